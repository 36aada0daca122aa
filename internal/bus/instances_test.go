package bus_test

import (
	"context"
	"encoding/json"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// pair is two instances on one bus sharing one registry, and the
// external controller.
type pair struct {
	url, pfx string
	reg      *registry.Memory
	a, b     *instance
	ctrl     *externalController
}

func startPair(t *testing.T, url string, oa instanceOpts) *pair {
	t.Helper()
	p := &pair{url: url, pfx: natstest.Prefix(t, "mstest"), reg: registry.NewMemory(0, nil)}
	p.ctrl = startController(t, url, p.pfx)
	p.a = startInstance(t, url, p.pfx, "instance-a", p.reg, oa)
	p.b = startInstance(t, url, p.pfx, "instance-b", p.reg, instanceOpts{})
	return p
}

// countingRegistry counts an instance's agent look-ups, which it makes
// only for control requests it took for an agent it does not hold.
type countingRegistry struct {
	registry.Registry
	lookups atomic.Int64
}

func (c *countingRegistry) LookupAgent(ctx context.Context, id, org string) (registry.Client, bool, error) {
	c.lookups.Add(1)
	return c.Registry.LookupAgent(ctx, id, org)
}

// controlRequest sends a control request on the bus in the background;
// the answer arrives on the channel.
func controlRequest(t *testing.T, nc *nats.Conn, pfx string, req bus.ControlRequest) <-chan map[string]any {
	t.Helper()
	data, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan map[string]any, 1)
	go func() {
		var m map[string]any
		msg, err := nc.Request(pfx+".control", data, 20*time.Second)
		if err != nil {
			m = map[string]any{"requestError": err.Error()}
		} else if err := json.Unmarshal(msg.Data, &m); err != nil {
			m = map[string]any{"requestError": err.Error(), "raw": string(msg.Data)}
		}
		out <- m
	}()
	return out
}

// answerControl reads the control message an agent gets and answers it.
func answerControl(t *testing.T, agent *testclient.Conn, wantCommand string) {
	t.Helper()
	env := testclient.Next(t, agent, wire.TypeControl)
	var req wire.ControlRequest
	if err := env.DecodePayload(&req); err != nil {
		t.Fatal(err)
	}
	if req.Command != wantCommand {
		t.Fatalf("agent got control command %q, want %q", req.Command, wantCommand)
	}
	v := "on"
	answer := testclient.Message(wire.TypeControl, env.From, wire.ControlResponse{Success: true, Output: map[string]*string{"echo": req.Parameters["set"], "state": &v}})
	answer.MessageID = env.MessageID
	agent.Send(answer)
}

func str(s string) *string { return &s }

// TestControlAcrossInstances: the controller's control requests reach an
// agent whichever instance takes them, and the answer comes back.
func TestControlAcrossInstances(t *testing.T) {
	url := natstest.URL(t)
	counting := &countingRegistry{}
	p := &pair{url: url, pfx: natstest.Prefix(t, "mstest"), reg: registry.NewMemory(0, nil)}
	counting.Registry = p.reg
	p.ctrl = startController(t, url, p.pfx)
	p.a = startInstance(t, url, p.pfx, "instance-a", p.reg, instanceOpts{reg: counting})
	p.b = startInstance(t, url, p.pfx, "instance-b", p.reg, instanceOpts{})
	agent := p.b.authedAgent(1, agentA1)
	nc := rawConn(t, url)

	// The queue group gives each request to one instance; send until
	// instance A (which does not hold the agent) has taken some.
	sent := int64(0)
	for i := 0; counting.lookups.Load() == 0; i++ {
		sent++
		if i == 60 {
			t.Fatal("instance A never took a control request")
		}
		got := controlRequest(t, nc, p.pfx, bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "set-setting",
			Settings: map[string]*string{"set": str("value")}, SentTime: time.Now().UTC()})
		answerControl(t, agent, "set-setting")
		m := <-got
		settings, _ := m["settings"].(map[string]any)
		if m["success"] != true || m["agentId"] != "reg-a1" || m["organizationId"] != orgA || settings["echo"] != "value" || settings["state"] != "on" {
			t.Fatalf("control answer %v", m)
		}
		if want := []string{"agentId", "message", "organizationId", "settings", "success"}; !slices.Equal(keys(m), want) {
			t.Fatalf("control answer keys %v, want %v", keys(m), want)
		}
	}
	if n := p.b.stats.Get(stats.ControlRelaySuccess); n != sent {
		t.Fatalf("instance B, which holds the agent, counted %d control successes of %d", n, sent)
	}
	t.Logf("%d control requests until instance A took one", sent)

	t.Run("not connected", func(t *testing.T) {
		for range 4 { // either instance answers the same
			m := <-controlRequest(t, nc, p.pfx, bus.ControlRequest{AgentID: "reg-nobody", OrganizationID: orgA, Command: "x", SentTime: time.Now().UTC()})
			if m["success"] != false || m["message"] != wire.TextDestinationNotConnected {
				t.Fatalf("answer %v", m)
			}
		}
	})
	t.Run("stale", func(t *testing.T) {
		for range 4 {
			m := <-controlRequest(t, nc, p.pfx, bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "stale",
				SentTime: time.Now().Add(-6 * time.Minute).UTC()})
			if m["success"] != false || m["message"] != wire.TextControlRequestExpired {
				t.Fatalf("answer %v", m)
			}
		}
		// The agent never saw the stale ones: its next control is this.
		got := controlRequest(t, nc, p.pfx, bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "fresh", SentTime: time.Now().UTC()})
		answerControl(t, agent, "fresh")
		if m := <-got; m["success"] != true {
			t.Fatalf("answer %v", m)
		}
		if p.a.stats.Get(stats.ControlRelayStaleMessage)+p.b.stats.Get(stats.ControlRelayStaleMessage) != 4 {
			t.Fatal("stale requests not counted")
		}
	})
	t.Run("invalid", func(t *testing.T) {
		msg, err := nc.Request(p.pfx+".control", []byte(`{"organizationId":"x"}`), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(msg.Data, &m); err != nil || m["success"] != false || m["message"] == "" {
			t.Fatalf("answer %s", msg.Data)
		}
	})
}

// TestRelayAcrossInstances relays commands between a portal on one
// instance and an agent on the other, both ways, with the organization
// checks of one instance.
func TestRelayAcrossInstances(t *testing.T) {
	p := startPair(t, natstest.URL(t), instanceOpts{})

	roundTrip := func(t *testing.T, portal, agent *testclient.Conn) {
		t.Helper()
		cmd := testclient.Message(wire.TypeCommand, agent.ClientID, wire.CommandRequest{Method: "GET", Path: "/api/v1/serverstate"})
		portal.Send(cmd)
		got := testclient.Next(t, agent, wire.TypeCommand)
		if got.From != portal.ClientID || got.MessageID != cmd.MessageID {
			t.Fatalf("agent got command from %q id %q", got.From, got.MessageID)
		}
		var req wire.CommandRequest
		if err := got.DecodePayload(&req); err != nil || req.Path != "/api/v1/serverstate" {
			t.Fatalf("command payload %s: %v", got.Payload, err)
		}
		body := "b2s="
		answer := testclient.Message(wire.TypeCommand, portal.ClientID, wire.CommandResponse{StatusCode: 200, Body: &body})
		answer.MessageID = cmd.MessageID
		agent.Send(answer)
		back := testclient.Next(t, portal, wire.TypeCommand)
		var resp wire.CommandResponse
		if back.From != agent.ClientID || back.MessageID != cmd.MessageID || back.DecodePayload(&resp) != nil || resp.StatusCode != 200 || *resp.Body != body {
			t.Fatalf("portal got %+v", back)
		}
	}

	t.Run("portal on A, agent on B", func(t *testing.T) {
		agent := p.b.authedAgent(1, agentA1)
		portal := p.a.authedPortal(portalA, false)
		if l := list(t, portal); len(l) != 1 || l[0].ClientID != agent.ClientID || l[0].GatewayID != "instance-b" {
			t.Fatalf("list %+v", l)
		}
		roundTrip(t, portal, agent)
		roundTrip(t, portal, agent)
	})
	t.Run("portal on B, agent on A", func(t *testing.T) {
		agent := p.a.authedAgent(2, agentA2)
		portal := p.b.authedPortal(portalA, false)
		roundTrip(t, portal, agent)
	})
	t.Run("sub-organization agent answers a parent portal", func(t *testing.T) {
		agent := p.b.authedAgent(3, agentSub1)
		portal := p.a.authedPortal(portalA, true)
		roundTrip(t, portal, agent)
	})
	t.Run("payload styles pass unchanged", func(t *testing.T) {
		agent := p.b.agent(4)
		agent.Style = wire.StyleEmbedded // the server answers it in this style
		if !agent.AuthAgent(agentA1).Accepted {
			t.Fatal("auth refused")
		}
		portal := p.a.authedPortal(portalA, false)
		for _, payload := range []string{`"opaque.jwe.payload.that.is.not.json"`, `{"method":"GET","path":"/x"}`} {
			cmd := &wire.Envelope{Type: wire.TypeCommand, To: agent.ClientID, Payload: json.RawMessage(payload)}
			portal.Send(cmd)
			got := testclient.Next(t, agent, wire.TypeCommand)
			if got.MessageID != cmd.MessageID || string(got.Payload) != payload {
				t.Fatalf("payload %s arrived as %s", payload, got.Payload)
			}
		}
	})
	t.Run("another organization is denied", func(t *testing.T) {
		agent := p.b.authedAgent(5, agentA1)
		intruder := p.a.authedPortal(portalB, false)
		intruder.Send(testclient.Message(wire.TypeCommand, agent.ClientID, wire.CommandRequest{Method: "GET", Path: "/secret"}))
		intruder.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
		if n := p.a.stats.Get(stats.CommandRelayDenied); n != 1 {
			t.Fatalf("CommandRelayDenied = %d", n)
		}
		// The agent got nothing: the next command it sees is this one.
		portal := p.a.authedPortal(portalA, false)
		roundTrip(t, portal, agent)
	})
	t.Run("an agent may not answer another organization's portal", func(t *testing.T) {
		agent := p.a.authedAgent(6, agentB1)
		portal := p.b.authedPortal(portalA, false)
		agent.Send(testclient.Message(wire.TypeCommand, portal.ClientID, wire.CommandResponse{StatusCode: 200}))
		agent.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	})
	t.Run("impersonating portal is denied", func(t *testing.T) {
		agent := p.b.authedAgent(7, agentA1)
		imp := p.a.authedPortal(portalImp, false)
		imp.Send(testclient.Message(wire.TypeCommand, agent.ClientID, nil))
		imp.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	})
	t.Run("unknown destination", func(t *testing.T) {
		portal := p.a.authedPortal(portalA, false)
		cmd := testclient.Message(wire.TypeCommand, "no-such-client", nil)
		portal.Send(cmd)
		got := testclient.Next(t, portal, wire.TypeCommand)
		if got.MessageID != cmd.MessageID || got.ErrorMessage != wire.TextDestinationNotAvailable {
			t.Fatalf("got %+v", got)
		}
	})
}

// TestListPushAcrossInstances: a portal hears of agents that connect and
// disconnect on another instance.
func TestListPushAcrossInstances(t *testing.T) {
	p := startPair(t, natstest.URL(t), instanceOpts{})
	portal := p.a.authedPortal(portalA, false)
	other := p.a.authedPortal(portalB, false)
	if l := list(t, portal); len(l) != 0 {
		t.Fatalf("list %+v", l)
	}
	agent := p.b.authedAgent(1, agentA1)
	waitList := func(what string, want func([]wire.ClientRegistration) bool) {
		t.Helper()
		for {
			env := testclient.Next(t, portal, wire.TypeList)
			if want(testclient.DecodeList(t, env)) {
				return
			}
			t.Logf("list push before %s: %s", what, env.Payload)
		}
	}
	waitList("the agent connected", func(l []wire.ClientRegistration) bool {
		return len(l) == 1 && l[0].ClientID == agent.ClientID
	})
	if err := agent.WS.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	waitList("the agent left", func(l []wire.ClientRegistration) bool { return len(l) == 0 })

	// The other organization's portal was told nothing: its next
	// message answers its own request.
	req := testclient.Message(wire.TypeList, "MachineService", nil)
	other.Send(req)
	if env := other.Expect(wire.TypeList); env.MessageID != req.MessageID {
		t.Fatalf("portal of another organization got a push: %+v", env)
	}
}

// events collects what is published under <prefix>.events.
type events struct {
	mu   sync.Mutex
	msgs []*nats.Msg
}

func subscribeEvents(t *testing.T, nc *nats.Conn, pfx string) *events {
	t.Helper()
	ev := &events{}
	if _, err := nc.Subscribe(pfx+".events.>", func(m *nats.Msg) {
		ev.mu.Lock()
		ev.msgs = append(ev.msgs, m)
		ev.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return ev
}

// find returns the decoded events on subject for which match holds.
func (ev *events) find(subject string, match func(map[string]any) bool) []map[string]any {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var out []map[string]any
	for _, m := range ev.msgs {
		if m.Subject != subject {
			continue
		}
		var v map[string]any
		if json.Unmarshal(m.Data, &v) == nil && match(v) {
			out = append(out, v)
		}
	}
	return out
}

// TestEventsOnSubjects watches the activity, certificate and list events
// on their subjects.
func TestEventsOnSubjects(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mstest")
	startController(t, url, pfx)
	ev := subscribeEvents(t, rawConn(t, url), pfx)
	in := startInstance(t, url, pfx, "instance-a", registry.NewMemory(0, nil), instanceOpts{})

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { in.srv.PublishCertificate(ctx, time.Hour); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	agent := in.authedAgent(1, agentA1)
	agent.Send(testclient.Message(wire.TypePing, "server", nil))
	agent.Expect(wire.TypePong)
	if err := agent.WS.Close(); err != nil {
		t.Fatal(err)
	}

	activityKeys := []string{"activityTimestamp", "activityType", "clientVersion", "metadata", "organizationId", "registeredAgentId"}
	for _, typ := range []string{"Connected", "Ping", "Disconnected"} {
		var got []map[string]any
		waitFor(t, typ+" event", func() bool {
			got = ev.find(pfx+".events.activity", func(m map[string]any) bool { return m["activityType"] == typ })
			return len(got) == 1
		})
		m := got[0]
		ts, _ := m["activityTimestamp"].(string)
		if _, err := time.Parse(time.RFC3339, ts); err != nil || !slices.Equal(keys(m), activityKeys) ||
			m["registeredAgentId"] != "reg-a1" || m["organizationId"] != orgA || m["clientVersion"] != "2.1.0.0" {
			t.Fatalf("%s event %v", typ, m)
		}
		if md, _ := m["metadata"].(map[string]any); typ == "Connected" && md["machine-name"] != "test-machine" {
			t.Fatalf("Connected event metadata %v", m["metadata"])
		}
	}
	var certs []map[string]any
	waitFor(t, "certificate event", func() bool {
		certs = ev.find(pfx+".events.certificate", func(map[string]any) bool { return true })
		return len(certs) == 1
	})
	c := certs[0]
	exp, _ := c["expires"].(string)
	if _, err := time.Parse(time.RFC3339, exp); err != nil || !slices.Equal(keys(c), []string{"clientId", "expires", "hashedPublicKey", "publicKey"}) ||
		c["clientId"] != "instance-a" || c["hashedPublicKey"] != wire.PublicKeyHash(&testclient.Key(t, serverKeyIndex).PublicKey) {
		t.Fatalf("certificate event %v", c)
	}
	waitFor(t, "list events", func() bool {
		return len(ev.find(pfx+".events.list", func(m map[string]any) bool {
			return m["organizationId"] == orgA && m["instanceId"] == "instance-a"
		})) == 2
	})
}

// TestNATSRestart stops the NATS server under two running instances and
// starts a new one on the same port: meanwhile auth fails at once and
// local relay goes on; afterwards everything works again by itself.
func TestNATSRestart(t *testing.T) {
	ns := natstest.Start(t, -1)
	url := ns.ClientURL()
	port := ns.Addr().(*net.TCPAddr).Port
	p := startPair(t, url, instanceOpts{})
	agent := p.a.authedAgent(1, agentA1)
	portal := p.a.authedPortal(portalA, false)
	remote := p.b.authedAgent(2, agentA2)

	ns.Shutdown()
	ns.WaitForShutdown()
	waitFor(t, "instance A to notice", func() bool { return p.a.bus.Ready(context.Background()) != nil })
	t.Logf("ready while down: %v", p.a.bus.Ready(context.Background()))

	before := p.a.stats.Get(stats.AuthClientTimeoutFailure)
	if res := p.a.agent(3).AuthAgent(agentA2); res.Accepted {
		t.Fatal("accepted without a controller")
	}
	if p.a.stats.Get(stats.AuthClientTimeoutFailure) != before+1 {
		t.Fatal("the failed auth was not counted as a timeout failure")
	}
	cmd := testclient.Message(wire.TypeCommand, agent.ClientID, nil)
	portal.Send(cmd)
	if got := testclient.Next(t, agent, wire.TypeCommand); got.MessageID != cmd.MessageID {
		t.Fatalf("local relay while NATS is down: %+v", got)
	}
	cmd = testclient.Message(wire.TypeCommand, remote.ClientID, nil)
	portal.Send(cmd)
	if got := testclient.Next(t, portal, wire.TypeCommand); got.ErrorMessage != wire.TextDestinationNotAvailable {
		t.Fatalf("relay to the other instance while NATS is down: %+v", got)
	}

	natstest.Start(t, port)
	waitFor(t, "both instances to reconnect", func() bool {
		return p.a.bus.Ready(context.Background()) == nil && p.b.bus.Ready(context.Background()) == nil
	})
	waitFor(t, "auth through the controller", func() bool {
		return p.a.agent(4).AuthAgent(agentA2).Accepted
	})
	cmd = testclient.Message(wire.TypeCommand, remote.ClientID, nil)
	portal.Send(cmd)
	if got := testclient.Next(t, remote, wire.TypeCommand); got.MessageID != cmd.MessageID || got.From != portal.ClientID {
		t.Fatalf("relay to the other instance after the restart: %+v", got)
	}
}

// TestAuthFailsWhenNATSDrops: an auth waiting for the controller fails
// as soon as the connection to NATS drops, not at the controller
// deadline (here longer than the test client waits).
func TestAuthFailsWhenNATSDrops(t *testing.T) {
	ns := natstest.Start(t, -1)
	url, pfx := ns.ClientURL(), natstest.Prefix(t, "mstest")
	ec := startController(t, url, pfx)
	asked := make(chan struct{})
	release := make(chan struct{})
	defer close(release)
	ec.mu.Lock()
	ec.hold = func(_ string, req map[string]any) {
		if req["token"] == agentA1 {
			close(asked)
			<-release
		}
	}
	ec.mu.Unlock()
	in := startInstance(t, url, pfx, "instance-a", registry.NewMemory(0, nil), instanceOpts{
		cfg: func(c *config.Config) { c.ControllerTimeout = time.Minute },
	})
	a := in.agent(1)
	res := make(chan wire.AuthResult, 1)
	go func() {
		a.Send(testclient.Message(wire.TypeAuth, "server", wire.AuthRequest{
			Token: agentA1, PublicKey: wire.EncodePublicKey(&a.Key.PublicKey), ClientVersion: "2.1.0.0", ProtocolVersion: wire.ProtocolVersion,
		}))
		env, err := a.Read()
		var r wire.AuthResult
		if err == nil {
			err = env.DecodePayload(&r)
		}
		if err != nil {
			t.Errorf("reading the auth answer: %v", err)
		}
		res <- r
	}()
	<-asked
	ns.Shutdown()
	if r := <-res; r.Accepted {
		t.Fatal("accepted")
	}
	if n := in.stats.Get(stats.AuthClientTimeoutFailure); n != 1 {
		t.Fatalf("AuthClientTimeoutFailure = %d", n)
	}
}
