package servertest

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/machineservice/machineservice/internal/controller"
)

// Controller is the static controller of Tokens that a test can take
// down or turn against every agent token while a server uses it.
type Controller struct {
	controller.Controller
	// Down fails every validation as a controller that cannot be reached.
	Down atomic.Bool
	// Reject refuses every agent token.
	Reject atomic.Bool
}

// NewController returns a Controller that is up and accepts Tokens.
func NewController(t testing.TB) *Controller {
	t.Helper()
	st, err := controller.NewStatic(Tokens(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return &Controller{Controller: st}
}

// ValidateAgent validates as the static controller does unless Down or
// Reject is set.
func (c *Controller) ValidateAgent(ctx context.Context, token string) (controller.Agent, error) {
	switch {
	case c.Down.Load():
		return controller.Agent{}, fmt.Errorf("%w: the test controller is down", controller.ErrUnavailable)
	case c.Reject.Load():
		return controller.Agent{}, fmt.Errorf("%w: the test controller refuses every token", controller.ErrRejected)
	}
	return c.Controller.ValidateAgent(ctx, token)
}

// ValidatePortal validates as the static controller does unless Down is
// set.
func (c *Controller) ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (controller.Portal, error) {
	if c.Down.Load() {
		return controller.Portal{}, fmt.Errorf("%w: the test controller is down", controller.ErrUnavailable)
	}
	return c.Controller.ValidatePortal(ctx, token, includeSubOrgs)
}

// StartWithController runs a server as Start does, on ctrl instead of
// the static controller.
func StartWithController(t testing.TB, ctrl controller.Controller, opts ...Option) *Server {
	t.Helper()
	return startOn(t, "127.0.0.1:0", ctrl, opts)
}
