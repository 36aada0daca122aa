package registry

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The schema is a handful of tables, so the migration runner is the
// short one below rather than a library: the maintained ones either
// work through database/sql (goose) or bring their own driver stack
// (golang-migrate), while this runs on the pgx pool the registry already
// uses and takes an advisory lock so that instances starting together do
// not race.

//go:embed migrations/*.sql
var migrationFiles embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the embedded migrations in order. Their file names
// are NNNN_name.sql, numbered from 1 without gaps.
func migrations() ([]migration, error) {
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return nil, fmt.Errorf("list migrations: %w", err)
	}
	out := make([]migration, 0, len(names))
	for _, n := range names {
		base := path.Base(n)
		num, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("migration %s: name must start with a version number and '_'", base)
		}
		data, err := migrationFiles.ReadFile(n)
		if err != nil {
			return nil, fmt.Errorf("read migration %s: %w", base, err)
		}
		out = append(out, migration{version: v, name: strings.TrimSuffix(base, ".sql"), sql: string(data)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version < out[j].version })
	for i, m := range out {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration %s: expected version %d", m.name, i+1)
		}
	}
	return out, nil
}

// SchemaVersion is the version the embedded migrations bring the schema
// to.
func SchemaVersion() int {
	ms, err := migrations()
	if err != nil {
		panic(err) // the embedded files are fixed at build time; the tests read them
	}
	return len(ms)
}

// lockKey is the advisory lock of one task in the current schema, so that
// separate schemas in one database (tests) do not wait on each other.
const lockKey = `hashtext(coalesce(current_schema(), '') || ':machineservice:' || $1)`

// MigrateResult tells what Migrate did.
type MigrateResult struct {
	From, To int      // schema versions before and after
	Applied  []string // names of the migrations applied
}

// Migrate applies the migrations the schema lacks, each in its own
// transaction, and records them in the schema_version table. Instances
// migrating at the same time wait for each other.
func Migrate(ctx context.Context, pool *pgxpool.Pool) (MigrateResult, error) {
	var res MigrateResult
	ms, err := migrations()
	if err != nil {
		return res, err
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return res, fmt.Errorf("migrate: connect: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock(`+lockKey+`)`, "migrate"); err != nil {
		return res, fmt.Errorf("migrate: lock: %w", err)
	}
	defer func() {
		// A failed unlock ends with the session; the connection is
		// dropped so that the lock cannot outlive this call.
		if _, err := conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock(`+lockKey+`)`, "migrate"); err != nil {
			_ = conn.Conn().Close(context.WithoutCancel(ctx))
		}
	}()
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
		version    integer     PRIMARY KEY,
		name       text        NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return res, fmt.Errorf("migrate: create schema_version: %w", err)
	}
	if err := conn.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_version`).Scan(&res.From); err != nil {
		return res, fmt.Errorf("migrate: read schema version: %w", err)
	}
	res.To = res.From
	for _, m := range ms {
		if m.version <= res.From {
			continue
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO schema_version (version, name) VALUES ($1, $2)`, m.version, m.name)
			return err
		})
		if err != nil {
			return res, fmt.Errorf("migrate: apply %s: %w", m.name, err)
		}
		res.To = m.version
		res.Applied = append(res.Applied, m.name)
	}
	return res, nil
}

// CurrentSchemaVersion reads the schema's version: 0 when no migration
// has been applied.
func CurrentSchemaVersion(ctx context.Context, pool *pgxpool.Pool) (int, error) {
	var exists bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass('schema_version') IS NOT NULL`).Scan(&exists); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	if !exists {
		return 0, nil
	}
	var v int
	if err := pool.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_version`).Scan(&v); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return v, nil
}

// CheckSchema returns an error wrapping ErrSchemaOutdated when the
// schema lacks migrations this build has. A newer schema is accepted:
// migrations only add, so an older build keeps working during a rolling
// upgrade.
func CheckSchema(ctx context.Context, pool *pgxpool.Pool) error {
	v, err := CurrentSchemaVersion(ctx, pool)
	if err != nil {
		return err
	}
	if want := SchemaVersion(); v < want {
		return fmt.Errorf("%w: the database is at version %d, this build needs %d", ErrSchemaOutdated, v, want)
	}
	return nil
}
