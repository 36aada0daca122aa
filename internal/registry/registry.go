// Package registry keeps the list of connected clients that portals are
// shown: one entry per client id and organization, with the instance that
// holds the connection.
package registry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// Client is one registered connection.
type Client struct {
	ClientID              string
	OrganizationID        string
	Type                  wire.ClientType
	ConnectionID          string
	InstanceID            string
	MachineServerURI      string
	ClientVersion         string
	MachineRegistrationID string // the registered agent id
	ClientIP              string
	FirstSeen             time.Time
	LastUpdated           time.Time
}

// Registration returns the entry as a list answer carries it.
func (c Client) Registration() wire.ClientRegistration {
	return wire.ClientRegistration{
		ClientID:              c.ClientID,
		ClientVersion:         c.ClientVersion,
		OrganizationID:        c.OrganizationID,
		MachineRegistrationID: c.MachineRegistrationID,
		MachineServerURI:      c.MachineServerURI,
		Type:                  c.Type,
		LastUpdated:           c.LastUpdated.UTC(),
		GatewayID:             c.InstanceID,
		LastUpdatedOn:         c.LastUpdated.UTC(),
	}
}

// Registry stores registrations. Implementations are safe for concurrent
// use.
type Registry interface {
	// Register adds or replaces the entry for (ClientID, OrganizationID).
	// It fails with ErrConflict when a fresh entry under that key belongs,
	// on another connection, to a client of another type or another
	// registered agent id.
	Register(ctx context.Context, c Client) error
	// Touch marks the entry as seen now, if the connection still owns it.
	Touch(ctx context.Context, clientID, organizationID, connectionID string) error
	// Unregister removes the entry, if the connection still owns it; a
	// newer connection's entry for the same client is left alone.
	Unregister(ctx context.Context, clientID, organizationID, connectionID string) error
	// Lookup returns the fresh entry of a client, in any of the
	// organizations, and false when there is none.
	Lookup(ctx context.Context, clientID string, organizationIDs []string) (Client, bool, error)
	// LookupAgent returns the fresh entry of the agent with a registered
	// agent id, in organization organizationID (any when empty), and false
	// when there is none. With several, the most recently updated wins.
	LookupAgent(ctx context.Context, registeredAgentID, organizationID string) (Client, bool, error)
	// Locate returns the fresh entries of a client id in every
	// organization, so a relay can find the instance that holds a client
	// whose organization the sender does not know.
	Locate(ctx context.Context, clientID string) ([]Client, error)
	// Agents lists the agents of the organizations that were refreshed
	// within the client timeout, ordered by organization and client id.
	Agents(ctx context.Context, organizationIDs []string) ([]Client, error)
}

// ErrConflict means Register found the client id taken, in the same
// organization, by a client of another type or another registered agent:
// the newcomer is refused rather than allowed to push the other out.
var ErrConflict = errors.New("client id taken by another client")

// sameClient tells whether two entries under one key describe the same
// client: a reconnection, or a connection authenticating again, rather
// than a newcomer claiming its client id.
func sameClient(a, b Client) bool {
	return a.ConnectionID == b.ConnectionID ||
		a.Type == b.Type && a.MachineRegistrationID == b.MachineRegistrationID
}

// conflict is the error of a register that old's entry refuses.
func conflict(old, c Client) error {
	holder := "a portal"
	if old.Type == wire.ClientTypeAgent {
		holder = fmt.Sprintf("an agent with registered agent id %q", old.MachineRegistrationID)
	}
	return fmt.Errorf("register %s %s: %w: %s", c.Type, c.ClientID, ErrConflict, holder)
}

// ErrUnavailable means the registry's store cannot be reached.
var ErrUnavailable = errors.New("registry unavailable")
