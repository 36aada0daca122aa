package bus_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Organizations, and the tokens the test's external controller knows.
const (
	orgA   = "11111111-1111-1111-1111-111111111111"
	orgB   = "22222222-2222-2222-2222-222222222222"
	orgSub = "33333333-3333-3333-3333-333333333333" // a sub-organization of orgA

	agentA1       = "agent-token-a1"
	agentA2       = "agent-token-a2"
	agentB1       = "agent-token-b1"
	agentSub1     = "agent-token-sub1"
	agentRenew    = "agent-token-renew"
	agentNotFound = "agent-token-not-found"
	portalA       = "portal-token-a"
	portalB       = "portal-token-b"
	portalImp     = "portal-token-impersonated"
)

// serverKeyIndex is the testclient key both instances use.
const serverKeyIndex = 0

// dialBus connects a bus for a test, with quick reconnects.
func dialBus(t *testing.T, url, pfx, name string, mod func(*bus.NATSOptions)) *bus.NATS {
	t.Helper()
	o := bus.NATSOptions{
		URL:           url,
		SubjectPrefix: pfx,
		Name:          name,
		ReconnectMin:  10 * time.Millisecond,
		ReconnectMax:  100 * time.Millisecond,
		Logger:        testlog.New(t).With("bus", name),
	}
	if mod != nil {
		mod(&o)
	}
	nb, err := bus.DialNATS(o)
	if err != nil {
		t.Fatalf("dial bus: %v", err)
	}
	return nb
}

// instance is one running server on the bus.
type instance struct {
	t     *testing.T
	id    string
	srv   *server.Server
	bus   *bus.NATS
	base  string
	stats *stats.Stats
}

type instanceOpts struct {
	cfg func(*config.Config)
	bus func(*bus.NATSOptions)
	reg registry.Registry // default: the one given to startInstance
}

// startInstance runs a server with id on the bus until the test ends.
func startInstance(t *testing.T, url, pfx, id string, reg registry.Registry, o instanceOpts) *instance {
	t.Helper()
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = id
	cfg.MachineName = "test-machine"
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.ControlTimeout = 10 * time.Second
	if o.cfg != nil {
		o.cfg(cfg)
	}
	nb := dialBus(t, url, pfx, id, func(no *bus.NATSOptions) {
		no.AuthTimeout = cfg.ControllerTimeout
		if o.bus != nil {
			o.bus(no)
		}
	})
	if o.reg != nil {
		reg = o.reg
	}
	in := &instance{t: t, id: id, bus: nb, stats: stats.New()}
	key := testclient.Key(t, serverKeyIndex)
	srv, err := server.New(cfg, server.Deps{
		Key:         key,
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(90 * 24 * time.Hour),
		Controller:  nb,
		Registry:    reg,
		Events:      nb,
		Remote:      nb,
		Stats:       in.stats,
		Logger:      testlog.New(t).With("instance", id),
		Version:     "test",
	})
	if err != nil {
		t.Fatal(err)
	}
	in.srv = srv
	if err := nb.Attach(srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // runs after the server's shutdown, registered below
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := nb.Close(ctx); err != nil {
			t.Errorf("close bus of %s: %v", id, err)
		}
	})
	in.base = servertest.Serve(t, id, srv)
	return in
}

func (in *instance) agent(n int) *testclient.Conn {
	in.t.Helper()
	return testclient.DialAgent(in.t, in.base, &testclient.Key(in.t, serverKeyIndex).PublicKey, n)
}

func (in *instance) authedAgent(n int, token string) *testclient.Conn {
	in.t.Helper()
	a := in.agent(n)
	if res := a.AuthAgent(token); !res.Accepted {
		in.t.Fatalf("%s: agent auth with %q refused", in.id, token)
	}
	return a
}

func (in *instance) portal() *testclient.Conn {
	in.t.Helper()
	return testclient.DialPortal(in.t, in.base)
}

func (in *instance) authedPortal(token string, includeSubOrgs bool) *testclient.Conn {
	in.t.Helper()
	p := in.portal()
	if res := p.AuthPortal(token, includeSubOrgs); !res.Accepted {
		in.t.Fatalf("%s: portal auth with %q refused", in.id, token)
	}
	return p
}

// rawConn is a plain nats.go connection for the test's side of the bus.
func rawConn(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond))
	if err != nil {
		t.Fatalf("connect to nats: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// externalController answers the validation requests as a controller
// written against the subjects would, with replies written out by hand.
// It records every request it gets.
type externalController struct {
	mu       sync.Mutex
	requests []recorded
	// hold, when set, is called before answering; it may block.
	hold func(subject string, req map[string]any)
	// replied, when set, is called after answering.
	replied func(req map[string]any)
}

type recorded struct {
	subject string
	raw     string
	fields  map[string]any
}

const farExpiry = "2035-01-01T00:00:00Z"

var agentReplies = map[string]string{
	agentA1:       `{"success":true,"organizationId":"` + orgA + `","registeredAgentId":"reg-a1","expires":"` + farExpiry + `","newToken":null,"message":null}`,
	agentA2:       `{"success":true,"organizationId":"` + orgA + `","registeredAgentId":"reg-a2","expires":"` + farExpiry + `","newToken":null,"message":null}`,
	agentB1:       `{"success":true,"organizationId":"` + orgB + `","registeredAgentId":"reg-b1","expires":"` + farExpiry + `","newToken":null,"message":null}`,
	agentSub1:     `{"success":true,"organizationId":"` + orgSub + `","registeredAgentId":"reg-sub1","expires":"` + farExpiry + `","newToken":null,"message":null}`,
	agentRenew:    `{"success":true,"organizationId":"` + orgA + `","registeredAgentId":"reg-renew","expires":"` + farExpiry + `","newToken":"renewed-token","message":null}`,
	agentNotFound: `{"success":false,"organizationId":null,"registeredAgentId":null,"expires":null,"newToken":null,"message":"Agent not found"}`,
}

func portalReply(token string, includeSubOrgs bool) string {
	subs := "[]"
	if includeSubOrgs {
		subs = `["` + orgSub + `"]`
	}
	switch token {
	case portalA:
		return `{"success":true,"organizationId":"` + orgA + `","expires":"` + farExpiry + `","message":null,"isImpersonated":false,"subOrganizations":` + subs + `}`
	case portalB:
		return `{"success":true,"organizationId":"` + orgB + `","expires":"` + farExpiry + `","message":null,"isImpersonated":false,"subOrganizations":[]}`
	case portalImp:
		return `{"success":true,"organizationId":"` + orgA + `","expires":"` + farExpiry + `","message":null,"isImpersonated":true,"subOrganizations":[]}`
	}
	return `{"success":false,"organizationId":null,"expires":null,"message":"Invalid token","isImpersonated":null,"subOrganizations":null}`
}

// startController subscribes the external controller on the bus.
func startController(t *testing.T, url, pfx string) *externalController {
	t.Helper()
	nc := rawConn(t, url)
	ec := &externalController{}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // before the connection closes (cleanups run last first)
	handle := func(m *nats.Msg) {
		var fields map[string]any
		if err := json.Unmarshal(m.Data, &fields); err != nil {
			t.Errorf("controller got invalid JSON on %s: %s", m.Subject, m.Data)
			return
		}
		ec.mu.Lock()
		ec.requests = append(ec.requests, recorded{subject: m.Subject, raw: string(m.Data), fields: fields})
		hold, replied := ec.hold, ec.replied
		ec.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if hold != nil {
				hold(m.Subject, fields)
			}
			token, _ := fields["token"].(string)
			var reply string
			if strings.HasSuffix(m.Subject, ".auth.agent") {
				var ok bool
				if reply, ok = agentReplies[token]; !ok {
					reply = `{"success":false,"organizationId":null,"registeredAgentId":null,"expires":null,"newToken":null,"message":"Invalid token"}`
				}
			} else {
				inc, _ := fields["includeSubOrgs"].(bool)
				reply = portalReply(token, inc)
			}
			_ = m.Respond([]byte(reply)) // a late reply may find the connection closed at the end
			if replied != nil {
				replied(fields)
			}
		}()
	}
	for _, s := range []string{pfx + ".auth.agent", pfx + ".auth.portal"} {
		if _, err := nc.Subscribe(s, handle); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return ec
}

func (ec *externalController) recorded() []recorded {
	ec.mu.Lock()
	defer ec.mu.Unlock()
	return append([]recorded(nil), ec.requests...)
}

// list asks for the list and returns the answer, skipping list pushes.
func list(t *testing.T, c *testclient.Conn) []wire.ClientRegistration {
	t.Helper()
	req := testclient.Message(wire.TypeList, "MachineService", nil)
	c.Send(req)
	for {
		env := testclient.Next(t, c, wire.TypeList)
		if env.MessageID == req.MessageID {
			return testclient.DecodeList(t, env)
		}
	}
}

// waitFor polls cond until it holds or 15 seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, what, 15*time.Second, cond)
}
