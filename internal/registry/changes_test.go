package registry_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

// changes collects what OnAgentsChanged reports.
type changes struct {
	mu    sync.Mutex
	calls [][]string
}

func (c *changes) record(orgs []string) {
	c.mu.Lock()
	c.calls = append(c.calls, slices.Clone(orgs))
	c.mu.Unlock()
}

// all returns the organizations reported so far, in order, each once.
func (c *changes) all() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Compact(slices.Sorted(slices.Values(slices.Concat(c.calls...))))
}

// waitForOrgs waits until exactly want has been reported.
func (c *changes) waitForOrgs(t *testing.T, want ...string) {
	t.Helper()
	slices.Sort(want)
	testwait.For(t, "organizations "+strings.Join(want, ",")+" reported", 10*time.Second, func() bool {
		got := c.all()
		for _, o := range got {
			if !slices.Contains(want, o) {
				t.Fatalf("organizations reported: %v, want %v", got, want)
			}
		}
		return slices.Equal(got, want)
	})
}

// TestPostgresReapReportsOrganizations reaps an instance that stopped:
// the organizations of its agents are reported, not those of its portals
// nor those of a live instance's agents.
func TestPostgresReapReportsOrganizations(t *testing.T) {
	pool, _ := migratedPool(t)
	var ch changes
	newPostgres(t, pool, registry.PostgresOptions{
		InstanceID: "reaper", HeartbeatInterval: 50 * time.Millisecond, InstanceTimeout: 10 * time.Second,
		OnAgentsChanged: ch.record,
	})
	exec(t, pool, `INSERT INTO instances (instance_id, heartbeat) VALUES ('dead', now() - interval '1 minute'),
		('live', now() + interval '1 hour')`)
	for _, r := range []struct {
		id, org, instance string
		typ               wire.ClientType
	}{
		{"a1", orgA, "dead", wire.ClientTypeAgent},
		{"a2", orgA, "dead", wire.ClientTypeAgent},
		{"b1", orgB, "dead", wire.ClientTypeAgent},
		{"p1", orgC, "dead", wire.ClientTypePortal},
		{"c1", orgC, "live", wire.ClientTypeAgent},
	} {
		exec(t, pool, `INSERT INTO clients (client_id, organization_id, client_type, instance_id, connection_id)
			VALUES ($1, $2, $3, $4, 'conn-' || $1)`, r.id, r.org, int(r.typ), r.instance)
	}
	ch.waitForOrgs(t, orgA, orgB)
	if n := count(t, pool, `SELECT count(*) FROM clients WHERE instance_id = 'dead'`); n != 0 {
		t.Fatalf("%d rows of the dead instance left", n)
	}
}

// TestPostgresWriteBackReportsOrganizations cuts an instance off the
// database while its rows are reaped and one of its agents leaves: once
// back, the organizations of the agents written back and of the agent
// that left are reported.
func TestPostgresWriteBackReportsOrganizations(t *testing.T) {
	pool, conn := migratedPool(t)
	ctx := context.Background()
	px, viaProxy := pgtest.StartProxy(t, conn)
	var ch changes
	r := newPostgres(t, openPool(t, viaProxy), registry.PostgresOptions{
		InstanceID: "cut", HeartbeatInterval: 50 * time.Millisecond, Timeout: time.Second,
		OnAgentsChanged: ch.record,
	})
	p := pgAgent("p", orgC, "conn-p")
	p.Type, p.MachineRegistrationID = wire.ClientTypePortal, ""
	for _, c := range []registry.Client{pgAgent("a", orgA, "conn-a"), pgAgent("b", orgB, "conn-b"), p} {
		if err := r.Register(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	px.Cut()
	if err := r.Unregister(ctx, "b", orgB, "conn-b"); !errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("unregister during the outage = %v, want ErrUnavailable", err)
	}
	// Reaped, as another instance does once the heartbeat is old, but
	// for the agent that left.
	exec(t, pool, `DELETE FROM clients WHERE instance_id = 'cut' AND client_id <> 'b'`)
	px.Restore()
	ch.waitForOrgs(t, orgA, orgB)
	if got := listIDs(t, r, orgA, orgB); got != "a" {
		t.Fatalf("agents = %q, want a", got)
	}
}

// TestCleanupReportsOrganizations purges a stale agent and a long dead
// instance's agent and portal.
func TestCleanupReportsOrganizations(t *testing.T) {
	pool, _ := migratedPool(t)
	exec(t, pool, `INSERT INTO instances (instance_id, heartbeat) VALUES ('gone', now() - interval '2 days'),
		('live', now())`)
	for _, r := range []struct {
		id, org, instance, age string
		typ                    wire.ClientType
	}{
		{"stale", orgA, "live", "25 hours", wire.ClientTypeAgent},
		{"fresh", orgA, "live", "1 minute", wire.ClientTypeAgent},
		{"b", orgB, "gone", "1 minute", wire.ClientTypeAgent},
		{"p", orgC, "gone", "1 minute", wire.ClientTypePortal},
	} {
		exec(t, pool, `INSERT INTO clients (client_id, organization_id, client_type, instance_id, connection_id, last_updated)
			VALUES ($1, $2, $3, $4, 'conn-' || $1, now() - $5::interval)`, r.id, r.org, int(r.typ), r.instance, r.age)
	}
	res, err := registry.Cleanup(context.Background(), pool, registry.CleanupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Clients != 1 || res.Instances != 1 || !slices.Equal(res.AgentOrganizations, []string{orgA, orgB}) {
		t.Fatalf("cleanup = %+v, want one client, one instance and organizations A and B", res)
	}
}
