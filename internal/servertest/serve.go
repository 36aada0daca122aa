package servertest

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/server"
)

// Serve runs srv, built by the test, on a free loopback port until the
// test ends and returns its base URL. name tells a test's servers apart
// in its failures; it may be empty.
func Serve(t testing.TB, name string, srv *server.Server) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ServeOn(t, name, srv, l)
	return "http://" + l.Addr().String()
}

// ServeOn is Serve on a listener of the test's, for a server whose
// configuration names its own address. When the test ends it shuts srv
// down and fails the test if the shutdown or Serve went wrong.
func ServeOn(t testing.TB, name string, srv *server.Server, l net.Listener) {
	t.Helper()
	if name != "" {
		name += ": "
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("%sshutdown: %v", name, err)
		}
		if err := <-done; !errors.Is(err, server.ErrServerClosed) {
			t.Errorf("%sserve returned %v", name, err)
		}
	})
}
