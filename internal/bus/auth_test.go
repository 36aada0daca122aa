package bus_test

import (
	"encoding/json"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

func keys(m map[string]any) []string {
	return slices.Sorted(maps.Keys(m))
}

// TestAuthExternalController authenticates agents and portals through a
// controller that knows only the subjects and their JSON.
func TestAuthExternalController(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mstest")
	ec := startController(t, url, pfx)
	in := startInstance(t, url, pfx, "instance-a", registry.NewMemory(0, nil), instanceOpts{})

	t.Run("agent", func(t *testing.T) {
		a := in.agent(1)
		if res := a.AuthAgent(agentA1); !res.Accepted || res.WillReplaceToken || res.NewToken != nil {
			t.Fatalf("auth result %+v", res)
		}
		r := ec.recorded()
		last := r[len(r)-1]
		if last.subject != pfx+".auth.agent" || !slices.Equal(keys(last.fields), []string{"token"}) || last.fields["token"] != agentA1 {
			t.Fatalf("controller got %s %s", last.subject, last.raw)
		}
	})
	t.Run("agent with a new token", func(t *testing.T) {
		a := in.agent(2)
		res := a.AuthAgent(agentRenew)
		if !res.Accepted || !res.WillReplaceToken || res.NewToken == nil || *res.NewToken != "renewed-token" {
			t.Fatalf("auth result %+v", res)
		}
	})
	t.Run("agent refused", func(t *testing.T) {
		before := in.stats.Get(stats.AuthClientFailure)
		a := in.agent(3)
		if res := a.AuthAgent("no-such-token"); res.Accepted {
			t.Fatal("accepted an unknown token")
		}
		a.ExpectClose(1008, wire.TextAuthenticationFailed)
		if d := in.stats.Get(stats.AuthClientFailure) - before; d != 1 {
			t.Fatalf("AuthClientFailure went up by %d", d)
		}
	})
	t.Run("agent not found", func(t *testing.T) {
		before := in.stats.Get(stats.AuthClientNotFound)
		a := in.agent(3)
		if res := a.AuthAgent(agentNotFound); res.Accepted {
			t.Fatal("accepted")
		}
		if d := in.stats.Get(stats.AuthClientNotFound) - before; d != 1 {
			t.Fatalf("AuthClientNotFound went up by %d", d)
		}
	})
	t.Run("portal with sub-organizations", func(t *testing.T) {
		p := in.authedPortal(portalA, true)
		r := ec.recorded()
		last := r[len(r)-1]
		if last.subject != pfx+".auth.portal" || !slices.Equal(keys(last.fields), []string{"includeSubOrgs", "token"}) ||
			last.fields["token"] != portalA || last.fields["includeSubOrgs"] != true {
			t.Fatalf("controller got %s %s", last.subject, last.raw)
		}
		in.authedAgent(4, agentSub1)
		var orgs []string
		waitFor(t, "the sub-organization's agent in the list", func() bool {
			orgs = orgs[:0]
			for _, e := range list(t, p) {
				orgs = append(orgs, e.OrganizationID)
			}
			return slices.Contains(orgs, orgSub)
		})
	})
	t.Run("portal refused", func(t *testing.T) {
		p := in.portal()
		if res := p.AuthPortal("no-such-token", false); res.Accepted {
			t.Fatal("accepted")
		}
		p.ExpectClose(1008, wire.TextAuthenticationFailed)
	})
}

// TestAuthNoResponders: without a controller on the bus an auth fails at
// once, counted as a timeout failure. The controller timeout is longer
// than the test client waits for the answer.
func TestAuthNoResponders(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mstest")
	in := startInstance(t, url, pfx, "instance-a", registry.NewMemory(0, nil), instanceOpts{
		cfg: func(c *config.Config) { c.ControllerTimeout = time.Minute },
	})
	a := in.agent(1)
	if res := a.AuthAgent(agentA1); res.Accepted {
		t.Fatal("accepted without a controller")
	}
	p := in.portal()
	if res := p.AuthPortal(portalA, false); res.Accepted {
		t.Fatal("accepted without a controller")
	}
	if c, p := in.stats.Get(stats.AuthClientTimeoutFailure), in.stats.Get(stats.AuthPortalTimeoutFailure); c != 1 || p != 1 {
		t.Fatalf("timeout failures: client %d, portal %d", c, p)
	}
}

// TestAuthLateReply: a controller that answers after the deadline is not
// heard; its late answer does not become the answer to a later request.
func TestAuthLateReply(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mstest")
	ec := startController(t, url, pfx)
	release := make(chan struct{})
	lateSent := make(chan struct{})
	ec.mu.Lock()
	ec.hold = func(_ string, req map[string]any) {
		if req["token"] == agentA1 {
			<-release
		}
	}
	ec.replied = func(req map[string]any) {
		if req["token"] == agentA1 {
			close(lateSent)
		}
	}
	ec.mu.Unlock()
	in := startInstance(t, url, pfx, "instance-a", registry.NewMemory(0, nil), instanceOpts{
		cfg: func(c *config.Config) { c.ControllerTimeout = 300 * time.Millisecond },
	})
	slow := in.agent(1)
	if res := slow.AuthAgent(agentA1); res.Accepted {
		t.Fatal("accepted although the controller had not answered in time")
	}
	close(release) // the controller now answers success, too late
	<-lateSent
	if got := in.stats.Get(stats.AuthClientTimeoutFailure); got != 1 {
		t.Fatalf("AuthClientTimeoutFailure = %d", got)
	}
	// The controller refuses this one at once; the late success must not
	// be taken for its answer.
	other := in.agent(2)
	if res := other.AuthAgent("no-such-token"); res.Accepted {
		t.Fatal("a late reply was taken as the answer to a later request")
	}
	// And the controller, answering in time again, is heard.
	ec.mu.Lock()
	ec.hold = nil
	ec.mu.Unlock()
	in.authedAgent(3, agentA2)
}

// TestBuiltinControllerOnBus: the built-in controller answers on the bus
// in the contract's shapes, and an instance authenticates through it.
func TestBuiltinControllerOnBus(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mstest")
	st, err := controller.NewStatic(controller.TokensFile{
		Agents:  []controller.AgentToken{{Token: agentA1, OrganizationID: orgA, RegisteredAgentID: "reg-a1", Expires: time.Date(2035, 1, 1, 0, 0, 0, 0, time.UTC), NewToken: "next"}},
		Portals: []controller.PortalToken{{Token: portalA, OrganizationID: orgA, SubOrganizations: []string{orgSub}, Expires: time.Date(2035, 1, 1, 0, 0, 0, 0, time.UTC)}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctrlBus := dialBus(t, url, pfx, "controller", nil)
	t.Cleanup(func() {
		if err := ctrlBus.Close(t.Context()); err != nil {
			t.Error(err)
		}
	})
	stop, err := ctrlBus.ServeController(&controller.Builtin{Static: st}, bus.ControllerOptions{LogEvents: true})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	nc := rawConn(t, url)

	agentKeys := []string{"expires", "message", "newToken", "organizationId", "registeredAgentId", "success"}
	portalKeys := []string{"expires", "isImpersonated", "message", "organizationId", "subOrganizations", "success"}
	cases := []struct {
		name, subject, req string
		keys               []string
		check              func(map[string]any) bool
	}{
		{"agent", ".auth.agent", `{"token":"` + agentA1 + `"}`, agentKeys, func(m map[string]any) bool {
			return m["success"] == true && m["organizationId"] == orgA && m["registeredAgentId"] == "reg-a1" &&
				m["expires"] == "2035-01-01T00:00:00Z" && m["newToken"] == "next" && m["message"] == nil
		}},
		{"agent refused", ".auth.agent", `{"token":"nope"}`, agentKeys, func(m map[string]any) bool {
			return m["success"] == false && m["organizationId"] == nil && m["message"] != nil
		}},
		{"agent without token", ".auth.agent", `{}`, agentKeys, func(m map[string]any) bool {
			return m["success"] == false && m["message"] == "Request without token"
		}},
		{"portal", ".auth.portal", `{"token":"` + portalA + `","includeSubOrgs":true}`, portalKeys, func(m map[string]any) bool {
			subs, _ := m["subOrganizations"].([]any)
			return m["success"] == true && m["organizationId"] == orgA && m["isImpersonated"] == false &&
				len(subs) == 1 && subs[0] == orgSub && m["expires"] == "2035-01-01T00:00:00Z"
		}},
		{"portal without sub-organizations", ".auth.portal", `{"token":"` + portalA + `","includeSubOrgs":false}`, portalKeys, func(m map[string]any) bool {
			return m["success"] == true && m["subOrganizations"] == nil
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msg, err := nc.Request(pfx+tc.subject, []byte(tc.req), 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			var m map[string]any
			if err := json.Unmarshal(msg.Data, &m); err != nil {
				t.Fatalf("reply %s: %v", msg.Data, err)
			}
			if !slices.Equal(keys(m), tc.keys) || !tc.check(m) {
				t.Fatalf("reply %s", msg.Data)
			}
		})
	}

	t.Run("instance", func(t *testing.T) {
		in := startInstance(t, url, pfx, "instance-a", registry.NewMemory(0, nil), instanceOpts{})
		a := in.agent(1)
		if res := a.AuthAgent(agentA1); !res.Accepted || res.NewToken == nil || *res.NewToken != "next" {
			t.Fatalf("auth result %+v", res)
		}
		p := in.authedPortal(portalA, false)
		if l := list(t, p); len(l) != 1 || l[0].ClientID != a.ClientID {
			t.Fatalf("list %+v", l)
		}
	})
}
