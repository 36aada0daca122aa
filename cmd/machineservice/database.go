package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
)

// cleanupInterval is how often each instance runs the database cleanup;
// the instances that find another one at it skip their turn.
const cleanupInterval = 24 * time.Hour

// migrateTimeout bounds `machineservice migrate`, and
// migrateConnectTimeout its connecting.
const (
	migrateTimeout        = 5 * time.Minute
	migrateConnectTimeout = 10 * time.Second
)

// backends are where serve keeps its registry and statistics.
type backends struct {
	registry registry.Registry
	exporter stats.Exporter // nil: the log
	pool     *pgxpool.Pool  // nil without a database
	pg       *registry.Postgres
	stop     context.CancelFunc
	wg       sync.WaitGroup
	// agentsChanged hears of the organizations whose agents the registry
	// or the cleanup changed; set once the server exists.
	agentsChanged atomic.Pointer[func(organizationIDs []string)]
}

// onAgentsChanged sets what hears of the organizations whose agents
// changed without a connection of this instance saying so.
func (b *backends) onAgentsChanged(f func(organizationIDs []string)) {
	b.agentsChanged.Store(&f)
}

func (b *backends) reportAgentsChanged(orgs []string) {
	if f := b.agentsChanged.Load(); f != nil {
		(*f)(orgs)
	}
}

// openBackends connects to the database when the settings call for it.
// In development it applies the migrations; in production it checks the
// schema version unless ENVIRONMENT__VERIFYSCHEMA=false.
func openBackends(ctx context.Context, cfg *config.Config, log *slog.Logger) (*backends, error) {
	b := &backends{stop: func() {}}
	useRegistry := !cfg.InMemoryClientList
	useStats := !cfg.DisableDatabaseStatistics
	if cfg.DatabaseConnectionString == "" || (!useRegistry && !useStats) {
		if cfg.DatabaseConnectionString != "" {
			log.Warn("DATABASE__CONNECTIONSTRING is not used: ENVIRONMENT__INMEMORYCLIENTLIST and ENVIRONMENT__DISABLEDATABASESTATISTICS are both true")
		}
		log.Info("clients are registered in memory; run one instance only")
		b.registry = registry.NewMemory(cfg.ClientTimeout, nil)
		return b, nil
	}
	conn, err := config.PostgresConnString(cfg.DatabaseConnectionString)
	if err != nil {
		return nil, fmt.Errorf("%w: DATABASE__CONNECTIONSTRING: %v", config.ErrUsage, err)
	}
	if cfg.Dev {
		res, err := applyMigrations(ctx, cfg.DatabaseAdminConnectionString, cfg.DatabaseConnectionString, cfg.DatabaseTimeout)
		if err != nil {
			return nil, err
		}
		log.Info("database schema", "version", res.To, "applied", len(res.Applied))
	}
	pool, err := registry.OpenPool(ctx, conn, cfg.DatabaseTimeout)
	if err != nil {
		return nil, fmt.Errorf("database (DATABASE__CONNECTIONSTRING): %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			pool.Close()
		}
	}()
	if !cfg.Dev && cfg.VerifySchema {
		cctx, cancel := context.WithTimeout(ctx, cfg.DatabaseTimeout)
		err := registry.CheckSchema(cctx, pool)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("%w: run `machineservice migrate` first (or set ENVIRONMENT__VERIFYSCHEMA=false)", err)
		}
	}
	b.pool = pool
	if useRegistry {
		pg, err := registry.NewPostgres(context.WithoutCancel(ctx), pool, registry.PostgresOptions{
			InstanceID:        cfg.InstanceID,
			PublicURL:         cfg.PublicURL,
			ClientTimeout:     cfg.ClientTimeout,
			InstanceTimeout:   cfg.InstanceTimeout,
			HeartbeatInterval: cfg.HeartbeatInterval,
			Timeout:           cfg.DatabaseTimeout,
			History:           !cfg.DisableDatabaseClientHistory,
			Logger:            log,
			OnAgentsChanged:   b.reportAgentsChanged,
		})
		if err != nil {
			return nil, err
		}
		b.pg, b.registry = pg, pg
		log.Info("clients are registered in PostgreSQL", "instance", cfg.InstanceID, "public_url", cfg.PublicURL,
			"history", !cfg.DisableDatabaseClientHistory)
	} else {
		b.registry = registry.NewMemory(cfg.ClientTimeout, nil)
		log.Info("clients are registered in memory (ENVIRONMENT__INMEMORYCLIENTLIST); run one instance only")
	}
	if useStats {
		b.exporter = registry.StatisticsExporter(pool, cfg.InstanceID, cfg.DatabaseTimeout)
	}
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	b.stop = cancel
	b.wg.Go(func() { cleanupLoop(cctx, pool, cfg, log, b.reportAgentsChanged) })
	ok = true
	return b, nil
}

// statisticsCheck is a readiness check for the database when only the
// statistics are kept there; a PostgreSQL registry checks it itself. It
// is nil without a database.
func (b *backends) statisticsCheck() metrics.Checker {
	if b.pg != nil || b.pool == nil {
		return nil
	}
	pool := b.pool
	return metrics.CheckerFunc(func(ctx context.Context) error {
		if err := pool.Ping(ctx); err != nil {
			return fmt.Errorf("statistics database unreachable: %w", err)
		}
		return nil
	})
}

// close removes this instance's registrations and closes the pool.
func (b *backends) close(log *slog.Logger) {
	b.stop()
	b.wg.Wait()
	if b.pg != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := b.pg.Close(ctx); err != nil {
			log.Warn("removing this instance's registrations failed; other instances reap them", "err", err)
		}
		cancel()
	}
	if b.pool != nil {
		b.pool.Close()
	}
}

// cleanupLoop purges stale rows now and then every cleanupInterval, and
// tells agentsChanged whose agents it removed.
func cleanupLoop(ctx context.Context, pool *pgxpool.Pool, cfg *config.Config, log *slog.Logger, agentsChanged func([]string)) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		res, err := registry.Cleanup(cctx, pool, registry.CleanupOptions{
			Retention: time.Duration(cfg.StatisticsRetentionDays) * 24 * time.Hour,
		})
		cancel()
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("database cleanup failed; next try in an hour", "err", err)
			t.Reset(time.Hour)
			continue
		case err != nil:
			return
		case res.Skipped:
			log.Info("database cleanup skipped: another instance is at it")
		default:
			log.Info("database cleanup", "clients", res.Clients, "instances", res.Instances,
				"history", res.History, "statistics", res.Statistics)
			if len(res.AgentOrganizations) > 0 {
				agentsChanged(res.AgentOrganizations)
			}
		}
		t.Reset(cleanupInterval)
	}
}

// applyMigrations migrates the schema through the admin connection
// string when there is one, else the normal one.
func applyMigrations(ctx context.Context, admin, normal string, timeout time.Duration) (registry.MigrateResult, error) {
	setting, raw := "DATABASE__ADMINCONNECTIONSTRING", admin
	if strings.TrimSpace(raw) == "" {
		setting, raw = "DATABASE__CONNECTIONSTRING", normal
	}
	if strings.TrimSpace(raw) == "" {
		return registry.MigrateResult{}, fmt.Errorf("%w: DATABASE__CONNECTIONSTRING (or DATABASE__ADMINCONNECTIONSTRING) is required to migrate", config.ErrUsage)
	}
	conn, err := config.PostgresConnString(raw)
	if err != nil {
		return registry.MigrateResult{}, fmt.Errorf("%w: %s: %v", config.ErrUsage, setting, err)
	}
	pool, err := registry.OpenPool(ctx, conn, timeout)
	if err != nil {
		return registry.MigrateResult{}, fmt.Errorf("database (%s): %w", setting, err)
	}
	defer pool.Close()
	res, err := registry.Migrate(ctx, pool)
	if err != nil {
		return res, fmt.Errorf("database (%s): %w", setting, err)
	}
	return res, nil
}

// migrate is `machineservice migrate` (and `initonly`, the original's
// name): apply the schema migrations and exit.
func migrate(args []string, stdout io.Writer, getenv func(string) string) error {
	if len(args) > 0 {
		return fmt.Errorf("%w: migrate takes no arguments, got %q", config.ErrUsage, args[0])
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, migrateTimeout)
	defer cancel()
	res, err := applyMigrations(ctx, getenv("DATABASE__ADMINCONNECTIONSTRING"), getenv("DATABASE__CONNECTIONSTRING"), migrateConnectTimeout)
	if err != nil {
		return err
	}
	if len(res.Applied) == 0 {
		fmt.Fprintf(stdout, "database schema is up to date at version %d\n", res.To)
		return nil
	}
	fmt.Fprintf(stdout, "database schema migrated from version %d to %d: %s\n", res.From, res.To, strings.Join(res.Applied, ", "))
	return nil
}
