// Package controller defines what the server asks of its controller, the
// service that validates agent and portal tokens, and implements the
// built-in controller: static tokens from a file and JWT verification.
package controller

import (
	"context"
	"errors"
	"time"
)

// Agent is what the controller knows of an agent's token.
type Agent struct {
	OrganizationID    string
	RegisteredAgentID string
	Expires           time.Time // zero: no expiry
	// NewToken, when set, replaces the agent's token, which is about to
	// expire.
	NewToken string
}

// Portal is what the controller knows of a portal's token.
type Portal struct {
	OrganizationID   string
	SubOrganizations []string // only when asked for
	Impersonated     bool
	Expires          time.Time // zero: no expiry
}

// Controller validates tokens. Implementations are safe for concurrent use.
type Controller interface {
	// ValidateAgent validates an agent token.
	ValidateAgent(ctx context.Context, token string) (Agent, error)
	// ValidatePortal validates a portal token; includeSubOrgs asks for the
	// organization's sub-organizations too.
	ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (Portal, error)
}

// Errors a Controller returns. Other errors mean the controller could not
// be asked.
var (
	// ErrRejected means the token is not valid.
	ErrRejected = errors.New("token rejected")
	// ErrAgentNotFound means the token is well formed but names no
	// registered agent.
	ErrAgentNotFound = errors.New("agent not found")
	// ErrUnavailable means the controller did not answer in time or could
	// not be reached.
	ErrUnavailable = errors.New("controller unavailable")
)

// None rejects every token. It is the controller of a development server
// that was given no tokens.
type None struct{}

// ValidateAgent rejects the token.
func (None) ValidateAgent(context.Context, string) (Agent, error) {
	return Agent{}, errors.Join(ErrRejected, errors.New("no tokens are configured"))
}

// ValidatePortal rejects the token.
func (None) ValidatePortal(context.Context, string, bool) (Portal, error) {
	return Portal{}, errors.Join(ErrRejected, errors.New("no tokens are configured"))
}

var _ Controller = None{}
