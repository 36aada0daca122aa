// Package bus holds the controller contract: the messages the server and
// its controller exchange, and the publisher of the server's events. Local
// is the in-process implementation for a stand-alone server; NATS carries
// the contract over NATS and, between instances, relays, control requests
// and list changes.
package bus

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// ActivityType tells what an agent did.
type ActivityType string

// Activity types.
const (
	ActivityConnected    ActivityType = "Connected"
	ActivityPing         ActivityType = "Ping"
	ActivityDisconnected ActivityType = "Disconnected"
)

// AgentActivity is published when an agent connects, pings or disconnects.
type AgentActivity struct {
	ActivityType      ActivityType       `json:"activityType"`
	ActivityTimestamp time.Time          `json:"activityTimestamp"`
	RegisteredAgentID string             `json:"registeredAgentId"`
	OrganizationID    string             `json:"organizationId"`
	ClientVersion     string             `json:"clientVersion"`
	Metadata          map[string]*string `json:"metadata"`
}

// Certificate announces the server's public key to the controller.
type Certificate struct {
	HashedPublicKey string    `json:"hashedPublicKey"`
	PublicKey       string    `json:"publicKey"`
	ClientID        string    `json:"clientId"`
	Expires         time.Time `json:"expires"`
}

// ControlRequest asks for a control command to be sent to an agent, by its
// registered agent id.
type ControlRequest struct {
	AgentID        string             `json:"agentId"`
	OrganizationID string             `json:"organizationId"`
	Command        string             `json:"command"`
	Settings       map[string]*string `json:"settings"`
	SentTime       time.Time          `json:"sentTime"`
}

// ControlResponse is the answer to a ControlRequest.
type ControlResponse struct {
	AgentID        string             `json:"agentId"`
	OrganizationID string             `json:"organizationId"`
	Settings       map[string]*string `json:"settings"`
	Success        bool               `json:"success"`
	Message        string             `json:"message"`
}

// Publisher sends the server's events. Implementations are safe for
// concurrent use and do not block for long.
type Publisher interface {
	PublishActivity(ctx context.Context, a AgentActivity) error
	PublishCertificate(ctx context.Context, c Certificate) error
}

// Local is the in-process Publisher: it logs each event at debug level and
// hands it to the subscribers.
type Local struct {
	log *slog.Logger

	mu          sync.Mutex
	activity    []func(AgentActivity)
	certificate []func(Certificate)
}

var _ Publisher = (*Local)(nil)

// NewLocal returns a Local publisher that logs to log (nil: no logging).
func NewLocal(log *slog.Logger) *Local {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Local{log: log}
}

// OnActivity adds a subscriber for activity events.
func (l *Local) OnActivity(f func(AgentActivity)) {
	l.mu.Lock()
	l.activity = append(l.activity, f)
	l.mu.Unlock()
}

// OnCertificate adds a subscriber for certificate events.
func (l *Local) OnCertificate(f func(Certificate)) {
	l.mu.Lock()
	l.certificate = append(l.certificate, f)
	l.mu.Unlock()
}

// PublishActivity delivers a to the subscribers.
func (l *Local) PublishActivity(_ context.Context, a AgentActivity) error {
	l.log.Debug("agent activity", "type", a.ActivityType, "agent", a.RegisteredAgentID, "org", a.OrganizationID)
	l.mu.Lock()
	subs := l.activity
	l.mu.Unlock()
	for _, f := range subs {
		f(a)
	}
	return nil
}

// PublishCertificate delivers c to the subscribers.
func (l *Local) PublishCertificate(_ context.Context, c Certificate) error {
	l.log.Debug("server certificate", "hash", c.HashedPublicKey, "expires", c.Expires)
	l.mu.Lock()
	subs := l.certificate
	l.mu.Unlock()
	for _, f := range subs {
		f(c)
	}
	return nil
}
