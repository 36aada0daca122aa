package ctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/ctl"
	"github.com/machineservice/machineservice/internal/logging"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	org         = "11111111-1111-1111-1111-111111111111"
	agentToken  = "agent-token"
	agent2Token = "agent-token-2"
	portalToken = "portal-token"
)

// logBuffer keeps the server's JSON log records.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// records returns the records with message msg.
func (b *logBuffer) records(msg string) []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(b.buf.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// env is a real server, its control socket, and the logger behind both.
type env struct {
	t      *testing.T
	srv    *server.Server
	base   string
	socket string
	log    *logging.Control
	logs   *logBuffer
	stats  *stats.Stats
}

func start(t *testing.T) *env {
	t.Helper()
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = "test-instance"
	e := &env{t: t, logs: &logBuffer{}, log: logging.NewControl(slog.LevelWarn), stats: stats.New()}
	logger := logging.New(e.logs, true, e.log)
	tokens, err := controller.NewStatic(controller.TokensFile{
		Agents: []controller.AgentToken{
			{Token: agentToken, OrganizationID: org, RegisteredAgentID: "reg-1"},
			{Token: agent2Token, OrganizationID: org, RegisteredAgentID: "reg-2"},
		},
		Portals: []controller.PortalToken{{Token: portalToken, OrganizationID: org}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.srv, err = server.New(cfg, server.Deps{
		Key:         testclient.Key(t, 0),
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(time.Hour),
		Controller:  tokens,
		Stats:       e.stats,
		Logger:      logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.base = "http://" + l.Addr().String()
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(l) }()

	e.socket = filepath.Join(t.TempDir(), "run", "control.sock")
	cs, err := ctl.Listen(e.socket, ctl.Deps{
		Logging: e.log,
		Server:  e.srv,
		Stats:   e.stats,
		Extra:   func() map[string]int64 { return map[string]int64{"rejected.scanner": 7} },
		Logger:  logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctlDone := make(chan error, 1)
	go func() { ctlDone <- cs.Serve() }()
	t.Cleanup(func() {
		if err := cs.Close(); err != nil {
			t.Errorf("close control socket: %v", err)
		}
		if err := <-ctlDone; err != nil {
			t.Errorf("control socket serve: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := e.srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		<-served
	})
	return e
}

// ctl runs `machineservice ctl` against the server and returns the exit
// status, stdout and stderr.
func (e *env) ctl(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := ctl.Run(context.Background(), e.socket, args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func (e *env) agent(n int, token string) *testclient.Conn {
	e.t.Helper()
	a := testclient.DialAgent(e.t, e.base, &testclient.Key(e.t, 0).PublicKey, n)
	if !a.AuthAgent(token).Accepted {
		e.t.Fatalf("agent %q refused", token)
	}
	return a
}

func TestSocket(t *testing.T) {
	e := start(t)
	fi, err := os.Stat(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	if _, err := ctl.Listen(e.socket, ctl.Deps{}); !errors.Is(err, ctl.ErrSocketInUse) {
		t.Fatalf("second Listen: %v, want ErrSocketInUse", err)
	}

	dir := t.TempDir()
	plain := filepath.Join(dir, "file")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ctl.Listen(plain, ctl.Deps{}); err == nil {
		t.Fatal("Listen replaced a regular file")
	}

	// A socket left behind by a server that died is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	_ = l.Close()
	cs, err := ctl.Listen(stale, ctl.Deps{})
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cs.Serve() }()
	var out, errOut bytes.Buffer
	if code := ctl.Run(context.Background(), stale, []string{"stats"}, &out, &errOut); code != 0 {
		t.Fatalf("stats over the new socket: %d %s", code, errOut.String())
	}
	if err := cs.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

func TestLogLevel(t *testing.T) {
	e := start(t)
	tests := []struct {
		args []string
		code int
		want slog.Level
		out  string
	}{
		{[]string{"loglevel", "debug"}, 0, slog.LevelDebug, "log level debug (was warn)\n"},
		{[]string{"loglevel", "Information"}, 0, slog.LevelInfo, "log level info (was debug)\n"},
		{[]string{"loglevel", "error"}, 0, slog.LevelError, "log level error (was info)\n"},
		{[]string{"loglevel", "loud"}, 2, slog.LevelError, ""},
		{[]string{"loglevel"}, 2, slog.LevelError, ""},
		{[]string{"loglevel", "warn", "extra"}, 2, slog.LevelError, ""},
		{[]string{"loglevel", "reset"}, 0, slog.LevelWarn, "log level warn (the configured level; was error)\n"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, out, errOut := e.ctl(tt.args...)
			if code != tt.code || out != tt.out {
				t.Fatalf("exit %d, stdout %q, stderr %q; want %d %q", code, out, errOut, tt.code, tt.out)
			}
			if tt.code == 2 && !strings.Contains(errOut, "loglevel debug|info|warn|error|reset") {
				t.Fatalf("usage error without usage: %q", errOut)
			}
			if got := e.log.Level(); got != tt.want {
				t.Fatalf("level %v, want %v", got, tt.want)
			}
		})
	}
}

func TestTrace(t *testing.T) {
	e := start(t)
	traced := e.agent(1, agentToken)
	other := e.agent(2, agent2Token)
	binary := func(c *testclient.Conn) {
		t.Helper()
		if err := c.WS.WriteMessage(websocket.BinaryMessage, []byte{1, 2, 3}); err != nil {
			t.Fatal(err)
		}
	}
	ping := func(c *testclient.Conn) {
		t.Helper()
		c.Send(testclient.Message(wire.TypePing, "server", nil))
		c.Expect(wire.TypePong)
	}
	// The server logs an ignored binary frame at debug level; the level
	// is warn, so only a trace shows it. A ping behind each frame: when
	// its pong is back, the frame has been handled and logged.
	binary(traced)
	ping(traced)
	code, out, errOut := e.ctl("trace", traced.ClientID)
	if code != 0 || out != "tracing client "+traced.ClientID+" at debug level (1 open connections)\n" {
		t.Fatalf("trace: %d %q %q", code, out, errOut)
	}
	binary(other)
	binary(traced)
	ping(other)
	ping(traced)
	recs := e.logs.records("binary frame ignored")
	if len(recs) != 1 || recs[0]["client"] != traced.ClientID || recs[0]["level"] != "DEBUG" {
		t.Fatalf("traced records %v", recs)
	}

	if code, out, _ := e.ctl("trace", "off"); code != 0 || out != "trace off (was "+traced.ClientID+")\n" {
		t.Fatalf("trace off: %d %q", code, out)
	}
	binary(traced)
	ping(traced)
	if recs := e.logs.records("binary frame ignored"); len(recs) != 1 {
		t.Fatalf("logged after trace off: %v", recs)
	}
	if code, _, _ := e.ctl("trace"); code != 2 {
		t.Fatalf("trace without a client: exit %d", code)
	}

	// A client traced before it connects is traced once it authenticates.
	if code, out, _ := e.ctl("trace", "later-client"); code != 0 || !strings.Contains(out, "(0 open connections)") {
		t.Fatalf("trace of an absent client: %d %q", code, out)
	}
	later := testclient.DialAgent(t, e.base, &testclient.Key(t, 0).PublicKey, 3)
	later.ClientID = "later-client"
	if !later.AuthAgent(agentToken).Accepted {
		t.Fatal("refused")
	}
	binary(later)
	ping(later)
	if recs := e.logs.records("binary frame ignored"); len(recs) != 2 || recs[1]["client"] != "later-client" {
		t.Fatalf("records %v", recs)
	}
}

func TestConnections(t *testing.T) {
	e := start(t)
	agent := e.agent(1, agentToken)
	testclient.DialPortal(t, e.base) // not authenticated
	code, out, errOut := e.ctl("connections")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[0]), " ") != "CLIENT ROLE ORGANIZATION AUTHENTICATED REMOTE SINCE BYTES_IN BYTES_OUT" {
		t.Fatalf("connections:\n%s", out)
	}
	var sawAgent, sawPortal bool
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		if len(f) != 8 {
			t.Fatalf("line %q", line)
		}
		if _, err := time.Parse(time.RFC3339, f[5]); err != nil {
			t.Fatalf("since %q: %v", f[5], err)
		}
		switch f[1] {
		case "agent":
			sawAgent = true
			if f[0] != agent.ClientID || f[2] != org || f[3] != "true" || f[4] != "127.0.0.1" || f[6] == "0" || f[7] == "0" {
				t.Fatalf("agent line %q", line)
			}
		case "portal":
			sawPortal = true
			if f[0] != "-" || f[2] != "-" || f[3] != "false" || f[4] != "127.0.0.1" {
				t.Fatalf("portal line %q", line)
			}
		}
	}
	if !sawAgent || !sawPortal {
		t.Fatalf("connections:\n%s", out)
	}
	if code, _, _ := e.ctl("connections", "extra"); code != 2 {
		t.Fatalf("connections with an argument: exit %d", code)
	}
}

func TestStats(t *testing.T) {
	e := start(t)
	e.agent(1, agentToken)
	// The counter moves just after the auth answer is queued: poll.
	var code int
	var out, errOut string
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, out, errOut = e.ctl("stats")
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errOut)
		}
		if strings.Contains(out, "AuthClientSuccess 1\n") || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, want := range []string{"AuthClientSuccess 1\n", "CommandRelaySuccess 0\n", "openConnections 1\n", "totalConnections 1\n", "rejected.scanner 7\n", "uptime "} {
		if !strings.Contains(out, want) {
			t.Errorf("stats lack %q:\n%s", want, out)
		}
	}
}

func TestControl(t *testing.T) {
	e := start(t)
	agent := e.agent(1, agentToken)
	type result struct {
		code        int
		out, errOut string
	}
	run := func(args ...string) chan result {
		ch := make(chan result, 1)
		go func() {
			code, out, errOut := e.ctl(args...)
			ch <- result{code, out, errOut}
		}()
		return ch
	}
	answer := func(res wire.ControlResponse) wire.ControlRequest {
		t.Helper()
		env := agent.Expect(wire.TypeControl)
		var req wire.ControlRequest
		if err := env.DecodePayload(&req); err != nil {
			t.Fatal(err)
		}
		reply := testclient.Message(wire.TypeControl, env.From, res)
		reply.MessageID = env.MessageID
		agent.Send(reply)
		return req
	}
	str := func(s string) *string { return &s }

	ch := run("control", "reg-1", "set-settings", "pause=1h", "note=a=b", "empty=")
	req := answer(wire.ControlResponse{Success: true, Output: map[string]*string{"pause": str("1h"), "state": nil}})
	if req.Command != "set-settings" || len(req.Parameters) != 3 || *req.Parameters["pause"] != "1h" || *req.Parameters["note"] != "a=b" || *req.Parameters["empty"] != "" {
		t.Fatalf("agent got %+v", req)
	}
	if r := <-ch; r.code != 0 || r.out != "success: true\nsettings:\n  pause=1h\n  state=(null)\n" {
		t.Fatalf("control: %d %q %q", r.code, r.out, r.errOut)
	}

	ch = run("control", "reg-1", "reboot")
	answer(wire.ControlResponse{Success: false, ErrorMessage: str("not allowed")})
	if r := <-ch; r.code != 1 || r.out != "success: false\nmessage: not allowed\n" || !strings.Contains(r.errOut, "without success") {
		t.Fatalf("failed control: %d %q %q", r.code, r.out, r.errOut)
	}

	if r := <-run("control", "reg-unknown", "x"); r.code != 1 || !strings.Contains(r.out, wire.TextDestinationNotConnected) {
		t.Fatalf("control to an unknown agent: %d %q %q", r.code, r.out, r.errOut)
	}
	for _, args := range [][]string{{"control"}, {"control", "reg-1"}, {"control", "reg-1", "x", "novalue"}, {"control", "reg-1", "x", "=v"}} {
		if r := <-run(args...); r.code != 2 {
			t.Fatalf("%q: exit %d, want 2", args, r.code)
		}
	}
}

func TestRunErrors(t *testing.T) {
	e := start(t)
	tests := []struct {
		name   string
		socket string
		args   []string
		code   int
		stderr string
	}{
		{"no command", e.socket, nil, 2, "no command"},
		{"unknown command", e.socket, []string{"restart"}, 2, `unknown command "restart"`},
		{"no server", filepath.Join(t.TempDir(), "none.sock"), []string{"stats"}, 2, "connect to the control socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := ctl.Run(context.Background(), tt.socket, tt.args, &out, &errOut)
			if code != tt.code || !strings.Contains(errOut.String(), tt.stderr) {
				t.Fatalf("exit %d, stderr %q; want %d %q", code, errOut.String(), tt.code, tt.stderr)
			}
		})
	}
}
