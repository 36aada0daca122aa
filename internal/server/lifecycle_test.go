package server_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

func TestPingPong(t *testing.T) {
	e := start(t)
	t.Run("agent", func(t *testing.T) {
		a := e.authedAgentT(t, 1, agentA1)
		req := testclient.Message(wire.TypePing, "server", nil)
		a.Send(req)
		data := readRaw(t, a)
		jweHeader(t, data)
		pong, err := wire.OpenEnvelope(data, a.Key)
		if err != nil {
			t.Fatal(err)
		}
		if pong.Type != wire.TypePong || pong.To != a.ClientID || pong.From != "test-instance" || pong.MessageID == "" || pong.MessageID == req.MessageID {
			t.Fatalf("pong %+v", pong)
		}
	})
	// The server answers WebSocket pings of clients in any state.
	for _, path := range []string{"/agent", "/portal"} {
		t.Run("websocket ping on "+path, func(t *testing.T) {
			ws, _ := rawDial(t, e.base, path)
			pongs := make(chan string, 1)
			ws.SetPongHandler(func(data string) error { pongs <- data; return nil })
			go func() {
				for {
					if _, _, err := ws.ReadMessage(); err != nil {
						return
					}
				}
			}()
			if err := ws.WriteControl(websocket.PingMessage, []byte("hello"), time.Now().Add(time.Second)); err != nil {
				t.Fatal(err)
			}
			select {
			case got := <-pongs:
				if got != "hello" {
					t.Fatalf("pong %q", got)
				}
			case <-time.After(testclient.Timeout):
				t.Fatal("no pong")
			}
		})
	}
	t.Run("portal", func(t *testing.T) {
		p := e.authedPortalT(t, portalA, false)
		req := testclient.Message(wire.TypePing, "server", nil)
		p.Send(req)
		data := readRaw(t, p)
		pong, err := wire.DecodeEnvelope(data)
		if err != nil {
			t.Fatalf("portal pong is not plain: %.100s", data)
		}
		if pong.Type != wire.TypePong || pong.To != p.ClientID || pong.MessageID == "" || pong.MessageID == req.MessageID {
			t.Fatalf("pong %+v", pong)
		}
	})
}

// TestPingRefreshesRegistration moves the clock and checks lastUpdated,
// and that an agent that stops pinging drops out of the list after the
// client timeout.
func TestPingRefreshesRegistration(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	quiet := e.authedAgentT(t, 2, agentA2)
	p := e.authedPortalT(t, portalA, false)
	byID := func() map[string]wire.ClientRegistration {
		m := map[string]wire.ClientRegistration{}
		for _, r := range list(t, p) {
			m[r.ClientID] = r
		}
		return m
	}
	before := byID()[a.ClientID].LastUpdated
	if before.IsZero() {
		t.Fatal("no lastUpdated")
	}
	e.clock.Advance(time.Minute)
	ping(t, a)
	after := byID()[a.ClientID].LastUpdated
	if !after.Equal(before.Add(time.Minute)) {
		t.Fatalf("lastUpdated %v after a ping a minute later, was %v", after, before)
	}
	if got := byID()[quiet.ClientID].LastUpdated; !got.Equal(before) {
		t.Fatalf("the quiet agent's lastUpdated moved to %v", got)
	}
	e.clock.Advance(registry.DefaultClientTimeout - 30*time.Second)
	ping(t, a)
	m := byID()
	if _, ok := m[quiet.ClientID]; ok || len(m) != 1 {
		t.Fatalf("list %v, want only the agent that pinged", m)
	}
	// A portal's ping refreshes nothing listed, but is answered.
	ping(t, p)
}

func TestActivityEvents(t *testing.T) {
	e := start(t)
	a := e.agentT(t, 1)
	a.Send(testclient.Message(wire.TypeAuth, "server", wire.AuthRequest{
		Token: agentA1, PublicKey: wire.EncodePublicKey(&a.Key.PublicKey), ClientVersion: "2.1.0.0", ProtocolVersion: 1,
		Metadata: map[string]*string{"machine-name": strp("box"), "client-id": strp(a.ClientID), "install-id": nil},
	}))
	if res := a.Expect(wire.TypeAuth); res.MessageID == "" {
		t.Fatal("no auth answer")
	}
	// Connected is published right after the answer is queued.
	waitFor(t, "the Connected activity", func() bool { return len(e.activities()) > 0 })
	acts := e.activities()
	if len(acts) != 1 {
		t.Fatalf("activities %+v, want one Connected", acts)
	}
	c := acts[0]
	if c.ActivityType != bus.ActivityConnected || c.RegisteredAgentID != "reg-a1" || c.OrganizationID != orgA ||
		c.ClientVersion != "2.1.0.0" || c.ActivityTimestamp.IsZero() {
		t.Fatalf("Connected %+v", c)
	}
	if v := c.Metadata["machine-name"]; v == nil || *v != "box" {
		t.Fatalf("metadata %v", c.Metadata)
	}
	if v, ok := c.Metadata["install-id"]; !ok || v != nil {
		t.Fatalf("metadata null value lost: %v", c.Metadata)
	}

	ping(t, a)
	acts = e.activities()
	if len(acts) != 2 || acts[1].ActivityType != bus.ActivityPing || acts[1].RegisteredAgentID != "reg-a1" {
		t.Fatalf("activities after ping %+v", acts)
	}
	// Portals publish nothing.
	p := e.authedPortalT(t, portalA, false)
	ping(t, p)
	if got := len(e.activities()); got != 2 {
		t.Fatalf("%d activities after a portal's auth and ping", got)
	}

	_ = a.WS.Close()
	waitFor(t, "Disconnected", func() bool { return len(e.activities()) == 3 })
	d := e.activities()[2]
	if d.ActivityType != bus.ActivityDisconnected || d.RegisteredAgentID != "reg-a1" || d.OrganizationID != orgA {
		t.Fatalf("Disconnected %+v", d)
	}
	// A refused agent publishes nothing.
	r := e.agentT(t, 2)
	if r.AuthAgent("bad").Accepted {
		t.Fatal("accepted")
	}
	r.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationFailed)
	if got := len(e.activities()); got != 3 {
		t.Fatalf("%d activities after a refused auth", got)
	}
}

func TestDisablePingMessages(t *testing.T) {
	e := start(t, withConfig(func(c *config.Config) { c.DisablePingMessages = true }))
	a := e.authedAgentT(t, 1, agentA1)
	waitFor(t, "the Connected activity", func() bool { return len(e.activities()) > 0 })
	ping(t, a)
	ping(t, a)
	for _, act := range e.activities() {
		if act.ActivityType == bus.ActivityPing {
			t.Fatalf("Ping activity published: %+v", act)
		}
	}
	if got := len(e.activities()); got != 1 {
		t.Fatalf("activities %+v, want only Connected", e.activities())
	}
}

// TestTokenExpiry lets tokens expire on the server's clock: the next
// message gets a warning, then the connection is closed.
func TestTokenExpiry(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentExpiry)
	p := e.authedPortalT(t, portalExp, false)
	long := e.authedAgentT(t, 2, agentA1)
	ping(t, a)
	ping(t, p)
	e.clock.Advance(2 * time.Minute)
	for _, c := range []*testclient.Conn{a, p} {
		c.Send(testclient.Message(wire.TypePing, "server", nil))
		w := testclient.Next(t, c, wire.TypeWarning)
		if w.ErrorMessage != wire.TextTokenExpired || w.To != c.ClientID {
			t.Fatalf("%s warning %+v", c.Role, w)
		}
		c.ExpectClose(websocket.ClosePolicyViolation, wire.TextTokenExpired)
	}
	// The agent's warning was encrypted (Read decrypted it) and the
	// connection with a valid token is untouched.
	ping(t, long)
	// An expired token no longer authenticates.
	late := e.agentT(t, 3)
	if late.AuthAgent(agentExpiry).Accepted {
		t.Fatal("expired token accepted")
	}
}

// TestIgnored sends what the server ignores: unknown types and binary
// frames, before and after auth. The connection keeps working.
func TestIgnored(t *testing.T) {
	e := start(t)
	for _, role := range []string{"agent", "portal"} {
		t.Run(role, func(t *testing.T) {
			var c *testclient.Conn
			auth := func() {
				if role == "agent" {
					if !e.authAgentT(t, c, agentA1).Accepted {
						t.Fatal("refused")
					}
				} else if !c.AuthPortal(portalA, false).Accepted {
					t.Fatal("refused")
				}
			}
			if role == "agent" {
				c = e.agentT(t, 1)
			} else {
				c = e.portalT(t)
			}
			junk := func() {
				c.Send(testclient.Message("frobnicate", "server", map[string]int{"x": 1}))
				c.Send(testclient.Message(wire.TypeWelcome, "server", nil))
				c.Send(testclient.Message(wire.TypePong, "server", nil))
				c.Send(testclient.Message(wire.TypeWarning, "server", nil))
				c.Send(testclient.Message("authgateway", "server", nil))
				if err := c.WS.WriteMessage(websocket.BinaryMessage, []byte("\x00\x01 not text {")); err != nil {
					t.Fatal(err)
				}
			}
			if role == "portal" {
				junk() // an agent may send nothing but auth first
			}
			auth()
			junk()
			ping(t, c)
		})
	}
	if got := e.stats.Get(stats.MessagesIgnored); got != 18 {
		t.Fatalf("MessagesIgnored = %d, want 18", got)
	}
}

// TestEnvelopeKeys sends envelopes with the keys capitalised as in the
// specification's example: they are read, and answers use camelCase.
func TestEnvelopeKeys(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	p := e.portalT(t)
	p.SendRaw([]byte(`{"From":"Console","To":"MachineService","Type":"AuthPortal","MessageId":"m1","Payload":{"JwToken":"` + portalA + `","ClientVersion":"","ProtocolVersion":1}}`))
	if res := authResult(t, p, wire.TypeAuthPortal, "m1"); !res.Accepted {
		t.Fatal("refused")
	}
	p.SendRaw([]byte(`{"FROM":"Console","TO":"MachineService","TYPE":"LIST","MESSAGEID":"m2","PAYLOAD":null}`))
	var data []byte
	var raw map[string]json.RawMessage
	for string(raw["messageId"]) != `"m2"` { // skip lists pushed meanwhile
		data = readRaw(t, p)
		raw = nil
		if err := json.Unmarshal(data, &raw); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []string{"from", "to", "type", "messageId", "payload", "errorMessage"} {
		if _, ok := raw[k]; !ok {
			t.Fatalf("answer %s has no key %q", data, k)
		}
	}
	if string(raw["messageId"]) != `"m2"` || string(raw["type"]) != `"list"` {
		t.Fatalf("answer %s", data)
	}
	var l []map[string]any
	if err := json.Unmarshal(raw["payload"], &l); err != nil || len(l) != 1 || l[0]["clientId"] != a.ClientID {
		t.Fatalf("list payload %s (%v)", raw["payload"], err)
	}
	for _, k := range []string{"clientId", "clientVersion", "organizationId", "machineRegistrationId", "machineServerUri", "type", "lastUpdated"} {
		if _, ok := l[0][k]; !ok {
			t.Errorf("registration has no %q: %v", k, l[0])
		}
	}
	if l[0]["type"] != float64(1) {
		t.Errorf("registration type %v, want 1", l[0]["type"])
	}
	// The portal's id is the from of its authportal.
	p.SendRaw([]byte(`{"type":"command","to":"` + a.ClientID + `","messageId":"m3","payload":{"method":"GET"}}`))
	if got := a.Expect(wire.TypeCommand); got.From != "Console" || got.MessageID != "m3" {
		t.Fatalf("agent got %+v", got)
	}
}

// TestShutdown closes a server with clients in every state.
func TestShutdown(t *testing.T) {
	var reg registry.Registry
	e := start(t, withRegistry(&reg))
	a := e.authedAgentT(t, 1, agentA1)
	sub := e.authedAgentT(t, 2, agentSub1)
	p := e.authedPortalT(t, portalA, true)
	fresh := e.agentT(t, 3)
	portalFresh := e.portalT(t)
	if agents, err := reg.Agents(context.Background(), []string{orgA, orgSub}); err != nil || len(agents) != 2 {
		t.Fatalf("registry before shutdown: %v, %v", agents, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(ctx) }()
	for _, c := range []*testclient.Conn{a, sub, p, fresh, portalFresh} {
		c.ExpectClose(websocket.CloseGoingAway, wire.TextShuttingDown)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("Shutdown did not return within its context")
	}
	if agents, err := reg.Agents(context.Background(), []string{orgA, orgSub}); err != nil || len(agents) != 0 {
		t.Fatalf("registry after shutdown: %v, %v", agents, err)
	}
	if _, err := testclient.DialErr(t, e.base, "/agent", nil); err == nil {
		t.Fatal("a connection was accepted after shutdown")
	}
}

// TestShutdownUnresponsive shuts down while a client neither reads nor
// answers the close: Shutdown still returns within its context.
func TestShutdownUnresponsive(t *testing.T) {
	t.Parallel()
	e := start(t)
	e.authedAgentT(t, 1, agentA1) // never read again
	p := e.authedPortalT(t, portalA, false)
	p.WS.SetCloseHandler(func(int, string) error { return nil }) // no close answer
	go func() {
		for {
			if _, _, err := p.WS.ReadMessage(); err != nil {
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestStatistics checks that the counters follow what happens.
func TestStatistics(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	bad := e.agentT(t, 2)
	bad.AuthAgent("nope")
	bad.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationFailed)
	p := e.authedPortalT(t, portalA, false)
	pbad := e.portalT(t)
	pbad.AuthPortal("nope", false)
	pbad.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationFailed)
	list(t, p)
	list(t, p)
	ping(t, a)
	ping(t, p)
	cmd := command(a.ClientID, nil)
	p.Send(cmd)
	a.Expect(wire.TypeCommand)
	p.Send(command("nobody", nil))
	testclient.Next(t, p, wire.TypeCommand)

	want := map[stats.Counter]int64{
		stats.AuthClientSuccess:                   1,
		stats.AuthClientFailure:                   1,
		stats.AuthPortalSuccess:                   1,
		stats.AuthPortalFailure:                   1,
		stats.ListCommandSuccess:                  2,
		stats.PingCommandSuccess:                  3, // one by authedPortalT
		stats.CommandRelaySuccess:                 1,
		stats.CommandRelayDestinationNotAvailable: 1,
	}
	for c, n := range want {
		e.waitCounter(t, c, n)
	}
	snap := e.stats.Snapshot()
	if snap.TotalConnections != 4 || snap.MaxSimultaneous < 2 || snap.MessagesReceived < 9 {
		t.Errorf("snapshot %+v", snap)
	}
	waitFor(t, "the refused connections to be counted", func() bool { return e.closes("auth_rejected") == 2 })
}

// TestShutdownDuringAuth shuts down while an agent's token is with the
// controller: the agent is told the server is shutting down, and nothing
// is counted against the controller.
func TestShutdownDuringAuth(t *testing.T) {
	var g *gate
	e := start(t, withController(func(inner controller.Controller) controller.Controller {
		g = newGate(inner)
		return g
	}))
	a := e.agentT(t, 1)
	a.Send(testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1)))
	g.waitEntered(t)
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- e.srv.Shutdown(ctx)
	}()
	a.ExpectClose(websocket.CloseGoingAway, wire.TextShuttingDown)
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if n := e.stats.Get(stats.AuthClientTimeoutFailure); n != 0 {
		t.Fatalf("AuthClientTimeoutFailure = %d after a shutdown", n)
	}
}
