package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/term"
)

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd())) //nolint:gosec // a file descriptor fits in an int
}

// statusLine is stderr with a transient status line under the log lines
// ("connecting", "retrying in 5 s"), shown only on a terminal. Log lines
// written through it clear the status first and show it again after.
type statusLine struct {
	mu    sync.Mutex
	w     io.Writer
	tty   bool
	text  string
	shown bool

	// the countdown under way, if any
	stopTick chan struct{}
}

func newStatusLine(w io.Writer) *statusLine {
	return &statusLine{w: w, tty: isTerminal(w)}
}

func (s *statusLine) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clearLocked()
	n, err := s.w.Write(p)
	s.showLocked()
	return n, err
}

func (s *statusLine) clearLocked() {
	if s.shown {
		_, _ = io.WriteString(s.w, "\r\x1b[K") // a terminal write; nothing to do if it fails
		s.shown = false
	}
}

func (s *statusLine) showLocked() {
	if s.tty && s.text != "" {
		_, _ = io.WriteString(s.w, "\r"+s.text) // see clearLocked
		s.shown = true
	}
}

// Set replaces the status line; "" removes it. It ends a countdown.
func (s *statusLine) Set(text string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopCountdownLocked()
	s.setLocked(text)
}

func (s *statusLine) setLocked(text string) {
	if !s.tty {
		return
	}
	s.clearLocked()
	s.text = text
	s.showLocked()
}

// Countdown shows format with the seconds left until d has passed,
// updated every second, until the next Set or Countdown.
func (s *statusLine) Countdown(format string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopCountdownLocked()
	if !s.tty {
		return
	}
	end := time.Now().Add(d)
	show := func() {
		left := max(0, time.Until(end).Round(time.Second))
		s.setLocked(fmt.Sprintf(format, int(left/time.Second)))
	}
	show()
	stop := make(chan struct{})
	s.stopTick = stop
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				s.mu.Lock()
				select {
				case <-stop:
				default:
					show()
				}
				s.mu.Unlock()
			}
		}
	}()
}

func (s *statusLine) stopCountdownLocked() {
	if s.stopTick != nil {
		close(s.stopTick)
		s.stopTick = nil
	}
}

// Elapsed shows format with the seconds since now, updated every second,
// after a first second of quiet so that quick answers show nothing. It
// returns the function that ends it.
func (s *statusLine) Elapsed(format string) func() {
	if !s.tty {
		return func() {}
	}
	start := time.Now()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				s.mu.Lock()
				s.setLocked(fmt.Sprintf(format, int(time.Since(start).Round(time.Second)/time.Second)))
				s.mu.Unlock()
			}
		}
	}()
	return func() {
		close(stop)
		<-done
		s.Set("")
	}
}
