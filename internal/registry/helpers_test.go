package registry_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/testlog"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testDatabaseEnv names the connection URL of the test database.
const testDatabaseEnv = pgtest.Env

// freshSchema returns a connection string for a fresh schema, and its
// name.
func freshSchema(t *testing.T) (string, string) {
	t.Helper()
	return pgtest.Schema(t)
}

// parseConn reads a connection string as pgx does.
func parseConn(t *testing.T, conn string) *pgconn.Config {
	t.Helper()
	c, err := pgconn.ParseConfig(conn)
	if err != nil {
		t.Fatalf("%s: %v", testDatabaseEnv, err)
	}
	return c
}

// openPool opens a pool that is closed when the test ends.
func openPool(t *testing.T, conn string) *pgxpool.Pool {
	t.Helper()
	pool, err := registry.OpenPool(context.Background(), conn, 2*time.Second)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// migratedPool opens a pool on a fresh, migrated schema.
func migratedPool(t *testing.T) (*pgxpool.Pool, string) {
	t.Helper()
	conn, _ := freshSchema(t)
	pool := openPool(t, conn)
	if _, err := registry.Migrate(context.Background(), pool); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	return pool, conn
}

// newPostgres starts a registry that is closed when the test ends.
func newPostgres(t *testing.T, pool *pgxpool.Pool, o registry.PostgresOptions) *registry.Postgres {
	t.Helper()
	if o.Logger == nil {
		o.Logger = testlog.New(t)
	}
	r, err := registry.NewPostgres(context.Background(), pool, o)
	if err != nil {
		t.Fatalf("new postgres registry: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(context.Background()); err != nil {
			t.Errorf("close registry: %v", err)
		}
	})
	return r
}

// count runs a counting query.
func count(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// exec runs a statement.
func exec(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// logRecorder is a logger that logs through t.Log and counts the
// messages, so that a test can tell what the registry reported.
type logRecorder struct {
	slog.Handler
	mu   *sync.Mutex
	msgs *[]string
}

func recordLogs(t *testing.T) (*slog.Logger, *logRecorder) {
	r := &logRecorder{Handler: testlog.New(t).Handler(), mu: &sync.Mutex{}, msgs: new([]string)}
	return slog.New(r), r
}

func (r *logRecorder) Handle(ctx context.Context, rec slog.Record) error {
	r.mu.Lock()
	*r.msgs = append(*r.msgs, rec.Message)
	r.mu.Unlock()
	return r.Handler.Handle(ctx, rec)
}

func (r *logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	return &logRecorder{Handler: r.Handler.WithAttrs(as), mu: r.mu, msgs: r.msgs}
}

func (r *logRecorder) WithGroup(name string) slog.Handler {
	return &logRecorder{Handler: r.Handler.WithGroup(name), mu: r.mu, msgs: r.msgs}
}

// count returns how many messages so far contain s.
func (r *logRecorder) count(s string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range *r.msgs {
		if strings.Contains(m, s) {
			n++
		}
	}
	return n
}
