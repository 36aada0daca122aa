package portal_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/portal"
)

// downController is the test tokens' static controller, except that
// while down is set it fails as a controller that cannot be reached.
type downController struct {
	controller.Controller
	down atomic.Bool
}

func (d *downController) ValidateAgent(ctx context.Context, token string) (controller.Agent, error) {
	if d.down.Load() {
		return controller.Agent{}, fmt.Errorf("%w: the test controller is down", controller.ErrUnavailable)
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

// TestAuthUnavailable: a server whose controller is down closes the
// portal's authentication with 1013, which is not a refused token.
func TestAuthUnavailable(t *testing.T) {
	ctrl := &downController{Controller: staticController(t)}
	ctrl.down.Store(true)
	base := startWithController(t, ctrl)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, err := portal.Dial(ctx, portal.Config{Server: base, Token: servertest.PortalToken})
	if !errors.Is(err, portal.ErrAuthUnavailable) || errors.Is(err, portal.ErrAuthRejected) {
		t.Fatalf("controller down: got %v, want ErrAuthUnavailable", err)
	}

	ctrl.down.Store(false)
	pc, err := portal.Dial(ctx, portal.Config{Server: base, Token: servertest.PortalToken})
	if err != nil {
		t.Fatalf("controller back: %v", err)
	}
	_ = pc.Close()
	_, err = portal.Dial(ctx, portal.Config{Server: base, Token: "wrong"})
	if !errors.Is(err, portal.ErrAuthRejected) || errors.Is(err, portal.ErrAuthUnavailable) {
		t.Fatalf("wrong token: got %v, want ErrAuthRejected", err)
	}
}
