package testlog_test

import (
	"strings"
	"sync"
	"testing"

	"github.com/machineservice/machineservice/internal/testlog"
)

// recorder stands in for a test to see what New writes and to end the
// test on demand.
type recorder struct {
	testing.TB
	lines    []string
	cleanups []func()
}

func (r *recorder) Helper() {}

func (r *recorder) Log(args ...any) {
	for _, a := range args {
		r.lines = append(r.lines, a.(string))
	}
}

func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }

func (r *recorder) end() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}

func TestNew(t *testing.T) {
	r := &recorder{TB: t}
	log := testlog.New(r)
	log.Debug("first", "k", "v")
	if len(r.lines) != 1 {
		t.Fatalf("got %d lines, want 1: %q", len(r.lines), r.lines)
	}
	if l := r.lines[0]; !strings.Contains(l, "level=DEBUG") || !strings.Contains(l, "msg=first k=v") || strings.HasSuffix(l, "\n") {
		t.Errorf("line = %q, want a debug record without a trailing newline", l)
	}
	r.end()
	log.Info("after the end")
	if len(r.lines) != 1 {
		t.Errorf("logged after the test ended: %q", r.lines[1:])
	}
}

// TestBuffer: writes from several goroutines all arrive, read while
// they are written (the race detector watches the sharing).
func TestBuffer(t *testing.T) {
	var b testlog.Buffer
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 100 {
				_, _ = b.Write([]byte("x"))
				_ = b.String()
			}
		})
	}
	wg.Wait()
	if got := b.String(); got != strings.Repeat("x", 400) {
		t.Fatalf("got %d bytes, want 400", len(got))
	}
}
