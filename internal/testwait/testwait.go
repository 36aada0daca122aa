// Package testwait polls a condition in a test until it holds, so tests
// wait for what happens on other goroutines and connections instead of
// sleeping for a guessed time.
package testwait

import (
	"testing"
	"time"
)

// interval is how long For sleeps between looks at the condition.
const interval = 10 * time.Millisecond

// For polls cond until it holds, and fails the test naming what it waited
// for if timeout passes first.
func For(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(interval)
	}
}
