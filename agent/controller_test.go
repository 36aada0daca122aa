package agent_test

import (
	"errors"
	"testing"
	"time"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/servertest"
)

// TestAuthUnavailableIsRetried: while the server's controller is down the
// agent is told so (1013), not that its token is bad, and retries with its
// usual backoff until the controller is back.
func TestAuthUnavailableIsRetried(t *testing.T) {
	ctrl := servertest.NewController(t)
	ctrl.Down.Store(true)
	base := servertest.StartWithController(t, ctrl).Base
	a := servertest.StartAgent(t, agent.Config{
		Server:         base,
		Token:          servertest.AgentToken,
		InitialBackoff: 50 * time.Millisecond,
		MaxBackoff:     5 * time.Second,
	})
	servertest.WaitFor(t, "two attempts while the controller is down", func() bool { return endedWith(a, agent.ErrAuthUnavailable, 2) })
	for _, e := range a.Events() {
		if e.State == agent.Disconnected && !errors.Is(e.Err, agent.ErrAuthUnavailable) {
			t.Fatalf("attempt %d ended with %v, want ErrAuthUnavailable", e.Attempt, e.Err)
		}
		if e.State == agent.Disconnected && e.Attempt == 1 && e.RetryIn > 50*time.Millisecond {
			t.Fatalf("first retry in %s, want the initial backoff", e.RetryIn)
		}
	}
	ctrl.Down.Store(false)
	servertest.WaitFor(t, "connected once the controller is back", func() bool { return a.Count(agent.Connected) == 1 })
}

// endedWith says whether at least n attempts ended with an error wrapping
// target.
func endedWith(a *servertest.Agent, target error, n int) bool {
	for _, e := range a.Events() {
		if e.State == agent.Disconnected && errors.Is(e.Err, target) {
			n--
		}
	}
	return n <= 0
}

// TestAuthRejectedBacksOffAtCap: a refused token is reported as Rejected
// and retried, but with the backoff at its cap from the first refusal on;
// once the token is accepted again the agent connects.
func TestAuthRejectedBacksOffAtCap(t *testing.T) {
	const initial, maxBackoff = 10 * time.Millisecond, 400 * time.Millisecond
	ctrl := servertest.NewController(t)
	ctrl.Reject.Store(true)
	base := servertest.StartWithController(t, ctrl).Base
	a := servertest.StartAgent(t, agent.Config{
		Server:         base,
		Token:          servertest.AgentToken,
		InitialBackoff: initial,
		MaxBackoff:     maxBackoff,
	})
	rejected := func() []agent.Event {
		var out []agent.Event
		for _, e := range a.Events() {
			if e.State == agent.Rejected {
				out = append(out, e)
			}
		}
		return out
	}
	servertest.WaitFor(t, "two refusals", func() bool { return len(rejected()) >= 2 })
	for i, e := range rejected() {
		if !errors.Is(e.Err, agent.ErrAuthRejected) {
			t.Fatalf("refusal %d: Err %v, want ErrAuthRejected", i+1, e.Err)
		}
		if e.Attempt != i+1 || e.RetryIn < maxBackoff/2 || e.RetryIn > maxBackoff {
			t.Fatalf("refusal %d: attempt %d, retry in %s; want attempt %d and the capped backoff (%s to %s)",
				i+1, e.Attempt, e.RetryIn, i+1, maxBackoff/2, maxBackoff)
		}
	}
	if n := a.Count(agent.Disconnected); n != 0 {
		t.Fatalf("%d Disconnected events for refusals, want them reported as Rejected", n)
	}

	ctrl.Reject.Store(false) // the token is good again
	servertest.WaitFor(t, "connected once the token is accepted", func() bool { return a.Count(agent.Connected) == 1 })
}
