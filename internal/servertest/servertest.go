// Package servertest runs the real relay server in-process on a loopback
// port for the tests of the client libraries and the command line, with
// the built-in static controller and an in-memory registry.
package servertest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

// Tokens and organizations every test server knows.
//
//nolint:gosec // test tokens, not credentials
const (
	Org      = "11111111-1111-1111-1111-111111111111"
	OtherOrg = "22222222-2222-2222-2222-222222222222"

	AgentToken       = "agent-token-1" // registered agent "agent-1"
	AgentToken2      = "agent-token-2" // registered agent "agent-2"
	RenewingToken    = "agent-token-renewing"
	RenewedToken     = "agent-token-renewed" // what RenewingToken is renewed to; agent "agent-renewed"
	PortalToken      = "portal-token"
	OtherPortalToken = "portal-token-other-org"
)

// Tokens is the static controller's tokens file.
func Tokens() controller.TokensFile {
	far := time.Now().Add(24 * time.Hour)
	return controller.TokensFile{
		Agents: []controller.AgentToken{
			{Token: AgentToken, OrganizationID: Org, RegisteredAgentID: "agent-1", Expires: far},
			{Token: AgentToken2, OrganizationID: Org, RegisteredAgentID: "agent-2", Expires: far},
			{Token: RenewingToken, OrganizationID: Org, RegisteredAgentID: "agent-renewing", Expires: far, NewToken: RenewedToken},
			{Token: RenewedToken, OrganizationID: Org, RegisteredAgentID: "agent-renewed", Expires: far},
		},
		Portals: []controller.PortalToken{
			{Token: PortalToken, OrganizationID: Org, Expires: far},
			{Token: OtherPortalToken, OrganizationID: OtherOrg, Expires: far},
		},
	}
}

var (
	keyOnce sync.Once
	key     *rsa.PrivateKey
	keyErr  error
)

func serverKey() (*rsa.PrivateKey, error) {
	keyOnce.Do(func() { key, keyErr = rsa.GenerateKey(rand.Reader, 2048) })
	return key, keyErr
}

// Key is the server key of every test server, generated once per test
// binary.
func Key(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	k, err := serverKey()
	if err != nil {
		t.Fatalf("generate server key: %v", err)
	}
	return k
}

// Server is one running test server.
type Server struct {
	Srv  *server.Server
	Addr string // host:port
	Base string // http://host:port

	stopOnce sync.Once
	stopErr  error
	done     chan error
}

// Option adjusts the server's configuration before it starts.
type Option func(*config.Config)

// Start runs a server on a random loopback port until the test ends.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	return StartAt(t, "127.0.0.1:0", opts...)
}

// StartAt runs a server on addr (for a restart on the same address)
// until the test ends.
func StartAt(t testing.TB, addr string, opts ...Option) *Server {
	t.Helper()
	return startOn(t, addr, nil, opts)
}

// startOn runs a server on addr and ctrl (nil: the static controller)
// until the test ends.
func startOn(t testing.TB, addr string, ctrl controller.Controller, opts []Option) *Server {
	t.Helper()
	s, err := launch(addr, testlog.New(t), ctrl, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	return s
}

// Launch runs a server on addr until Stop, logging to log (nil: nowhere).
// Tests use Start; Launch serves examples, which have no testing.T.
func Launch(addr string, log *slog.Logger, opts ...Option) (*Server, error) {
	return launch(addr, log, nil, opts)
}

func launch(addr string, log *slog.Logger, ctrl controller.Controller, opts []Option) (*Server, error) {
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		return nil, err
	}
	cfg.InstanceID = "test-instance"
	cfg.MachineName = "test-machine"
	cfg.ShutdownTimeout = 5 * time.Second
	for _, o := range opts {
		o(cfg)
	}
	if ctrl == nil {
		st, err := controller.NewStatic(Tokens(), nil)
		if err != nil {
			return nil, err
		}
		ctrl = st
	}
	k, err := serverKey()
	if err != nil {
		return nil, err
	}
	srv, err := server.New(cfg, server.Deps{
		Key:         k,
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(90 * 24 * time.Hour),
		Controller:  ctrl,
		Registry:    registry.NewMemory(0, nil),
		Logger:      log,
		Version:     "test",
	})
	if err != nil {
		return nil, err
	}
	var l net.Listener
	// The port of a server that just stopped may take a moment to free.
	for deadline := time.Now().Add(5 * time.Second); ; {
		l, err = net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	s := &Server{Srv: srv, Addr: l.Addr().String(), done: make(chan error, 1)}
	s.Base = "http://" + s.Addr
	go func() { s.done <- srv.Serve(l) }()
	return s, nil
}

// KeyHash is the hash the server's welcome carries.
func (s *Server) KeyHash() string {
	k, _ := serverKey() // the server runs, so the key exists
	return wire.PublicKeyHash(&k.PublicKey)
}

// Stop shuts the server down; later calls only return the first result.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := s.Srv.Shutdown(ctx)
		if serr := <-s.done; !errors.Is(serr, server.ErrServerClosed) && err == nil {
			err = fmt.Errorf("serve returned %v", serr)
		}
		if err != nil {
			s.stopErr = fmt.Errorf("shutdown: %w", err)
		}
	})
	return s.stopErr
}

// WaitFor polls cond until it holds or 10 seconds pass.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, what, 10*time.Second, cond)
}
