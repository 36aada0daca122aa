package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/wire"
)

// How long the tests wait for the command: a race-instrumented binary
// generating an RSA key on a busy machine is slow.
const (
	startTimeout = 60 * time.Second
	exitTimeout  = 10 * time.Second
)

var (
	serveBinaryOnce sync.Once
	serveBinaryPath string
	serveBinaryErr  error
)

// buildServeBinary builds the command once for all tests of this package
// and returns its path. It is built with -race when the tests are.
func buildServeBinary(t *testing.T) string {
	t.Helper()
	serveBinaryOnce.Do(func() {
		dir, err := binaryDir()
		if err != nil {
			serveBinaryErr = err
			return
		}
		path := filepath.Join(dir, "machineservice")
		args := []string{"build", "-o", path}
		if raceEnabled() {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, ".")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			serveBinaryErr = fmt.Errorf("go build: %w\n%s", err, out)
			return
		}
		serveBinaryPath = path
	})
	if serveBinaryErr != nil {
		t.Fatalf("build the command: %v", serveBinaryErr)
	}
	return serveBinaryPath
}

// binaryDir returns where to put the binary. Under go test the test binary
// runs from go's work directory, which go removes afterwards; a test
// binary run by hand gets a new temporary directory.
func binaryDir() (string, error) {
	if exe, err := os.Executable(); err == nil && strings.Contains(exe, "go-build") {
		return os.MkdirTemp(filepath.Dir(exe), "serve-")
	}
	return os.MkdirTemp("", "machineservice-serve-test-")
}

func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// isolatedSettings replace defaults that every process on the machine
// shares (the metrics address 127.0.0.1:9091, the production control
// socket), so that a server a test starts does not collide with another
// test run or a real server. TestMain sets them for the servers run in
// this process, and childEnv for children.
var isolatedSettings = []string{"METRICS__LISTEN=127.0.0.1:0", "ENVIRONMENT__CONTROLSOCKET=off"}

// childEnv is this process's environment without the command's settings,
// plus isolatedSettings, plus extra, which wins over both.
func childEnv(extra ...string) []string {
	var env []string
	// The race detector otherwise waits a second before a clean exit.
	gorace := "atexit_sleep_ms=0"
	for _, kv := range os.Environ() {
		switch {
		case strings.HasPrefix(kv, "ENVIRONMENT__"), strings.HasPrefix(kv, "AUTH__"),
			strings.HasPrefix(kv, "DATABASE__"), strings.HasPrefix(kv, "MESSAGING__"), strings.HasPrefix(kv, "METRICS__"):
		case strings.HasPrefix(kv, "GORACE="):
			gorace = strings.TrimPrefix(kv, "GORACE=") + " " + gorace
		default:
			env = append(env, kv)
		}
	}
	env = append(append(env, "GORACE="+gorace), isolatedSettings...)
	return append(env, extra...) // exec uses the last value of a key
}

// examplesTokens is the absolute path of the shipped tokens file; the
// command runs in a temporary directory.
func examplesTokens(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "examples", "tokens.json"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// child is one running command.
type child struct {
	t      *testing.T
	cmd    *exec.Cmd
	stdout testlog.Buffer
	stderr testlog.Buffer
	done   chan struct{} // closed when it has exited
	err    error         // Wait's result, after done
}

// startChild runs the command with args in dir.
func startChild(t *testing.T, dir string, env []string, args ...string) *child {
	t.Helper()
	c := &child{t: t, done: make(chan struct{})}
	c.cmd = exec.Command(buildServeBinary(t), args...)
	c.cmd.Dir = dir
	c.cmd.Env = env
	c.cmd.Stdout = &c.stdout
	c.cmd.Stderr = &c.stderr
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", args, err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			_ = c.cmd.Process.Kill() // the test failed before stopping it
			<-c.done
		}
		if t.Failed() {
			t.Logf("stderr of %v:\n%s", args, c.stderr.String())
		}
	})
	return c
}

// exitCode waits for the command to exit and returns its status.
func (c *child) exitCode(within time.Duration) int {
	c.t.Helper()
	select {
	case <-c.done:
	case <-time.After(within):
		c.t.Fatalf("the command did not exit within %v; stderr:\n%s", within, c.stderr.String())
	}
	if c.err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(c.err, &ee) {
		return ee.ExitCode() // -1 when killed by a signal
	}
	c.t.Fatalf("wait: %v", c.err)
	return -1
}

func (c *child) signal(sig os.Signal) {
	c.t.Helper()
	if err := c.cmd.Process.Signal(sig); err != nil {
		c.t.Fatalf("signal %v: %v", sig, err)
	}
}

// runChild runs a command that should end by itself and returns its exit
// status, stdout and stderr.
func runChild(t *testing.T, dir string, env []string, args ...string) (int, string, string) {
	t.Helper()
	c := startChild(t, dir, env, args...)
	code := c.exitCode(startTimeout)
	return code, c.stdout.String(), c.stderr.String()
}

// waitHealthy polls GET /health until it answers 200.
func (c *child) waitHealthy(addr string) {
	c.t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-c.done:
			c.t.Fatalf("the command exited (%v) before it was healthy; stderr:\n%s", c.err, c.stderr.String())
		default:
		}
		resp, err := client.Get("http://" + addr + "/health")
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("not healthy within %v (last: %v); stderr:\n%s", startTimeout, err, c.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// certificates fetches the server's certificate list.
func certificates(t *testing.T, addr string) []wire.Certificate {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + "/certificates")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/certificates: %s", resp.Status)
	}
	var certs []wire.Certificate
	if err := json.NewDecoder(resp.Body).Decode(&certs); err != nil {
		t.Fatalf("/certificates: %v", err)
	}
	if len(certs) != 1 {
		t.Fatalf("/certificates lists %d keys, want 1", len(certs))
	}
	return certs
}

// keyFileHash returns the public key hash of the key in a PEM file.
func keyFileHash(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	key, err := wire.ParsePrivateKey(string(data))
	if err != nil {
		t.Fatalf("key file %s: %v", path, err)
	}
	return wire.PublicKeyHash(&key.PublicKey)
}

// dialPortal connects to /portal, reads the welcome and authenticates with
// a token of the shipped tokens file.
func dialPortal(t *testing.T, addr string) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, resp, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+addr+"/portal", nil)
	if err != nil {
		t.Fatalf("dial /portal: %v", err)
	}
	_ = resp.Body.Close()
	t.Cleanup(func() { _ = ws.Close() })

	if typ := readEnvelope(t, ws)["type"]; typ != "welcome" {
		t.Fatalf("first message type %v, want welcome", typ)
	}
	auth := map[string]any{
		"from": "portal-test", "to": "MachineService", "type": "authportal", "messageId": "m1",
		"payload": map[string]any{"token": "dev-portal-token", "clientVersion": "test", "protocolVersion": 1},
	}
	if err := ws.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := ws.WriteJSON(auth); err != nil {
		t.Fatalf("write authportal: %v", err)
	}
	answer := readEnvelope(t, ws)
	payload, _ := answer["payload"].(map[string]any)
	if answer["type"] != "authportal" || payload["accepted"] != true {
		t.Fatalf("authportal answer %v, want accepted", answer)
	}
	return ws
}

func readEnvelope(t *testing.T, ws *websocket.Conn) map[string]any {
	t.Helper()
	if err := ws.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	_, data, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	var env map[string]any
	if err := json.Unmarshal(data, &env); err != nil {
		t.Fatalf("not an envelope: %q: %v", data, err)
	}
	return env
}

// waitClose reads until the connection ends and returns the close frame.
func waitClose(t *testing.T, ws *websocket.Conn) *websocket.CloseError {
	t.Helper()
	if err := ws.SetReadDeadline(time.Now().Add(exitTimeout)); err != nil {
		t.Fatal(err)
	}
	for {
		_, _, err := ws.ReadMessage()
		if err == nil {
			continue
		}
		var ce *websocket.CloseError
		if !errors.As(err, &ce) {
			t.Fatalf("connection ended without a close frame: %v", err)
		}
		return ce
	}
}

func TestServeDev(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "k.pem")
	addr := freeAddr(t)
	args := []string{"serve", "--dev", "--listen", addr, "--tokens", examplesTokens(t), "--dev-key-file", keyFile}

	c := startChild(t, dir, childEnv(), args...)
	c.waitHealthy(addr)

	fi, err := os.Stat(keyFile)
	if err != nil {
		t.Fatalf("the development key file: %v", err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("key file mode %v, want 0600", mode)
	}
	hash := keyFileHash(t, keyFile)
	cert := certificates(t, addr)[0]
	if cert.PublicKeyHash != hash {
		t.Errorf("/certificates hash %q, want the key file's %q", cert.PublicKeyHash, hash)
	}
	if got, err := wire.ParsePublicKey(cert.PublicKey); err != nil || wire.PublicKeyHash(got) != hash {
		t.Errorf("/certificates public key does not match the key file (%v)", err)
	}
	if !cert.Expiry.After(time.Now().Add(80 * 24 * time.Hour)) {
		t.Errorf("development key expiry %v, want about 90 days ahead", cert.Expiry)
	}

	ws := dialPortal(t, addr)
	c.signal(syscall.SIGTERM)
	ce := waitClose(t, ws)
	if ce.Code != websocket.CloseGoingAway || ce.Text != "Server shutting down" {
		t.Errorf("close frame %d %q, want 1001 \"Server shutting down\"", ce.Code, ce.Text)
	}
	if code := c.exitCode(exitTimeout); code != 0 {
		t.Errorf("exit status after SIGTERM %d, want 0; stderr:\n%s", code, c.stderr.String())
	}

	// A second start keeps the key.
	c = startChild(t, dir, childEnv(), args...)
	c.waitHealthy(addr)
	if got := certificates(t, addr)[0].PublicKeyHash; got != hash {
		t.Errorf("second start: /certificates hash %q, want the first start's %q", got, hash)
	}
	if !strings.Contains(c.stderr.String(), "using the development key") {
		t.Errorf("second start does not say it uses the existing key; stderr:\n%s", c.stderr.String())
	}
	c.signal(syscall.SIGINT)
	if code := c.exitCode(exitTimeout); code != 0 {
		t.Errorf("exit status after SIGINT %d, want 0", code)
	}
	if _, err := os.Stat(filepath.Join(dir, "debug-privatekey.pem")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a key file was written at the default path despite --dev-key-file (%v)", err)
	}
}

func TestServePortTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dir := t.TempDir()
	code, _, stderr := runChild(t, dir, childEnv(), "serve", "--dev", "--listen", l.Addr().String(), "--dev-key-file", filepath.Join(dir, "k.pem"))
	if code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	for _, want := range []string{"listen on " + l.Addr().String(), "--listen", "address already in use"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not contain %q:\n%s", want, stderr)
		}
	}
}

// productionKey returns a new server key as ENVIRONMENT__MACHINESERVERPRIVATE
// holds it, and its public key hash.
func productionKey(t *testing.T) (string, string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(wire.EncodePrivateKey(key)), wire.PublicKeyHash(&key.PublicKey)
}

func TestServeProduction(t *testing.T) {
	key, hash := productionKey(t)
	const expires = "2031-02-03T04:05:06Z"
	env := childEnv(
		"ENVIRONMENT__MACHINESERVERPRIVATE="+key,
		"ENVIRONMENT__MACHINESERVERKEYEXPIRES="+expires,
		// No database: production allows it only when told.
		"ENVIRONMENT__INMEMORYCLIENTLIST=true",
		"ENVIRONMENT__DISABLEDATABASESTATISTICS=true",
	)

	t.Run("without a bus", func(t *testing.T) {
		code, _, stderr := runChild(t, t.TempDir(), env, "serve", "--listen", freeAddr(t))
		if code != 2 {
			t.Errorf("exit status %d, want 2", code)
		}
		if !strings.Contains(stderr, "MESSAGING__CONNECTIONSTRING") {
			t.Errorf("stderr does not name MESSAGING__CONNECTIONSTRING:\n%s", stderr)
		}
	})

	t.Run("with tokens", func(t *testing.T) {
		dir := t.TempDir()
		addr := freeAddr(t)
		c := startChild(t, dir, append(env, "AUTH__TOKENSFILE="+examplesTokens(t), "ENVIRONMENT__ISPROD=true",
			"MESSAGING__CONNECTIONSTRING="+natstest.URL(t), "MESSAGING__SUBJECTPREFIX=serve-prod-"+strconv.Itoa(os.Getpid())), "serve", "--listen", addr)
		c.waitHealthy(addr)
		cert := certificates(t, addr)[0]
		if cert.PublicKeyHash != hash {
			t.Errorf("/certificates hash %q, want the configured key's %q", cert.PublicKeyHash, hash)
		}
		if want, _ := time.Parse(time.RFC3339, expires); !cert.Expiry.Equal(want) {
			t.Errorf("/certificates expiry %v, want ENVIRONMENT__MACHINESERVERKEYEXPIRES %v", cert.Expiry, want)
		}
		dialPortal(t, addr)
		c.signal(syscall.SIGTERM)
		if code := c.exitCode(exitTimeout); code != 0 {
			t.Errorf("exit status after SIGTERM %d, want 0", code)
		}
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) != 0 {
			t.Errorf("production start wrote files in its working directory: %v", entries)
		}
		// Production logs are JSON lines.
		for l := range strings.SplitSeq(strings.TrimSpace(c.stderr.String()), "\n") {
			if !json.Valid([]byte(l)) {
				t.Errorf("production log line is not JSON: %q", l)
			}
		}
	})

	t.Run("bad key", func(t *testing.T) {
		env := childEnv("ENVIRONMENT__MACHINESERVERPRIVATE=bm90IGEga2V5", "ENVIRONMENT__MACHINESERVERKEYEXPIRES="+expires, "AUTH__TOKENSFILE="+examplesTokens(t),
			"ENVIRONMENT__INMEMORYCLIENTLIST=true", "ENVIRONMENT__DISABLEDATABASESTATISTICS=true", "MESSAGING__CONNECTIONSTRING=nats://127.0.0.1:1")
		code, _, stderr := runChild(t, t.TempDir(), env, "serve", "--listen", freeAddr(t))
		if code != 2 || !strings.Contains(stderr, "ENVIRONMENT__MACHINESERVERPRIVATE") {
			t.Errorf("exit status %d, stderr %q; want 2 naming ENVIRONMENT__MACHINESERVERPRIVATE", code, stderr)
		}
	})
}

func TestCommandErrors(t *testing.T) {
	tests := []struct {
		name string
		env  []string
		args []string
		code int
		want []string // in stderr
	}{
		{"production without key", nil, []string{"serve"}, 2, []string{"ENVIRONMENT__MACHINESERVERPRIVATE", "ENVIRONMENT__MACHINESERVERKEYEXPIRES"}},
		{"dev in production", []string{"ENVIRONMENT__ISPROD=true"}, []string{"serve", "--dev"}, 2, []string{"ENVIRONMENT__ISPROD"}},
		{"bad setting", []string{"ENVIRONMENT__MAXMESSAGESIZE=big"}, []string{"serve", "--dev"}, 2, []string{"ENVIRONMENT__MAXMESSAGESIZE"}},
		{"unknown flag", nil, []string{"serve", "--dev", "--bogus"}, 2, []string{"bogus"}},
		{"missing tokens file", nil, []string{"serve", "--dev", "--tokens", "missing.json"}, 2, []string{"AUTH__TOKENSFILE", "missing.json"}},
		{"unknown command", nil, []string{"bogus"}, 2, []string{`unknown command "bogus"`, "usage:"}},
		{"no command", nil, nil, 2, []string{"usage:"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			args := tt.args
			if len(args) > 0 && args[0] == "serve" {
				args = append(args, "--listen", freeAddr(t))
			}
			code, _, stderr := runChild(t, dir, childEnv(tt.env...), args...)
			if code != tt.code {
				t.Errorf("exit status %d, want %d", code, tt.code)
			}
			for _, w := range tt.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr does not contain %q:\n%s", w, stderr)
				}
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Errorf("a refused start left files: %v", entries)
			}
		})
	}
}

func TestEnvCommand(t *testing.T) {
	code, stdout, stderr := runChild(t, t.TempDir(), childEnv(), "env")
	if code != 0 {
		t.Fatalf("exit status %d; stderr:\n%s", code, stderr)
	}
	for _, want := range []string{"ENVIRONMENT__MAXMESSAGESIZE", "1048576", "AUTH__TOKENSFILE", "--tokens"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("env output does not contain %q:\n%s", want, stdout)
		}
	}
	code, stdout, _ = runChild(t, t.TempDir(), childEnv(), "version")
	if code != 0 || strings.TrimSpace(stdout) == "" {
		t.Errorf("version: exit status %d, output %q", code, stdout)
	}
}

// TestServeDevRenewsExpiredKey starts the server on a development key file
// whose announced expiry has passed: it must make and announce a new key
// rather than one that agents refuse.
func TestServeDevRenewsExpiredKey(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "k.pem")
	old, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, wire.EncodePrivateKey(old), 0o640); err != nil {
		t.Fatal(err)
	}
	oldHash := wire.PublicKeyHash(&old.PublicKey)
	stale := time.Now().Add(-91 * 24 * time.Hour)
	if err := os.Chtimes(keyFile, stale, stale); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	c := startChild(t, dir, childEnv(), "serve", "--dev", "--listen", addr, "--tokens", examplesTokens(t), "--dev-key-file", keyFile)
	c.waitHealthy(addr)

	cert := certificates(t, addr)[0]
	if cert.PublicKeyHash == oldHash {
		t.Errorf("/certificates announces the expired key %q", oldHash)
	}
	if !cert.Expiry.After(time.Now().Add(80 * 24 * time.Hour)) {
		t.Errorf("/certificates expiry %v, want about 90 days ahead", cert.Expiry)
	}
	if got := keyFileHash(t, keyFile); got != cert.PublicKeyHash {
		t.Errorf("the key file holds %q, the server announces %q", got, cert.PublicKeyHash)
	}
	if fi, err := os.Stat(keyFile); err != nil {
		t.Fatal(err)
	} else if mode := fi.Mode().Perm(); mode != 0o640 {
		t.Errorf("the replaced key file has mode %v, want the old file's 0640", mode)
	}
	// The control socket is off (isolatedSettings): only the key is left.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "k.pem" {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("files in the working directory: %v, want only k.pem", names)
	}
	for _, want := range []string{"the development key has expired", "generated a new development key"} {
		if !strings.Contains(c.stderr.String(), want) {
			t.Errorf("stderr does not say %q:\n%s", want, c.stderr.String())
		}
	}
	c.signal(syscall.SIGTERM)
	if code := c.exitCode(exitTimeout); code != 0 {
		t.Errorf("exit status after SIGTERM %d, want 0", code)
	}
}
