package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/wire"
)

// binary is the command built once for the tests that run it.
var binary string

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	for _, kv := range isolatedSettings {
		k, v, _ := strings.Cut(kv, "=")
		if err := os.Setenv(k, v); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	dir, err := os.MkdirTemp("", "machineservice-cli-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binary = filepath.Join(dir, "machineservice")
	build := exec.Command("go", "build", "-o", binary, ".")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "go build:", err)
		return 1
	}
	return m.Run()
}

// process is a long-running command of the binary.
type process struct {
	cmd    *exec.Cmd
	stderr *testlog.Buffer
	exited chan struct{}
	err    error
}

// start runs the binary with args until the test ends, then stops it with
// SIGINT and checks that it exits 0.
func start(t *testing.T, args ...string) *process {
	t.Helper()
	p := &process{cmd: exec.Command(binary, args...), stderr: &testlog.Buffer{}, exited: make(chan struct{})}
	p.cmd.Stderr = p.stderr
	p.cmd.Stdout = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			t.Logf("%s output:\n%s", args[0], p.stderr.String())
		}
	})
	return p
}

func (p *process) stop(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.exited:
		if p.err != nil {
			t.Errorf("%s exited with %v after SIGINT", p.cmd.Args[1], p.err)
		}
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("%s did not stop on SIGINT", p.cmd.Args[1])
	}
}

var listening = regexp.MustCompile(`msg="machineservice listening" addr=(\S+)`)

// writeTokens writes the test tokens as a tokens file in dir.
func writeTokens(t *testing.T, dir string) string {
	t.Helper()
	tokens := filepath.Join(dir, "tokens.json")
	data, err := json.Marshal(servertest.Tokens())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokens, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return tokens
}

// startServer runs the server in development mode with the test tokens and
// returns its base URL.
func startServer(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	tokens := writeTokens(t, dir)
	p := start(t, "serve", "--dev", "--listen", "127.0.0.1:0", "--tokens", tokens, "--dev-key-file", filepath.Join(dir, "key.pem"))
	var base string
	servertest.WaitFor(t, "the server to listen", func() bool {
		if m := listening.FindStringSubmatch(p.stderr.String()); m != nil {
			base = "http://" + m[1]
			return true
		}
		return false
	})
	return base
}

// localAPI is the HTTP API the agent forwards to.
func localAPI(t *testing.T) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.Header.Get("X-Name"))
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", r.Header.Get("Content-Type"))
		_, _ = io.Copy(w, r.Body)
	})
	mux.HandleFunc("GET /moved", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/hello", http.StatusFound)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// runCLI runs the binary to the end.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("run %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

func portalArgs(base, token string, args ...string) []string {
	return append([]string{"portal", "--server", base, "--token", token}, args...)
}

// waitAgent polls `portal list --json` until registration is listed and
// returns the list.
func waitAgent(t *testing.T, base, registration string) []wire.ClientRegistration {
	t.Helper()
	var list []wire.ClientRegistration
	servertest.WaitFor(t, "agent "+registration+" listed", func() bool {
		out, errOut, code := runCLI(t, portalArgs(base, servertest.PortalToken, "list", "--json")...)
		if code != 0 {
			t.Fatalf("list --json: exit %d: %s", code, errOut)
		}
		list = nil
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			t.Fatalf("list --json printed %q: %v", out, err)
		}
		for _, a := range list {
			if a.MachineRegistrationID == registration {
				return true
			}
		}
		return false
	})
	return list
}

func TestAgentAndPortal(t *testing.T) {
	base := startServer(t)
	api := localAPI(t)
	agent := start(t, "agent", "--server", base, "--token", servertest.AgentToken, "--forward", api.URL)

	list := waitAgent(t, base, "agent-1")
	if len(list) != 1 || list[0].OrganizationID != servertest.Org || list[0].Type != wire.ClientTypeAgent {
		t.Fatalf("list %+v", list)
	}
	clientID := list[0].ClientID

	out, _, code := runCLI(t, portalArgs(base, servertest.PortalToken, "list")...)
	if code != 0 || !strings.Contains(out, "CLIENT ID") || !strings.Contains(out, clientID) || !strings.Contains(out, "agent-1") {
		t.Fatalf("list: exit %d:\n%s", code, out)
	}

	dataFile := filepath.Join(t.TempDir(), "body.json")
	if err := os.WriteFile(dataFile, []byte(`{"from":"file"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		args   []string
		stdout string
		status string // on stderr
		code   int
	}{
		{"GET by registration with a header", []string{"request", "agent-1", "GET", "/hello", "-H", "X-Name: world"}, "hello world", "HTTP 200", 0},
		{"GET by client id", []string{"request", clientID, "get", "/hello"}, "hello ", "HTTP 200", 0},
		{"POST with --data", []string{"request", "agent-1", "POST", "/echo", "--data", "abc", "-H", "Content-Type: text/plain"}, "abc", "HTTP 200", 0},
		{"POST with --data @FILE", []string{"request", "agent-1", "POST", "/echo", "--data", "@" + dataFile}, `{"from":"file"}`, "HTTP 200", 0},
		{"flags before the arguments", []string{"request", "-H", "X-Name: first", "agent-1", "GET", "/hello"}, "hello first", "HTTP 200", 0},
		{"a redirect is shown, not followed", []string{"request", "agent-1", "GET", "/moved"}, "", "HTTP 302", 0},
		{"404 exits 1", []string{"request", "agent-1", "GET", "/missing"}, "404 page not found\n", "HTTP 404", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := runCLI(t, portalArgs(base, servertest.PortalToken, tc.args...)...)
			if code != tc.code || (tc.stdout != "" && out != tc.stdout) || strings.TrimSpace(errOut) != tc.status {
				t.Fatalf("exit %d, stdout %q, stderr %q; want %d, %q, %q", code, out, errOut, tc.code, tc.stdout, tc.status)
			}
		})
	}

	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stderr string
	}{
		{"bad token", portalArgs(base, "wrong-token", "list"), 2, "authentication refused"},
		{"bad token on request", portalArgs(base, "wrong-token", "request", "agent-1", "GET", "/"), 2, "authentication refused"},
		{"agent not connected", portalArgs(base, servertest.PortalToken, "request", "nobody", "GET", "/"), 1, "Destination not available for relay"},
		{"server down", portalArgs("http://127.0.0.1:1", servertest.PortalToken, "list"), 2, "dial"},
		{"no command", portalArgs(base, servertest.PortalToken), 2, "a command is required"},
		{"unknown command", portalArgs(base, servertest.PortalToken, "ping"), 2, "unknown portal command"},
		{"missing arguments", portalArgs(base, servertest.PortalToken, "request", "agent-1", "GET"), 2, "AGENT METHOD PATH"},
		{"path without slash", portalArgs(base, servertest.PortalToken, "request", "agent-1", "GET", "hello"), 2, "PATH must start with /"},
		{"bad header", portalArgs(base, servertest.PortalToken, "request", "agent-1", "GET", "/", "-H", "nocolon"), 2, "want 'Name: value'"},
		{"--json with request", portalArgs(base, servertest.PortalToken, "request", "agent-1", "GET", "/", "--json"), 2, "--json belongs to list"},
		{"no server", []string{"portal", "--token", "x", "list"}, 2, "--server is required"},
		{"missing data file", portalArgs(base, servertest.PortalToken, "request", "agent-1", "POST", "/echo", "--data", "@/nonexistent"), 2, "--data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := runCLI(t, tc.args...)
			if code != tc.code || !strings.Contains(errOut, tc.stderr) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, errOut, tc.code, tc.stderr)
			}
		})
	}

	agent.stop(t)
	if log := agent.stderr.String(); !strings.Contains(log, "msg=connected") || !strings.Contains(log, "msg=stopped") {
		t.Fatalf("agent log lacks the state changes:\n%s", log)
	}
}

func TestAgentTokenFile(t *testing.T) {
	base := startServer(t)
	api := localAPI(t)
	tokenFile := filepath.Join(t.TempDir(), "agent-token")
	if err := os.WriteFile(tokenFile, []byte(servertest.RenewingToken+"\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	agent := start(t, "agent", "--server", base, "--token-file", tokenFile, "--forward", api.URL)
	servertest.WaitFor(t, "the renewed token in the file", func() bool {
		data, err := os.ReadFile(tokenFile)
		return err == nil && strings.TrimSpace(string(data)) == servertest.RenewedToken
	})
	fi, err := os.Stat(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o640 {
		t.Fatalf("token file mode %v, want 0640", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(filepath.Dir(tokenFile))
	if len(entries) != 1 {
		t.Fatalf("temporary files left beside the token file: %v", entries)
	}
	waitAgent(t, base, "agent-renewing")
	agent.stop(t)
	if !strings.Contains(agent.stderr.String(), "stored the renewed token") {
		t.Fatalf("agent log:\n%s", agent.stderr.String())
	}
}

func TestAgentUsage(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		args   []string
		stderr string
	}{
		{"no server", []string{"agent", "--token", "t", "--forward", "http://127.0.0.1:1"}, "--server is required"},
		{"no token", []string{"agent", "--server", "http://127.0.0.1:1", "--forward", "http://127.0.0.1:1"}, "--token or --token-file is required"},
		{"both tokens", []string{"agent", "--server", "http://127.0.0.1:1", "--token", "t", "--token-file", empty, "--forward", "http://127.0.0.1:1"}, "not both"},
		{"empty token file", []string{"agent", "--server", "http://127.0.0.1:1", "--token-file", empty, "--forward", "http://127.0.0.1:1"}, "is empty"},
		{"no forward", []string{"agent", "--server", "http://127.0.0.1:1", "--token", "t"}, "--forward is required"},
		{"bad forward", []string{"agent", "--server", "http://127.0.0.1:1", "--token", "t", "--forward", "127.0.0.1:8200"}, "forward URL"},
		{"bad server", []string{"agent", "--server", "127.0.0.1:8080", "--token", "t", "--forward", "http://127.0.0.1:1"}, "Server"},
		{"unknown flag", []string{"agent", "--nope"}, "flag provided but not defined"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := runCLI(t, tc.args...)
			if code != 2 || !strings.Contains(errOut, tc.stderr) {
				t.Fatalf("exit %d, stderr %q; want 2 and %q", code, errOut, tc.stderr)
			}
		})
	}
}

// While the server cannot be reached the agent keeps running, logging each
// failed attempt and when it retries.
func TestAgentWaitsForTheServer(t *testing.T) {
	api := localAPI(t)
	agent := start(t, "agent", "--server", "http://127.0.0.1:1", "--token", servertest.AgentToken, "--forward", api.URL)
	servertest.WaitFor(t, "a failed attempt logged", func() bool {
		return strings.Contains(agent.stderr.String(), "msg=disconnected") && strings.Contains(agent.stderr.String(), "retry_in=")
	})
}
