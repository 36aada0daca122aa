package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/wire"
)

// clearDatabaseEnv unsets the database settings the test process may
// have, so each test sets exactly what it means.
func clearDatabaseEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{"DATABASE__CONNECTIONSTRING", "DATABASE__ADMINCONNECTIONSTRING",
		"ENVIRONMENT__INMEMORYCLIENTLIST", "ENVIRONMENT__DISABLEDATABASESTATISTICS", "ENVIRONMENT__DEV", "ENVIRONMENT__ISPROD"} {
		t.Setenv(k, "")
	}
}

func runCommand(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestMigrateCommand(t *testing.T) {
	clearDatabaseEnv(t)
	conn, _ := pgtest.Schema(t)
	unreachable := "postgres://postgres@127.0.0.1:1/test?sslmode=disable&connect_timeout=2"

	tests := []struct {
		name          string
		cmd           string
		normal, admin string
		code          int
		out           string // in stdout on success, stderr on failure
	}{
		{"no connection string", "migrate", "", "", 2, "DATABASE__CONNECTIONSTRING"},
		{"bad connection string", "migrate", "Host=db;Colour=blue", "", 2, "DATABASE__CONNECTIONSTRING"},
		{"bad admin connection string", "migrate", conn, "Host=db;Colour=blue", 2, "DATABASE__ADMINCONNECTIONSTRING"},
		{"unreachable database", "migrate", unreachable, "", 1, "DATABASE__CONNECTIONSTRING"},
		{"empty schema", "migrate", conn, "", 0, "migrated from version 0"},
		{"up to date", "initonly", conn, "", 0, "up to date"},
		{"admin string is preferred", "migrate", unreachable, conn, 0, "up to date"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("DATABASE__CONNECTIONSTRING", tt.normal)
			t.Setenv("DATABASE__ADMINCONNECTIONSTRING", tt.admin)
			code, stdout, stderr := runCommand(tt.cmd)
			if code != tt.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", code, tt.code, stdout, stderr)
			}
			got := stdout
			if code != 0 {
				got = stderr
			}
			if !strings.Contains(got, tt.out) {
				t.Fatalf("output %q does not mention %q", got, tt.out)
			}
		})
	}
}

// TestServeNeedsDatabaseInProduction: production without a connection
// string stops at the start, naming the setting, unless both in-memory
// settings say so.
func TestServeNeedsDatabaseInProduction(t *testing.T) {
	clearDatabaseEnv(t)
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("ENVIRONMENT__MACHINESERVERPRIVATE", base64.StdEncoding.EncodeToString(wire.EncodePrivateKey(key)))
	t.Setenv("ENVIRONMENT__MACHINESERVERKEYEXPIRES", "2030-01-01T00:00:00Z")
	// Without a controller serve stops after the settings are
	// checked, so it never starts listening here.
	t.Setenv("AUTH__TOKENSFILE", "")

	code, _, stderr := runCommand("serve")
	if code != 2 || !strings.Contains(stderr, "DATABASE__CONNECTIONSTRING") {
		t.Fatalf("exit %d, stderr %q; want 2 naming DATABASE__CONNECTIONSTRING", code, stderr)
	}

	t.Setenv("ENVIRONMENT__INMEMORYCLIENTLIST", "true")
	t.Setenv("ENVIRONMENT__DISABLEDATABASESTATISTICS", "true")
	code, _, stderr = runCommand("serve")
	if strings.Contains(stderr, "DATABASE__CONNECTIONSTRING") || !strings.Contains(stderr, "MESSAGING__CONNECTIONSTRING") || code != 2 {
		t.Fatalf("exit %d, stderr %q; want only the missing bus", code, stderr)
	}
}

func loadConfig(t *testing.T, env map[string]string, args ...string) *config.Config {
	t.Helper()
	if env["ENVIRONMENT__DEV"] != "true" {
		env["ENVIRONMENT__MACHINESERVERPRIVATE"] = "set"
		env["ENVIRONMENT__MACHINESERVERKEYEXPIRES"] = "2030-01-01T00:00:00Z"
		env["MESSAGING__CONNECTIONSTRING"] = "nats://127.0.0.1:4222"
	}
	cfg, err := config.Load(args, func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("load config: %v", err)
	}
	cfg.InstanceID = "cmd-test"
	return cfg
}

func TestOpenBackends(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()

	t.Run("development applies the migrations", func(t *testing.T) {
		conn, _ := pgtest.Schema(t)
		be, err := openBackends(ctx, loadConfig(t, map[string]string{"ENVIRONMENT__DEV": "true", "DATABASE__CONNECTIONSTRING": conn}), log)
		if err != nil {
			t.Fatal(err)
		}
		defer be.close(log)
		if _, ok := be.registry.(*registry.Postgres); !ok || be.exporter == nil {
			t.Fatalf("registry %T, exporter %v", be.registry, be.exporter != nil)
		}
		if v, err := registry.CurrentSchemaVersion(ctx, be.pool); err != nil || v != registry.SchemaVersion() {
			t.Fatalf("schema version %d, %v", v, err)
		}
	})

	t.Run("production refuses an outdated schema", func(t *testing.T) {
		conn, _ := pgtest.Schema(t)
		env := map[string]string{"DATABASE__CONNECTIONSTRING": conn}
		_, err := openBackends(ctx, loadConfig(t, env), log)
		if !errors.Is(err, registry.ErrSchemaOutdated) || !strings.Contains(err.Error(), "machineservice migrate") {
			t.Fatalf("empty schema: %v, want ErrSchemaOutdated naming machineservice migrate", err)
		}
		if code, _, stderr := runCommandEnv(t, env, "migrate"); code != 0 {
			t.Fatalf("migrate: %d %s", code, stderr)
		}
		be, err := openBackends(ctx, loadConfig(t, env), log)
		if err != nil {
			t.Fatalf("after migrate: %v", err)
		}
		be.close(log)

		// A schema that claims to be older: refused, unless
		// ENVIRONMENT__VERIFYSCHEMA=false.
		pool, err := registry.OpenPool(ctx, conn, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		if _, err := pool.Exec(ctx, `DELETE FROM schema_version`); err != nil {
			t.Fatal(err)
		}
		if _, err := openBackends(ctx, loadConfig(t, env), log); !errors.Is(err, registry.ErrSchemaOutdated) {
			t.Fatalf("older schema: %v", err)
		}
		env["ENVIRONMENT__VERIFYSCHEMA"] = "false"
		be, err = openBackends(ctx, loadConfig(t, env), log)
		if err != nil {
			t.Fatalf("with ENVIRONMENT__VERIFYSCHEMA=false: %v", err)
		}
		be.close(log)
	})

	t.Run("in-memory client list with database statistics", func(t *testing.T) {
		conn, _ := pgtest.Schema(t)
		be, err := openBackends(ctx, loadConfig(t, map[string]string{"ENVIRONMENT__DEV": "true",
			"DATABASE__CONNECTIONSTRING": conn, "ENVIRONMENT__INMEMORYCLIENTLIST": "true"}), log)
		if err != nil {
			t.Fatal(err)
		}
		defer be.close(log)
		if _, ok := be.registry.(*registry.Memory); !ok || be.exporter == nil || be.pool == nil {
			t.Fatalf("registry %T, exporter %v", be.registry, be.exporter != nil)
		}
	})

	t.Run("no connection string in development", func(t *testing.T) {
		be, err := openBackends(ctx, loadConfig(t, map[string]string{"ENVIRONMENT__DEV": "true"}), log)
		if err != nil {
			t.Fatal(err)
		}
		defer be.close(log)
		if _, ok := be.registry.(*registry.Memory); !ok || be.exporter != nil || be.pool != nil {
			t.Fatalf("registry %T, exporter %v", be.registry, be.exporter != nil)
		}
	})
}

// runCommandEnv runs a command with env set in the process environment.
func runCommandEnv(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	clearDatabaseEnv(t)
	for k, v := range env {
		t.Setenv(k, v)
	}
	return runCommand(args...)
}
