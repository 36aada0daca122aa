package main

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/servertest"
)

// serveWithoutController runs `serve` on a bus on which no controller
// answers, as when the controller is down, and returns its base URL.
// Every authentication fails there with "Authentication service
// unavailable".
func serveWithoutController(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	env := childEnv("MESSAGING__SUBJECTPREFIX="+natstest.Prefix(t, "mscmd"), "ENVIRONMENT__STATUSREPORTINTERVALSECONDS=0")
	c := startChild(t, dir, env, "serve", "--dev", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
		"--nats", natstest.URL(t), "--dev-key-file", filepath.Join(dir, "key.pem"))
	t.Cleanup(func() {
		select {
		case <-c.done:
			return
		default:
		}
		c.signal(syscall.SIGTERM)
		if code := c.exitCode(exitTimeout); code != 0 {
			t.Errorf("serve exited with %d after SIGTERM; stderr:\n%s", code, c.stderr.String())
		}
	})
	var base string
	servertest.WaitFor(t, "the server to listen", func() bool {
		if m := listening.FindStringSubmatch(c.stderr.String()); m != nil {
			base = "http://" + m[1]
			return true
		}
		return false
	})
	return base
}

// TestPortalAuthUnavailable: with the controller down the portal command
// says so, rather than blaming the token, and exits 2.
func TestPortalAuthUnavailable(t *testing.T) {
	base := serveWithoutController(t)
	start := time.Now()
	_, stderr, code := runCLI(t, portalArgs(base, servertest.PortalToken, "list")...)
	if code != exitProblem || !strings.Contains(stderr, "authentication service is unavailable") || strings.Contains(stderr, "check --token") {
		t.Fatalf("exit %d, stderr %q; want exit 2 and the authentication service named unavailable", code, stderr)
	}
	t.Logf("answered in %v: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(stderr))
}
