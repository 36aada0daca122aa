package testwait_test

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/testwait"
)

// recorder stands in for a test to see how For fails it.
type recorder struct {
	testing.TB
	failure string
}

func (r *recorder) Helper() {}

// Fatalf ends the calling goroutine as the real one does, so For stops.
func (r *recorder) Fatalf(format string, args ...any) {
	r.failure = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestForHolds(t *testing.T) {
	var n atomic.Int32
	go func() {
		for range 3 {
			time.Sleep(5 * time.Millisecond)
			n.Add(1)
		}
	}()
	testwait.For(t, "three steps", 10*time.Second, func() bool { return n.Load() == 3 })
}

func TestForTimesOut(t *testing.T) {
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		testwait.For(r, "nothing", 30*time.Millisecond, func() bool { return false })
	}()
	<-done
	if want := "timed out after 30ms waiting for nothing"; r.failure != want {
		t.Errorf("failure = %q, want %q", r.failure, want)
	}
}
