package server_test

import (
	"encoding/json"
	"testing"

	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// TestFullFlow walks the whole protocol once: an agent and a portal
// connect, the portal lists the agent and sends it a command, the agent
// answers and the answer reaches the portal.
func TestFullFlow(t *testing.T) {
	for _, style := range []wire.Style{wire.StyleString, wire.StyleEmbedded} {
		t.Run(map[wire.Style]string{wire.StyleString: "string", wire.StyleEmbedded: "embedded"}[style], func(t *testing.T) {
			e := start(t)
			agent := e.agent(1)
			agent.Style = style
			var w wire.Welcome
			if err := agent.Welcome.DecodePayload(&w); err != nil {
				t.Fatal(err)
			}
			if w.PublicKeyHash != wire.PublicKeyHash(&testclient.Key(t, serverKeyIndex).PublicKey) {
				t.Fatalf("welcome key hash %q", w.PublicKeyHash)
			}
			if agent.Welcome.From != "test-instance" || agent.Welcome.To != "unknown client" {
				t.Fatalf("welcome from %q to %q", agent.Welcome.From, agent.Welcome.To)
			}
			if res := agent.AuthAgent(agentA1); !res.Accepted || res.WillReplaceToken || res.NewToken != nil {
				t.Fatalf("agent auth result %+v", res)
			}

			portal := e.portal()
			portal.Style = style
			if res := portal.AuthPortal(portalA, false); !res.Accepted {
				t.Fatalf("portal auth result %+v", res)
			}
			list := portal.List()
			if len(list) != 1 || list[0].ClientID != agent.ClientID || list[0].OrganizationID != orgA ||
				list[0].MachineRegistrationID != "reg-a1" || list[0].Type != wire.ClientTypeAgent || list[0].ClientVersion != "2.1.0.0" {
				t.Fatalf("list = %+v", list)
			}

			body := "aGVsbG8="
			cmd := testclient.Message(wire.TypeCommand, agent.ClientID, wire.CommandRequest{Method: "GET", Path: "/api/v1/serverstate", Body: &body})
			portal.Send(cmd)
			got := agent.Expect(wire.TypeCommand)
			if got.From != portal.ClientID || got.MessageID != cmd.MessageID {
				t.Fatalf("agent got command from %q id %q", got.From, got.MessageID)
			}
			if st, _ := got.PayloadStyle(); st != style {
				t.Fatalf("agent got payload style %v, want %v", st, style)
			}
			var req wire.CommandRequest
			if err := got.DecodePayload(&req); err != nil || req.Path != "/api/v1/serverstate" || *req.Body != body {
				t.Fatalf("command payload %s: %v", got.Payload, err)
			}

			answer := testclient.Message(wire.TypeCommand, portal.ClientID, wire.CommandResponse{StatusCode: 200, Body: &body})
			answer.MessageID = cmd.MessageID
			agent.Send(answer)
			// The list pushed after the agent's auth may reach the
			// portal, which authenticated after the agent's answer.
			back := portal.Next(wire.TypeCommand)
			if back.From != agent.ClientID || back.MessageID != cmd.MessageID {
				t.Fatalf("portal got answer from %q id %q", back.From, back.MessageID)
			}
			var resp wire.CommandResponse
			if err := back.DecodePayload(&resp); err != nil || resp.StatusCode != 200 {
				t.Fatalf("answer payload %s: %v", back.Payload, err)
			}

			agent.Send(testclient.Message(wire.TypePing, "server", nil))
			pong := agent.Expect(wire.TypePong)
			if pong.To != agent.ClientID {
				t.Fatalf("pong to %q", pong.To)
			}
			raw, _ := json.Marshal(e.activities())
			t.Logf("activity: %s", raw)
		})
	}
}
