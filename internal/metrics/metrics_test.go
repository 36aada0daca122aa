package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	org         = "11111111-1111-1111-1111-111111111111"
	agentToken  = "agent-token"
	portalToken = "portal-token"
)

// flag is a readiness check the test turns on and off, standing in for a
// database or bus that goes away.
type flag struct{ down atomic.Bool }

func (f *flag) Ready(context.Context) error {
	if f.down.Load() {
		return errors.New("connection refused")
	}
	return nil
}

// env is a real server with metrics, and the metrics listener.
type env struct {
	t        *testing.T
	srv      *server.Server
	base     string // the server, http://127.0.0.1:port
	metrics  string // the metrics listener, http://127.0.0.1:port
	bus      *flag
	shutdown func() error
}

func start(t *testing.T) *env {
	t.Helper()
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = "test-instance"
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg, server.ReasonNames())
	if err != nil {
		t.Fatal(err)
	}
	st := stats.New()
	st.SetObserver(m)
	tokens, err := controller.NewStatic(controller.TokensFile{
		Agents:  []controller.AgentToken{{Token: agentToken, OrganizationID: org, RegisteredAgentID: "reg-1"}},
		Portals: []controller.PortalToken{{Token: portalToken, OrganizationID: org}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(cfg, server.Deps{
		Key:         testclient.Key(t, 0),
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(time.Hour),
		Controller:  metrics.TimeController(tokens, m),
		Stats:       st,
		Logger:      slog.New(slog.DiscardHandler),
		Metrics:     m,
	})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, srv: srv, bus: &flag{}}
	checks := []metrics.Check{{Name: "server", Checker: srv}, {Name: "bus", Checker: e.bus}}
	if c, ok := metrics.CheckOf("registry", registryLike{}); ok {
		checks = append(checks, c)
	}
	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.metrics = "http://" + ml.Addr().String()
	hs := &http.Server{Handler: metrics.Handler(reg, checks), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(ml) }() // ends with Close below

	if got := e.readyStatus(); got != http.StatusServiceUnavailable {
		t.Errorf("/ready before Serve = %d, want 503", got)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.base = "http://" + l.Addr().String()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	var once atomic.Bool
	e.shutdown = func() error {
		if !once.CompareAndSwap(false, true) {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := srv.Shutdown(ctx)
		if serr := <-served; serr != server.ErrServerClosed {
			t.Errorf("serve returned %v", serr)
		}
		return err
	}
	t.Cleanup(func() {
		if err := e.shutdown(); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		_ = hs.Close()
	})
	return e
}

// registryLike is a dependency without a readiness check, as the memory
// registry is: it does not take part.
type registryLike struct{}

func (e *env) readyStatus() int {
	e.t.Helper()
	code, _ := e.get("/ready")
	return code
}

func (e *env) get(path string) (int, string) {
	e.t.Helper()
	resp, err := http.Get(e.metrics + path)
	if err != nil {
		e.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// scrape reads /metrics as Prometheus does.
func (e *env) scrape() map[string]*dto.MetricFamily {
	e.t.Helper()
	resp, err := http.Get(e.metrics + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		e.t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// value returns a series' value (a histogram's sample count), or -1 when
// there is no such series.
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.Metric {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.Label {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

// expect polls until every series has its value.
func (e *env) expect(want map[string]float64) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		fams := e.scrape()
		var wrong []string
		for key, v := range want {
			parts := strings.Split(key, " ")
			if got := value(fams, parts[0], parts[1:]...); got != v {
				wrong = append(wrong, fmt.Sprintf("%s = %v, want %v", key, got, v))
			}
		}
		if len(wrong) == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("metrics:\n%s", strings.Join(wrong, "\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestEverySeriesStartsAtZero(t *testing.T) {
	e := start(t)
	fams := e.scrape()
	for _, role := range []string{"agent", "portal"} {
		for _, res := range []string{"success", "failure", "timeout", "not_found"} {
			if v := value(fams, "machineservice_auth_total", "role", role, "result", res); v != 0 {
				t.Errorf("auth_total{%s,%s} = %v", role, res, v)
			}
		}
		for _, a := range []string{"true", "false"} {
			if v := value(fams, "machineservice_connections", "role", role, "authenticated", a); v != 0 {
				t.Errorf("connections{%s,%s} = %v", role, a, v)
			}
		}
	}
	for _, kind := range []string{"command", "control"} {
		for _, res := range []string{"success", "unavailable", "denied", "failure", "stale"} {
			if v := value(fams, "machineservice_relay_total", "kind", kind, "result", res); v != 0 {
				t.Errorf("relay_total{%s,%s} = %v", kind, res, v)
			}
		}
		if v := value(fams, "machineservice_relay_duration_seconds", "kind", kind); v != 0 {
			t.Errorf("relay_duration_seconds{%s} count = %v", kind, v)
		}
	}
	for _, r := range server.ReasonNames() {
		if v := value(fams, "machineservice_closes_total", "reason", r); v != 0 {
			t.Errorf("closes_total{%s} = %v", r, v)
		}
	}
	for _, q := range []string{"validate_agent", "validate_portal"} {
		if v := value(fams, "machineservice_bus_request_duration_seconds", "request", q); v != 0 {
			t.Errorf("bus_request_duration_seconds{%s} count = %v", q, v)
		}
	}
	for _, r := range []string{"blacklist", "rate_limit", "scanner", "origin", "max_connections", "max_connections_per_ip"} {
		if v := value(fams, "machineservice_rejected_requests_total", "rule", r); v != 0 {
			t.Errorf("rejected_requests_total{%s} = %v", r, v)
		}
	}
}

// TestMetricsFollowTraffic authenticates, relays a command and a control
// request and closes connections, and reads the effect on /metrics.
func TestMetricsFollowTraffic(t *testing.T) {
	e := start(t)
	serverKey := &testclient.Key(t, 0).PublicKey

	agent := testclient.DialAgent(t, e.base, serverKey, 1)
	e.expect(map[string]float64{"machineservice_connections role agent authenticated false": 1})
	if !agent.AuthAgent(agentToken).Accepted {
		t.Fatal("agent refused")
	}
	portal := testclient.DialPortal(t, e.base)
	if !portal.AuthPortal(portalToken, false).Accepted {
		t.Fatal("portal refused")
	}
	rejected := testclient.DialAgent(t, e.base, serverKey, 2)
	if rejected.AuthAgent("wrong token").Accepted {
		t.Fatal("wrong token accepted")
	}
	e.expect(map[string]float64{
		"machineservice_auth_total role agent result success":                 1,
		"machineservice_auth_total role agent result failure":                 1,
		"machineservice_auth_total role portal result success":                1,
		"machineservice_connections role agent authenticated true":            1,
		"machineservice_connections role agent authenticated false":           0,
		"machineservice_connections role portal authenticated true":           1,
		"machineservice_closes_total reason auth_rejected":                    1,
		"machineservice_bus_request_duration_seconds request validate_agent":  2,
		"machineservice_bus_request_duration_seconds request validate_portal": 1,
	})

	cmd := testclient.Message(wire.TypeCommand, agent.ClientID, wire.CommandRequest{Method: "GET", Path: "/api/v1/serverstate"})
	portal.Send(cmd)
	got := agent.Expect(wire.TypeCommand)
	answer := testclient.Message(wire.TypeCommand, portal.ClientID, wire.CommandResponse{StatusCode: 200})
	answer.MessageID = got.MessageID
	agent.Send(answer)
	expectSkippingLists(t, portal, wire.TypeCommand)
	portal.Send(testclient.Message(wire.TypeCommand, "nobody", wire.CommandRequest{Method: "GET", Path: "/"}))
	if env := expectSkippingLists(t, portal, wire.TypeCommand); env.ErrorMessage != wire.TextDestinationNotAvailable {
		t.Fatalf("relay to nobody: %+v", env)
	}
	e.expect(map[string]float64{
		"machineservice_relay_total kind command result success":     2,
		"machineservice_relay_total kind command result unavailable": 1,
		"machineservice_relay_duration_seconds kind command":         1,
	})

	done := make(chan bus.ControlResponse, 1)
	go func() {
		resp, _ := e.srv.Control(context.Background(), bus.ControlRequest{AgentID: "reg-1", OrganizationID: org, Command: "get-settings"})
		done <- resp
	}()
	ctrl := agent.Expect(wire.TypeControl)
	reply := testclient.Message(wire.TypeControl, "test-instance", wire.ControlResponse{Success: true})
	reply.MessageID = ctrl.MessageID
	agent.Send(reply)
	if resp := <-done; !resp.Success {
		t.Fatalf("control answer %+v", resp)
	}
	if _, err := e.srv.Control(context.Background(), bus.ControlRequest{AgentID: "reg-unknown", Command: "x"}); !errors.Is(err, server.ErrNotConnected) {
		t.Fatalf("control to an unknown agent: %v", err)
	}
	e.expect(map[string]float64{
		"machineservice_relay_total kind control result success":     1,
		"machineservice_relay_total kind control result unavailable": 1,
		"machineservice_relay_duration_seconds kind control":         1,
	})

	if err := agent.WS.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	e.expect(map[string]float64{
		"machineservice_connections role agent authenticated true": 0,
		"machineservice_closes_total reason client_closed":         1,
	})
}

// TestReady checks /ready follows the server and a dependency, and
// answers 503 from the moment shutdown begins.
func TestReady(t *testing.T) {
	e := start(t)
	if code, body := e.get("/ready"); code != http.StatusOK || body != "ready\n" {
		t.Fatalf("/ready = %d %q", code, body)
	}
	e.bus.down.Store(true)
	if code, body := e.get("/ready"); code != http.StatusServiceUnavailable || !strings.Contains(body, "bus: connection refused") {
		t.Fatalf("/ready with the bus cut = %d %q", code, body)
	}
	e.bus.down.Store(false)
	if code := e.readyStatus(); code != http.StatusOK {
		t.Fatalf("/ready with the bus back = %d", code)
	}

	// An agent that does not answer the close frame keeps the shutdown
	// going for a while.
	testclient.DialAgent(t, e.base, &testclient.Key(t, 0).PublicKey, 1)
	shut := make(chan error, 1)
	go func() { shut <- e.shutdown() }()
	waitFor(t, "/ready to fail", func() bool { return e.readyStatus() == http.StatusServiceUnavailable })
	select {
	case err := <-shut:
		t.Logf("shutdown ended (%v) before /ready was seen failing", err)
	default:
		t.Log("/ready failed while shutdown was still running")
		if err := <-shut; err != nil {
			t.Fatalf("shutdown: %v", err)
		}
	}
	if code, body := e.get("/ready"); code != http.StatusServiceUnavailable || !strings.Contains(body, "server: "+server.ErrShuttingDown.Error()) {
		t.Fatalf("/ready after shutdown = %d %q", code, body)
	}
}

// expectSkippingLists reads the portal's next message of type typ,
// skipping the agent lists the server pushes when agents come and go.
func expectSkippingLists(t *testing.T, portal *testclient.Conn, typ string) wire.Envelope {
	t.Helper()
	for {
		env, err := portal.Read()
		if err != nil {
			t.Fatalf("portal: waiting for %q: %v", typ, err)
		}
		if env.Type == wire.TypeList && typ != wire.TypeList {
			continue
		}
		if env.Type != typ {
			t.Fatalf("portal: got %q, want %q", env.Type, typ)
		}
		return env
	}
}

// waitFor polls cond until it holds or 10 seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, what, 10*time.Second, cond)
}
