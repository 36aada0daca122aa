package e2e_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/portal"
	"github.com/machineservice/machineservice/wire"
)

// TestTwoInstances runs two instances on one PostgreSQL registry and one
// NATS bus, with an agent on each, and checks what crosses between them:
// lists, commands both ways (one with a large answer), the organization
// check, control requests from the bus and list pushes.
func TestTwoInstances(t *testing.T) {
	c := newCluster(t)
	a := c.start("instance-a")
	b := c.start("instance-b")

	agentB, apiB := b.startAgent(t, servertest.AgentToken, "agent on B")  // registered agent "agent-1"
	agentA, apiA := a.startAgent(t, servertest.AgentToken2, "agent on A") // registered agent "agent-2"
	portalA := a.portal(t, servertest.PortalToken)
	portalB := b.portal(t, servertest.PortalToken)
	// The agent library reports Connected on the auth answer, which the
	// server sends before it writes the registration.
	for _, p := range []struct {
		name string
		c    *portal.Client
	}{{"portal on A", portalA}, {"portal on B", portalB}} {
		for _, ag := range []*servertest.Agent{agentA, agentB} {
			servertest.WaitFor(t, p.name+" to list "+ag.ClientID(), func() bool {
				_, ok := listed(t, p.c, ag.ClientID())
				return ok
			})
		}
	}

	t.Run("list across instances", func(t *testing.T) {
		e, _ := listed(t, portalA, agentB.ClientID())
		if e.GatewayID != b.id || e.MachineServerURI != b.url {
			t.Errorf("agent on B listed on A with gatewayId %q and machineServerUri %q, want %q and %q", e.GatewayID, e.MachineServerURI, b.id, b.url)
		}
		if e.MachineRegistrationID != "agent-1" || e.OrganizationID != servertest.Org || e.Type != wire.ClientTypeAgent {
			t.Errorf("agent on B listed on A as %+v", e)
		}
		if e, _ := listed(t, portalB, agentA.ClientID()); e.GatewayID != a.id || e.MachineServerURI != a.url {
			t.Errorf("agent on A listed on B with gatewayId %q and machineServerUri %q, want %q and %q", e.GatewayID, e.MachineServerURI, a.id, a.url)
		}
	})

	t.Run("command from A to an agent on B", func(t *testing.T) {
		status, by, body := call(t, portalA, agentB.ClientID(), "/api/v1/a-to-b?x=1", "ping from A")
		if want := `agent on B: POST /api/v1/a-to-b?x=1 body="ping from A"`; status != http.StatusAccepted || by != "agent on B" || body != want {
			t.Fatalf("answer %d %q %q, want %d %q %q", status, by, body, http.StatusAccepted, "agent on B", want)
		}
		if !slices.Contains(apiB.seen(), "/api/v1/a-to-b?x=1") {
			t.Fatalf("the local API behind the agent on B saw headers %q", apiB.seen())
		}
	})

	t.Run("command from B to an agent on A", func(t *testing.T) {
		status, by, body := call(t, portalB, agentA.ClientID(), "/b-to-a", "ping from B")
		if want := `agent on A: POST /b-to-a body="ping from B"`; status != http.StatusAccepted || by != "agent on A" || body != want {
			t.Fatalf("answer %d %q %q, want %d %q %q", status, by, body, http.StatusAccepted, "agent on A", want)
		}
		if !slices.Contains(apiA.seen(), "/b-to-a") {
			t.Fatalf("the local API behind the agent on A saw headers %q", apiA.seen())
		}
	})

	t.Run("large answer across instances", func(t *testing.T) {
		// About half of what one message may carry once base64 and the
		// JWE have grown it, and well within NATS' default max_payload.
		const size = 384 << 10
		status, by, body := call(t, portalA, agentB.ClientID(), fmt.Sprintf("/big?size=%d", size), "")
		if status != http.StatusOK || by != "agent on B" || body != strings.Repeat("x", size) {
			t.Fatalf("answer %d from %q with %d bytes, want 200 from the agent on B with %d", status, by, len(body), size)
		}
	})

	t.Run("another organization is denied", func(t *testing.T) {
		drops := agentB.Count(agent.Disconnected)
		other := testclient.DialPortal(t, a.base)
		if !other.AuthPortal(servertest.OtherPortalToken, false).Accepted {
			t.Fatal("the other organization's portal was refused")
		}
		if got := other.List(); len(got) != 0 {
			t.Fatalf("the other organization's portal lists %+v", got)
		}
		other.Send(testclient.Message(wire.TypeCommand, agentB.ClientID(), wire.CommandRequest{Method: "GET", Path: "/secret"}))
		other.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)

		// The agent stays connected and keeps answering its own portals.
		status, _, body := call(t, portalA, agentB.ClientID(), "/after-denial", "")
		if status != http.StatusAccepted || body != `agent on B: POST /after-denial body=""` {
			t.Fatalf("after the denial the agent on B answered %d %q", status, body)
		}
		if n := agentB.Count(agent.Disconnected); n != drops {
			t.Fatalf("the agent on B was disconnected %d times by the denied command", n-drops)
		}
		if slices.Contains(apiB.seen(), "/secret") {
			t.Fatal("the denied command reached the local API")
		}
	})

	t.Run("control requests from the bus", func(t *testing.T) {
		nc, err := nats.Connect(c.nats)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		// Seeing the requests an instance forwards to the one that holds
		// the agent tells which instance took each request from the
		// queue group. They are queued here before the reply, which the
		// forwarding instance sends after them on the same connection.
		forwarded := map[string]*nats.Subscription{}
		for _, in := range []*instance{a, b} {
			sub, err := nc.SubscribeSync(c.prefix + ".instance." + bus.SubjectToken(in.id) + ".control")
			if err != nil {
				t.Fatal(err)
			}
			forwarded[in.id] = sub
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			registered, name string
			holder           *instance
		}{{"agent-1", "agent on B", b}, {"agent-2", "agent on A", a}} {
			t.Run(tc.name, func(t *testing.T) {
				sub := forwarded[tc.holder.id]
				before, _, _ := sub.Pending()
				// The queue group gives each request to one instance; ask
				// until both have taken one.
				for i := 1; ; i++ {
					value := fmt.Sprintf("value-%d", i)
					reply := controlRequest(t, nc, c.prefix, bus.ControlRequest{
						AgentID: tc.registered, OrganizationID: servertest.Org, Command: "set-settings",
						Settings: map[string]*string{"k": &value}, SentTime: time.Now().UTC(),
					})
					want := bus.ControlResponse{AgentID: tc.registered, OrganizationID: servertest.Org, Success: true,
						Settings: map[string]*string{"agent": &tc.name, "command": strp("set-settings"), "echo": &value}}
					if !sameControl(reply, want) {
						t.Fatalf("control answer %s, want %s", show(reply), show(want))
					}
					n, _, _ := sub.Pending()
					via := n - before
					if via > 0 && i-via > 0 {
						t.Logf("%d requests: %d forwarded to %s, %d taken by it", i, via, tc.holder.id, i-via)
						break
					}
					if i == 60 {
						t.Fatalf("after %d requests %d were forwarded to %s: the queue group did not spread them", i, via, tc.holder.id)
					}
				}
			})
		}
		for id, sub := range forwarded {
			if err := sub.Unsubscribe(); err != nil {
				t.Errorf("unsubscribe from %s: %v", id, err)
			}
		}
	})

	t.Run("list pushes across instances", func(t *testing.T) {
		watcher := a.portal(t, servertest.PortalToken)
		// Lists pushed before this point are old news.
		for len(watcher.Updates()) > 0 {
			<-watcher.Updates()
		}
		comer, _ := b.startAgent(t, servertest.RenewedToken, "agent coming and going on B")
		got := waitPush(t, watcher, "the agent's arrival on B", func(list []portal.Agent) bool {
			return find(list, comer.ClientID()) != nil
		})
		if e := find(got, comer.ClientID()); e.GatewayID != b.id || e.MachineServerURI != b.url || e.MachineRegistrationID != "agent-renewed" {
			t.Fatalf("pushed entry %+v", *e)
		}
		if find(got, agentB.ClientID()) == nil || find(got, agentA.ClientID()) == nil {
			t.Fatalf("pushed list %+v lacks the other agents", got)
		}
		comer.Stop()
		waitPush(t, watcher, "the agent's departure from B", func(list []portal.Agent) bool {
			return find(list, comer.ClientID()) == nil && find(list, agentB.ClientID()) != nil
		})
		if _, ok := listed(t, watcher, comer.ClientID()); ok {
			t.Fatal("the agent that left is still listed")
		}
	})
}

// waitPush reads the lists pushed to c until one satisfies ok.
func waitPush(t *testing.T, c *portal.Client, what string, ok func([]portal.Agent) bool) []portal.Agent {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case list, open := <-c.Updates():
			if !open {
				t.Fatalf("waiting for %s: the portal connection ended: %v", what, c.Err())
			}
			if ok(list) {
				return list
			}
		case <-deadline:
			t.Fatalf("no pushed list showed %s", what)
		}
	}
}

func find(list []portal.Agent, clientID string) *portal.Agent {
	for i := range list {
		if list[i].ClientID == clientID {
			return &list[i]
		}
	}
	return nil
}

// controlRequest asks on <prefix>.control as an external controller does,
// with plain nats.go.
func controlRequest(t *testing.T, nc *nats.Conn, prefix string, req bus.ControlRequest) bus.ControlResponse {
	t.Helper()
	data, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := nc.Request(prefix+".control", data, 20*time.Second)
	if err != nil {
		t.Fatalf("control request: %v", err)
	}
	var resp bus.ControlResponse
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		t.Fatalf("control answer %s: %v", msg.Data, err)
	}
	return resp
}

func sameControl(a, b bus.ControlResponse) bool {
	if a.AgentID != b.AgentID || a.OrganizationID != b.OrganizationID || a.Success != b.Success || a.Message != b.Message || len(a.Settings) != len(b.Settings) {
		return false
	}
	for k, v := range b.Settings {
		w, ok := a.Settings[k]
		if !ok || (v == nil) != (w == nil) || (v != nil && *v != *w) {
			return false
		}
	}
	return true
}

func show(r bus.ControlResponse) string {
	data, _ := json.Marshal(r) // plain strings and maps always marshal
	return string(data)
}

func strp(s string) *string { return &s }
