package server

import (
	"context"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/wire"
)

// ConnInfo describes one open connection.
type ConnInfo struct {
	ConnID            string
	Role              wire.ClientType
	Authenticated     bool
	ClientID          string // empty until authenticated
	OrganizationID    string
	RegisteredAgentID string
	RemoteIP          string
	ConnectedAt       time.Time
	BytesIn           int64
	BytesOut          int64
}

// Connections lists the open connections, oldest first.
func (s *Server) Connections() []ConnInfo {
	conns := s.hub.snapshot()
	out := make([]ConnInfo, 0, len(conns))
	for _, c := range conns {
		info := ConnInfo{
			ConnID:      c.connID,
			Role:        c.role,
			RemoteIP:    c.remoteIP,
			ConnectedAt: c.connectedAt,
			BytesIn:     c.nc.in.Load(),
			BytesOut:    c.nc.out.Load(),
		}
		if id := c.identity(); id != nil {
			info.Authenticated = true
			info.ClientID = id.clientID
			info.OrganizationID = id.orgID
			info.RegisteredAgentID = id.registeredAgentID
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].ConnectedAt.Equal(out[j].ConnectedAt) {
			return out[i].ConnectedAt.Before(out[j].ConnectedAt)
		}
		return out[i].ConnID < out[j].ConnID
	})
	return out
}

// Ready reports whether the server accepts connections: ErrNotServing
// before Serve, ErrShuttingDown once Shutdown has begun.
func (s *Server) Ready(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closing:
		return ErrShuttingDown
	case !s.serving:
		return ErrNotServing
	}
	return nil
}

var _ metrics.Checker = (*Server)(nil)

type frontKey int

const (
	clientIPKey frontKey = iota
	connHookKey
)

// WithClientIP tells the server the client's address as a front (the
// protection middleware, which knows the trusted proxies) established it;
// the server then uses it instead of the socket peer.
func WithClientIP(ctx context.Context, ip string) context.Context {
	return context.WithValue(ctx, clientIPKey, ip)
}

// WithConnHook asks the server to call accepted when the request becomes
// a WebSocket connection, in the goroutine serving the request; the
// function accepted returns runs once when that connection ends. A
// request that is not upgraded never calls accepted.
func WithConnHook(ctx context.Context, accepted func() (closed func())) context.Context {
	return context.WithValue(ctx, connHookKey, accepted)
}

func frontClientIP(r *http.Request) (string, bool) {
	ip, ok := r.Context().Value(clientIPKey).(string)
	return ip, ok && ip != ""
}

func connHook(r *http.Request) func() {
	if accepted, ok := r.Context().Value(connHookKey).(func() func()); ok && accepted != nil {
		return accepted()
	}
	return nil
}

// Relayed commands are timed from the portal's request to the agent's
// answer, matched by the agent's connection and the message id. An answer
// that never comes leaves an entry behind; entries older than
// relayTrackAge are dropped when the table fills up, and beyond
// maxRelayTracked commands are not timed.
const (
	maxRelayTracked = 10000
	relayTrackAge   = 5 * time.Minute
)

// relayTimes holds the start of each command awaiting its answer, by the
// agent's connection and the message id.
type relayTimes struct {
	mu      sync.Mutex
	started map[*conn]map[string]time.Time
	n       int
	sweptAt time.Time // last sweep of a full table
}

func (r *relayTimes) start(agent *conn, messageID string, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started == nil {
		r.started = map[*conn]map[string]time.Time{}
	}
	if r.n >= maxRelayTracked {
		if now.Sub(r.sweptAt) < time.Second {
			return // swept a moment ago: a full table is not swept per command
		}
		r.sweptAt = now
		for c, m := range r.started {
			for id, t := range m {
				if now.Sub(t) > relayTrackAge {
					delete(m, id)
					r.n--
				}
			}
			if len(m) == 0 {
				delete(r.started, c)
			}
		}
		if r.n >= maxRelayTracked {
			return
		}
	}
	m := r.started[agent]
	if m == nil {
		m = map[string]time.Time{}
		r.started[agent] = m
	}
	if _, dup := m[messageID]; !dup {
		r.n++
	}
	m[messageID] = now
}

func (r *relayTimes) stop(agent *conn, messageID string, now time.Time) (time.Duration, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.started[agent]
	t, ok := m[messageID]
	if !ok {
		return 0, false
	}
	delete(m, messageID)
	r.n--
	if len(m) == 0 {
		delete(r.started, agent)
	}
	return now.Sub(t), true
}

func (r *relayTimes) dropConn(c *conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n -= len(r.started[c])
	delete(r.started, c)
}

// timeRelay notes a command relayed from a portal to an agent, and times
// the agent's answer going back. It uses the monotonic clock, not s.now.
func (s *Server) timeRelay(from, to *conn, env *wire.Envelope) {
	if s.metrics == nil || env.Type != wire.TypeCommand || env.MessageID == "" {
		return
	}
	switch {
	case from.role == wire.ClientTypePortal && to.role == wire.ClientTypeAgent:
		s.relayTimes.start(to, env.MessageID, time.Now())
	case from.role == wire.ClientTypeAgent && to.role == wire.ClientTypePortal:
		if d, ok := s.relayTimes.stop(from, env.MessageID, time.Now()); ok {
			s.metrics.ObserveRelay(metrics.KindCommand, d)
		}
	}
}
