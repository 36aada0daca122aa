package bus

import (
	"encoding/json"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// DefaultSubjectPrefix starts every subject unless configured otherwise.
const DefaultSubjectPrefix = "machineservice"

// MessageAgentNotFound is what a controller's rejection message contains
// when the token is valid but names no registered agent; the original
// server tells the two apart by it.
const MessageAgentNotFound = "Agent not found"

// ValidateAgentRequest is the request on <prefix>.auth.agent.
type ValidateAgentRequest struct {
	Token string `json:"token"`
}

// ValidatePortalRequest is the request on <prefix>.auth.portal.
type ValidatePortalRequest struct {
	Token          string `json:"token"`
	IncludeSubOrgs bool   `json:"includeSubOrgs"`
}

// TokenValidationResponse is a controller's answer to either validation
// request. Fields a controller leaves out or sets to null are empty.
type TokenValidationResponse struct {
	Success           bool       `json:"success"`
	OrganizationID    string     `json:"organizationId"`
	RegisteredAgentID string     `json:"registeredAgentId"`
	Expires           *time.Time `json:"expires"`
	NewToken          string     `json:"newToken"`
	Message           string     `json:"message"`
	IsImpersonated    bool       `json:"isImpersonated"`
	SubOrganizations  []string   `json:"subOrganizations"`
}

// agentValidationReply and portalValidationReply are the shapes the
// built-in controller writes: each kind has its own fields, absent values
// written as null.
type agentValidationReply struct {
	Success           bool       `json:"success"`
	OrganizationID    *string    `json:"organizationId"`
	RegisteredAgentID *string    `json:"registeredAgentId"`
	Expires           *time.Time `json:"expires"`
	NewToken          *string    `json:"newToken"`
	Message           *string    `json:"message"`
}

type portalValidationReply struct {
	Success          bool       `json:"success"`
	OrganizationID   *string    `json:"organizationId"`
	Expires          *time.Time `json:"expires"`
	Message          *string    `json:"message"`
	IsImpersonated   bool       `json:"isImpersonated"`
	SubOrganizations []string   `json:"subOrganizations"`
}

// ListChanged is published on <prefix>.events.list when an agent of an
// organization connects or disconnects; every instance then pushes a fresh
// list to its portals of that organization.
type ListChanged struct {
	OrganizationID string `json:"organizationId"`
	// InstanceID is the publisher, which has already told its own portals.
	InstanceID string `json:"instanceId"`
}

// Sender is the authenticated identity of a client whose message is
// relayed to another instance.
type Sender struct {
	ClientID       string          `json:"clientId"`
	OrganizationID string          `json:"organizationId"`
	Organizations  []string        `json:"organizations"` // OrganizationID first, then granted sub-organizations
	Role           wire.ClientType `json:"role"`
	Impersonated   bool            `json:"impersonated"`
}

// RelayResult is what the instance holding a relay's target did with it.
type RelayResult string

// Relay results.
const (
	// RelayOK means the message was queued for the target.
	RelayOK RelayResult = "ok"
	// RelayDenied means the sender may not reach the target: the sender's
	// instance closes it with Access denied.
	RelayDenied RelayResult = "denied"
	// RelayUnavailable means the target is not connected there.
	RelayUnavailable RelayResult = "unavailable"
)

// relayRequest is the request on <prefix>.instance.<id>.relay.
type relayRequest struct {
	// Envelope is the message as its sender wrote it, its payload in the
	// sender's style so it reaches the target unchanged.
	Envelope json.RawMessage `json:"envelope"`
	Sender   Sender          `json:"sender"`
}

type relayReply struct {
	Result RelayResult `json:"result"`
}
