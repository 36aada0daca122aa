package registry

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// DefaultClientTimeout is how long an entry stays listed without a refresh.
const DefaultClientTimeout = 5 * time.Minute

// Memory is a Registry for a single instance.
type Memory struct {
	timeout time.Duration
	now     func() time.Time

	mu      sync.Mutex
	clients map[key]Client
}

type key struct{ client, org string }

var _ Registry = (*Memory)(nil)

// NewMemory returns an empty registry. timeout <= 0 means
// DefaultClientTimeout; now may be nil for time.Now.
func NewMemory(timeout time.Duration, now func() time.Time) *Memory {
	if timeout <= 0 {
		timeout = DefaultClientTimeout
	}
	if now == nil {
		now = time.Now
	}
	return &Memory{timeout: timeout, now: now, clients: map[key]Client{}}
}

// Register adds or replaces the entry, unless a fresh entry under the
// key is another client's (ErrConflict).
func (m *Memory) Register(_ context.Context, c Client) error {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	k := key{c.ClientID, c.OrganizationID}
	old, ok := m.clients[k]
	if ok && !sameClient(old, c) {
		if old.LastUpdated.After(now.Add(-m.timeout)) {
			return conflict(old, c)
		}
		ok = false // a stale entry of another client: this one is new
	}
	if ok && !old.FirstSeen.IsZero() {
		c.FirstSeen = old.FirstSeen
	} else {
		c.FirstSeen = now
	}
	c.LastUpdated = now
	m.clients[k] = c
	return nil
}

// Touch refreshes the entry.
func (m *Memory) Touch(_ context.Context, clientID, organizationID, connectionID string) error {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	k := key{clientID, organizationID}
	if c, ok := m.clients[k]; ok && c.ConnectionID == connectionID {
		c.LastUpdated = now
		m.clients[k] = c
	}
	return nil
}

// Unregister removes the entry.
func (m *Memory) Unregister(_ context.Context, clientID, organizationID, connectionID string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := key{clientID, organizationID}
	if c, ok := m.clients[k]; ok && c.ConnectionID == connectionID {
		delete(m.clients, k)
	}
	return nil
}

// Agents lists fresh agents of the organizations.
func (m *Memory) Agents(_ context.Context, organizationIDs []string) ([]Client, error) {
	orgs := make(map[string]bool, len(organizationIDs))
	for _, o := range organizationIDs {
		orgs[o] = true
	}
	cutoff := m.now().Add(-m.timeout)
	m.mu.Lock()
	out := make([]Client, 0, 8)
	for _, c := range m.clients {
		if c.Type == wire.ClientTypeAgent && orgs[c.OrganizationID] && c.LastUpdated.After(cutoff) {
			out = append(out, c)
		}
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].OrganizationID != out[j].OrganizationID {
			return out[i].OrganizationID < out[j].OrganizationID
		}
		return out[i].ClientID < out[j].ClientID
	})
	return out, nil
}

// Lookup returns the fresh entry of a client in one of the organizations.
func (m *Memory) Lookup(_ context.Context, clientID string, organizationIDs []string) (Client, bool, error) {
	cutoff := m.now().Add(-m.timeout)
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range organizationIDs {
		if c, ok := m.clients[key{clientID, o}]; ok && c.LastUpdated.After(cutoff) {
			return c, true, nil
		}
	}
	return Client{}, false, nil
}

// LookupAgent returns the fresh entry of a registered agent.
func (m *Memory) LookupAgent(_ context.Context, registeredAgentID, organizationID string) (Client, bool, error) {
	cutoff := m.now().Add(-m.timeout)
	m.mu.Lock()
	defer m.mu.Unlock()
	var best Client
	found := false
	for _, c := range m.clients {
		if c.Type != wire.ClientTypeAgent || c.MachineRegistrationID != registeredAgentID || !c.LastUpdated.After(cutoff) {
			continue
		}
		if organizationID != "" && c.OrganizationID != organizationID {
			continue
		}
		if !found || c.LastUpdated.After(best.LastUpdated) {
			best, found = c, true
		}
	}
	return best, found, nil
}

// Locate returns the fresh entries of a client in every organization.
func (m *Memory) Locate(_ context.Context, clientID string) ([]Client, error) {
	cutoff := m.now().Add(-m.timeout)
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Client
	for k, c := range m.clients {
		if k.client == clientID && c.LastUpdated.After(cutoff) {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].OrganizationID < out[j].OrganizationID })
	return out, nil
}
