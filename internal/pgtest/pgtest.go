// Package pgtest gives tests a fresh schema in the PostgreSQL named by
// MACHINESERVICE_TEST_POSTGRES, so that tests and parallel runs sharing
// one database do not see each other's rows, and a TCP proxy in front of
// it that a test can cut to play a database outage.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Env names the connection string of the test database.
const Env = "MACHINESERVICE_TEST_POSTGRES"

// Schema creates a schema with a random name and returns a connection
// string whose search_path selects it, and the schema's name. The schema
// is dropped when the test ends. Without Env the test is skipped.
func Schema(t testing.TB) (conn, schema string) {
	t.Helper()
	base := os.Getenv(Env)
	if base == "" {
		t.Skipf("%s is not set; set it to a PostgreSQL URL (for example postgres://postgres@127.0.0.1:5432/test?sslmode=disable) to run the PostgreSQL tests", Env)
	}
	var b [6]byte
	_, _ = rand.Read(b[:]) // never fails
	schema = "ms_test_" + hex.EncodeToString(b[:])
	do := func(sql string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, base)
		if err != nil {
			return err
		}
		defer c.Close(ctx)
		_, err = c.Exec(ctx, sql)
		return err
	}
	if err := do("CREATE SCHEMA " + schema); err != nil {
		t.Fatalf("create a test schema in %s: %v", Env, err)
	}
	t.Cleanup(func() {
		if err := do("DROP SCHEMA " + schema + " CASCADE"); err != nil {
			t.Errorf("drop test schema %s: %v", schema, err)
		}
	})
	return WithSearchPath(t, base, schema), schema
}

// WithSearchPath adds search_path to a URL or key=value connection
// string.
func WithSearchPath(t testing.TB, conn, schema string) string {
	t.Helper()
	if !IsURL(conn) {
		return conn + " search_path=" + schema
	}
	u, err := url.Parse(conn)
	if err != nil {
		t.Fatalf("%s: %v", Env, err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String()
}

// IsURL tells a postgres:// URL from key=value pairs.
func IsURL(conn string) bool {
	return strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://")
}
