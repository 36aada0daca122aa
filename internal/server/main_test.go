package server_test

import (
	"log/slog"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testclock"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Organizations and tokens the test controller knows.
const (
	orgA   = "11111111-1111-1111-1111-111111111111"
	orgB   = "22222222-2222-2222-2222-222222222222"
	orgSub = "33333333-3333-3333-3333-333333333333" // a sub-organization of orgA

	agentA1     = "agent-token-a1"
	agentA2     = "agent-token-a2"
	agentB1     = "agent-token-b1"
	agentSub1   = "agent-token-sub1"
	agentRenew  = "agent-token-renew" // answered with a new token
	agentExpiry = "agent-token-expiring"
	portalA     = "portal-token-a"
	portalB     = "portal-token-b"
	portalImp   = "portal-token-impersonated"
	portalExp   = "portal-token-expiring"
)

// serverKeyIndex is the testclient key the server uses; agents use others.
const serverKeyIndex = 0

// env is one running test server.
type env struct {
	t      testing.TB
	srv    *server.Server
	cfg    *config.Config
	base   string           // http://127.0.0.1:port
	clock  *testclock.Clock // moves token expiry and the registry's timeouts
	events *bus.Local
	stats  *stats.Stats

	mu       sync.Mutex
	activity []bus.AgentActivity
}

type option func(*config.Config, *server.Deps)

func tokens(now func() time.Time) *controller.Static {
	far := time.Now().Add(24 * time.Hour)
	soon := time.Now().Add(time.Minute)
	st, err := controller.NewStatic(controller.TokensFile{
		Agents: []controller.AgentToken{
			{Token: agentA1, OrganizationID: orgA, RegisteredAgentID: "reg-a1", Expires: far},
			{Token: agentA2, OrganizationID: orgA, RegisteredAgentID: "reg-a2", Expires: far},
			{Token: agentB1, OrganizationID: orgB, RegisteredAgentID: "reg-b1", Expires: far},
			{Token: agentSub1, OrganizationID: orgSub, RegisteredAgentID: "reg-sub1", Expires: far},
			{Token: agentRenew, OrganizationID: orgA, RegisteredAgentID: "reg-renew", Expires: far, NewToken: "renewed-token"},
			{Token: agentExpiry, OrganizationID: orgA, RegisteredAgentID: "reg-exp", Expires: soon},
		},
		Portals: []controller.PortalToken{
			{Token: portalA, OrganizationID: orgA, SubOrganizations: []string{orgSub}, Expires: far},
			{Token: portalB, OrganizationID: orgB, Expires: far},
			{Token: portalImp, OrganizationID: orgA, Impersonated: true, Expires: far},
			{Token: portalExp, OrganizationID: orgA, Expires: soon},
		},
	}, now)
	if err != nil {
		panic(err)
	}
	return st
}

// start runs a server on a random loopback port until the test ends.
func start(t *testing.T, opts ...option) *env {
	t.Helper()
	return startTB(t, testlog.New(t), opts...)
}

// startBench is start for benchmarks, which log nothing.
func startBench(b *testing.B, opts ...option) *env {
	b.Helper()
	return startTB(b, slog.New(slog.DiscardHandler), opts...)
}

func startTB(t testing.TB, log *slog.Logger, opts ...option) *env {
	t.Helper()
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = "test-instance"
	cfg.MachineName = "test-machine"
	cfg.ShutdownTimeout = 5 * time.Second
	e := &env{t: t, cfg: cfg, clock: testclock.New(time.Now()), stats: stats.New()}
	e.events = bus.NewLocal(nil)
	e.events.OnActivity(func(a bus.AgentActivity) {
		e.mu.Lock()
		e.activity = append(e.activity, a)
		e.mu.Unlock()
	})
	key := testclient.Key(t, serverKeyIndex)
	deps := server.Deps{
		Key:         key,
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(90 * 24 * time.Hour),
		Controller:  tokens(e.clock.Now),
		Registry:    registry.NewMemory(0, e.clock.Now),
		Events:      e.events,
		Stats:       e.stats,
		Logger:      log,
		Now:         e.clock.Now,
		Version:     "test",
	}
	for _, o := range opts {
		o(cfg, &deps)
	}
	srv, err := server.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	e.base = servertest.Serve(t, "", srv)
	return e
}

// agent dials /agent with test key n.
func (e *env) agent(n int) *testclient.Conn {
	e.t.Helper()
	return testclient.DialAgent(e.t, e.base, &testclient.Key(e.t, serverKeyIndex).PublicKey, n)
}

// Authenticated clients come from authedAgentT and authedPortalT in
// helpers_test.go: they are bound to the calling (sub)test and wait until
// the client can be reached.

// portal dials /portal.
func (e *env) portal() *testclient.Conn {
	e.t.Helper()
	return testclient.DialPortal(e.t, e.base)
}

// activities returns the activity events published so far.
func (e *env) activities() []bus.AgentActivity {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]bus.AgentActivity(nil), e.activity...)
}

// waitFor polls cond until it holds or 10 seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, what, 10*time.Second, cond)
}
