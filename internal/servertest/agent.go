package servertest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/agent"
)

var (
	agentKeyOnce sync.Once
	agentKey     *rsa.PrivateKey
	agentKeyErr  error
)

// AgentKey is a key for test agents, generated once per test binary so
// that tests do not pay for a key each.
func AgentKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	agentKeyOnce.Do(func() { agentKey, agentKeyErr = rsa.GenerateKey(rand.Reader, 2048) })
	if agentKeyErr != nil {
		t.Fatalf("generate agent key: %v", agentKeyErr)
	}
	return agentKey
}

// Agent is a running agent and the events it reported.
type Agent struct {
	*agent.Agent

	stop func()

	mu     sync.Mutex
	events []agent.Event
}

// Stop stops the agent and waits for Run to return; later calls do
// nothing.
func (a *Agent) Stop() { a.stop() }

// Events returns the events so far.
func (a *Agent) Events() []agent.Event {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]agent.Event(nil), a.events...)
}

// Count counts the events in state st.
func (a *Agent) Count(st agent.State) int {
	n := 0
	for _, e := range a.Events() {
		if e.State == st {
			n++
		}
	}
	return n
}

// FastAgent returns cfg with the test key and short intervals, for
// settings the test has not set itself.
func FastAgent(t testing.TB, cfg agent.Config) agent.Config {
	t.Helper()
	if cfg.Key == nil {
		cfg.Key = AgentKey(t)
	}
	if cfg.InitialBackoff == 0 {
		cfg.InitialBackoff = 50 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 200 * time.Millisecond
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	return cfg
}

// StartAgent runs an agent until the test ends, then stops it and checks
// that Run returned as it should.
func StartAgent(t testing.TB, cfg agent.Config) *Agent {
	t.Helper()
	ta := &Agent{}
	user := cfg.OnState
	cfg.OnState = func(e agent.Event) {
		ta.mu.Lock()
		ta.events = append(ta.events, e)
		ta.mu.Unlock()
		t.Logf("agent: %s err=%v retry_in=%s", e.State, e.Err, e.RetryIn)
		if user != nil {
			user(e)
		}
	}
	a, err := agent.New(FastAgent(t, cfg))
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	ta.Agent = a
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	ta.stop = sync.OnceFunc(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("agent Run returned %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("agent Run did not return after cancel")
		}
	})
	t.Cleanup(ta.stop)
	return ta
}
