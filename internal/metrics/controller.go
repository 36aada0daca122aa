package metrics

import (
	"context"
	"time"

	"github.com/machineservice/machineservice/internal/controller"
)

// TimeController returns ctrl with its requests timed into the bus request
// histogram. With a nil m it returns ctrl itself.
func TimeController(ctrl controller.Controller, m *Metrics) controller.Controller {
	if m == nil {
		return ctrl
	}
	return timedController{ctrl: ctrl, m: m}
}

type timedController struct {
	ctrl controller.Controller
	m    *Metrics
}

var _ controller.Controller = timedController{}

func (t timedController) ValidateAgent(ctx context.Context, token string) (controller.Agent, error) {
	start := time.Now()
	defer func() { t.m.ObserveBus(RequestValidateAgent, time.Since(start)) }()
	return t.ctrl.ValidateAgent(ctx, token)
}

func (t timedController) ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (controller.Portal, error) {
	start := time.Now()
	defer func() { t.m.ObserveBus(RequestValidatePortal, time.Since(start)) }()
	return t.ctrl.ValidatePortal(ctx, token, includeSubOrgs)
}

// Ready passes the wrapped controller's readiness through, so wrapping it
// does not hide it from the readiness check.
func (t timedController) Ready(ctx context.Context) error {
	if c, ok := t.ctrl.(Checker); ok {
		return c.Ready(ctx)
	}
	return nil
}
