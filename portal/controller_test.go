package portal_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/portal"
)

// TestAuthUnavailable: a server whose controller is down closes the
// portal's authentication with 1013, which is not a refused token.
func TestAuthUnavailable(t *testing.T) {
	ctrl := servertest.NewController(t)
	ctrl.Down.Store(true)
	base := servertest.StartWithController(t, ctrl).Base
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, err := portal.Dial(ctx, portal.Config{Server: base, Token: servertest.PortalToken})
	if !errors.Is(err, portal.ErrAuthUnavailable) || errors.Is(err, portal.ErrAuthRejected) {
		t.Fatalf("controller down: got %v, want ErrAuthUnavailable", err)
	}

	ctrl.Down.Store(false)
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
