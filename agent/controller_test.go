package agent_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/testlog"
)

// downController is the test tokens' static controller, except that
// while down is set it fails as a controller that cannot be reached, and
// while reject is set it refuses every agent token.
type downController struct {
	controller.Controller
	down   atomic.Bool
	reject atomic.Bool
}

func (d *downController) ValidateAgent(ctx context.Context, token string) (controller.Agent, error) {
	switch {
	case d.down.Load():
		return controller.Agent{}, fmt.Errorf("%w: the test controller is down", controller.ErrUnavailable)
	case d.reject.Load():
		return controller.Agent{}, fmt.Errorf("%w: the test controller refuses every token", controller.ErrRejected)
	}
	return d.Controller.ValidateAgent(ctx, token)
}

func (d *downController) ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (controller.Portal, error) {
	if d.down.Load() {
		return controller.Portal{}, fmt.Errorf("%w: the test controller is down", controller.ErrUnavailable)
	}
	return d.Controller.ValidatePortal(ctx, token, includeSubOrgs)
}

// startWithController runs the real server, as servertest.Start does, on
// a controller of the test's, and returns its base URL.
func startWithController(t *testing.T, ctrl controller.Controller) string {
	t.Helper()
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = "test-instance"
	cfg.MachineName = "test-machine"
	cfg.ShutdownTimeout = 5 * time.Second
	srv, err := server.New(cfg, server.Deps{
		Key:         servertest.Key(t),
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(24 * time.Hour),
		Controller:  ctrl,
		Registry:    registry.NewMemory(0, nil),
		Logger:      testlog.New(t),
		Version:     "test",
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, server.ErrServerClosed) {
			t.Errorf("serve returned %v", err)
		}
	})
	return "http://" + l.Addr().String()
}

func staticController(t *testing.T) controller.Controller {
	t.Helper()
	st, err := controller.NewStatic(servertest.Tokens(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestAuthUnavailableIsRetried: while the server's controller is down the
// agent is told so (1013), not that its token is bad, and retries with its
// usual backoff until the controller is back.
func TestAuthUnavailableIsRetried(t *testing.T) {
	ctrl := &downController{Controller: staticController(t)}
	ctrl.down.Store(true)
	base := startWithController(t, ctrl)
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
	ctrl.down.Store(false)
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
	ctrl := &downController{Controller: staticController(t)}
	ctrl.reject.Store(true)
	base := startWithController(t, ctrl)
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

	ctrl.reject.Store(false) // the token is good again
	servertest.WaitFor(t, "connected once the token is accepted", func() bool { return a.Count(agent.Connected) == 1 })
}
