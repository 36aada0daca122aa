package registry_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

// conflictCase is a registration under a key that another client holds:
// the first is registered, then the second, with the first stale (older
// than the client timeout) when stale is set, or with its instance dead.
type conflictCase struct {
	name          string
	first, second registry.Client
	stale, dead   bool
	want          error // nil: the second replaces the first
}

var conflictCases = []conflictCase{
	{"a portal claims an agent's client id",
		agent("x", orgA, "c1"), portal("x", orgA, "c2"), false, false, registry.ErrConflict},
	{"an agent claims a portal's client id",
		portal("x", orgA, "c1"), agent("x", orgA, "c2"), false, false, registry.ErrConflict},
	{"an agent claims another agent's client id",
		agent("x", orgA, "c1"), withRegID(agent("x", orgA, "c2"), "reg-other"), false, false, registry.ErrConflict},
	{"the agent reconnects",
		agent("x", orgA, "c1"), agent("x", orgA, "c2"), false, false, nil},
	{"the portal reconnects",
		portal("x", orgA, "c1"), portal("x", orgA, "c2"), false, false, nil},
	{"a portal takes a stale agent's client id",
		agent("x", orgA, "c1"), portal("x", orgA, "c2"), true, false, nil},
	{"an agent takes another agent's stale client id",
		agent("x", orgA, "c1"), withRegID(agent("x", orgA, "c2"), "reg-other"), true, false, nil},
	{"the connection authenticates again as another agent",
		agent("x", orgA, "c1"), withRegID(agent("x", orgA, "c1"), "reg-renewed"), false, false, nil},
	{"the same client id in another organization",
		agent("x", orgA, "c1"), portal("x", orgB, "c2"), false, false, nil},
}

func withRegID(c registry.Client, id string) registry.Client {
	c.MachineRegistrationID = id
	return c
}

func TestMemoryRegisterConflict(t *testing.T) {
	ctx := context.Background()
	for _, tc := range conflictCases {
		t.Run(tc.name, func(t *testing.T) {
			m, clk := newMemory(t)
			register(t, m, tc.first)
			if tc.stale {
				clk.Advance(timeout + time.Second)
			}
			err := m.Register(ctx, tc.second)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("second Register = %v, want %v", err, tc.want)
			}
			want := tc.second
			if tc.want != nil {
				want = tc.first
			}
			got, ok := lookup(t, m, want.ClientID, want.OrganizationID)
			if !ok || got.ConnectionID != want.ConnectionID || got.Type != want.Type {
				t.Fatalf("entry after the second Register = %+v (found %v), want connection %s", got, ok, want.ConnectionID)
			}
			if tc.stale && !got.FirstSeen.Equal(clk.Now()) {
				t.Errorf("FirstSeen of the client that took a stale id = %v, want its own registration time %v", got.FirstSeen, clk.Now())
			}
		})
	}
}

// TestPostgresRegisterConflict registers the first client on one
// instance and the second on another, so that only the database can tell
// the conflict.
func TestPostgresRegisterConflict(t *testing.T) {
	pool, _ := migratedPool(t)
	ctx := context.Background()
	// No heartbeat during the test: a case marks an instance dead.
	quiet := func(id string) registry.PostgresOptions {
		return registry.PostgresOptions{InstanceID: id, HeartbeatInterval: time.Hour, History: true}
	}
	one := newPostgres(t, pool, quiet("one"))
	two := newPostgres(t, pool, quiet("two"))

	cases := append(conflictCases[:len(conflictCases):len(conflictCases)], conflictCase{
		"a portal takes the client id of an agent whose instance is dead",
		agent("x", orgA, "c1"), portal("x", orgA, "c2"), false, true, nil})
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			first, second := tc.first, tc.second
			first.ClientID = fmt.Sprintf("x%d", i)
			second.ClientID = first.ClientID
			first.InstanceID, second.InstanceID = "two", "one"
			if err := two.Register(ctx, first); err != nil {
				t.Fatalf("register the first: %v", err)
			}
			if tc.stale {
				exec(t, pool, `UPDATE clients SET last_updated = now() - interval '10 minutes' WHERE client_id = $1`, first.ClientID)
			}
			if tc.dead {
				exec(t, pool, `UPDATE instances SET heartbeat = now() - interval '10 minutes' WHERE instance_id = 'two'`)
				defer exec(t, pool, `UPDATE instances SET heartbeat = now() WHERE instance_id = 'two'`)
			}
			err := one.Register(ctx, second)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("second Register = %v, want %v", err, tc.want)
			}
			want := second
			if tc.want != nil {
				want = first
			}
			if n := count(t, pool, `SELECT count(*) FROM clients WHERE client_id = $1 AND organization_id = $2
				AND connection_id = $3 AND instance_id = $4 AND client_type = $5`,
				want.ClientID, want.OrganizationID, want.ConnectionID, want.InstanceID, int(want.Type)); n != 1 {
				t.Fatalf("the row of %s is not %s's", want.ClientID, want.ConnectionID)
			}
			if n := count(t, pool, `SELECT count(*) FROM client_history WHERE event = 'register'
				AND client_id = $1 AND connection_id = $2 AND instance_id = 'one'`, second.ClientID, second.ConnectionID); (n == 1) != (tc.want == nil) {
				t.Fatalf("%d register events for the second client", n)
			}
			if tc.want == nil {
				return
			}
			// The refused client is not kept: its pings write nothing
			// (a kept entry would try to take the row back).
			if err := one.Touch(ctx, second.ClientID, second.OrganizationID, second.ConnectionID); err != nil {
				t.Fatalf("touch of the refused client: %v", err)
			}
		})
	}

	t.Run("on one instance", func(t *testing.T) {
		if err := one.Register(ctx, pgAgent("y", orgA, "c1")); err != nil {
			t.Fatal(err)
		}
		p := pgAgent("y", orgA, "c2")
		p.Type, p.MachineRegistrationID = wire.ClientTypePortal, ""
		if err := one.Register(ctx, p); !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("a portal claiming the agent's id = %v, want ErrConflict", err)
		}
		// The agent's entry is intact: its pings keep it.
		exec(t, pool, `DELETE FROM clients WHERE client_id = 'y'`)
		if err := one.Touch(ctx, "y", orgA, "c1"); err != nil {
			t.Fatal(err)
		}
		if got := listIDs(t, one, orgA); !strings.Contains(got, "y") {
			t.Fatalf("agents = %q, want y written back by its ping", got)
		}
	})
}

// TestPostgresConflictAfterOutage registers an agent on an instance that
// is cut off the database while another instance gives its client id to
// a portal: once the database is back, the agent's entry is dropped and
// reported, the list opens and the write-back is not retried.
func TestPostgresConflictAfterOutage(t *testing.T) {
	pool, conn := migratedPool(t)
	ctx := context.Background()
	px, viaProxy := pgtest.StartProxy(t, conn)
	log, logs := recordLogs(t)
	const beat = 100 * time.Millisecond
	cut := newPostgres(t, openPool(t, viaProxy), registry.PostgresOptions{
		InstanceID: "cut", HeartbeatInterval: beat, Timeout: time.Second, Logger: log,
	})
	other := newPostgres(t, pool, registry.PostgresOptions{InstanceID: "other"})

	if err := cut.Register(ctx, pgAgent("kept", orgA, "c-kept")); err != nil {
		t.Fatal(err)
	}
	px.Cut()
	if err := cut.Register(ctx, pgAgent("x", orgA, "c-agent")); !errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("register during the outage = %v, want ErrUnavailable", err)
	}
	p := pgAgent("x", orgA, "c-portal")
	p.Type, p.MachineRegistrationID = wire.ClientTypePortal, ""
	if err := other.Register(ctx, p); err != nil {
		t.Fatal(err)
	}
	px.Restore()
	testwait.For(t, "the list after the outage", 10*time.Second, func() bool {
		_, err := cut.Agents(ctx, []string{orgA})
		return err == nil
	})
	if got := listIDs(t, cut, orgA); got != "kept" {
		t.Fatalf("agents = %q, want kept", got)
	}
	if n := count(t, pool, `SELECT count(*) FROM clients WHERE client_id = 'x' AND connection_id = 'c-portal'`); n != 1 {
		t.Fatal("the write-back took the portal's row")
	}
	const warning = "is not listed: another client holds its id"
	if n := logs.count(warning); n != 1 {
		t.Fatalf("%d conflict warnings, want 1", n)
	}
	// A few more heartbeats: the dropped entry is not written again.
	var last time.Time
	for range 3 {
		testwait.For(t, "a heartbeat", 10*time.Second, func() bool {
			var hb time.Time
			if err := pool.QueryRow(ctx, `SELECT heartbeat FROM instances WHERE instance_id = 'cut'`).Scan(&hb); err != nil {
				t.Fatal(err)
			}
			if hb.After(last) {
				last = hb
				return true
			}
			return false
		})
	}
	if n := logs.count(warning); n != 1 {
		t.Fatalf("%d conflict warnings after more heartbeats, want 1", n)
	}
	if err := cut.Touch(ctx, "x", orgA, "c-agent"); err != nil {
		t.Fatalf("a ping of the dropped agent: %v", err)
	}
}
