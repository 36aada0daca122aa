package protect_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/protect"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testclock"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// env is a real server behind a Guard, on a random loopback port.
type env struct {
	t     *testing.T
	srv   *server.Server
	guard *protect.Guard
	stats *stats.Stats
	clock *testclock.Clock // the rate limiter's clock
	port  string
}

func mustConfig(t *testing.T, vars map[string]string) *config.Config {
	t.Helper()
	cfg, err := config.Load([]string{"--dev"}, func(k string) string { return vars[k] })
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// start runs a guarded server configured by the environment variables in
// vars, as the command reads them.
func start(t *testing.T, vars map[string]string) *env {
	t.Helper()
	cfg := mustConfig(t, vars)
	cfg.InstanceID = "test-instance"
	cfg.ShutdownTimeout = 5 * time.Second
	e := &env{t: t, stats: stats.New(), clock: testclock.New(time.Now())}
	log := testlog.New(t) // its cleanup runs after the server's shutdown below
	ctx, cancel := context.WithCancel(context.Background())
	var err error
	e.guard, err = protect.New(ctx, cfg, protect.Deps{Logger: log, Stats: e.stats, Now: e.clock.Now})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	st, err := controller.NewStatic(controller.TokensFile{
		Portals: []controller.PortalToken{{Token: "portal-token", OrganizationID: "org"}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.srv, err = server.New(cfg, server.Deps{
		Key:         testclient.Key(t, 0),
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(time.Hour),
		Controller:  st,
		Stats:       e.stats,
		Logger:      log,
		Middleware:  e.guard.Wrap,
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, e.port, _ = net.SplitHostPort(l.Addr().String())
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(l) }()
	reloads := make(chan struct{})
	go func() { defer close(reloads); e.guard.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-reloads
		sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer scancel()
		if err := e.srv.Shutdown(sctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; err != server.ErrServerClosed {
			t.Errorf("serve returned %v", err)
		}
	})
	return e
}

func dialerFrom(ip string) *net.Dialer {
	return &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
}

// get requests path from the local address ip and returns the status
// and body.
func (e *env) get(ip, path string, h http.Header) (int, string, http.Header) {
	e.t.Helper()
	return e.do(ip, http.MethodGet, path, h)
}

func (e *env) do(ip, method, path string, h http.Header) (int, string, http.Header) {
	e.t.Helper()
	tr := &http.Transport{DialContext: dialerFrom(ip).DialContext, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://127.0.0.1:"+e.port+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		e.t.Fatalf("%s %s from %s: %v", method, path, ip, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body)), resp.Header
}

// dial opens a WebSocket from the local address ip. On success it reads
// the welcome and closes the connection when the test ends; on a refused
// upgrade it returns the status and body.
func (e *env) dial(ip, path string, h http.Header) (*websocket.Conn, int, string) {
	e.t.Helper()
	d := websocket.Dialer{NetDialContext: dialerFrom(ip).DialContext, HandshakeTimeout: 10 * time.Second}
	ws, resp, err := d.Dial("ws://127.0.0.1:"+e.port+path, h)
	if err != nil {
		if resp == nil {
			e.t.Fatalf("dial %s from %s: %v", path, ip, err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		return nil, resp.StatusCode, strings.TrimSpace(string(body))
	}
	e.t.Cleanup(func() { _ = ws.Close() })
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, data, err := ws.ReadMessage()
	if err != nil {
		e.t.Fatalf("read welcome: %v", err)
	}
	if env, err := wire.DecodeEnvelope(data); err != nil || env.Type != wire.TypeWelcome {
		e.t.Fatalf("first message %q: %v", data, err)
	}
	return ws, http.StatusSwitchingProtocols, ""
}

// remoteIPs returns the remote address the server recorded for each open
// connection.
func (e *env) remoteIPs() []string {
	var out []string
	for _, c := range e.srv.Connections() {
		out = append(out, c.RemoteIP)
	}
	return out
}

// waitFor polls cond until it holds or 10 seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, what, 10*time.Second, cond)
}
