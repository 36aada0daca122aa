package registry

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/machineservice/machineservice/wire"
)

// Defaults of PostgresOptions.
const (
	DefaultInstanceTimeout   = 60 * time.Second
	DefaultHeartbeatInterval = 15 * time.Second
	DefaultTimeout           = 3 * time.Second
	// retryInterval is how often an unreachable database is probed.
	retryInterval = time.Second
)

// PostgresOptions configure a Postgres registry.
type PostgresOptions struct {
	// InstanceID owns this instance's rows. Required.
	InstanceID string
	// PublicURL is recorded with the instance's heartbeat.
	PublicURL string
	// ClientTimeout: entries not refreshed for longer are not listed.
	// Zero means DefaultClientTimeout.
	ClientTimeout time.Duration
	// InstanceTimeout: the entries of an instance whose heartbeat is
	// older are not listed, and are reaped. Zero means
	// DefaultInstanceTimeout.
	InstanceTimeout time.Duration
	// HeartbeatInterval between heartbeats. Zero means
	// DefaultHeartbeatInterval.
	HeartbeatInterval time.Duration
	// Timeout bounds each database call, so that an unreachable database
	// delays a client by at most this much. Zero means DefaultTimeout.
	Timeout time.Duration
	// History records every register and unregister in client_history.
	History bool
	// Logger hears of outages and recoveries; nil discards.
	Logger *slog.Logger
	// OnAgentsChanged, when set, hears of the organizations whose agents
	// changed without a Register or Unregister of this instance: the
	// agents of a dead instance reaped, entries written back after an
	// outage, so that their portals can be sent a fresh list. It is
	// called on a goroutine of its own, outside the registry's locks and
	// only while the list answers, one call at a time: organizations
	// that change meanwhile go into the next call.
	OnAgentsChanged func(organizationIDs []string)
}

// Postgres is a Registry in PostgreSQL that several instances share.
//
// Each instance keeps a heartbeat row; entries are listed only while
// their instance's heartbeat is fresh, and the heartbeat loop of every
// instance reaps those of instances that stopped. The registry also
// keeps this instance's own entries in memory: while the database is
// unreachable writes fail fast and are recorded there, and once the
// heartbeat gets through again every local entry is written anew and the
// missed unregisters are applied, before Agents answers again.
type Postgres struct {
	// static after NewPostgres
	pool *pgxpool.Pool
	opts PostgresOptions
	log  *slog.Logger
	seed maphash.Seed
	// stripes order the database writes of one client key: a key's
	// local entry and its row are only changed under its stripe.
	stripes [64]sync.Mutex

	stop       chan struct{}
	done       chan struct{} // closed when the heartbeat loop ends
	notifyDone chan struct{} // closed when the notify loop ends
	wake       chan struct{} // a write failed: probe soon
	notify     chan struct{} // changed has organizations to report
	closeOnce  sync.Once

	mu      sync.Mutex
	local   map[key]*entry
	pending map[pendingKey]pendingUnregister
	// writesDown: writes are not tried, only recorded locally, until a
	// heartbeat gets through. listDown: Agents and Lookup fail, until
	// the local entries are written back.
	writesDown, listDown bool
	// dirty: something was not written; the next heartbeat resyncs.
	dirty     bool
	failures  uint64 // write failures so far, to tell if a resync saw one
	downSince time.Time
	// changed: organizations whose agents changed, not yet reported to
	// OnAgentsChanged.
	changed map[string]struct{}
}

type entry struct {
	c              Client
	historyPending bool // the register is not yet in client_history
}

type pendingKey struct {
	key
	connectionID string
}

type pendingUnregister struct {
	c       Client
	traffic Traffic
}

var (
	_ Registry        = (*Postgres)(nil)
	_ TrafficRecorder = (*Postgres)(nil)
)

// NewPostgres starts a registry on pool, which the caller keeps and
// closes after Close. It removes rows a previous run under the same
// instance id left behind, writes the first heartbeat, and keeps beating
// until Close or until ctx ends. Ending ctx without Close leaves the rows
// in place, as a killed process would; the other instances reap them.
func NewPostgres(ctx context.Context, pool *pgxpool.Pool, o PostgresOptions) (*Postgres, error) {
	if o.InstanceID == "" {
		return nil, errors.New("registry: no instance id")
	}
	if o.ClientTimeout <= 0 {
		o.ClientTimeout = DefaultClientTimeout
	}
	if o.InstanceTimeout <= 0 {
		o.InstanceTimeout = DefaultInstanceTimeout
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Postgres{
		pool:       pool,
		opts:       o,
		log:        log,
		seed:       maphash.MakeSeed(),
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
		wake:       make(chan struct{}, 1),
		local:      map[key]*entry{},
		pending:    map[pendingKey]pendingUnregister{},
		changed:    map[string]struct{}{},
		notifyDone: make(chan struct{}),
		notify:     make(chan struct{}, 1),
	}
	sctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	b := &pgx.Batch{}
	b.Queue(`DELETE FROM instances WHERE instance_id = $1`, o.InstanceID)
	p.queueHeartbeat(b)
	if err := pool.SendBatch(sctx, b).Close(); err != nil {
		return nil, fmt.Errorf("registry: first heartbeat: %w", err)
	}
	go p.run(ctx)
	if o.OnAgentsChanged != nil {
		go p.notifyLoop(ctx)
	} else {
		close(p.notifyDone)
	}
	return p, nil
}

// Close stops the heartbeat and deletes this instance's row and, with
// it, its entries.
func (p *Postgres) Close(ctx context.Context) error {
	p.closeOnce.Do(func() { close(p.stop) })
	<-p.done
	<-p.notifyDone
	err := p.removeInstance(ctx, p.pool)
	if err != nil && isOutage(err) && ctx.Err() == nil {
		// Right after an outage the pool may hand out a connection
		// that died with it and that it has not noticed yet: one of
		// its own does not.
		err = p.removeInstanceFresh(ctx)
	}
	if err != nil {
		return fmt.Errorf("registry: remove instance: %w", err)
	}
	return nil
}

func (p *Postgres) removeInstance(ctx context.Context, db interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}) error {
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	_, err := db.Exec(ctx, `DELETE FROM instances WHERE instance_id = $1`, p.opts.InstanceID)
	return err
}

// removeInstanceFresh is removeInstance on a new connection outside the
// pool.
func (p *Postgres) removeInstanceFresh(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, p.pool.Config().ConnConfig)
	if err != nil {
		return err
	}
	err = p.removeInstance(ctx, conn)
	_ = conn.Close(cctx) // the delete's outcome is what counts
	return err
}

func (p *Postgres) stripe(k key) *sync.Mutex {
	return &p.stripes[p.stripeIndex(k)]
}

func (p *Postgres) stripeIndex(k key) int {
	var h maphash.Hash
	h.SetSeed(p.seed)
	h.WriteString(k.client)
	h.WriteByte(0)
	h.WriteString(k.org)
	return int(h.Sum64() % uint64(len(p.stripes)))
}

// lockStripes locks the stripes of keys, in index order so that two
// callers cannot deadlock, and returns the unlock.
func (p *Postgres) lockStripes(keys []key) (unlock func()) {
	var held [len(p.stripes)]bool
	for _, k := range keys {
		held[p.stripeIndex(k)] = true
	}
	for i, h := range held {
		if h {
			p.stripes[i].Lock()
		}
	}
	return func() {
		for i, h := range held {
			if h {
				p.stripes[i].Unlock()
			}
		}
	}
}

// Register adds or replaces the entry, unless a fresh entry of another
// client holds the key (ErrConflict): a row is free to take when it is
// stale or its instance is dead. When the database cannot be written the
// entry is kept locally, written once the database is back, and the error
// wraps ErrUnavailable.
func (p *Postgres) Register(ctx context.Context, c Client) error {
	if c.InstanceID == "" {
		c.InstanceID = p.opts.InstanceID
	}
	k := key{c.ClientID, c.OrganizationID}
	l := p.stripe(k)
	l.Lock()
	defer l.Unlock()
	now := time.Now()
	p.mu.Lock()
	old := p.local[k]
	switch {
	case old == nil:
		c.FirstSeen = now
	case sameClient(old.c, c):
		c.FirstSeen = old.c.FirstSeen
	case now.Sub(old.c.LastUpdated) < p.opts.ClientTimeout:
		// Another client on this instance: known without asking,
		// even while the database is away.
		p.mu.Unlock()
		return conflict(old.c, c)
	default:
		c.FirstSeen = now
	}
	c.LastUpdated = now
	e := &entry{c: c, historyPending: p.opts.History}
	p.local[k] = e
	down := p.writesDown
	p.mu.Unlock()
	if down {
		return errDown
	}
	res, err := p.upsert(ctx, c, p.opts.History, false)
	if err != nil {
		return p.failed("register", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !res.written {
		// Under the stripe nothing else changed the key's local
		// entry: the previous one is put back.
		if old != nil {
			p.local[k] = old
		} else {
			delete(p.local, k)
		}
		return res.conflictError(c)
	}
	e.historyPending = false
	return nil
}

// Touch refreshes the entry if this connection owns it. An entry whose
// row has vanished (reaped while this instance could not beat, or purged)
// is written again, unless the client has meanwhile connected to another
// live instance.
func (p *Postgres) Touch(ctx context.Context, clientID, organizationID, connectionID string) error {
	k := key{clientID, organizationID}
	l := p.stripe(k)
	l.Lock()
	defer l.Unlock()
	p.mu.Lock()
	e := p.local[k]
	if e == nil || e.c.ConnectionID != connectionID {
		p.mu.Unlock()
		return nil
	}
	e.c.LastUpdated = time.Now()
	c, hist, down := e.c, e.historyPending, p.writesDown
	p.mu.Unlock()
	if down {
		return errDown
	}
	cctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	tag, err := p.pool.Exec(cctx, `UPDATE clients SET last_updated = now()
		WHERE client_id = $1 AND organization_id = $2 AND connection_id = $3`,
		clientID, organizationID, connectionID)
	if err == nil && tag.RowsAffected() == 0 {
		var res upsertResult
		res, err = p.upsert(ctx, c, hist, true)
		if err == nil {
			p.mu.Lock()
			if res.conflict {
				// Not this connection's to take back: it stays
				// unlisted, and its pings stop trying.
				delete(p.local, k)
			} else if res.written {
				e.historyPending = false
			}
			p.mu.Unlock()
			if res.conflict {
				return fmt.Errorf("touch: %w", res.conflictError(c))
			}
			if res.changed && c.Type == wire.ClientTypeAgent {
				p.agentsChanged(c.OrganizationID)
				p.reportChanges()
			}
		}
	}
	if err != nil {
		return p.failed("touch", err)
	}
	return nil
}

// Unregister removes the entry if this connection owns it.
func (p *Postgres) Unregister(ctx context.Context, clientID, organizationID, connectionID string) error {
	return p.UnregisterTraffic(ctx, clientID, organizationID, connectionID, Traffic{})
}

// UnregisterTraffic is Unregister that records the connection's traffic
// in the history. An unregister that cannot be written now is applied
// once the database is back.
func (p *Postgres) UnregisterTraffic(ctx context.Context, clientID, organizationID, connectionID string, t Traffic) error {
	k := key{clientID, organizationID}
	l := p.stripe(k)
	l.Lock()
	defer l.Unlock()
	p.mu.Lock()
	c := Client{ClientID: clientID, OrganizationID: organizationID, InstanceID: p.opts.InstanceID}
	if e := p.local[k]; e != nil {
		// A newer connection of the same client still describes it
		// for the history.
		c = e.c
		if e.c.ConnectionID == connectionID {
			delete(p.local, k)
		}
	}
	c.ConnectionID = connectionID
	down := p.writesDown
	pk := pendingKey{k, connectionID}
	if down {
		p.pending[pk] = pendingUnregister{c: c, traffic: t}
	}
	p.mu.Unlock()
	if down {
		return errDown
	}
	if err := p.remove(ctx, c, t); err != nil {
		p.mu.Lock()
		p.pending[pk] = pendingUnregister{c: c, traffic: t}
		p.mu.Unlock()
		return p.failed("unregister", err)
	}
	return nil
}

// Agents lists the agents of the organizations refreshed within the
// client timeout whose instance is alive. While the database is
// unreachable, or this instance's entries are not yet written back, it
// fails with an error wrapping ErrUnavailable rather than answer a list
// that misses clients.
func (p *Postgres) Agents(ctx context.Context, organizationIDs []string) ([]Client, error) {
	return p.fresh(ctx, "list agents", `c.organization_id = ANY($3) AND c.client_type = $4
		ORDER BY c.organization_id, c.client_id`,
		organizationIDs, int(wire.ClientTypeAgent))
}

// Lookup returns the fresh entry of a client in one of the organizations,
// preferring them in the order given.
func (p *Postgres) Lookup(ctx context.Context, clientID string, organizationIDs []string) (Client, bool, error) {
	return p.freshOne(ctx, "lookup", `c.client_id = $3 AND c.organization_id = ANY($4)
		ORDER BY array_position($4, c.organization_id)`,
		clientID, organizationIDs)
}

// LookupAgent returns the newest fresh entry of the agent with a
// registered agent id, in organizationID when it is not empty.
func (p *Postgres) LookupAgent(ctx context.Context, registeredAgentID, organizationID string) (Client, bool, error) {
	return p.freshOne(ctx, "lookup agent", `c.machine_registration_id = $3 AND c.client_type = $4
		  AND ($5 = '' OR c.organization_id = $5)
		ORDER BY c.last_updated DESC`,
		registeredAgentID, int(wire.ClientTypeAgent), organizationID)
}

// Locate returns the fresh entries of a client id in every organization,
// ordered by organization.
func (p *Postgres) Locate(ctx context.Context, clientID string) ([]Client, error) {
	return p.fresh(ctx, "locate", `c.client_id = $3
		ORDER BY c.organization_id`,
		clientID)
}

// freshClients selects the entries refreshed within the client timeout
// ($1, in seconds) whose instance's heartbeat is within the instance
// timeout ($2): the others belong to clients or instances that are gone.
const freshClients = `SELECT ` + clientColumns + `
	FROM clients c JOIN instances i ON i.instance_id = c.instance_id
	WHERE c.last_updated > now() - $1 * interval '1 second'
	  AND i.heartbeat > now() - $2 * interval '1 second'`

// fresh runs freshClients narrowed by cond, whose parameters are args
// numbered from $3, and names op in its errors.
func (p *Postgres) fresh(ctx context.Context, op, cond string, args ...any) ([]Client, error) {
	if err := p.listable(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	args = append([]any{p.opts.ClientTimeout.Seconds(), p.opts.InstanceTimeout.Seconds()}, args...)
	rows, err := p.pool.Query(ctx, freshClients+`
	  AND `+cond, args...)
	if err != nil {
		return nil, p.failed(op, err)
	}
	out, err := pgx.CollectRows(rows, scanClient)
	if err != nil {
		return nil, p.failed(op, err)
	}
	return out, nil
}

// freshOne is fresh for the first entry only; an empty answer is not an
// error but reports false.
func (p *Postgres) freshOne(ctx context.Context, op, cond string, args ...any) (Client, bool, error) {
	cs, err := p.fresh(ctx, op, cond+`
		LIMIT 1`, args...)
	if err != nil || len(cs) == 0 {
		return Client{}, false, err
	}
	return cs[0], true, nil
}

const clientColumns = `c.client_id, c.organization_id, c.client_type, c.connection_id, c.instance_id,
	c.machine_server_uri, c.client_version, c.machine_registration_id, c.client_ip, c.first_seen, c.last_updated`

func scanClient(row pgx.CollectableRow) (Client, error) {
	var c Client
	var typ int16
	err := row.Scan(&c.ClientID, &c.OrganizationID, &typ, &c.ConnectionID, &c.InstanceID,
		&c.MachineServerURI, &c.ClientVersion, &c.MachineRegistrationID, &c.ClientIP, &c.FirstSeen, &c.LastUpdated)
	c.Type = wire.ClientType(typ)
	return c, err
}

// Ready reports whether the database is reachable, for readiness probes:
// it pings through the pool, so an outage that no write has met yet is
// seen too.
func (p *Postgres) Ready(ctx context.Context) error {
	if err := p.listable(); err != nil {
		return err
	}
	if err := p.pool.Ping(ctx); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

func (p *Postgres) listable() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.listDown {
		return errDown
	}
	return nil
}

// errDown is what calls answer while the database is known to be
// unreachable: they do not wait for it.
var errDown = fmt.Errorf("%w: database unreachable; this instance's clients are kept in memory until it is back", ErrUnavailable)

// upsertResult is what an upsert did.
type upsertResult struct {
	// written: the row is the entry's now.
	written bool
	// conflict: a fresh row of another client holds the key (a
	// written=false without it is a reclaim that found the client
	// connected to another live instance).
	conflict bool
	// changed: written where the row was not this connection's fresh
	// one, so that the lists of its organization change.
	changed bool
	// The row found, if any.
	oldType           *int16
	oldRegID, oldConn *string
}

// old returns the row found; it is set when oldType is.
func (r upsertResult) old() Client {
	return Client{Type: wire.ClientType(*r.oldType), MachineRegistrationID: *r.oldRegID, ConnectionID: *r.oldConn}
}

func (r upsertResult) conflictError(c Client) error {
	if r.oldType == nil {
		// Taken between this statement's snapshot and its insert.
		return fmt.Errorf("register %s %s: %w", c.Type, c.ClientID, ErrConflict)
	}
	return conflict(r.old(), c)
}

// upsertSQL writes an entry and, when $13 is set, its register event.
//
// A row is free to take when it is stale or its instance is dead.
// Otherwise only the same client (type and registered agent id, or the
// same connection authenticating again) may replace it: a register
// replaces whatever row the client had, while a reclaim ($10: writing an
// entry back) leaves alone a row that another live instance holds, since
// the client has connected there since and this connection is on its way
// out.
//
// The final SELECT reads the row as it was before the statement (all
// parts of one statement share its snapshot), to tell a conflict and a
// change apart.
const upsertSQL = `WITH up AS (
	INSERT INTO clients (client_id, organization_id, client_type, instance_id, connection_id,
		machine_server_uri, client_version, machine_registration_id, client_ip, first_seen, last_updated)
	VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), now())
	ON CONFLICT (client_id, organization_id) DO UPDATE SET
		first_seen = CASE WHEN clients.connection_id = EXCLUDED.connection_id
			OR clients.client_type = EXCLUDED.client_type
				AND clients.machine_registration_id = EXCLUDED.machine_registration_id
			THEN clients.first_seen ELSE now() END,
		client_type = EXCLUDED.client_type,
		instance_id = EXCLUDED.instance_id,
		connection_id = EXCLUDED.connection_id,
		machine_server_uri = EXCLUDED.machine_server_uri,
		client_version = EXCLUDED.client_version,
		machine_registration_id = EXCLUDED.machine_registration_id,
		client_ip = EXCLUDED.client_ip,
		last_updated = now()
	WHERE clients.last_updated <= now() - $11 * interval '1 second'
		OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = clients.instance_id
			AND i.heartbeat > now() - $12 * interval '1 second')
		OR (clients.connection_id = EXCLUDED.connection_id
			OR clients.client_type = EXCLUDED.client_type
				AND clients.machine_registration_id = EXCLUDED.machine_registration_id)
			AND (NOT $10 OR clients.instance_id = EXCLUDED.instance_id)
	RETURNING 1
), hist AS (
	INSERT INTO client_history (event, client_id, organization_id, client_type, instance_id,
		connection_id, client_ip, client_version, machine_registration_id)
	SELECT 'register', $1, $2, $3, $4, $5, $9, $7, $8
	WHERE $13 AND EXISTS (SELECT 1 FROM up)
)
SELECT EXISTS (SELECT 1 FROM up), o.client_type, o.machine_registration_id, o.connection_id,
	coalesce(o.instance_id = $4 AND o.connection_id = $5
		AND o.last_updated > now() - $11 * interval '1 second', false)
FROM (SELECT) AS one LEFT JOIN clients o ON o.client_id = $1 AND o.organization_id = $2`

// queueUpsert queues the write of an entry (see upsertSQL); res is set
// once the batch is read.
func (p *Postgres) queueUpsert(b *pgx.Batch, c Client, hist, reclaim bool, res *upsertResult) {
	b.Queue(upsertSQL,
		c.ClientID, c.OrganizationID, int(c.Type), c.InstanceID, c.ConnectionID,
		c.MachineServerURI, c.ClientVersion, c.MachineRegistrationID, c.ClientIP,
		reclaim, p.opts.ClientTimeout.Seconds(), p.opts.InstanceTimeout.Seconds(), hist,
	).QueryRow(func(row pgx.Row) error {
		var wasOurs bool
		if err := row.Scan(&res.written, &res.oldType, &res.oldRegID, &res.oldConn, &wasOurs); err != nil {
			return err
		}
		res.changed = res.written && !wasOurs
		switch {
		case res.written:
		case !reclaim:
			res.conflict = true // a register gives way to nothing else
		case res.oldType != nil && res.oldRegID != nil && res.oldConn != nil:
			res.conflict = !sameClient(res.old(), c)
		}
		return nil
	})
}

// upsert writes an entry, and its register event when hist is set.
func (p *Postgres) upsert(ctx context.Context, c Client, hist, reclaim bool) (upsertResult, error) {
	var res upsertResult
	b := &pgx.Batch{}
	p.queueUpsert(b, c, hist, reclaim, &res)
	if err := p.send(ctx, b); err != nil {
		return upsertResult{}, err
	}
	return res, nil
}

// remove deletes the connection's entry, if it still owns the row, and
// records the unregister.
func (p *Postgres) remove(ctx context.Context, c Client, t Traffic) error {
	b := &pgx.Batch{}
	p.queueRemove(b, c, t, nil)
	return p.send(ctx, b)
}

// queueRemove queues a remove; agentGone, when not nil, is set once the
// batch is read if an agent's row was deleted.
func (p *Postgres) queueRemove(b *pgx.Batch, c Client, t Traffic, agentGone *bool) {
	q := b.Queue(`WITH gone AS (
			DELETE FROM clients WHERE client_id = $1 AND organization_id = $2 AND connection_id = $3
			RETURNING client_type)
		SELECT EXISTS (SELECT 1 FROM gone WHERE client_type = $4)`,
		c.ClientID, c.OrganizationID, c.ConnectionID, int(wire.ClientTypeAgent))
	if agentGone != nil {
		q.QueryRow(func(row pgx.Row) error { return row.Scan(agentGone) })
	}
	if p.opts.History {
		queueHistory(b, "unregister", c, &t)
	}
}

// send runs a batch, as one implicit transaction, within the timeout.
func (p *Postgres) send(ctx context.Context, b *pgx.Batch) error {
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	return p.pool.SendBatch(ctx, b).Close()
}

func queueHistory(b *pgx.Batch, event string, c Client, t *Traffic) {
	var in, out *int64
	if t != nil {
		in, out = &t.BytesIn, &t.BytesOut
	}
	b.Queue(`INSERT INTO client_history (event, client_id, organization_id, client_type, instance_id,
			connection_id, client_ip, client_version, machine_registration_id, bytes_in, bytes_out)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		event, c.ClientID, c.OrganizationID, int(c.Type), c.InstanceID,
		c.ConnectionID, c.ClientIP, c.ClientVersion, c.MachineRegistrationID, in, out)
}

// failed notes a failed database call: the next heartbeat writes this
// instance's entries again, and unless the server answered with an
// ordinary SQL error the database counts as unreachable until then.
func (p *Postgres) failed(op string, err error) error {
	outage := isOutage(err)
	p.mu.Lock()
	p.failures++
	p.dirty = true
	wasWritable := !p.writesDown
	became := outage && !p.listDown
	if outage {
		p.writesDown, p.listDown = true, true
		if became {
			p.downSince = time.Now()
		}
	}
	p.mu.Unlock()
	if became {
		p.log.Warn("registry database unreachable; clients are kept in memory until it is back", "op", op, "err", err)
	}
	if !outage || wasWritable {
		select { // beat (and resync) soon rather than at the next heartbeat
		case p.wake <- struct{}{}:
		default:
		}
	}
	if outage {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, op, err)
	}
	return fmt.Errorf("registry: %s: %w", op, err)
}

// isOutage tells a database that cannot be reached (or is going away)
// from one that refused a statement.
func isOutage(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return true
	}
	switch pe.Code[:2] {
	case "08", // connection exception
		"53", // insufficient resources
		"57", // operator intervention: shutdown, cancel
		"58": // system error
		return true
	}
	return false
}

// run is the heartbeat loop: a heartbeat and a reap every interval, or a
// probe every retryInterval while the database is unreachable, and the
// resync once it is back.
func (p *Postgres) run(ctx context.Context) {
	defer close(p.done)
	t := time.NewTimer(p.opts.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.stop:
			return
		case <-p.wake:
			t.Reset(min(retryInterval, p.opts.HeartbeatInterval))
			continue
		case <-t.C:
		}
		p.beat(ctx)
		p.mu.Lock()
		next := p.opts.HeartbeatInterval
		if p.writesDown {
			next = min(retryInterval, next)
		}
		p.mu.Unlock()
		t.Reset(next)
	}
}

func (p *Postgres) queueHeartbeat(b *pgx.Batch) {
	b.Queue(`INSERT INTO instances (instance_id, machine_server_uri, started_at, heartbeat)
		VALUES ($1, $2, now(), now())
		ON CONFLICT (instance_id) DO UPDATE SET heartbeat = now(), machine_server_uri = EXCLUDED.machine_server_uri`,
		p.opts.InstanceID, p.opts.PublicURL)
}

// beat writes the heartbeat and reaps instances whose heartbeat stopped
// (their clients go with them). Several instances reaping at once delete
// the same rows; that is harmless.
func (p *Postgres) beat(ctx context.Context) {
	defer p.reportChanges()
	b := &pgx.Batch{}
	p.queueHeartbeat(b)
	// The final SELECT sees the clients as they were before the delete
	// cascaded to them. An instance that finds the rows deleted by
	// another reaper meanwhile reports nothing.
	var reaped []string
	b.Queue(`WITH dead AS (
			DELETE FROM instances WHERE heartbeat < now() - $1 * interval '1 second' AND instance_id <> $2
			RETURNING instance_id)
		SELECT DISTINCT c.organization_id FROM clients c JOIN dead d ON d.instance_id = c.instance_id
		WHERE c.client_type = $3`,
		p.opts.InstanceTimeout.Seconds(), p.opts.InstanceID, int(wire.ClientTypeAgent),
	).Query(func(rows pgx.Rows) error {
		var err error
		reaped, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err := p.send(ctx, b); err != nil {
		_ = p.failed("heartbeat", err) // failed records it; there is no caller to tell
		return
	}
	p.agentsChanged(reaped...)
	p.mu.Lock()
	need := p.writesDown || p.dirty
	p.mu.Unlock()
	if need {
		p.resync(ctx)
	}
}

// agentsChanged records organizations to report to OnAgentsChanged.
func (p *Postgres) agentsChanged(orgs ...string) {
	if p.opts.OnAgentsChanged == nil || len(orgs) == 0 {
		return
	}
	p.mu.Lock()
	for _, o := range orgs {
		p.changed[o] = struct{}{}
	}
	p.mu.Unlock()
}

// reportChanges wakes the notify loop, if there is anything to report.
func (p *Postgres) reportChanges() {
	p.mu.Lock()
	n := len(p.changed)
	p.mu.Unlock()
	if n == 0 {
		return
	}
	select {
	case p.notify <- struct{}{}:
	default: // already awake
	}
}

// notifyLoop calls OnAgentsChanged with the organizations recorded, once
// the list answers: the callback is expected to list their agents.
func (p *Postgres) notifyLoop(ctx context.Context) {
	defer close(p.notifyDone)
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.stop:
			return
		case <-p.notify:
		}
		p.mu.Lock()
		if p.listDown {
			// Kept for the heartbeat that opens the list.
			p.mu.Unlock()
			continue
		}
		orgs := make([]string, 0, len(p.changed))
		for o := range p.changed {
			orgs = append(orgs, o)
		}
		clear(p.changed)
		p.mu.Unlock()
		if len(orgs) > 0 {
			slices.Sort(orgs)
			p.opts.OnAgentsChanged(orgs)
		}
	}
}

// resyncChunk is how many unregisters or entries one batch of a resync
// carries: a batch is one round trip, and holds the stripes of its keys
// for as long.
const resyncChunk = 500

// resync applies the unregisters that were missed and writes every local
// entry again, in batches. Writes are let through first, so that the
// entries added meanwhile are written by their own calls; the list opens
// only when the resync went through without a failure.
func (p *Postgres) resync(ctx context.Context) {
	began := time.Now()
	p.mu.Lock()
	start := p.failures
	p.dirty = false
	p.writesDown = false
	since := p.downSince
	wasDown := p.listDown
	pend := make([]pendingKey, 0, len(p.pending))
	for k := range p.pending {
		pend = append(pend, k)
	}
	keys := make([]key, 0, len(p.local))
	for k := range p.local {
		keys = append(keys, k)
	}
	p.mu.Unlock()

	removed, written := 0, 0
	for chunk := range slices.Chunk(pend, resyncChunk) {
		n, err := p.removePending(ctx, chunk)
		if err != nil {
			_ = p.failed("resync unregister", err) // the next heartbeat retries
			return
		}
		removed += n
	}
	for chunk := range slices.Chunk(keys, resyncChunk) {
		n, err := p.writeBack(ctx, chunk)
		if err != nil {
			_ = p.failed("resync register", err) // the next heartbeat retries
			return
		}
		written += n
	}
	p.mu.Lock()
	ok := p.failures == start
	if ok {
		p.listDown = false
	}
	p.mu.Unlock()
	if ok && wasDown {
		p.log.Info("registry database reachable again; this instance's clients are written back",
			"clients", written, "unregisters", removed, "outage", time.Since(since).Round(time.Millisecond).String(),
			"took", time.Since(began).Round(time.Millisecond).String())
	}
}

// removePending applies the missed unregisters of pks in one batch, and
// returns how many there were. Those it could not apply stay pending.
func (p *Postgres) removePending(ctx context.Context, pks []pendingKey) (int, error) {
	keys := make([]key, len(pks))
	for i, pk := range pks {
		keys[i] = pk.key
	}
	unlock := p.lockStripes(keys)
	defer unlock()
	p.mu.Lock()
	taken := make([]pendingKey, 0, len(pks))
	us := make([]pendingUnregister, 0, len(pks))
	for _, pk := range pks {
		if u, ok := p.pending[pk]; ok {
			delete(p.pending, pk)
			taken = append(taken, pk)
			us = append(us, u)
		}
	}
	p.mu.Unlock()
	if len(us) == 0 {
		return 0, nil
	}
	b := &pgx.Batch{}
	gone := make([]bool, len(us))
	for i, u := range us {
		p.queueRemove(b, u.c, u.traffic, &gone[i])
	}
	if err := p.send(ctx, b); err != nil {
		// The stripes kept these keys' unregisters from being
		// recorded again meanwhile.
		p.mu.Lock()
		for i, pk := range taken {
			p.pending[pk] = us[i]
		}
		p.mu.Unlock()
		return 0, err
	}
	for i, u := range us {
		if gone[i] {
			p.agentsChanged(u.c.OrganizationID)
		}
	}
	return len(us), nil
}

// writeBack writes the local entries of keys in one batch, and returns
// how many it wrote. An entry that meets a conflict is dropped.
func (p *Postgres) writeBack(ctx context.Context, keys []key) (int, error) {
	type item struct {
		k    key
		e    *entry
		c    Client
		hist bool
		res  upsertResult
	}
	unlock := p.lockStripes(keys)
	items := make([]item, 0, len(keys))
	p.mu.Lock()
	for _, k := range keys {
		if e := p.local[k]; e != nil {
			items = append(items, item{k: k, e: e, c: e.c, hist: e.historyPending})
		}
	}
	p.mu.Unlock()
	if len(items) == 0 {
		unlock()
		return 0, nil
	}
	b := &pgx.Batch{}
	for i := range items {
		p.queueUpsert(b, items[i].c, items[i].hist, true, &items[i].res)
	}
	if err := p.send(ctx, b); err != nil {
		unlock()
		return 0, err
	}
	written := 0
	var refused []item
	p.mu.Lock()
	for _, it := range items {
		switch {
		case it.res.conflict:
			// Another client took the id while this one was only
			// known here: this one stays unlisted, and nothing
			// tries again.
			delete(p.local, it.k)
			refused = append(refused, it)
		case it.res.written:
			written++
			it.e.historyPending = false
		}
	}
	p.mu.Unlock()
	unlock()
	for _, it := range items {
		if it.res.changed && it.c.Type == wire.ClientTypeAgent {
			p.agentsChanged(it.c.OrganizationID)
		}
	}
	for _, it := range refused {
		p.log.Warn("a client registered while the database was away is not listed: another client holds its id",
			"org", it.c.OrganizationID, "conn", it.c.ConnectionID, "err", it.res.conflictError(it.c))
	}
	return written, nil
}

// OpenPool connects to PostgreSQL with connString (a URL or key=value
// pairs; see config.PostgresConnString for the Npgsql form). Connecting
// takes at most timeout unless connString sets connect_timeout.
func OpenPool(ctx context.Context, connString string, timeout time.Duration) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("parse connection string: %w", err)
	}
	if cfg.ConnConfig.ConnectTimeout == 0 && timeout > 0 {
		cfg.ConnConfig.ConnectTimeout = timeout
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open pool: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, max(timeout, time.Second))
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to %s:%d: %w", cfg.ConnConfig.Host, cfg.ConnConfig.Port, err)
	}
	return pool, nil
}
