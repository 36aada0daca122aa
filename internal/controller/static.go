package controller

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"
)

// TokensFile is the JSON form of the static tokens file.
type TokensFile struct {
	Agents  []AgentToken  `json:"agents"`
	Portals []PortalToken `json:"portals"`
}

// AgentToken is one agent entry of a tokens file.
type AgentToken struct {
	Token             string    `json:"token"`
	OrganizationID    string    `json:"organizationId"`
	RegisteredAgentID string    `json:"registeredAgentId"`
	Expires           time.Time `json:"expires"`
	NewToken          string    `json:"newToken,omitempty"`
}

// PortalToken is one portal entry of a tokens file.
type PortalToken struct {
	Token            string    `json:"token"`
	OrganizationID   string    `json:"organizationId"`
	SubOrganizations []string  `json:"subOrganizations,omitempty"`
	Impersonated     bool      `json:"impersonated,omitempty"`
	Expires          time.Time `json:"expires"`
}

// Static validates tokens listed in a tokens file. Tokens are looked up by
// their SHA-256, so lookups take the same time whatever the token.
type Static struct {
	now     func() time.Time
	agents  map[[32]byte]AgentToken
	portals map[[32]byte]PortalToken
}

var _ Controller = (*Static)(nil)

// LoadTokensFile reads and checks a tokens file.
func LoadTokensFile(path string, now func() time.Time) (*Static, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read tokens file: %w", err)
	}
	// A misspelt field would be dropped silently, and a token meant to
	// expire would never expire.
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f TokensFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse tokens file %s: %w", path, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("parse tokens file %s: data after the JSON object", path)
	}
	return NewStatic(f, now)
}

// NewStatic builds a Static controller from the entries of f. now may be
// nil for time.Now.
func NewStatic(f TokensFile, now func() time.Time) (*Static, error) {
	if now == nil {
		now = time.Now
	}
	s := &Static{now: now, agents: map[[32]byte]AgentToken{}, portals: map[[32]byte]PortalToken{}}
	for i, a := range f.Agents {
		switch {
		case a.Token == "":
			return nil, fmt.Errorf("agents[%d]: token is empty", i)
		case a.OrganizationID == "":
			return nil, fmt.Errorf("agents[%d]: organizationId is empty", i)
		case a.RegisteredAgentID == "":
			return nil, fmt.Errorf("agents[%d]: registeredAgentId is empty", i)
		}
		k := sha256.Sum256([]byte(a.Token))
		if _, dup := s.agents[k]; dup {
			return nil, fmt.Errorf("agents[%d]: token listed twice", i)
		}
		s.agents[k] = a
	}
	for i, p := range f.Portals {
		switch {
		case p.Token == "":
			return nil, fmt.Errorf("portals[%d]: token is empty", i)
		case p.OrganizationID == "":
			return nil, fmt.Errorf("portals[%d]: organizationId is empty", i)
		}
		k := sha256.Sum256([]byte(p.Token))
		if _, dup := s.portals[k]; dup {
			return nil, fmt.Errorf("portals[%d]: token listed twice", i)
		}
		s.portals[k] = p
	}
	return s, nil
}

// Len reports how many agent and portal tokens s knows.
func (s *Static) Len() (agents, portals int) { return len(s.agents), len(s.portals) }

// ValidateAgent looks the token up among the agent tokens.
func (s *Static) ValidateAgent(_ context.Context, token string) (Agent, error) {
	a, ok := s.agents[sha256.Sum256([]byte(token))]
	if !ok {
		return Agent{}, fmt.Errorf("%w: unknown agent token", ErrRejected)
	}
	if !a.Expires.IsZero() && !s.now().Before(a.Expires) {
		return Agent{}, fmt.Errorf("%w: token expired at %s", ErrRejected, a.Expires.Format(time.RFC3339))
	}
	return Agent{OrganizationID: a.OrganizationID, RegisteredAgentID: a.RegisteredAgentID, Expires: a.Expires, NewToken: a.NewToken}, nil
}

// ValidatePortal looks the token up among the portal tokens.
func (s *Static) ValidatePortal(_ context.Context, token string, includeSubOrgs bool) (Portal, error) {
	p, ok := s.portals[sha256.Sum256([]byte(token))]
	if !ok {
		return Portal{}, fmt.Errorf("%w: unknown portal token", ErrRejected)
	}
	if !p.Expires.IsZero() && !s.now().Before(p.Expires) {
		return Portal{}, fmt.Errorf("%w: token expired at %s", ErrRejected, p.Expires.Format(time.RFC3339))
	}
	out := Portal{OrganizationID: p.OrganizationID, Impersonated: p.Impersonated, Expires: p.Expires}
	if includeSubOrgs {
		out.SubOrganizations = append([]string(nil), p.SubOrganizations...)
	}
	return out, nil
}
