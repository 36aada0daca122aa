package wire

import (
	"encoding/json"
	"time"
)

// ProtocolVersion is the protocol version this package speaks.
const ProtocolVersion = 1

// SupportedProtocolVersions lists the versions a server accepts.
var SupportedProtocolVersions = []int{ProtocolVersion}

// Welcome is the payload of the welcome message.
type Welcome struct {
	PublicKeyHash             string  `json:"publicKeyHash"`
	MachineName               string  `json:"machineName"`
	ServerVersion             string  `json:"serverVersion"`
	Nonce                     *string `json:"nonce"`
	SupportedProtocolVersions []int   `json:"supportedProtocolVersions"`
}

// AuthRequest is the payload of auth (agents) and authportal (portals).
type AuthRequest struct {
	// Token is the access token. The specification also calls it jwToken;
	// both names are read, Token wins when both are given.
	Token           string             `json:"token"`
	PublicKey       string             `json:"publicKey,omitempty"`
	ClientVersion   string             `json:"clientVersion"`
	ProtocolVersion int                `json:"protocolVersion"`
	IncludeSubOrgs  bool               `json:"includeSubOrgs,omitempty"`
	Metadata        map[string]*string `json:"metadata,omitempty"`
}

// UnmarshalJSON reads both token names.
func (a *AuthRequest) UnmarshalJSON(data []byte) error {
	type plain AuthRequest
	aux := struct {
		*plain
		JwToken string `json:"jwToken"`
	}{plain: (*plain)(a)}
	if err := json.Unmarshal(data, &aux); err != nil {
		return err
	}
	if a.Token == "" {
		a.Token = aux.JwToken
	}
	return nil
}

// AuthResult is the payload of the answer to auth and authportal.
type AuthResult struct {
	Accepted         bool    `json:"accepted"`
	WillReplaceToken bool    `json:"willReplaceToken"`
	NewToken         *string `json:"newToken"`
}

// ClientType tells agents from portals in a ClientRegistration. It is
// written as a number, as the original does.
type ClientType int

// Client types.
const (
	ClientTypeAgent  ClientType = 1
	ClientTypePortal ClientType = 2
)

// String returns "agent" or "portal".
func (t ClientType) String() string {
	switch t {
	case ClientTypeAgent:
		return "agent"
	case ClientTypePortal:
		return "portal"
	}
	return "unknown"
}

// ClientRegistration is one entry of a list answer.
type ClientRegistration struct {
	ClientID              string     `json:"clientId"`
	ClientVersion         string     `json:"clientVersion"`
	OrganizationID        string     `json:"organizationId"`
	MachineRegistrationID string     `json:"machineRegistrationId"`
	MachineServerURI      string     `json:"machineServerUri"`
	Type                  ClientType `json:"type"`
	LastUpdated           time.Time  `json:"lastUpdated"`
	// GatewayID and LastUpdatedOn repeat the instance id and LastUpdated
	// under the names the original also writes.
	GatewayID     string    `json:"gatewayId"`
	LastUpdatedOn time.Time `json:"lastUpdatedOn"`
}

// ControlRequest is the payload the server sends an agent in a control
// message.
type ControlRequest struct {
	Command    string             `json:"command"`
	Parameters map[string]*string `json:"parameters"`
}

// ControlResponse is the agent's answer to a control message.
type ControlResponse struct {
	Success      bool               `json:"success"`
	Output       map[string]*string `json:"output"`
	ErrorMessage *string            `json:"errorMessage"`
}

// CommandRequest is what a Duplicati portal sends an agent in a command
// message. The server never reads it: command payloads are relayed as they
// are. Clients use it.
type CommandRequest struct {
	Method  string            `json:"method"`
	Path    string            `json:"path"`
	Body    *string           `json:"body"` // base64
	Headers map[string]string `json:"headers"`
}

// CommandResponse is a Duplicati agent's answer to a CommandRequest.
type CommandResponse struct {
	StatusCode int               `json:"statusCode"`
	Body       *string           `json:"body"` // base64
	Headers    map[string]string `json:"headers"`
}

// Certificate is one entry of the server certificate list that agents fetch
// to learn the server's public keys.
type Certificate struct {
	PublicKeyHash string    `json:"publicKeyHash"`
	PublicKey     string    `json:"publicKey"`
	Obtained      time.Time `json:"obtained"`
	Expiry        time.Time `json:"expiry"`
}
