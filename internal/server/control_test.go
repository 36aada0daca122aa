package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

type controlResult struct {
	resp bus.ControlResponse
	err  error
}

// control runs srv.Control in the background, as the bus would.
func (e *env) control(req bus.ControlRequest) <-chan controlResult {
	out := make(chan controlResult, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		resp, err := e.srv.Control(ctx, req)
		out <- controlResult{resp, err}
	}()
	return out
}

func waitControl(t *testing.T, ch <-chan controlResult) controlResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(testclient.Timeout):
		t.Fatal("Control did not return")
		return controlResult{}
	}
}

func strp(s string) *string { return &s }

func TestControl(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	for _, style := range []wire.Style{wire.StyleString, wire.StyleEmbedded} {
		t.Run(styleName(style), func(t *testing.T) {
			// The server learns the style from a payload (an ignored
			// message's will do); the pong shows it was read.
			a.Style = style
			a.Send(testclient.Message("style", "server", map[string]int{"n": 1}))
			ping(t, a)
			ch := e.control(bus.ControlRequest{
				AgentID:        "reg-a1",
				OrganizationID: orgA,
				Command:        "set-settings",
				Settings:       map[string]*string{"loglevel": strp("debug"), "empty": nil},
				SentTime:       e.clock.Now(),
			})
			data := readRaw(t, a)
			jweHeader(t, data)
			got, err := wire.OpenEnvelope(data, a.Key)
			if err != nil {
				t.Fatalf("control does not decrypt with the agent key: %v", err)
			}
			if got.Type != wire.TypeControl || got.To != a.ClientID || got.From != "test-instance" || got.MessageID == "" {
				t.Fatalf("control envelope %+v", got)
			}
			if st, _ := got.PayloadStyle(); st != style {
				t.Fatalf("control payload %s, want style %s", got.Payload, styleName(style))
			}
			var raw map[string]json.RawMessage
			if err := got.DecodePayload(&raw); err != nil {
				t.Fatal(err)
			}
			if string(raw["command"]) != `"set-settings"` || string(raw["parameters"]) != `{"empty":null,"loglevel":"debug"}` {
				t.Fatalf("control payload %s", got.Payload)
			}

			answer := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{
				Success: true,
				Output:  map[string]*string{"loglevel": strp("debug"), "restart": strp("no")},
			})
			answer.MessageID = got.MessageID
			a.Send(answer)
			r := waitControl(t, ch)
			if r.err != nil || !r.resp.Success || r.resp.AgentID != "reg-a1" || r.resp.OrganizationID != orgA ||
				r.resp.Settings["restart"] == nil || *r.resp.Settings["restart"] != "no" {
				t.Fatalf("Control = %+v, %v", r.resp, r.err)
			}
			// The agent is still connected.
			ping(t, a)
		})
	}
	t.Run("failure reported by the agent", func(t *testing.T) {
		ch := e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "pause"})
		got := a.Expect(wire.TypeControl)
		answer := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{ErrorMessage: strp("not supported")})
		answer.MessageID = got.MessageID
		a.Send(answer)
		r := waitControl(t, ch)
		if r.err != nil || r.resp.Success || r.resp.Message != "not supported" {
			t.Fatalf("Control = %+v, %v", r.resp, r.err)
		}
	})
	t.Run("without organization", func(t *testing.T) {
		ch := e.control(bus.ControlRequest{AgentID: "reg-a1", Command: "ping"})
		got := a.Expect(wire.TypeControl)
		answer := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{Success: true})
		answer.MessageID = got.MessageID
		a.Send(answer)
		if r := waitControl(t, ch); r.err != nil || !r.resp.Success {
			t.Fatalf("Control = %+v, %v", r.resp, r.err)
		}
	})
	if i, s := e.stats.Get(stats.ControlRelayInitiated), e.stats.Get(stats.ControlRelaySuccess); i != 4 || s != 4 {
		t.Fatalf("ControlRelayInitiated = %d, ControlRelaySuccess = %d, want 4 and 4", i, s)
	}
}

func TestControlNotConnected(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	for _, tt := range []struct {
		name string
		req  bus.ControlRequest
	}{
		{"unknown agent", bus.ControlRequest{AgentID: "reg-nobody", OrganizationID: orgA, Command: "x"}},
		{"other organization", bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgB, Command: "x"}},
		{"client id is not an agent id", bus.ControlRequest{AgentID: a.ClientID, OrganizationID: orgA, Command: "x"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := waitControl(t, e.control(tt.req))
			if !errors.Is(r.err, server.ErrNotConnected) || r.resp.Message != "Client was not connected" || r.resp.Success {
				t.Fatalf("Control = %+v, %v", r.resp, r.err)
			}
			if r.resp.AgentID != tt.req.AgentID || r.resp.OrganizationID != tt.req.OrganizationID {
				t.Fatalf("answer names %q/%q", r.resp.AgentID, r.resp.OrganizationID)
			}
		})
	}
	// Nothing reached the agent.
	ping(t, a)
	if got := e.stats.Get(stats.ControlRelayDestinationNotAvailable); got != 3 {
		t.Fatalf("ControlRelayDestinationNotAvailable = %d", got)
	}
}

func TestControlTimeout(t *testing.T) {
	e := start(t, withConfig(func(c *config.Config) { c.ControlTimeout = 200 * time.Millisecond }))
	a := e.authedAgentT(t, 1, agentA1)
	ch := e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "slow"})
	got := a.Expect(wire.TypeControl)
	r := waitControl(t, ch)
	if !errors.Is(r.err, server.ErrControlTimeout) || r.resp.Success || r.resp.Message == "" {
		t.Fatalf("Control = %+v, %v", r.resp, r.err)
	}
	// A late answer is dropped; the agent stays connected.
	late := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{Success: true})
	late.MessageID = got.MessageID
	a.Send(late)
	ping(t, a)
	if got := e.stats.Get(stats.ControlRelayFailure); got != 1 {
		t.Fatalf("ControlRelayFailure = %d", got)
	}
}

func TestControlStale(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	r := waitControl(t, e.control(bus.ControlRequest{
		AgentID: "reg-a1", OrganizationID: orgA, Command: "old",
		SentTime: e.clock.Now().Add(-server.MaxControlAge - time.Second),
	}))
	if !errors.Is(r.err, server.ErrControlStale) || r.resp.Success {
		t.Fatalf("Control = %+v, %v", r.resp, r.err)
	}
	// Nothing was delivered: the next message is the pong.
	ping(t, a)
	if got := e.stats.Get(stats.ControlRelayStaleMessage); got != 1 {
		t.Fatalf("ControlRelayStaleMessage = %d", got)
	}
	// Just within the age it is delivered.
	ch := e.control(bus.ControlRequest{
		AgentID: "reg-a1", OrganizationID: orgA, Command: "recent",
		SentTime: e.clock.Now().Add(-server.MaxControlAge + time.Minute),
	})
	got := a.Expect(wire.TypeControl)
	answer := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{Success: true})
	answer.MessageID = got.MessageID
	a.Send(answer)
	if r := waitControl(t, ch); r.err != nil {
		t.Fatalf("Control = %+v, %v", r.resp, r.err)
	}
}

func TestControlInvalidAnswer(t *testing.T) {
	e := start(t)
	for _, tt := range []struct {
		name    string
		payload json.RawMessage
	}{
		{"not json", json.RawMessage(`"not json"`)},
		{"wrong shape", json.RawMessage(`{"success":"yes"}`)},
		{"none", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := e.authedAgentT(t, 1, agentA1)
			ch := e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "x"})
			got := a.Expect(wire.TypeControl)
			a.Send(&wire.Envelope{Type: wire.TypeControl, To: got.From, MessageID: got.MessageID, Payload: tt.payload})
			a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidControlResponse)
			if r := waitControl(t, ch); r.err == nil || r.resp.Success {
				t.Fatalf("Control = %+v, %v", r.resp, r.err)
			}
		})
	}
}

// TestControlAgentLeaves closes the agent while a control request waits:
// Control returns at once, long before its timeout.
func TestControlAgentLeaves(t *testing.T) {
	e := start(t, withConfig(func(c *config.Config) { c.ControlTimeout = time.Minute }))
	a := e.authedAgentT(t, 1, agentA1)
	ch := e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "x"})
	a.Expect(wire.TypeControl)
	_ = a.WS.Close()
	r := waitControl(t, ch)
	if !errors.Is(r.err, server.ErrClosed) || r.resp.Success {
		t.Fatalf("Control = %+v, %v", r.resp, r.err)
	}
}

// TestControlAnswerFromOtherConnection answers a control request from
// another connection of the same agent: it is not taken as the answer.
func TestControlAnswerFromOtherConnection(t *testing.T) {
	e := start(t, withConfig(func(c *config.Config) { c.ControlTimeout = 300 * time.Millisecond }))
	a := e.authedAgentT(t, 1, agentA1)
	other := e.authedAgentT(t, 2, agentA2)
	ch := e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "x"})
	got := a.Expect(wire.TypeControl)
	forged := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{Success: true})
	forged.MessageID = got.MessageID
	other.Send(forged)
	ping(t, other)
	if r := waitControl(t, ch); !errors.Is(r.err, server.ErrControlTimeout) {
		t.Fatalf("Control = %+v, %v; want a timeout", r.resp, r.err)
	}
}
