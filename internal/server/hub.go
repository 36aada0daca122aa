package server

import (
	"slices"
	"sync"

	"github.com/machineservice/machineservice/wire"
)

// hub indexes this instance's connections.
type hub struct {
	mu sync.RWMutex
	// all holds every open connection, authenticated or not.
	all map[*conn]struct{}
	// byClient holds authenticated connections by client id. Client ids
	// are unique within an organization, so there is rarely more than one.
	byClient map[string][]*conn
	// byAgent holds authenticated agents by registered agent id, newest
	// last.
	byAgent map[string][]*conn
	// portals holds authenticated portals under every organization they
	// see.
	portals map[string]map[*conn]struct{}
}

func (h *hub) init() {
	h.all = map[*conn]struct{}{}
	h.byClient = map[string][]*conn{}
	h.byAgent = map[string][]*conn{}
	h.portals = map[string]map[*conn]struct{}{}
}

func (h *hub) add(c *conn) {
	h.mu.Lock()
	h.all[c] = struct{}{}
	h.mu.Unlock()
}

// remove forgets c entirely.
func (h *hub) remove(c *conn, id *identity) {
	h.mu.Lock()
	delete(h.all, c)
	if id != nil {
		h.unindexLocked(c, id)
	}
	h.mu.Unlock()
}

// authenticated indexes c under its new identity, replacing old (c's
// previous identity, or nil). It returns the connection the same client
// held before in the same organization, which the caller closes. A client
// id held in the organization by a client of the other role, or by
// another registered agent, is not taken over: c is not indexed and
// taken reports it.
func (h *hub) authenticated(c *conn, old, id *identity) (replaced *conn, taken bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, open := h.all[c]; !open {
		return nil, false
	}
	for _, other := range h.byClient[id.clientID] {
		oid := other.identity()
		if other == c || oid == nil || oid.orgID != id.orgID {
			continue
		}
		if oid.role != id.role || oid.registeredAgentID != id.registeredAgentID {
			return nil, true
		}
		replaced = other
		h.unindexLocked(other, oid)
		break
	}
	if old != nil {
		h.unindexLocked(c, old)
	}
	h.byClient[id.clientID] = append(h.byClient[id.clientID], c)
	if c.role == wire.ClientTypeAgent {
		h.byAgent[id.registeredAgentID] = append(h.byAgent[id.registeredAgentID], c)
	} else {
		for _, org := range id.orgs {
			set := h.portals[org]
			if set == nil {
				set = map[*conn]struct{}{}
				h.portals[org] = set
			}
			set[c] = struct{}{}
		}
	}
	return replaced, false
}

// taken reports whether the client id of id is held in its organization
// by another connection that authenticated cannot take over.
func (h *hub) taken(c *conn, id *identity) bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	for _, other := range h.byClient[id.clientID] {
		if oid := other.identity(); other != c && oid != nil && oid.orgID == id.orgID &&
			(oid.role != id.role || oid.registeredAgentID != id.registeredAgentID) {
			return true
		}
	}
	return false
}

func (h *hub) unindexLocked(c *conn, id *identity) {
	h.byClient[id.clientID] = without(h.byClient[id.clientID], c)
	if len(h.byClient[id.clientID]) == 0 {
		delete(h.byClient, id.clientID)
	}
	if c.role == wire.ClientTypeAgent {
		h.byAgent[id.registeredAgentID] = without(h.byAgent[id.registeredAgentID], c)
		if len(h.byAgent[id.registeredAgentID]) == 0 {
			delete(h.byAgent, id.registeredAgentID)
		}
		return
	}
	for _, org := range id.orgs {
		if set := h.portals[org]; set != nil {
			delete(set, c)
			if len(set) == 0 {
				delete(h.portals, org)
			}
		}
	}
}

func without(list []*conn, c *conn) []*conn {
	for i, x := range list {
		if x == c {
			return append(list[:i:i], list[i+1:]...)
		}
	}
	return list
}

// client finds the authenticated connection of clientID, preferring one
// that from may reach.
func (h *hub) client(clientID string, from *identity) *conn {
	h.mu.RLock()
	defer h.mu.RUnlock()
	list := h.byClient[clientID]
	for _, c := range list {
		if id := c.identity(); id != nil && mayReach(from, id) {
			return c
		}
	}
	if len(list) > 0 {
		return list[0]
	}
	return nil
}

// agent finds the newest connection of a registered agent, in
// organization org when org is not empty.
func (h *hub) agent(registeredAgentID, org string) *conn {
	h.mu.RLock()
	defer h.mu.RUnlock()
	list := h.byAgent[registeredAgentID]
	for i := len(list) - 1; i >= 0; i-- {
		if id := list[i].identity(); id != nil && (org == "" || id.orgID == org) {
			return list[i]
		}
	}
	return nil
}

// portalsOf lists the authenticated portals that see organization org.
func (h *hub) portalsOf(org string) []*conn {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := make([]*conn, 0, len(h.portals[org]))
	for c := range h.portals[org] {
		out = append(out, c)
	}
	return out
}

func (h *hub) snapshot() []*conn {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := make([]*conn, 0, len(h.all))
	for c := range h.all {
		out = append(out, c)
	}
	return out
}

func (h *hub) count() int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.all)
}

// mayReach reports whether a client may send to another: relays go
// between a portal and an agent only (an agent token must not drive other
// agents), and the target is in one of the sender's organizations, or the
// sender is an agent in one of the target's (a portal that was granted a
// sub-organization).
func mayReach(from, to *identity) bool {
	if from.role == to.role {
		return false
	}
	if slices.Contains(from.orgs, to.orgID) {
		return true
	}
	return from.role == wire.ClientTypeAgent && slices.Contains(to.orgs, from.orgID)
}
