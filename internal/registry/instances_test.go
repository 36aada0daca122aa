package registry_test

import (
	"context"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

// Short heartbeat timings, so that a dead instance drops out of the list
// within seconds rather than the default minute.
const (
	testHeartbeat      = 200 * time.Millisecond
	testInstanceWindow = 2 * time.Second
)

const (
	agentToken1 = "agent-1"
	agentToken2 = "agent-2"
	agentToken3 = "agent-3"
	portalToken = "portal-a"
)

// instance is one running server on the shared database.
type instance struct {
	t     *testing.T
	id    string
	url   string // its ENVIRONMENT__PUBLICURL
	base  string // http://127.0.0.1:port
	srv   *server.Server
	reg   *registry.Postgres
	pool  *pgxpool.Pool
	stats *stats.Stats
	// kill stops the registry's heartbeat without any cleanup, as if the
	// process had been killed.
	kill context.CancelFunc
}

// startInstance runs a server whose registry is on the database conn
// points to, until the test ends.
func startInstance(t *testing.T, conn, id string) *instance {
	t.Helper()
	pool := openPool(t, conn)
	kctx, kill := context.WithCancel(context.Background())
	t.Cleanup(kill)
	inst := &instance{t: t, id: id, url: "wss://" + id + ".example", pool: pool, stats: stats.New(), kill: kill}
	log := testlog.New(t).With("instance", id)
	// The server is made after the registry, as serve does.
	var agentsChanged atomic.Pointer[func([]string)]
	reg, err := registry.NewPostgres(kctx, pool, registry.PostgresOptions{
		InstanceID:        id,
		PublicURL:         inst.url,
		HeartbeatInterval: testHeartbeat,
		InstanceTimeout:   testInstanceWindow,
		Timeout:           time.Second,
		History:           true,
		Logger:            log,
		OnAgentsChanged: func(orgs []string) {
			if f := agentsChanged.Load(); f != nil {
				(*f)(orgs)
			}
		},
	})
	if err != nil {
		t.Fatalf("registry of %s: %v", id, err)
	}
	inst.reg = reg
	t.Cleanup(func() {
		if err := reg.Close(context.Background()); err != nil {
			t.Errorf("close registry of %s: %v", id, err)
		}
	})

	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = id
	cfg.PublicURL = inst.url
	cfg.ShutdownTimeout = 5 * time.Second
	far := time.Now().Add(24 * time.Hour)
	ctrl, err := controller.NewStatic(controller.TokensFile{
		Agents: []controller.AgentToken{
			{Token: agentToken1, OrganizationID: orgA, RegisteredAgentID: "reg-1", Expires: far},
			{Token: agentToken2, OrganizationID: orgA, RegisteredAgentID: "reg-2", Expires: far},
			{Token: agentToken3, OrganizationID: orgA, RegisteredAgentID: "reg-3", Expires: far},
		},
		Portals: []controller.PortalToken{{Token: portalToken, OrganizationID: orgA, Expires: far}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(cfg, server.Deps{
		Key:         testclient.Key(t, 0),
		KeyObtained: time.Now(),
		KeyExpires:  far,
		Controller:  ctrl,
		Registry:    reg,
		Stats:       inst.stats,
		Logger:      log,
		Version:     "test",
	})
	if err != nil {
		t.Fatal(err)
	}
	inst.srv = srv
	f := srv.AgentsChanged
	agentsChanged.Store(&f)
	inst.base = servertest.Serve(t, id, srv)
	return inst
}

// agent connects and authenticates an agent with test key n.
func (in *instance) agent(n int, token string) *testclient.Conn {
	in.t.Helper()
	a := testclient.DialAgent(in.t, in.base, &testclient.Key(in.t, 0).PublicKey, n)
	if res := a.AuthAgent(token); !res.Accepted {
		in.t.Fatalf("agent auth with %q refused", token)
	}
	return a
}

// portal connects and authenticates a portal of orgA.
func (in *instance) portal() *testclient.Conn {
	in.t.Helper()
	p := testclient.DialPortal(in.t, in.base)
	if res := p.AuthPortal(portalToken, false); !res.Accepted {
		in.t.Fatal("portal auth refused")
	}
	return p
}

// list asks for the list and returns the answer's entries and
// errorMessage, skipping the lists the server pushes meanwhile.
func list(t *testing.T, p *testclient.Conn) ([]wire.ClientRegistration, string) {
	t.Helper()
	req := testclient.Message(wire.TypeList, "MachineService", nil)
	p.Send(req)
	env := expect(t, p, wire.TypeList, req.MessageID)
	if env.ErrorMessage != "" {
		return nil, env.ErrorMessage
	}
	var regs []wire.ClientRegistration
	if err := env.DecodePayload(&regs); err != nil {
		t.Fatalf("list payload %s: %v", env.Payload, err)
	}
	return regs, ""
}

// expect reads until a message of type typ (and messageID, when given)
// arrives; pushed lists and others are skipped.
func expect(t *testing.T, c *testclient.Conn, typ, messageID string) wire.Envelope {
	t.Helper()
	for {
		env, err := c.Read()
		if err != nil {
			t.Fatalf("%s: waiting for %q: %v", c.Role, typ, err)
		}
		if env.Type == typ && (messageID == "" || env.MessageID == messageID) {
			return env
		}
	}
}

// listed returns the client ids listed, sorted, or "error: ..." when the
// list failed.
func listed(t *testing.T, p *testclient.Conn) string {
	t.Helper()
	regs, errMsg := list(t, p)
	if errMsg != "" {
		return "error: " + errMsg
	}
	s := make([]string, 0, len(regs))
	for _, r := range regs {
		s = append(s, r.ClientID)
	}
	sort.Strings(s)
	return strings.Join(s, ",")
}

func sortedIDs(cs ...*testclient.Conn) string {
	s := make([]string, 0, len(cs))
	for _, c := range cs {
		s = append(s, c.ClientID)
	}
	sort.Strings(s)
	return strings.Join(s, ",")
}

// hangUp closes a client's connection with a close frame.
func hangUp(t *testing.T, c *testclient.Conn) {
	t.Helper()
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "bye")
	if err := c.WS.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second)); err != nil {
		t.Fatalf("close: %v", err)
	}
	_ = c.WS.Close() // the server's answer does not matter here
}

// TestTwoInstances runs two servers on one database: an agent on B is
// listed to a portal on A with B's instance id and URL, and is gone from
// the list once it disconnects.
func TestTwoInstances(t *testing.T) {
	_, conn := migratedPool(t)
	a := startInstance(t, conn, "instance-a")
	b := startInstance(t, conn, "instance-b")

	portalA := a.portal()
	agentB := b.agent(1, agentToken1)
	testwait.For(t, "the agent on B listed on A", 10*time.Second, func() bool { return listed(t, portalA) == agentB.ClientID })
	regs, _ := list(t, portalA)
	r := regs[0]
	if r.GatewayID != b.id || r.MachineServerURI != b.url || r.OrganizationID != orgA ||
		r.MachineRegistrationID != "reg-1" || r.ClientVersion != "2.1.0.0" || r.Type != wire.ClientTypeAgent ||
		time.Since(r.LastUpdated) > time.Minute {
		t.Fatalf("entry listed on A: %+v", r)
	}

	agentA := a.agent(2, agentToken2)
	portalB := b.portal()
	both := sortedIDs(agentA, agentB)
	testwait.For(t, "both agents listed on A", 10*time.Second, func() bool { return listed(t, portalA) == both })
	testwait.For(t, "both agents listed on B", 10*time.Second, func() bool { return listed(t, portalB) == both })
	regs, _ = list(t, portalB)
	for _, r := range regs {
		want := map[string]string{agentA.ClientID: a.id, agentB.ClientID: b.id}[r.ClientID]
		if r.GatewayID != want || r.MachineServerURI != "wss://"+want+".example" {
			t.Fatalf("entry %s listed with instance %q and URL %q, want %q", r.ClientID, r.GatewayID, r.MachineServerURI, want)
		}
	}

	hangUp(t, agentB)
	testwait.For(t, "the agent on B gone from A's list", 10*time.Second, func() bool { return listed(t, portalA) == agentA.ClientID })
	testwait.For(t, "its unregister in the history", 10*time.Second, func() bool {
		return count(t, a.pool, `SELECT count(*) FROM client_history WHERE event = 'unregister'
			AND client_id = $1 AND instance_id = $2 AND bytes_in > 0 AND bytes_out > 0`, agentB.ClientID, b.id) == 1
	})
}

// TestKilledInstance stops an instance's heartbeat without any cleanup:
// its agents stop being listed on the other instance within the instance
// window, and its rows are reaped.
func TestKilledInstance(t *testing.T) {
	_, conn := migratedPool(t)
	a := startInstance(t, conn, "instance-a")
	b := startInstance(t, conn, "instance-b")

	portalA := a.portal()
	agentB := b.agent(1, agentToken1)
	testwait.For(t, "the agent on B listed on A", 10*time.Second, func() bool { return listed(t, portalA) == agentB.ClientID })

	b.kill()
	killed := time.Now()
	testwait.For(t, "the killed instance's agent gone from A's list", 10*time.Second, func() bool { return listed(t, portalA) == "" })
	t.Logf("unlisted %v after the kill (instance window %v)", time.Since(killed).Round(10*time.Millisecond), testInstanceWindow)
	testwait.For(t, "the killed instance's rows reaped", 10*time.Second, func() bool {
		return count(t, a.pool, `SELECT count(*) FROM clients WHERE instance_id = $1`, b.id) == 0 &&
			count(t, a.pool, `SELECT count(*) FROM instances WHERE instance_id = $1`, b.id) == 0
	})
	if n := count(t, a.pool, `SELECT count(*) FROM instances WHERE instance_id = $1`, a.id); n != 1 {
		t.Fatal("the live instance reaped itself")
	}
}

// TestKilledInstancePushesList kills an instance: the portal on the
// instance that reaps it is sent a list without the killed instance's
// agent, without asking.
func TestKilledInstancePushesList(t *testing.T) {
	_, conn := migratedPool(t)
	a := startInstance(t, conn, "instance-a")
	b := startInstance(t, conn, "instance-b")

	// The portal comes last, so that it is pushed no list before the
	// kill.
	agentA := a.agent(2, agentToken2)
	agentB := b.agent(1, agentToken1)
	portalA := a.portal()
	both := sortedIDs(agentA, agentB)
	testwait.For(t, "both agents listed on A", 10*time.Second, func() bool { return listed(t, portalA) == both })

	b.kill()
	// Pushes from the agents' arrival may still be on their way (pushes
	// are gathered for a moment): read pushed lists until the reaped one.
	for range 5 {
		env := expect(t, portalA, wire.TypeList, "")
		var regs []wire.ClientRegistration
		if err := env.DecodePayload(&regs); err != nil {
			t.Fatalf("pushed list %s: %v", env.Payload, err)
		}
		if len(regs) == 1 && regs[0].ClientID == agentA.ClientID {
			return
		}
		t.Logf("pushed list of %d agents, waiting for the one after the kill", len(regs))
	}
	t.Fatalf("no pushed list without the killed instance's agent")
}

// TestDatabaseOutage cuts instance B off the database through a proxy
// and restores it: B's clients keep being relayed, B's list answers an
// errorMessage meanwhile, and afterwards every client connected to B is
// listed again while the one that left during the outage is not.
func TestDatabaseOutage(t *testing.T) {
	_, conn := migratedPool(t)
	px, proxied := pgtest.StartProxy(t, conn)
	a := startInstance(t, conn, "instance-a")
	b := startInstance(t, proxied, "instance-b")

	portalA := a.portal()
	portalB := b.portal()
	agent1 := b.agent(1, agentToken1)
	agent3 := b.agent(3, agentToken3)
	before := sortedIDs(agent1, agent3)
	testwait.For(t, "B's agents listed on A", 10*time.Second, func() bool { return listed(t, portalA) == before })

	px.Cut()
	testwait.For(t, "B's list to fail", 10*time.Second, func() bool {
		return listed(t, portalB) == "error: "+wire.TextRegistryUnavailable
	})

	// Relaying goes on.
	cmd := testclient.Message(wire.TypeCommand, agent1.ClientID, wire.CommandRequest{Method: "GET", Path: "/api/v1/serverstate"})
	portalB.Send(cmd)
	got := agent1.Expect(wire.TypeCommand)
	answer := testclient.Message(wire.TypeCommand, portalB.ClientID, wire.CommandResponse{StatusCode: 200})
	answer.MessageID = got.MessageID
	agent1.Send(answer)
	if back := expect(t, portalB, wire.TypeCommand, cmd.MessageID); back.From != agent1.ClientID {
		t.Fatalf("answer from %q", back.From)
	}
	agent1.Send(testclient.Message(wire.TypePing, "server", nil))
	agent1.Expect(wire.TypePong)

	// Clients come and go while the database is away.
	agent2 := b.agent(2, agentToken2)
	hangUp(t, agent3)
	if _, errMsg := list(t, portalB); errMsg != wire.TextRegistryUnavailable {
		t.Fatalf("B's list during the outage answered %q", errMsg)
	}
	// A stops listing B's clients once B's heartbeat is older than the
	// window and reaps them, so everything must be written back.
	testwait.For(t, "B's agents gone from A's list", 10*time.Second, func() bool { return listed(t, portalA) == "" })

	px.Restore()
	after := sortedIDs(agent1, agent2)
	testwait.For(t, "B's agents listed on A again", 10*time.Second, func() bool { return listed(t, portalA) == after })
	testwait.For(t, "B's list to work again", 10*time.Second, func() bool { return listed(t, portalB) == after })
	regs, _ := list(t, portalA)
	for _, r := range regs {
		if r.GatewayID != b.id || r.MachineServerURI != b.url {
			t.Fatalf("entry %s listed with instance %q and URL %q", r.ClientID, r.GatewayID, r.MachineServerURI)
		}
	}
	if n := b.stats.Get(stats.RegistryFailure) + b.stats.Get(stats.ListFailure); n == 0 {
		t.Fatal("the outage was not counted")
	}
	if n := count(t, a.pool, `SELECT count(*) FROM client_history WHERE event = 'unregister' AND client_id = $1 AND bytes_in > 0`, agent3.ClientID); n != 1 {
		t.Fatalf("%d unregister events for the agent that left during the outage, want 1", n)
	}
	if n := count(t, a.pool, `SELECT count(*) FROM client_history WHERE event = 'register' AND client_id = $1`, agent2.ClientID); n != 1 {
		t.Fatalf("%d register events for the agent that came during the outage, want 1", n)
	}
}
