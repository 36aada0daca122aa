package registry_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

const (
	orgA = "11111111-1111-1111-1111-111111111111"
	orgB = "22222222-2222-2222-2222-222222222222"
)

func TestMigrate(t *testing.T) {
	conn, _ := freshSchema(t)
	pool := openPool(t, conn)
	ctx := context.Background()

	if v, err := registry.CurrentSchemaVersion(ctx, pool); err != nil || v != 0 {
		t.Fatalf("empty schema: version %d, %v", v, err)
	}
	if err := registry.CheckSchema(ctx, pool); !errors.Is(err, registry.ErrSchemaOutdated) {
		t.Fatalf("CheckSchema on an empty schema = %v, want ErrSchemaOutdated", err)
	}

	res, err := registry.Migrate(ctx, pool)
	if err != nil {
		t.Fatalf("migrate an empty schema: %v", err)
	}
	latest := registry.SchemaVersion()
	if latest < 1 || res.From != 0 || res.To != latest || len(res.Applied) != latest {
		t.Fatalf("first migrate = %+v, want 0 -> %d", res, latest)
	}
	for _, table := range []string{"schema_version", "instances", "clients", "client_history", "statistics"} {
		if n := count(t, pool, `SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = $1`, table); n != 1 {
			t.Errorf("table %s missing after migrate", table)
		}
	}

	res, err = registry.Migrate(ctx, pool)
	if err != nil {
		t.Fatalf("migrate an up-to-date schema: %v", err)
	}
	if res.From != latest || res.To != latest || len(res.Applied) != 0 {
		t.Fatalf("second migrate = %+v, want nothing applied at %d", res, latest)
	}
	if err := registry.CheckSchema(ctx, pool); err != nil {
		t.Fatalf("CheckSchema after migrate: %v", err)
	}
}

// TestMigrateConcurrently starts several migrations on one empty schema
// at once, as instances starting together do.
func TestMigrateConcurrently(t *testing.T) {
	conn, _ := freshSchema(t)
	pool := openPool(t, conn)
	var wg sync.WaitGroup
	results := make([]registry.MigrateResult, 4)
	errs := make([]error, 4)
	for i := range results {
		wg.Go(func() { results[i], errs[i] = registry.Migrate(context.Background(), pool) })
	}
	wg.Wait()
	applied := 0
	for i, err := range errs {
		if err != nil {
			t.Fatalf("migration %d: %v", i, err)
		}
		applied += len(results[i].Applied)
	}
	if applied != registry.SchemaVersion() {
		t.Fatalf("%d migrations applied in total, want %d", applied, registry.SchemaVersion())
	}
}

func pgAgent(id, org, conn string) registry.Client {
	return registry.Client{
		ClientID: id, OrganizationID: org, Type: wire.ClientTypeAgent, ConnectionID: conn,
		ClientVersion: "2.1.0.0", MachineRegistrationID: "reg-" + id, ClientIP: "127.0.0.1",
		MachineServerURI: "wss://one.example",
	}
}

func ids(cs []registry.Client) string {
	s := make([]string, 0, len(cs))
	for _, c := range cs {
		s = append(s, c.ClientID)
	}
	return strings.Join(s, ",")
}

func listIDs(t *testing.T, r registry.Registry, orgs ...string) string {
	t.Helper()
	cs, err := r.Agents(context.Background(), orgs)
	if err != nil {
		t.Fatalf("agents: %v", err)
	}
	return ids(cs)
}

func TestPostgresRegistry(t *testing.T) {
	pool, _ := migratedPool(t)
	ctx := context.Background()
	r := newPostgres(t, pool, registry.PostgresOptions{InstanceID: "one", PublicURL: "wss://one.example"})

	for _, c := range []registry.Client{
		pgAgent("b", orgA, "conn-b"),
		pgAgent("a", orgA, "conn-a"),
		pgAgent("c", orgB, "conn-c"),
		{ClientID: "portal", OrganizationID: orgA, Type: wire.ClientTypePortal, ConnectionID: "conn-p"},
	} {
		if err := r.Register(ctx, c); err != nil {
			t.Fatalf("register %s: %v", c.ClientID, err)
		}
	}

	t.Run("lists the agents of the organizations in order", func(t *testing.T) {
		if got := listIDs(t, r, orgA); got != "a,b" {
			t.Fatalf("agents of A = %q, want a,b", got)
		}
		if got := listIDs(t, r, orgB, orgA); got != "a,b,c" {
			t.Fatalf("agents of A and B = %q, want a,b,c", got)
		}
		cs, _ := r.Agents(ctx, []string{orgB})
		c := cs[0]
		if c.InstanceID != "one" || c.MachineServerURI != "wss://one.example" || c.ClientVersion != "2.1.0.0" ||
			c.MachineRegistrationID != "reg-c" || c.ClientIP != "127.0.0.1" || c.ConnectionID != "conn-c" ||
			c.Type != wire.ClientTypeAgent || c.FirstSeen.IsZero() || time.Since(c.LastUpdated) > time.Minute {
			t.Fatalf("entry = %+v", c)
		}
	})

	t.Run("lookup", func(t *testing.T) {
		c, ok, err := r.Lookup(ctx, "portal", []string{orgB, orgA})
		if err != nil || !ok || c.Type != wire.ClientTypePortal || c.OrganizationID != orgA {
			t.Fatalf("lookup portal = %+v %v %v", c, ok, err)
		}
		if _, ok, err := r.Lookup(ctx, "a", []string{orgB}); err != nil || ok {
			t.Fatalf("lookup a in B = %v %v, want not found", ok, err)
		}
	})

	t.Run("stale entries are not listed and a ping refreshes them", func(t *testing.T) {
		exec(t, pool, `UPDATE clients SET last_updated = now() - interval '10 minutes' WHERE client_id = 'a'`)
		if got := listIDs(t, r, orgA); got != "b" {
			t.Fatalf("agents of A with a stale = %q, want b", got)
		}
		if err := r.Touch(ctx, "a", orgA, "another-conn"); err != nil {
			t.Fatal(err)
		}
		if got := listIDs(t, r, orgA); got != "b" {
			t.Fatalf("a touch by another connection refreshed the entry: %q", got)
		}
		if err := r.Touch(ctx, "a", orgA, "conn-a"); err != nil {
			t.Fatal(err)
		}
		if got := listIDs(t, r, orgA); got != "a,b" {
			t.Fatalf("agents of A after the touch = %q, want a,b", got)
		}
	})

	t.Run("a touch writes back a vanished row", func(t *testing.T) {
		exec(t, pool, `DELETE FROM clients WHERE client_id = 'b'`)
		if err := r.Touch(ctx, "b", orgA, "conn-b"); err != nil {
			t.Fatal(err)
		}
		if got := listIDs(t, r, orgA); got != "a,b" {
			t.Fatalf("agents of A = %q, want a,b", got)
		}
	})

	t.Run("a touch does not take back a client that moved to another live instance", func(t *testing.T) {
		if err := r.Register(ctx, pgAgent("e", orgA, "conn-e1")); err != nil {
			t.Fatal(err)
		}
		exec(t, pool, `INSERT INTO instances (instance_id) VALUES ('two')`)
		exec(t, pool, `UPDATE clients SET instance_id = 'two', connection_id = 'conn-e2' WHERE client_id = 'e'`)
		if err := r.Touch(ctx, "e", orgA, "conn-e1"); err != nil {
			t.Fatal(err)
		}
		if n := count(t, pool, `SELECT count(*) FROM clients WHERE client_id = 'e' AND instance_id = 'two'`); n != 1 {
			t.Fatal("the touch took the entry back from the live instance")
		}
		if err := r.Unregister(ctx, "e", orgA, "conn-e1"); err != nil {
			t.Fatal(err)
		}
		if n := count(t, pool, `SELECT count(*) FROM clients WHERE client_id = 'e' AND instance_id = 'two'`); n != 1 {
			t.Fatal("the old connection's unregister removed the other instance's entry")
		}
		exec(t, pool, `DELETE FROM instances WHERE instance_id = 'two'`)
	})

	t.Run("a newer connection keeps its entry when the old one unregisters", func(t *testing.T) {
		first := pgAgent("d", orgA, "conn-d1")
		if err := r.Register(ctx, first); err != nil {
			t.Fatal(err)
		}
		cs, _ := r.Agents(ctx, []string{orgA})
		seen := cs[len(cs)-1].FirstSeen
		if err := r.Register(ctx, pgAgent("d", orgA, "conn-d2")); err != nil {
			t.Fatal(err)
		}
		if err := r.Unregister(ctx, "d", orgA, "conn-d1"); err != nil {
			t.Fatal(err)
		}
		cs, _ = r.Agents(ctx, []string{orgA})
		if ids(cs) != "a,b,d" || cs[2].ConnectionID != "conn-d2" || !cs[2].FirstSeen.Equal(seen) {
			t.Fatalf("after the old connection unregistered: %+v", cs)
		}
		if err := r.Unregister(ctx, "d", orgA, "conn-d2"); err != nil {
			t.Fatal(err)
		}
		if got := listIDs(t, r, orgA); got != "a,b" {
			t.Fatalf("agents of A = %q, want a,b", got)
		}
	})

	t.Run("entries of an instance whose heartbeat stopped are not listed", func(t *testing.T) {
		exec(t, pool, `INSERT INTO instances (instance_id, heartbeat) VALUES ('dead', now() - interval '5 minutes')`)
		exec(t, pool, `INSERT INTO clients (client_id, organization_id, client_type, instance_id, connection_id)
			VALUES ('z', $1, 1, 'dead', 'conn-z')`, orgA)
		if got := listIDs(t, r, orgA); got != "a,b" {
			t.Fatalf("agents of A = %q, want a,b (not the dead instance's z)", got)
		}
	})

	t.Run("close removes the instance's rows", func(t *testing.T) {
		if err := r.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if n := count(t, pool, `SELECT count(*) FROM clients WHERE instance_id = 'one'`); n != 0 {
			t.Fatalf("%d rows left after close", n)
		}
		if n := count(t, pool, `SELECT count(*) FROM instances WHERE instance_id = 'one'`); n != 0 {
			t.Fatal("instance row left after close")
		}
	})
}

// TestPostgresRestartSameInstanceID checks that rows a previous run
// under the same instance id left behind are removed at start: the new
// run's heartbeat would otherwise keep them listed.
func TestPostgresRestartSameInstanceID(t *testing.T) {
	pool, _ := migratedPool(t)
	ctx := context.Background()
	kctx, kill := context.WithCancel(ctx)
	old, err := registry.NewPostgres(kctx, pool, registry.PostgresOptions{InstanceID: "same"})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Register(ctx, pgAgent("ghost", orgA, "c1")); err != nil {
		t.Fatal(err)
	}
	kill()
	r := newPostgres(t, pool, registry.PostgresOptions{InstanceID: "same"})
	if got := listIDs(t, r, orgA); got != "" {
		t.Fatalf("agents after the restart = %q, want none", got)
	}
	// The killed run's loop has ended; closing it now would delete the
	// new run's instance row, so it is left as a killed process leaves it.
}

func TestPostgresHistory(t *testing.T) {
	for _, history := range []bool{true, false} {
		t.Run(fmt.Sprintf("history=%v", history), func(t *testing.T) {
			pool, _ := migratedPool(t)
			ctx := context.Background()
			r := newPostgres(t, pool, registry.PostgresOptions{InstanceID: "one", History: history})
			if err := r.Register(ctx, pgAgent("a", orgA, "conn-a")); err != nil {
				t.Fatal(err)
			}
			err := registry.UnregisterWithTraffic(ctx, r, "a", orgA, "conn-a", registry.Traffic{BytesIn: 1234, BytesOut: 5678})
			if err != nil {
				t.Fatal(err)
			}
			n := count(t, pool, `SELECT count(*) FROM client_history`)
			if !history {
				if n != 0 {
					t.Fatalf("%d history rows with history disabled", n)
				}
				return
			}
			if n != 2 {
				t.Fatalf("%d history rows, want 2", n)
			}
			if count(t, pool, `SELECT count(*) FROM client_history WHERE event = 'register' AND client_id = 'a'
				AND connection_id = 'conn-a' AND client_ip = '127.0.0.1' AND client_version = '2.1.0.0' AND bytes_in IS NULL`) != 1 {
				t.Error("register event missing or incomplete")
			}
			if count(t, pool, `SELECT count(*) FROM client_history WHERE event = 'unregister' AND client_id = 'a'
				AND connection_id = 'conn-a' AND client_type = 1 AND bytes_in = 1234 AND bytes_out = 5678`) != 1 {
				t.Error("unregister event missing or without traffic")
			}
		})
	}
}

// TestStatisticsPersisted runs the statistics loop with the PostgreSQL
// exporter and reads the rows it writes.
func TestStatisticsPersisted(t *testing.T) {
	pool, _ := migratedPool(t)
	st := stats.New()
	st.Inc(stats.AuthClientSuccess)
	st.Inc(stats.AuthClientSuccess)
	st.Inc(stats.ListCommandSuccess)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		st.Run(ctx, testlog.New(t), 0, 50*time.Millisecond, registry.StatisticsExporter(pool, "one", time.Second))
	}()
	defer func() { cancel(); <-done }()
	testwait.For(t, "a statistics row with the counts", 10*time.Second, func() bool {
		return count(t, pool, `SELECT count(*) FROM statistics WHERE instance_id = 'one'
			AND (counters->>'AuthClientSuccess')::int = 2 AND (counters->>'ListCommandSuccess')::int = 1`) == 1
	})
	if st.Get(stats.AuthClientSuccess) != 0 {
		t.Fatal("counters were not reset after the export")
	}
	var raw []byte
	if err := pool.QueryRow(context.Background(), `SELECT counters FROM statistics ORDER BY at LIMIT 1`).Scan(&raw); err != nil {
		t.Fatal(err)
	}
	var counters map[string]int64
	if err := json.Unmarshal(raw, &counters); err != nil {
		t.Fatal(err)
	}
	if _, ok := counters["ControlRelayStaleMessage"]; !ok {
		t.Fatalf("counters row lacks ControlRelayStaleMessage: %s", raw)
	}
}

func TestCleanup(t *testing.T) {
	pool, _ := migratedPool(t)
	ctx := context.Background()
	r := newPostgres(t, pool, registry.PostgresOptions{InstanceID: "live"})
	if err := r.Register(ctx, pgAgent("fresh", orgA, "c-fresh")); err != nil {
		t.Fatal(err)
	}
	exec(t, pool, `INSERT INTO instances (instance_id, heartbeat) VALUES ('gone', now() - interval '2 days')`)
	exec(t, pool, `INSERT INTO clients (client_id, organization_id, client_type, instance_id, connection_id, last_updated)
		VALUES ('old', $1, 1, 'live', 'c-old', now() - interval '25 hours')`, orgA)
	for _, at := range []string{"40 days", "1 day"} {
		exec(t, pool, `INSERT INTO statistics (instance_id, at, counters) VALUES ('live', now() - $1::interval, '{}')`, at)
		exec(t, pool, `INSERT INTO client_history (event, at, client_id, organization_id, client_type, instance_id, connection_id)
			VALUES ('register', now() - $1::interval, 'x', $2, 1, 'live', 'c')`, at, orgA)
	}

	// Several instances cleaning up at once: one does it, the others
	// skip or find nothing left; none fails.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var total registry.CleanupResult
	for range 4 {
		wg.Go(func() {
			res, err := registry.Cleanup(ctx, pool, registry.CleanupOptions{})
			if err != nil {
				t.Errorf("cleanup: %v", err)
				return
			}
			mu.Lock()
			total.Clients += res.Clients
			total.Instances += res.Instances
			total.History += res.History
			total.Statistics += res.Statistics
			mu.Unlock()
		})
	}
	wg.Wait()
	if total.Clients != 1 || total.Instances != 1 || total.History != 1 || total.Statistics != 1 {
		t.Fatalf("cleanup deleted %+v, want one of each", total)
	}
	if got := listIDs(t, r, orgA); got != "fresh" {
		t.Fatalf("agents after cleanup = %q, want fresh", got)
	}
	if count(t, pool, `SELECT count(*) FROM statistics`) != 1 || count(t, pool, `SELECT count(*) FROM client_history`) != 1 {
		t.Fatal("cleanup removed rows within retention")
	}
}

// TestNpgsqlConnectionString runs the registry through a connection
// string written the way the original server's settings write it.
func TestNpgsqlConnectionString(t *testing.T) {
	conn, schema := freshSchema(t)
	pc := parseConn(t, conn)
	sslMode := "Disable"
	if pc.TLSConfig != nil {
		sslMode = "Prefer"
	}
	npgsql := fmt.Sprintf(`Host=%s;Port=%d;Database=%s;Username=%s;Password="%s";Search Path=%s;SSL Mode=%s;Pooling=true`,
		pc.Host, pc.Port, pc.Database, pc.User, strings.ReplaceAll(pc.Password, `"`, `""`), schema, sslMode)
	converted, err := config.PostgresConnString(npgsql)
	if err != nil {
		t.Fatalf("convert %q: %v", npgsql, err)
	}
	pool := openPool(t, converted)
	ctx := context.Background()
	if _, err := registry.Migrate(ctx, pool); err != nil {
		t.Fatalf("migrate through %q: %v", converted, err)
	}
	if n := count(t, pool, `SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'clients'`, schema); n != 1 {
		t.Fatalf("the Npgsql Search Path did not select schema %s", schema)
	}
	r := newPostgres(t, pool, registry.PostgresOptions{InstanceID: "npgsql"})
	if err := r.Register(ctx, pgAgent("a", orgA, "c")); err != nil {
		t.Fatal(err)
	}
	if got := listIDs(t, r, orgA); got != "a" {
		t.Fatalf("agents = %q, want a", got)
	}
}
