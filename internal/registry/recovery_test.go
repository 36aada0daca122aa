package registry_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
)

// TestPostgresRecoveryOfManyClients cuts an instance with many clients
// off the database while some leave and others come, and restores it:
// every entry is written back and every missed unregister applied. It
// logs how long the list stayed closed after the database was back.
func TestPostgresRecoveryOfManyClients(t *testing.T) {
	if testing.Short() {
		t.Skip("writes a few thousand rows")
	}
	pool, conn := migratedPool(t)
	ctx := context.Background()
	px, viaProxy := pgtest.StartProxy(t, conn)
	r := newPostgres(t, openPool(t, viaProxy), registry.PostgresOptions{
		InstanceID: "many", HeartbeatInterval: 100 * time.Millisecond, Timeout: 2 * time.Second, History: true,
	})
	const before, during, leaving = 1000, 1000, 500
	name := func(i int) string { return fmt.Sprintf("c%05d", i) }
	for i := range before {
		if err := r.Register(ctx, pgAgent(name(i), orgA, "conn-"+name(i))); err != nil {
			t.Fatal(err)
		}
	}
	px.Cut()
	for i := before; i < before+during; i++ {
		if err := r.Register(ctx, pgAgent(name(i), orgA, "conn-"+name(i))); err != nil && !errors.Is(err, registry.ErrUnavailable) {
			t.Fatal(err)
		}
	}
	for i := range leaving {
		if err := r.Unregister(ctx, name(i), orgA, "conn-"+name(i)); err != nil && !errors.Is(err, registry.ErrUnavailable) {
			t.Fatal(err)
		}
	}
	if _, err := r.Agents(ctx, []string{orgA}); !errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("list during the outage = %v, want ErrUnavailable", err)
	}

	px.Restore()
	restored := time.Now()
	testwait.For(t, "the list after the outage", 60*time.Second, func() bool {
		_, err := r.Agents(ctx, []string{orgA})
		return err == nil
	})
	t.Logf("%d entries written back and %d unregisters applied; the list opened %v after the database was back",
		before+during-leaving, leaving, time.Since(restored).Round(time.Millisecond))

	cs, err := r.Agents(ctx, []string{orgA})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != before+during-leaving || cs[0].ClientID != name(leaving) || cs[len(cs)-1].ClientID != name(before+during-1) {
		t.Fatalf("%d agents listed after the outage, want %s..%s", len(cs), name(leaving), name(before+during-1))
	}
	if n := count(t, pool, `SELECT count(*) FROM client_history WHERE event = 'unregister'`); n != leaving {
		t.Fatalf("%d unregister events, want %d", n, leaving)
	}
	if n := count(t, pool, `SELECT count(*) FROM client_history WHERE event = 'register'`); n != before+during {
		t.Fatalf("%d register events, want %d", n, before+during)
	}
}

// TestPostgresCloseAfterOutage closes the registry right after the
// database came back, while its pool still holds connections that died
// with the outage: the instance's rows are removed all the same.
func TestPostgresCloseAfterOutage(t *testing.T) {
	pool, conn := migratedPool(t)
	ctx := context.Background()
	px, viaProxy := pgtest.StartProxy(t, conn)
	r, err := registry.NewPostgres(ctx, openPool(t, viaProxy), registry.PostgresOptions{
		InstanceID: "closing", HeartbeatInterval: time.Hour, Timeout: 2 * time.Second, Logger: testlog.New(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Register(ctx, pgAgent("a", orgA, "conn-a")); err != nil {
		t.Fatal(err)
	}
	px.Cut()
	px.Restore()
	if err := r.Close(ctx); err != nil {
		t.Fatalf("close right after the outage: %v", err)
	}
	if n := count(t, pool, `SELECT count(*) FROM clients WHERE instance_id = 'closing'`) +
		count(t, pool, `SELECT count(*) FROM instances WHERE instance_id = 'closing'`); n != 0 {
		t.Fatalf("%d rows of the closed instance left", n)
	}
}
