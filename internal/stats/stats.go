// Package stats counts what the server does: the original server's
// statistics counters, exported and reset periodically, and the running
// totals of the status report.
package stats

import (
	"context"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Counter is one statistics counter.
type Counter int

// The counters. The first eighteen are the original server's.
const (
	CommandRelaySuccess Counter = iota
	CommandRelayDestinationNotAvailable
	AuthClientSuccess
	AuthClientFailure
	AuthPortalSuccess
	AuthPortalFailure
	ListCommandSuccess
	PingCommandSuccess
	RateLimitExceeded
	ControlRelayInitiated
	ControlRelaySuccess
	ControlRelayFailure
	ControlRelayDestinationNotAvailable
	ControlRelayDestinationNotAuthenticated
	AuthClientTimeoutFailure
	AuthPortalTimeoutFailure
	AuthClientNotFound
	ControlRelayStaleMessage
	CommandRelayDenied
	ListFailure
	RegistryFailure
	MessagesIgnored
	numCounters
)

var counterNames = [numCounters]string{
	"CommandRelaySuccess",
	"CommandRelayDestinationNotAvailable",
	"AuthClientSuccess",
	"AuthClientFailure",
	"AuthPortalSuccess",
	"AuthPortalFailure",
	"ListCommandSuccess",
	"PingCommandSuccess",
	"RateLimitExceeded",
	"ControlRelayInitiated",
	"ControlRelaySuccess",
	"ControlRelayFailure",
	"ControlRelayDestinationNotAvailable",
	"ControlRelayDestinationNotAuthenticated",
	"AuthClientTimeoutFailure",
	"AuthPortalTimeoutFailure",
	"AuthClientNotFound",
	"ControlRelayStaleMessage",
	"CommandRelayDenied",
	"ListFailure",
	"RegistryFailure",
	"MessagesIgnored",
}

// String returns the counter's name.
func (c Counter) String() string {
	if c < 0 || c >= numCounters {
		return "Unknown"
	}
	return counterNames[c]
}

// Stats holds the counters. The zero value is not usable; call New.
type Stats struct {
	started time.Time

	counters [numCounters]atomic.Int64

	totalConnections atomic.Int64
	openConnections  atomic.Int64
	maxSimultaneous  atomic.Int64
	messagesReceived atomic.Int64

	mu     sync.Mutex
	closes map[string]int64 // by close reason, never reset

	observer Observer // set before the Stats is shared
}

// Observer is told of every count as it happens, for metrics that, unlike
// the counters here, are never reset.
type Observer interface {
	Counted(c Counter)
}

// SetObserver makes o see every count from now on. Call it before the
// Stats is shared.
func (s *Stats) SetObserver(o Observer) { s.observer = o }

// New returns zeroed counters.
func New() *Stats {
	return &Stats{started: time.Now(), closes: map[string]int64{}}
}

// Inc adds one to c.
func (s *Stats) Inc(c Counter) {
	s.counters[c].Add(1)
	if s.observer != nil {
		s.observer.Counted(c)
	}
}

// Get returns c's current value.
func (s *Stats) Get(c Counter) int64 { return s.counters[c].Load() }

// Opened records a new connection.
func (s *Stats) Opened() {
	s.totalConnections.Add(1)
	n := s.openConnections.Add(1)
	for {
		m := s.maxSimultaneous.Load()
		if n <= m || s.maxSimultaneous.CompareAndSwap(m, n) {
			return
		}
	}
}

// Closed records a closed connection and why it closed.
func (s *Stats) Closed(reason string) {
	s.openConnections.Add(-1)
	s.mu.Lock()
	s.closes[reason]++
	s.mu.Unlock()
}

// MessageReceived counts one received message.
func (s *Stats) MessageReceived() { s.messagesReceived.Add(1) }

// Snapshot is a copy of the counters and totals.
type Snapshot struct {
	Counters         map[string]int64 `json:"counters"`
	Closes           map[string]int64 `json:"closes"`
	TotalConnections int64            `json:"totalConnections"`
	OpenConnections  int64            `json:"openConnections"`
	MaxSimultaneous  int64            `json:"maxSimultaneous"`
	MessagesReceived int64            `json:"messagesReceived"`
	Uptime           time.Duration    `json:"uptime"`
}

// Snapshot copies the current values.
func (s *Stats) Snapshot() Snapshot {
	snap := s.totals()
	snap.Counters = make(map[string]int64, numCounters)
	for c := Counter(0); c < numCounters; c++ {
		snap.Counters[c.String()] = s.counters[c].Load()
	}
	return snap
}

// Export returns the counters and resets them to zero.
func (s *Stats) Export() map[string]int64 {
	out := make(map[string]int64, numCounters)
	for c := Counter(0); c < numCounters; c++ {
		out[c.String()] = s.counters[c].Swap(0)
	}
	return out
}

func (s *Stats) totals() Snapshot {
	s.mu.Lock()
	closes := make(map[string]int64, len(s.closes))
	for k, v := range s.closes {
		closes[k] = v
	}
	s.mu.Unlock()
	return Snapshot{
		Closes:           closes,
		TotalConnections: s.totalConnections.Load(),
		OpenConnections:  s.openConnections.Load(),
		MaxSimultaneous:  s.maxSimultaneous.Load(),
		MessagesReceived: s.messagesReceived.Load(),
		Uptime:           time.Since(s.started).Round(time.Second),
	}
}

// Exporter receives the counters each export interval.
type Exporter func(ctx context.Context, at time.Time, counters map[string]int64) error

// finalExportTimeout bounds the export Run makes when its context ends.
const finalExportTimeout = 5 * time.Second

// Run logs a status report every statusEvery and exports (then resets)
// the counters every exportEvery, until ctx ends. A zero interval disables
// that task. A failed export is logged and its counts are kept for the
// next one. When ctx ends and exports are on, Run exports once more, with
// a context of its own bounded by finalExportTimeout, so that a restart
// does not lose the counts of the interval it cuts short.
func (s *Stats) Run(ctx context.Context, log *slog.Logger, statusEvery, exportEvery time.Duration, export Exporter) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if export == nil {
		export = logExporter(log)
	}
	status := tick(statusEvery)
	exports := tick(exportEvery)
	defer status.Stop()
	defer exports.Stop()
	for {
		select {
		case <-ctx.Done():
			if exportEvery > 0 {
				s.finalExport(ctx, log, export)
			}
			return
		case <-status.C:
			t := s.totals()
			log.Info("status",
				"open_connections", t.OpenConnections,
				"total_connections", t.TotalConnections,
				"max_simultaneous", t.MaxSimultaneous,
				"messages_received", t.MessagesReceived,
				"uptime", t.Uptime.String())
		case at := <-exports.C:
			counters := s.Export()
			if err := export(ctx, at, counters); err != nil {
				log.Warn("statistics export failed; counts kept for the next export", "err", err)
				s.restore(counters)
			}
		}
	}
}

// finalExport exports what was counted since the last export. ctx has
// ended already, so the export gets a context of its own that keeps
// ctx's values. Should it fail, the counts go to the log, the last place
// left for them.
func (s *Stats) finalExport(ctx context.Context, log *slog.Logger, export Exporter) {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalExportTimeout)
	defer cancel()
	counters := s.Export()
	if err := export(fctx, time.Now(), counters); err != nil {
		log.Warn("final statistics export failed", append([]any{"err", err}, nonZero(counters)...)...)
		s.restore(counters) // still readable through Get and Snapshot
	}
}

// restore adds counts whose export failed back to the counters.
func (s *Stats) restore(counters map[string]int64) {
	for c := Counter(0); c < numCounters; c++ {
		s.counters[c].Add(counters[c.String()])
	}
}

func logExporter(log *slog.Logger) Exporter {
	return func(_ context.Context, _ time.Time, counters map[string]int64) error {
		log.Info("statistics", nonZero(counters)...)
		return nil
	}
}

// nonZero returns the counters that are not zero as log attributes, by
// name.
func nonZero(counters map[string]int64) []any {
	names := make([]string, 0, len(counters))
	for k, v := range counters {
		if v != 0 {
			names = append(names, k)
		}
	}
	sort.Strings(names)
	attrs := make([]any, 0, 2*len(names))
	for _, n := range names {
		attrs = append(attrs, n, counters[n])
	}
	return attrs
}

type ticker struct {
	C <-chan time.Time
	t *time.Ticker
}

func (t ticker) Stop() {
	if t.t != nil {
		t.t.Stop()
	}
}

func tick(d time.Duration) ticker {
	if d <= 0 {
		return ticker{}
	}
	t := time.NewTicker(d)
	return ticker{C: t.C, t: t}
}
