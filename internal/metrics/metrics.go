// Package metrics holds the server's Prometheus collectors, all in this
// file, and the HTTP handler that serves them with the readiness check.
//
// A nil *Metrics is valid and records nothing, so the server can run
// without metrics.
package metrics

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// Label values.
const (
	KindCommand = "command"
	KindControl = "control"

	RequestValidateAgent  = "validate_agent"
	RequestValidatePortal = "validate_portal"
)

// Results of auth_total and relay_total.
var (
	authResults  = []string{"success", "failure", "timeout", "not_found"}
	relayResults = []string{"success", "unavailable", "denied", "failure", "stale"}
	roles        = []string{"agent", "portal"}
)

// Rules of rejected_total: the protection rules that turn requests away.
const (
	RuleBlacklist           = "blacklist"
	RuleRateLimit           = "rate_limit"
	RuleScanner             = "scanner"
	RuleOrigin              = "origin"
	RuleMaxConnections      = "max_connections"
	RuleMaxConnectionsPerIP = "max_connections_per_ip"
)

var rules = []string{RuleBlacklist, RuleRateLimit, RuleScanner, RuleOrigin, RuleMaxConnections, RuleMaxConnectionsPerIP}

// Metrics is the server's collectors.
type Metrics struct {
	connections   *prometheus.GaugeVec
	auth          *prometheus.CounterVec
	relay         *prometheus.CounterVec
	closes        *prometheus.CounterVec
	rejected      *prometheus.CounterVec
	relayDuration *prometheus.HistogramVec
	busDuration   *prometheus.HistogramVec

	// counted is read-only after New.
	counted map[stats.Counter]prometheus.Counter
}

var _ stats.Observer = (*Metrics)(nil)

// New creates the collectors and registers them with reg. closeReasons are
// the names connections close under; each gets a series at zero.
func New(reg prometheus.Registerer, closeReasons []string) (*Metrics, error) {
	m := &Metrics{
		connections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "machineservice_connections",
			Help: "Open WebSocket connections by role and whether they are authenticated.",
		}, []string{"role", "authenticated"}),
		auth: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "machineservice_auth_total",
			Help: "Authentications by role and result.",
		}, []string{"role", "result"}),
		relay: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "machineservice_relay_total",
			Help: "Relayed command messages and control requests by result.",
		}, []string{"kind", "result"}),
		closes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "machineservice_closes_total",
			Help: "Closed connections by close reason.",
		}, []string{"reason"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "machineservice_rejected_requests_total",
			Help: "HTTP requests and upgrades turned away by a protection rule.",
		}, []string{"rule"}),
		relayDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "machineservice_relay_duration_seconds",
			Help:    "Round trips through agents: a portal's command to the agent's answer, a control request to its answer.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"kind"}),
		busDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "machineservice_bus_request_duration_seconds",
			Help:    "Requests to the controller: token validations.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"request"}),
		counted: map[stats.Counter]prometheus.Counter{},
	}
	for _, c := range []prometheus.Collector{m.connections, m.auth, m.relay, m.closes, m.rejected, m.relayDuration, m.busDuration} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	// Every series exists from the start, so rates and alerts see zeros
	// rather than gaps.
	for _, r := range roles {
		m.connections.WithLabelValues(r, "false")
		m.connections.WithLabelValues(r, "true")
		for _, res := range authResults {
			m.auth.WithLabelValues(r, res)
		}
	}
	for _, k := range []string{KindCommand, KindControl} {
		for _, res := range relayResults {
			m.relay.WithLabelValues(k, res)
		}
		m.relayDuration.WithLabelValues(k)
	}
	for _, r := range closeReasons {
		m.closes.WithLabelValues(r)
	}
	for _, r := range rules {
		m.rejected.WithLabelValues(r)
	}
	for _, q := range []string{RequestValidateAgent, RequestValidatePortal} {
		m.busDuration.WithLabelValues(q)
	}

	m.mapCounter(stats.AuthClientSuccess, m.auth, "agent", "success")
	m.mapCounter(stats.AuthClientFailure, m.auth, "agent", "failure")
	m.mapCounter(stats.AuthClientTimeoutFailure, m.auth, "agent", "timeout")
	m.mapCounter(stats.AuthClientNotFound, m.auth, "agent", "not_found")
	m.mapCounter(stats.AuthPortalSuccess, m.auth, "portal", "success")
	m.mapCounter(stats.AuthPortalFailure, m.auth, "portal", "failure")
	m.mapCounter(stats.AuthPortalTimeoutFailure, m.auth, "portal", "timeout")
	m.mapCounter(stats.CommandRelaySuccess, m.relay, KindCommand, "success")
	m.mapCounter(stats.CommandRelayDestinationNotAvailable, m.relay, KindCommand, "unavailable")
	m.mapCounter(stats.CommandRelayDenied, m.relay, KindCommand, "denied")
	m.mapCounter(stats.ControlRelaySuccess, m.relay, KindControl, "success")
	m.mapCounter(stats.ControlRelayFailure, m.relay, KindControl, "failure")
	m.mapCounter(stats.ControlRelayDestinationNotAvailable, m.relay, KindControl, "unavailable")
	m.mapCounter(stats.ControlRelayDestinationNotAuthenticated, m.relay, KindControl, "denied")
	m.mapCounter(stats.ControlRelayStaleMessage, m.relay, KindControl, "stale")
	m.mapCounter(stats.RateLimitExceeded, m.rejected, RuleRateLimit)
	return m, nil
}

func (m *Metrics) mapCounter(c stats.Counter, vec *prometheus.CounterVec, labels ...string) {
	m.counted[c] = vec.WithLabelValues(labels...)
}

// Counted counts the series that statistics counter c stands for. The
// server's Stats calls it on every count (see stats.Observer), so the
// Prometheus counters and the statistics never disagree, and unlike the
// statistics they are never reset.
func (m *Metrics) Counted(c stats.Counter) {
	if m == nil {
		return
	}
	if counter, ok := m.counted[c]; ok {
		counter.Inc()
	}
}

// Rejected counts a request turned away by a protection rule. The rate
// limit is counted through Counted instead.
func (m *Metrics) Rejected(rule string) {
	if m == nil {
		return
	}
	m.rejected.WithLabelValues(rule).Inc()
}

// ObserveRelay records a round trip through an agent; kind is KindCommand
// or KindControl.
func (m *Metrics) ObserveRelay(kind string, d time.Duration) {
	if m == nil {
		return
	}
	m.relayDuration.WithLabelValues(kind).Observe(d.Seconds())
}

// ObserveBus records a request to the controller.
func (m *Metrics) ObserveBus(request string, d time.Duration) {
	if m == nil {
		return
	}
	m.busDuration.WithLabelValues(request).Observe(d.Seconds())
}

// Conn is one connection's place in the connections gauge. Its methods on
// Metrics move it between series exactly once each, however the
// connection's goroutines race. The zero value is ready.
type Conn struct {
	state atomic.Uint32
	role  string
}

const (
	connNew uint32 = iota
	connOpen
	connAuthenticated
	connClosed
)

// Opened counts a new connection as unauthenticated.
func (m *Metrics) Opened(c *Conn, role wire.ClientType) {
	if m == nil {
		return
	}
	c.role = role.String()
	if c.state.CompareAndSwap(connNew, connOpen) {
		m.connections.WithLabelValues(c.role, "false").Inc()
	}
}

// Authenticated moves an open connection to the authenticated series.
// Later calls (re-authentication) change nothing.
func (m *Metrics) Authenticated(c *Conn) {
	if m == nil {
		return
	}
	if c.state.CompareAndSwap(connOpen, connAuthenticated) {
		m.connections.WithLabelValues(c.role, "false").Dec()
		m.connections.WithLabelValues(c.role, "true").Inc()
	}
}

// Closed removes the connection from the gauge and counts its close
// reason.
func (m *Metrics) Closed(c *Conn, reason string) {
	if m == nil {
		return
	}
	switch c.state.Swap(connClosed) {
	case connOpen:
		m.connections.WithLabelValues(c.role, "false").Dec()
	case connAuthenticated:
		m.connections.WithLabelValues(c.role, "true").Dec()
	case connClosed:
		return
	}
	m.closes.WithLabelValues(reason).Inc()
}
