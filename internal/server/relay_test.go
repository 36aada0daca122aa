package server_test

import (
	"bytes"
	"encoding/json"
	"slices"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// TestRelayFrom checks that relayed envelopes carry the sender's
// authenticated id, whatever the sender wrote in "from".
func TestRelayFrom(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	p := e.authedPortalT(t, portalA, false)
	for _, forged := range []string{"", "someone-else", a.ClientID} {
		cmd := command(a.ClientID, map[string]string{"path": "/x"})
		cmd.From = forged
		if forged == "" {
			// Send fills an empty from; write the frame by hand.
			data, err := cmd.Marshal(wire.StyleString)
			if err != nil {
				t.Fatal(err)
			}
			p.SendRaw(data)
		} else {
			p.Send(cmd)
		}
		got := a.Expect(wire.TypeCommand)
		if got.From != p.ClientID || got.MessageID != cmd.MessageID || got.To != a.ClientID {
			t.Fatalf("portal wrote from %q; agent got from %q id %q to %q", forged, got.From, got.MessageID, got.To)
		}
		answer := command(p.ClientID, map[string]int{"statusCode": 200})
		answer.MessageID = cmd.MessageID
		answer.From = forged
		if forged == "" {
			answer.From = "x"
		}
		a.Send(answer)
		back := p.Expect(wire.TypeCommand)
		if back.From != a.ClientID || back.MessageID != cmd.MessageID {
			t.Fatalf("agent wrote from %q; portal got from %q id %q", answer.From, back.From, back.MessageID)
		}
	}
	e.waitCounter(t, stats.CommandRelaySuccess, 6)
}

func TestRelayDestinationNotAvailable(t *testing.T) {
	e := start(t)
	p := e.authedPortalT(t, portalA, false)
	gone := e.authedAgentT(t, 1, agentA1)
	goneID := gone.ClientID
	_ = gone.WS.Close()
	waitFor(t, "the agent to leave", func() bool { return len(listIDs(t, p)) == 0 })
	for _, tt := range []struct{ name, typ, to string }{
		{"unknown command", wire.TypeCommand, "no-such-client"},
		{"disconnected command", wire.TypeCommand, goneID},
		{"unknown control", wire.TypeControl, "no-such-client"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req := testclient.Message(tt.typ, tt.to, map[string]string{"method": "GET"})
			p.Send(req)
			env := p.Expect(tt.typ)
			if env.MessageID != req.MessageID || env.ErrorMessage != wire.TextDestinationNotAvailable {
				t.Fatalf("answer %+v, want errorMessage %q for %q", env, wire.TextDestinationNotAvailable, req.MessageID)
			}
		})
	}
	// The portal is still connected and working.
	ping(t, p)
	if got := e.stats.Get(stats.CommandRelayDestinationNotAvailable); got != 3 {
		t.Fatalf("CommandRelayDestinationNotAvailable = %d, want 3", got)
	}
	// An agent's command to nobody is dropped without an error envelope,
	// which the Duplicati agent would not expect; it stays connected.
	a := e.authedAgentT(t, 2, agentA2)
	a.Send(command("no-such-client", nil))
	ping(t, a)
}

// TestRelayAcrossOrganizations sends commands to a client of another
// organization: the sender is closed, the target neither gets the command
// nor loses its connection.
func TestRelayAcrossOrganizations(t *testing.T) {
	e := start(t)
	agentOfA := e.authedAgentT(t, 1, agentA1)
	portalOfA := e.authedPortalT(t, portalA, false)

	t.Run("portal to agent", func(t *testing.T) {
		intruder := e.authedPortalT(t, portalB, false)
		intruder.Send(command(agentOfA.ClientID, map[string]string{"method": "DELETE"}))
		intruder.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	})
	t.Run("agent to portal", func(t *testing.T) {
		intruder := e.authedAgentT(t, 2, agentB1)
		intruder.Send(command(portalOfA.ClientID, map[string]int{"statusCode": 200}))
		intruder.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	})
	t.Run("agent to agent", func(t *testing.T) {
		intruder := e.authedAgentT(t, 2, agentB1)
		intruder.Send(command(agentOfA.ClientID, nil))
		intruder.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	})
	if got := e.stats.Get(stats.CommandRelayDenied); got != 3 {
		t.Fatalf("CommandRelayDenied = %d, want 3", got)
	}
	// The targets are connected and the next message each gets is from its
	// own organization.
	cmd := command(agentOfA.ClientID, map[string]string{"method": "GET"})
	portalOfA.Send(cmd)
	if got := agentOfA.Expect(wire.TypeCommand); got.MessageID != cmd.MessageID || got.From != portalOfA.ClientID {
		t.Fatalf("agent of A got %+v", got)
	}
	answer := command(portalOfA.ClientID, map[string]int{"statusCode": 200})
	agentOfA.Send(answer)
	if got := portalOfA.Expect(wire.TypeCommand); got.MessageID != answer.MessageID {
		t.Fatalf("portal of A got %+v", got)
	}
	if ids := listIDs(t, portalOfA); !slices.Equal(ids, []string{agentOfA.ClientID}) {
		t.Fatalf("portal of A lists %v", ids)
	}
}

func TestImpersonatingPortal(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	imp := e.authedPortalT(t, portalImp, false)
	// It may look.
	if ids := listIDs(t, imp); !slices.Equal(ids, []string{a.ClientID}) {
		t.Fatalf("impersonating portal lists %v", ids)
	}
	for _, typ := range []string{wire.TypeCommand, wire.TypeControl} {
		t.Run(typ, func(t *testing.T) {
			imp := e.authedPortalT(t, portalImp, false)
			imp.Send(testclient.Message(typ, a.ClientID, map[string]string{"method": "POST"}))
			imp.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
		})
	}
	// The agent got nothing: the next message it reads is this one.
	p := e.authedPortalT(t, portalA, false)
	cmd := command(a.ClientID, map[string]string{"method": "GET"})
	p.Send(cmd)
	if got := a.Expect(wire.TypeCommand); got.MessageID != cmd.MessageID || got.From != p.ClientID {
		t.Fatalf("agent got %+v, want only the ordinary portal's command", got)
	}
}

// TestSameClientID connects a second agent with the same client id in the
// same organization: it replaces the first.
func TestSameClientID(t *testing.T) {
	e := start(t)
	p := e.authedPortalT(t, portalA, false)
	first := e.authedAgentT(t, 1, agentA1)
	second := e.agentT(t, 2)
	second.ClientID = first.ClientID
	if res := e.authAgentT(t, second, agentA1); !res.Accepted {
		t.Fatal("second connection refused")
	}
	first.ExpectClose(websocket.CloseNormalClosure, wire.TextReplaced)
	waitFor(t, "the first connection to end", func() bool { return e.closes("replaced") == 1 })

	l := list(t, p)
	if len(l) != 1 || l[0].ClientID != first.ClientID || l[0].MachineRegistrationID != "reg-a1" {
		t.Fatalf("list %+v, want only the second connection", l)
	}
	// Commands reach the second connection.
	cmd := command(second.ClientID, nil)
	p.Send(cmd)
	if got := second.Expect(wire.TypeCommand); got.MessageID != cmd.MessageID {
		t.Fatalf("second got %+v", got)
	}
	ping(t, second)
	l = list(t, p)
	if len(l) != 1 || l[0].MachineRegistrationID != "reg-a1" {
		t.Fatalf("list after the first closed %+v", l)
	}

	// Another agent, or a portal, claiming the id is refused, and the
	// holder stays.
	thief := e.agentT(t, 4)
	thief.ClientID = first.ClientID
	if res := e.authAgentT(t, thief, agentA2); res.Accepted {
		t.Fatal("another agent took the client id")
	}
	thief.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	claimer := e.portalT(t)
	claimer.ClientID = first.ClientID
	if res := claimer.AuthPortal(portalA, false); res.Accepted {
		t.Fatal("a portal took an agent's client id")
	}
	claimer.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	ping(t, second)
	if l = list(t, p); len(l) != 1 || l[0].MachineRegistrationID != "reg-a1" {
		t.Fatalf("list after the refused claims %+v", l)
	}

	// The same client id in another organization is another client.
	other := e.agentT(t, 3)
	other.ClientID = first.ClientID
	if res := e.authAgentT(t, other, agentB1); !res.Accepted {
		t.Fatal("same id in B refused")
	}
	ping(t, second)
	ping(t, other)
	pb := e.authedPortalT(t, portalB, false)
	if ids := listIDs(t, pb); !slices.Equal(ids, []string{first.ClientID}) {
		t.Fatalf("portal B lists %v", ids)
	}
	if l := list(t, p); len(l) != 1 || l[0].MachineRegistrationID != "reg-a1" {
		t.Fatalf("portal A lists %+v", l)
	}
}

// TestReconnectSameAgent is the Duplicati agent reconnecting with the same
// client id and token while its old connection is still open: the old one
// is replaced, and its end is not reported as the agent disconnecting.
func TestReconnectSameAgent(t *testing.T) {
	e := start(t)
	p := e.authedPortalT(t, portalA, false)
	old := e.authedAgentT(t, 1, agentA1)
	again := e.agentT(t, 1)
	again.ClientID = old.ClientID
	if res := e.authAgentT(t, again, agentA1); !res.Accepted {
		t.Fatal("reconnect refused")
	}
	old.ExpectClose(websocket.CloseNormalClosure, wire.TextReplaced)
	waitFor(t, "the old connection to end", func() bool { return e.closes("replaced") == 1 })
	if ids := listIDs(t, p); !slices.Equal(ids, []string{old.ClientID}) {
		t.Fatalf("list %v", ids)
	}
	connected := func() (n int) {
		for _, a := range e.activities() {
			if a.ActivityType == bus.ActivityConnected {
				n++
			}
		}
		return n
	}
	waitFor(t, "both Connected activities", func() bool { return connected() == 2 })
	for _, a := range e.activities() {
		if a.ActivityType == bus.ActivityDisconnected {
			t.Fatalf("Disconnected published while the agent is connected: %+v", e.activities())
		}
	}
	// When the agent really leaves, it is reported.
	_ = again.WS.Close()
	waitFor(t, "the Disconnected activity", func() bool {
		acts := e.activities()
		return acts[len(acts)-1].ActivityType == bus.ActivityDisconnected
	})
}

// TestListPush checks the lists a portal is sent unasked when an agent of
// its organizations connects or disconnects, and that other portals are
// not.
func TestListPush(t *testing.T) {
	e := start(t)
	pa := e.authedPortalT(t, portalA, false)
	pall := e.authedPortalT(t, portalA, true)
	pb := e.authedPortalT(t, portalB, false)

	expectPush := func(t *testing.T, p *testclient.Conn, want []string) {
		t.Helper()
		env := p.Expect(wire.TypeList)
		l := testclient.DecodeList(t, env)
		ids := []string{}
		for _, r := range l {
			ids = append(ids, r.ClientID)
		}
		slices.Sort(ids)
		slices.Sort(want)
		if !slices.Equal(ids, want) {
			t.Fatalf("pushed list %v, want %v", ids, want)
		}
	}
	// expectNoPush shows that nothing was pushed: the next list the portal
	// reads answers its own request.
	expectNoPush := func(t *testing.T, p *testclient.Conn) {
		t.Helper()
		req := testclient.Message(wire.TypeList, "MachineService", nil)
		p.Send(req)
		if env := p.Expect(wire.TypeList); env.MessageID != req.MessageID {
			t.Fatalf("portal was pushed a list %+v", env)
		}
	}

	a := e.authedAgentT(t, 1, agentA1)
	expectPush(t, pa, []string{a.ClientID})
	expectPush(t, pall, []string{a.ClientID})

	sub := e.authedAgentT(t, 2, agentSub1)
	expectPush(t, pall, []string{a.ClientID, sub.ClientID})

	_ = sub.WS.Close()
	expectPush(t, pall, []string{a.ClientID})
	_ = a.WS.Close()
	expectPush(t, pa, []string{})
	expectPush(t, pall, []string{})

	// B heard of none of it; A without sub-organizations not of sub.
	expectNoPush(t, pb)
	expectNoPush(t, pa)
	// Portals connecting do not push.
	e.authedPortalT(t, portalA, false)
	expectNoPush(t, pa)
	expectNoPush(t, pall)
}

// TestPayloadPassThrough relays payloads the server cannot read: they
// arrive with the same content, in the recipient's style. Text that is not
// JSON (an end-to-end JWE) arrives byte for byte; JSON arrives as the same
// JSON value.
func TestPayloadPassThrough(t *testing.T) {
	e := start(t)
	const jweLike = "eyJhbGciOiJSU0EtT0FFUC0yNTYiLCJlbmMiOiJBMjU2Q0JDLUhTNTEyIn0.c2VjcmV0.aXY.Y2lwaGVy.dGFn"
	tests := []struct {
		name    string
		payload json.RawMessage
		inner   string // the content a recipient must decode, whatever its style
	}{
		{"compact JWE text", testclient.RawJSON(jweLike), jweLike},
		{"string with quotes", testclient.RawJSON(`a "quoted" \ text`), `a "quoted" \ text`},
		{"json in a string", testclient.RawJSON(`{"z":1,  "a":[true,null],"u":"\u00e9"}`), `{"z":1,  "a":[true,null],"u":"\u00e9"}`},
		{"embedded object", json.RawMessage(`{"z":1,  "a":[true,null],"u":"\u00e9"}`), `{"z":1,  "a":[true,null],"u":"\u00e9"}`},
	}
	for _, agentStyle := range []wire.Style{wire.StyleString, wire.StyleEmbedded} {
		t.Run("agent "+styleName(agentStyle), func(t *testing.T) {
			a := e.agentT(t, 1)
			a.Style = agentStyle
			if !e.authAgentT(t, a, agentA1).Accepted {
				t.Fatal("refused")
			}
			p := e.authedPortalT(t, portalA, false)
			for _, tt := range tests {
				cmd := &wire.Envelope{Type: wire.TypeCommand, To: a.ClientID, Payload: tt.payload}
				p.Send(cmd)
				got := a.Expect(wire.TypeCommand)
				if content(t, got.Payload) != content(t, testclient.RawJSON(tt.inner)) {
					t.Fatalf("%s: agent got payload %s, want content %q", tt.name, got.Payload, tt.inner)
				}
				back := &wire.Envelope{Type: wire.TypeCommand, To: p.ClientID, MessageID: cmd.MessageID, Payload: tt.payload}
				a.Send(back)
				env := testclient.Next(t, p, wire.TypeCommand)
				if content(t, env.Payload) != content(t, testclient.RawJSON(tt.inner)) {
					t.Fatalf("%s: portal got payload %s, want content %q", tt.name, env.Payload, tt.inner)
				}
			}
		})
	}
}

// content is a payload's text: the string a string payload holds, or an
// embedded payload's JSON; JSON is compacted, as the style conversion
// may.
func content(t *testing.T, p json.RawMessage) string {
	t.Helper()
	text := string(p)
	if len(p) > 0 && p[0] == '"' {
		if err := json.Unmarshal(p, &text); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if json.Compact(&buf, []byte(text)) == nil {
		return buf.String()
	}
	return text
}

// TestRelayOnlyBetweenRoles lets an agent send a command to another agent
// of its organization: an agent token must not drive other agents, so the
// sender is closed and the target keeps working.
func TestRelayOnlyBetweenRoles(t *testing.T) {
	e := start(t)
	a1 := e.authedAgentT(t, 1, agentA1)
	a2 := e.authedAgentT(t, 2, agentA2)
	a1.Send(command(a2.ClientID, nil))
	a1.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	ping(t, a2)
	p1 := e.authedPortalT(t, portalA, false)
	p2 := e.authedPortalT(t, portalA, false)
	p1.Send(command(p2.ClientID, nil))
	p1.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
	ping(t, p2)
}
