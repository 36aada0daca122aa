package registry

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/machineservice/machineservice/wire"
)

// DefaultRetention is how long statistics and client history are kept.
const DefaultRetention = 30 * 24 * time.Hour

// StatisticsExporter returns an exporter for stats.Stats.Run that stores
// each export as one statistics row: the instance, the time and the
// counters as a JSON object. A failed write returns the error, so the
// counts are kept for the next export.
func StatisticsExporter(pool *pgxpool.Pool, instanceID string, timeout time.Duration) func(context.Context, time.Time, map[string]int64) error {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return func(ctx context.Context, at time.Time, counters map[string]int64) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		if _, err := pool.Exec(ctx, `INSERT INTO statistics (instance_id, at, counters) VALUES ($1, $2, $3)`,
			instanceID, at.UTC(), counters); err != nil {
			return fmt.Errorf("store statistics: %w", err)
		}
		return nil
	}
}

// CleanupOptions say what the cleanup purges.
type CleanupOptions struct {
	// StaleClients: entries not refreshed for longer are deleted, and so
	// are instances whose heartbeat is older. Zero means one day.
	StaleClients time.Duration
	// Retention: statistics and history rows older are deleted. Zero
	// means DefaultRetention.
	Retention time.Duration
}

// CleanupResult counts what a cleanup deleted.
type CleanupResult struct {
	// Skipped is set when another instance was cleaning up at the time.
	Skipped                                 bool
	Clients, Instances, History, Statistics int64
	// AgentOrganizations are the organizations whose agents were
	// deleted, in order, so that their portals can be sent a fresh list.
	AgentOrganizations []string
}

// Cleanup purges stale entries, dead instances, and history and
// statistics past retention, in one transaction. Instances that run it at
// the same time do not wait: all but one skip it.
func Cleanup(ctx context.Context, pool *pgxpool.Pool, o CleanupOptions) (CleanupResult, error) {
	if o.StaleClients <= 0 {
		o.StaleClients = 24 * time.Hour
	}
	if o.Retention <= 0 {
		o.Retention = DefaultRetention
	}
	var res CleanupResult
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var got bool
		if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock(`+lockKey+`)`, "cleanup").Scan(&got); err != nil {
			return err
		}
		if !got {
			res.Skipped = true
			return nil
		}
		stale, keep := o.StaleClients.Seconds(), o.Retention.Seconds()
		agent := int(wire.ClientTypeAgent)
		// Each SELECT sees the clients as they were before its delete
		// (and its cascade).
		var fromClients, fromInstances []string
		if err := tx.QueryRow(ctx, `WITH gone AS (
				DELETE FROM clients WHERE last_updated < now() - $1 * interval '1 second'
				RETURNING organization_id, client_type)
			SELECT count(*), coalesce(array_agg(DISTINCT organization_id) FILTER (WHERE client_type = $2), '{}')
			FROM gone`, stale, agent).Scan(&res.Clients, &fromClients); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, `WITH dead AS (
				DELETE FROM instances WHERE heartbeat < now() - $1 * interval '1 second'
				RETURNING instance_id)
			SELECT (SELECT count(*) FROM dead), coalesce((SELECT array_agg(DISTINCT c.organization_id)
				FROM clients c JOIN dead d ON d.instance_id = c.instance_id WHERE c.client_type = $2), '{}')`,
			stale, agent).Scan(&res.Instances, &fromInstances); err != nil {
			return err
		}
		res.AgentOrganizations = slices.Compact(slices.Sorted(slices.Values(append(fromClients, fromInstances...))))
		for _, d := range []struct {
			n   *int64
			sql string
		}{
			{&res.History, `DELETE FROM client_history WHERE at < now() - $1 * interval '1 second'`},
			{&res.Statistics, `DELETE FROM statistics WHERE at < now() - $1 * interval '1 second'`},
		} {
			tag, err := tx.Exec(ctx, d.sql, keep)
			if err != nil {
				return err
			}
			*d.n = tag.RowsAffected()
		}
		return nil
	})
	if err != nil {
		return CleanupResult{}, fmt.Errorf("cleanup: %w", err)
	}
	return res, nil
}
