package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/wire"
)

// /ready asks every dependency that implements metrics.Checker; these are
// the ones serve wires in (see readinessChecks).
var (
	_ metrics.Checker = (*server.Server)(nil)
	_ metrics.Checker = (*registry.Postgres)(nil)
	_ metrics.Checker = (*bus.NATS)(nil)
)

var metricsListening = regexp.MustCompile(`msg="metrics and readiness listening" addr=(\S+)`)

// served is a `machineservice serve` child process started by runServe.
type served struct {
	*child
	base    string // http://host:port of the relay
	metrics string // host:port of /metrics and /ready
	socket  string // the control socket
}

// runServe runs `serve --dev` in a child process with the test tokens and
// server key, on loopback ports of its own, with the settings in env
// (KEY=VALUE) and the extra args, until it listens.
func runServe(t *testing.T, env []string, args ...string) *served {
	t.Helper()
	dir := t.TempDir()
	tokens := writeTokens(t, dir)
	keyFile := filepath.Join(dir, "key.pem")
	if err := os.WriteFile(keyFile, wire.EncodePrivateKey(servertest.Key(t)), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &served{socket: filepath.Join(dir, "ctl.sock")}
	env = append([]string{"ENVIRONMENT__CONTROLSOCKET=" + s.socket, "ENVIRONMENT__STATUSREPORTINTERVALSECONDS=0"}, env...)
	args = append([]string{"serve", "--dev", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
		"--tokens", tokens, "--dev-key-file", keyFile}, args...)
	s.child = startChild(t, dir, childEnv(env...), args...)
	deadline := time.Now().Add(startTimeout)
	for s.base == "" || s.metrics == "" {
		select {
		case <-s.done:
			t.Fatalf("serve exited (%v) before it listened; stderr:\n%s", s.err, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not listen within %v; stderr:\n%s", startTimeout, s.stderr.String())
		}
		out := s.stderr.String()
		if m := listening.FindStringSubmatch(out); m != nil {
			s.base = "http://" + m[1]
		}
		if m := metricsListening.FindStringSubmatch(out); m != nil {
			s.metrics = m[1]
		}
		time.Sleep(10 * time.Millisecond)
	}
	return s
}

// stop ends the child with SIGTERM and checks it exits 0.
func (s *served) stop() {
	s.t.Helper()
	s.signal(syscall.SIGTERM)
	if code := s.exitCode(exitTimeout); code != 0 {
		s.t.Errorf("serve exited with %d after SIGTERM; stderr:\n%s", code, s.stderr.String())
	}
}

// ready asks GET /ready.
func (s *served) ready() (int, string) {
	s.t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + s.metrics + "/ready")
	if err != nil {
		s.t.Fatalf("GET /ready: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatalf("GET /ready: %v", err)
	}
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// waitReady polls /ready until it answers status with a body containing
// want. An outage must show within a few seconds (a check takes at most
// metrics.CheckTimeout); a recovery may wait for a reconnection's
// backoff.
func (s *served) waitReady(what string, status int, want string) {
	s.t.Helper()
	within := 20 * time.Second
	if status != http.StatusOK {
		within = 10 * time.Second
	}
	start := time.Now()
	for {
		code, body := s.ready()
		if code == status && strings.Contains(body, want) {
			s.t.Logf("%s after %v: %d %q", what, time.Since(start).Round(time.Millisecond), code, body)
			return
		}
		if time.Since(start) > within {
			s.t.Fatalf("%s: /ready still answers %d %q after %v, want %d with %q; stderr:\n%s", what, code, body, within, status, want, s.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReadyFollowsDependencies runs serve on a PostgreSQL registry reached
// through a proxy and on an embedded NATS server, and checks that /ready
// follows both: 503 naming the registry while the database is cut away,
// 503 naming the bus while NATS is down, 200 again once each is back.
func TestReadyFollowsDependencies(t *testing.T) {
	conn, _ := pgtest.Schema(t)
	px, proxied := pgtest.StartProxy(t, conn)
	ns := natstest.Start(t, -1)
	s := runServe(t, []string{
		"DATABASE__CONNECTIONSTRING=" + proxied,
		"DATABASE__TIMEOUTSECONDS=1",
		"ENVIRONMENT__INSTANCEHEARTBEATSECONDS=1",
		"MESSAGING__SUBJECTPREFIX=" + natstest.Prefix(t, "mscmd"),
	}, "--nats", ns.ClientURL())
	s.waitReady("started", http.StatusOK, "ready")

	px.Cut()
	s.waitReady("database cut", http.StatusServiceUnavailable, "registry: ")
	// Once the registry has noticed too (its heartbeat failed), it stays
	// unready until it has written its clients back.
	servertest.WaitFor(t, "the registry to notice the outage", func() bool {
		return strings.Contains(s.stderr.String(), "registry database unreachable")
	})
	if code, body := s.ready(); code != http.StatusServiceUnavailable || !strings.Contains(body, "registry: ") {
		t.Fatalf("/ready during the outage answered %d %q", code, body)
	}
	px.Restore()
	s.waitReady("database restored", http.StatusOK, "ready")
	servertest.WaitFor(t, "the registry to write its clients back", func() bool {
		return strings.Contains(s.stderr.String(), "registry database reachable again")
	})

	natsPort := ns.Addr().(*net.TCPAddr).Port
	ns.Shutdown()
	ns.WaitForShutdown()
	s.waitReady("NATS stopped", http.StatusServiceUnavailable, "bus: ")
	natstest.Start(t, natsPort) // the same address: the server reconnects by itself
	s.waitReady("NATS restarted", http.StatusOK, "ready")
	s.stop()
}

// TestReadyFollowsStatisticsDatabase: with the registry in memory and
// only the statistics in PostgreSQL, /ready follows the database too.
func TestReadyFollowsStatisticsDatabase(t *testing.T) {
	conn, _ := pgtest.Schema(t)
	px, proxied := pgtest.StartProxy(t, conn)
	s := runServe(t, []string{"DATABASE__CONNECTIONSTRING=" + proxied, "ENVIRONMENT__INMEMORYCLIENTLIST=true"})
	s.waitReady("started", http.StatusOK, "ready")
	px.Cut()
	s.waitReady("database cut", http.StatusServiceUnavailable, "database: ")
	px.Restore()
	s.waitReady("database restored", http.StatusOK, "ready")
	s.stop()
}

// controlEcho answers control requests with the command, the "k"
// setting, and who answered.
func controlEcho(name string) agent.ControlHandler {
	return agent.ControlHandlerFunc(func(_ context.Context, req *agent.ControlRequest) *agent.ControlResponse {
		return &agent.ControlResponse{Success: true, Output: map[string]*string{
			"agent": &name, "command": &req.Command, "echo": req.Parameters["k"],
		}}
	})
}

// ctlRun runs `machineservice ctl --socket SOCKET ARGS...` as a user
// would, in this process, and returns the exit status and output.
func ctlRun(socket string, args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"ctl", "--socket", socket}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// TestCtlControl sends `machineservice ctl control` to a running server
// that holds the agent, which prints the agent's answer.
func TestCtlControl(t *testing.T) {
	s := runServe(t, nil)
	a := servertest.StartAgent(t, agent.Config{Server: s.base, Token: servertest.AgentToken, Control: controlEcho("the agent")})
	servertest.WaitFor(t, "the agent to connect", func() bool { return a.Count(agent.Connected) > 0 })

	code, out, errOut := ctlRun(s.socket, "control", "agent-1", "set-settings", "k=a=b", "other=")
	want := "success: true\nsettings:\n  agent=the agent\n  command=set-settings\n  echo=a=b\n"
	if code != 0 || out != want {
		t.Fatalf("ctl control: exit %d, stdout %q, stderr %q; want exit 0 and %q", code, out, errOut, want)
	}
	code, out, _ = ctlRun(s.socket, "control", "agent-unknown", "x")
	if code != 1 || !strings.Contains(out, wire.TextDestinationNotConnected) {
		t.Fatalf("ctl control to an unknown agent: exit %d, stdout %q", code, out)
	}
	a.Stop()
	s.stop()
}

// TestCtlControlAcrossInstances runs two serve processes on one database
// and one NATS: `ctl control` on one reaches the agent on the other.
func TestCtlControlAcrossInstances(t *testing.T) {
	conn, _ := pgtest.Schema(t)
	env := []string{"DATABASE__CONNECTIONSTRING=" + conn, "MESSAGING__SUBJECTPREFIX=" + natstest.Prefix(t, "mscmd")}
	url := natstest.URL(t)
	a := runServe(t, append(env, "ENVIRONMENT__INSTANCEID=ctl-a"), "--nats", url)
	b := runServe(t, append(env, "ENVIRONMENT__INSTANCEID=ctl-b"), "--nats", url)
	ag := servertest.StartAgent(t, agent.Config{Server: b.base, Token: servertest.AgentToken, Control: controlEcho("the agent on B")})
	servertest.WaitFor(t, "the agent to connect to B", func() bool { return ag.Count(agent.Connected) > 0 })

	want := "success: true\nsettings:\n  agent=the agent on B\n  command=pause\n  echo=1h\n"
	// The agent library reports Connected before the registration is
	// written, so A may not find it at once.
	var code int
	var out, errOut string
	servertest.WaitFor(t, "ctl control on A to reach the agent on B", func() bool {
		code, out, errOut = ctlRun(a.socket, "control", "agent-1", "pause", "k=1h")
		return code == 0 || !strings.Contains(out, wire.TextDestinationNotConnected)
	})
	if code != 0 || out != want {
		t.Fatalf("ctl control on A: exit %d, stdout %q, stderr %q; want exit 0 and %q", code, out, errOut, want)
	}
	ag.Stop()
	a.stop()
	b.stop()
}
