package e2e_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/wire"
)

// TestControlDuringRegistryOutage cuts instance A away from the database
// while the agent is on B. Control requests from the bus that B takes
// reach the agent; those A takes, unable to look the agent up, are
// answered that the client list is unavailable, not that the agent is
// not connected.
func TestControlDuringRegistryOutage(t *testing.T) {
	c := newCluster(t)
	px, proxied := pgtest.StartProxy(t, c.conn)
	a := c.startOn("instance-a", proxied)
	b := c.start("instance-b")
	ag, _ := b.startAgent(t, servertest.AgentToken, "agent on B")
	watcher := a.portal(t, servertest.PortalToken)
	servertest.WaitFor(t, "the agent on B listed on A", func() bool {
		_, ok := listed(t, watcher, ag.ClientID())
		return ok
	})
	nc, err := nats.Connect(c.nats)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	px.Cut()
	byA, byB := 0, 0
	for i := 0; byA == 0 || byB == 0; i++ {
		if i == 60 {
			t.Fatalf("after %d requests, %d answered by A and %d by B", i, byA, byB)
		}
		resp := controlRequest(t, nc, c.prefix, bus.ControlRequest{AgentID: "agent-1", OrganizationID: servertest.Org,
			Command: "get-settings", SentTime: time.Now().UTC()})
		switch {
		case resp.Success:
			byB++
		case resp.Message == wire.TextRegistryUnavailable:
			byA++
		default:
			t.Fatalf("control answer during A's outage: %s", show(resp))
		}
	}
	t.Logf("%d answered through B, %d by A during its outage", byB, byA)

	px.Restore()
	servertest.WaitFor(t, "A to list the agent again", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		list, err := watcher.List(ctx)
		return err == nil && find(list, ag.ClientID()) != nil
	})
}
