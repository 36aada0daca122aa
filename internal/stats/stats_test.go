package stats_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testlog"
)

// original are the counters of the original server, by name.
var original = []string{
	"CommandRelaySuccess", "CommandRelayDestinationNotAvailable",
	"AuthClientSuccess", "AuthClientFailure", "AuthPortalSuccess", "AuthPortalFailure",
	"ListCommandSuccess", "PingCommandSuccess", "RateLimitExceeded",
	"ControlRelayInitiated", "ControlRelaySuccess", "ControlRelayFailure",
	"ControlRelayDestinationNotAvailable", "ControlRelayDestinationNotAuthenticated",
	"AuthClientTimeoutFailure", "AuthPortalTimeoutFailure", "AuthClientNotFound",
	"ControlRelayStaleMessage",
}

// waitFor is how long a test waits for something Run does.
const waitFor = 10 * time.Second

// run starts s.Run and returns a function that stops it and waits for it
// to return.
func run(t *testing.T, s *stats.Stats, log *slog.Logger, statusEvery, exportEvery time.Duration, export stats.Exporter) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Run(ctx, log, statusEvery, exportEvery, export)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(waitFor):
				t.Errorf("Run did not return within %v of its context ending", waitFor)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// receive waits for the next value on ch.
func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitFor):
		t.Fatalf("no %s within %v", what, waitFor)
		panic("unreachable")
	}
}

func TestCounterNames(t *testing.T) {
	snap := stats.New().Snapshot()
	for _, name := range original {
		if _, ok := snap.Counters[name]; !ok {
			t.Errorf("counter %s of the original server is missing", name)
		}
	}
	if got := stats.AuthClientNotFound.String(); got != "AuthClientNotFound" {
		t.Errorf("AuthClientNotFound.String() = %q", got)
	}
	for _, c := range []stats.Counter{-1, 10000} {
		if got := c.String(); got != "Unknown" {
			t.Errorf("Counter(%d).String() = %q, want Unknown", int(c), got)
		}
	}
}

func TestIncGet(t *testing.T) {
	s := stats.New()
	s.Inc(stats.AuthClientSuccess)
	s.Inc(stats.AuthClientSuccess)
	s.Inc(stats.ControlRelayStaleMessage)
	tests := []struct {
		c    stats.Counter
		want int64
	}{
		{stats.AuthClientSuccess, 2},
		{stats.ControlRelayStaleMessage, 1},
		{stats.AuthClientFailure, 0},
	}
	for _, tt := range tests {
		if got := s.Get(tt.c); got != tt.want {
			t.Errorf("Get(%v) = %d, want %d", tt.c, got, tt.want)
		}
	}
}

func TestConnections(t *testing.T) {
	s := stats.New()
	s.Opened()
	s.Opened()
	s.Opened()
	s.Closed("client_closed")
	s.Closed("client_closed")
	s.Opened()
	s.Closed("shutting_down")
	s.MessageReceived()
	s.MessageReceived()

	snap := s.Snapshot()
	if snap.TotalConnections != 4 || snap.OpenConnections != 1 || snap.MaxSimultaneous != 3 || snap.MessagesReceived != 2 {
		t.Errorf("total, open, max, messages = %d, %d, %d, %d; want 4, 1, 3, 2",
			snap.TotalConnections, snap.OpenConnections, snap.MaxSimultaneous, snap.MessagesReceived)
	}
	if snap.Closes["client_closed"] != 2 || snap.Closes["shutting_down"] != 1 || len(snap.Closes) != 2 {
		t.Errorf("Closes = %v, want client_closed 2, shutting_down 1", snap.Closes)
	}
	// The snapshot is a copy.
	snap.Closes["client_closed"] = 100
	if got := s.Snapshot().Closes["client_closed"]; got != 2 {
		t.Errorf("changing a snapshot changed the stats: %d", got)
	}
}

func TestMaxSimultaneousConcurrent(t *testing.T) {
	s := stats.New()
	const n = 50
	var wg sync.WaitGroup
	for range n {
		wg.Go(s.Opened)
	}
	wg.Wait()
	for range n {
		wg.Go(func() { s.Closed("client_closed") })
	}
	wg.Wait()
	snap := s.Snapshot()
	if snap.MaxSimultaneous != n || snap.OpenConnections != 0 || snap.TotalConnections != n || snap.Closes["client_closed"] != n {
		t.Errorf("after %d concurrent opens and closes: %+v", n, snap)
	}
}

func TestExportResets(t *testing.T) {
	s := stats.New()
	s.Inc(stats.ListCommandSuccess)
	s.Inc(stats.ListCommandSuccess)
	s.Inc(stats.PingCommandSuccess)
	s.Opened()
	s.Closed("client_closed")

	got := s.Export()
	if got["ListCommandSuccess"] != 2 || got["PingCommandSuccess"] != 1 {
		t.Errorf("Export = %v", got)
	}
	if len(got) != len(s.Snapshot().Counters) {
		t.Errorf("Export has %d counters, Snapshot %d; want every counter", len(got), len(s.Snapshot().Counters))
	}
	if s.Get(stats.ListCommandSuccess) != 0 || s.Get(stats.PingCommandSuccess) != 0 {
		t.Error("Export did not reset the counters")
	}
	for name, v := range s.Export() {
		if v != 0 {
			t.Errorf("second Export: %s = %d, want 0", name, v)
		}
	}
	// The connection totals are not statistics counters; they stay.
	if snap := s.Snapshot(); snap.TotalConnections != 1 || snap.Closes["client_closed"] != 1 {
		t.Errorf("Export reset the totals: %+v", snap)
	}
}

func TestSnapshotJSON(t *testing.T) {
	s := stats.New()
	s.Inc(stats.CommandRelaySuccess)
	s.Opened()
	data, err := json.Marshal(s.Snapshot())
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Counters        map[string]int64 `json:"counters"`
		OpenConnections int64            `json:"openConnections"`
	}
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if back.Counters["CommandRelaySuccess"] != 1 || back.OpenConnections != 1 {
		t.Errorf("snapshot JSON %s", data)
	}
	// A snapshot does not reset anything.
	if s.Get(stats.CommandRelaySuccess) != 1 {
		t.Error("Snapshot reset a counter")
	}
}

func TestRunExports(t *testing.T) {
	s := stats.New()
	s.Inc(stats.AuthPortalSuccess)
	type export struct {
		at       time.Time
		counters map[string]int64
	}
	exports := make(chan export, 100)
	started := time.Now()
	run(t, s, slog.New(slog.DiscardHandler), 0, 10*time.Millisecond, func(_ context.Context, at time.Time, counters map[string]int64) error {
		select {
		case exports <- export{at, counters}:
		default:
		}
		return nil
	})

	first := receive(t, exports, "export")
	if first.counters["AuthPortalSuccess"] != 1 {
		t.Errorf("first export = %v, want AuthPortalSuccess 1", first.counters)
	}
	if first.at.Before(started) {
		t.Errorf("export time %v is before Run started (%v)", first.at, started)
	}
	s.Inc(stats.AuthPortalFailure)
	// Poll: the next export that sees the new count carries it once.
	for {
		e := receive(t, exports, "export")
		if e.counters["AuthPortalSuccess"] != 0 {
			t.Fatalf("a later export repeats AuthPortalSuccess: %v", e.counters)
		}
		if e.counters["AuthPortalFailure"] == 1 {
			break
		}
	}
	if s.Get(stats.AuthPortalFailure) != 0 {
		t.Error("the counter was not reset by the export")
	}
}

func TestRunExportFailureKeepsCounts(t *testing.T) {
	s := stats.New()
	for range 3 {
		s.Inc(stats.AuthClientSuccess)
	}
	logs := &testlog.Buffer{}
	calls := make(chan map[string]int64, 100)
	var mu sync.Mutex
	failures := 2
	run(t, s, slog.New(slog.NewTextHandler(logs, nil)), 0, 5*time.Millisecond, func(_ context.Context, _ time.Time, counters map[string]int64) error {
		mu.Lock()
		defer mu.Unlock()
		select {
		case calls <- counters:
		default:
		}
		if failures > 0 {
			failures--
			return errors.New("store unavailable")
		}
		return nil
	})

	for i := range 3 { // two failed exports, then one that succeeds
		if got := receive(t, calls, "export")["AuthClientSuccess"]; got != 3 {
			t.Errorf("export %d: AuthClientSuccess = %d, want the 3 kept from before", i+1, got)
		}
	}
	if got := receive(t, calls, "export")["AuthClientSuccess"]; got != 0 {
		t.Errorf("the export after the successful one: AuthClientSuccess = %d, want 0", got)
	}
	if out := logs.String(); !strings.Contains(out, "statistics export failed") || !strings.Contains(out, "store unavailable") {
		t.Errorf("the failures were not logged: %q", out)
	}
}

// TestRunExportLosesNothing counts from many goroutines while Run exports
// and resets: every count is exported or still held, none twice.
func TestRunExportLosesNothing(t *testing.T) {
	s := stats.New()
	var mu sync.Mutex
	var exported int64
	calls := 0
	stop := run(t, s, slog.New(slog.DiscardHandler), 0, time.Millisecond, func(_ context.Context, _ time.Time, counters map[string]int64) error {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls%3 == 0 {
			return errors.New("every third export fails")
		}
		exported += counters["CommandRelaySuccess"]
		return nil
	})
	const workers, each = 8, 2000
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				s.Inc(stats.CommandRelaySuccess)
			}
		})
	}
	wg.Wait()
	stop()
	mu.Lock()
	defer mu.Unlock()
	if total := exported + s.Get(stats.CommandRelaySuccess); total != workers*each {
		t.Errorf("exported %d + held %d = %d, want %d", exported, s.Get(stats.CommandRelaySuccess), total, workers*each)
	}
}

func TestRunStatusReport(t *testing.T) {
	s := stats.New()
	s.Opened()
	s.Opened()
	s.MessageReceived()
	logs := &testlog.Buffer{}
	run(t, s, slog.New(slog.NewJSONHandler(logs, nil)), 5*time.Millisecond, 0, nil)

	deadline := time.Now().Add(waitFor)
	for !strings.Contains(logs.String(), `"msg":"status"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no status report within %v: %q", waitFor, logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	line := ""
	for l := range strings.SplitSeq(logs.String(), "\n") {
		if strings.Contains(l, `"msg":"status"`) {
			line = l
			break
		}
	}
	var rec map[string]any
	if err := json.Unmarshal([]byte(line), &rec); err != nil {
		t.Fatalf("status line %q: %v", line, err)
	}
	for k, want := range map[string]float64{"open_connections": 2, "total_connections": 2, "max_simultaneous": 2, "messages_received": 1} {
		if rec[k] != want {
			t.Errorf("status %s = %v, want %v", k, rec[k], want)
		}
	}
	if _, ok := rec["uptime"]; !ok {
		t.Error("status report without uptime")
	}
	if strings.Contains(logs.String(), `"msg":"statistics"`) {
		t.Error("an export ran although its interval is 0")
	}
}

func TestRunDefaultExporterLogs(t *testing.T) {
	s := stats.New()
	s.Inc(stats.RateLimitExceeded)
	logs := &testlog.Buffer{}
	run(t, s, slog.New(slog.NewTextHandler(logs, nil)), 0, 5*time.Millisecond, nil)

	deadline := time.Now().Add(waitFor)
	for !strings.Contains(logs.String(), "msg=statistics") {
		if time.Now().After(deadline) {
			t.Fatalf("no statistics line within %v: %q", waitFor, logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	first := strings.SplitN(logs.String(), "\n", 2)[0]
	if !strings.Contains(first, "RateLimitExceeded=1") {
		t.Errorf("first statistics line %q lacks RateLimitExceeded=1", first)
	}
	if strings.Contains(first, "=0") {
		t.Errorf("statistics line %q lists zero counters", first)
	}
	if s.Get(stats.RateLimitExceeded) != 0 {
		t.Error("the logged export did not reset the counter")
	}
}

// finalCall is what an exporter saw of one call.
type finalCall struct {
	counters    map[string]int64
	ctxErr      error // the context's error during the call
	hasDeadline bool
	deadline    time.Time
}

func TestRunFinalExport(t *testing.T) {
	s := stats.New()
	s.Inc(stats.AuthClientSuccess)
	s.Inc(stats.AuthClientSuccess)
	calls := make(chan finalCall, 10)
	// The interval is far longer than the test: only the final export runs.
	stop := run(t, s, slog.New(slog.DiscardHandler), 0, time.Hour, func(ctx context.Context, _ time.Time, counters map[string]int64) error {
		d, ok := ctx.Deadline()
		calls <- finalCall{counters, ctx.Err(), ok, d}
		return nil
	})
	s.Inc(stats.CommandRelaySuccess)
	stopped := time.Now()
	stop()

	c := receive(t, calls, "final export")
	if c.counters["AuthClientSuccess"] != 2 || c.counters["CommandRelaySuccess"] != 1 {
		t.Errorf("final export = %v, want AuthClientSuccess 2, CommandRelaySuccess 1", c.counters)
	}
	if c.ctxErr != nil {
		t.Errorf("the final export's context had ended: %v", c.ctxErr)
	}
	if !c.hasDeadline || c.deadline.After(stopped.Add(time.Minute)) {
		t.Errorf("the final export's context has deadline %v (set: %v), want one within a minute", c.deadline, c.hasDeadline)
	}
	if s.Get(stats.AuthClientSuccess) != 0 {
		t.Error("the final export did not reset the counters")
	}
	select {
	case c := <-calls:
		t.Errorf("a second export after the end: %v", c.counters)
	default:
	}
}

func TestRunFinalExportFailureLogsCounts(t *testing.T) {
	s := stats.New()
	s.Inc(stats.ListFailure)
	logs := &testlog.Buffer{}
	stop := run(t, s, slog.New(slog.NewTextHandler(logs, nil)), 0, time.Hour, func(context.Context, time.Time, map[string]int64) error {
		return errors.New("store unavailable")
	})
	stop()
	out := logs.String()
	for _, want := range []string{"final statistics export failed", "store unavailable", "ListFailure=1"} {
		if !strings.Contains(out, want) {
			t.Errorf("log does not contain %q: %q", want, out)
		}
	}
}

func TestRunNoFinalExportWhenExportsAreOff(t *testing.T) {
	s := stats.New()
	s.Inc(stats.ListFailure)
	logs := &testlog.Buffer{}
	stop := run(t, s, slog.New(slog.NewTextHandler(logs, nil)), time.Hour, 0, nil)
	stop()
	if out := logs.String(); strings.Contains(out, "statistics") {
		t.Errorf("an export ran although its interval is 0: %q", out)
	}
	if s.Get(stats.ListFailure) != 1 {
		t.Error("the counters were reset although exports are off")
	}
}
