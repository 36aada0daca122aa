// Package testlog gives tests a logger that writes through t.Log, so a
// failing test shows what the code under test logged beside its own
// messages (run with -v to see it for passing tests too), and a buffer
// for output that the test reads while it is being written.
package testlog

import (
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// New returns a debug-level text logger that writes each record through
// t.Log until the test ends. Records arriving later, from goroutines that
// outlive the test, are dropped: t.Log after the end of a test panics.
func New(t testing.TB) *slog.Logger {
	w := &writer{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type writer struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *writer) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}
