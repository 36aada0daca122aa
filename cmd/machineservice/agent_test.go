package main

import (
	"strings"
	"testing"

	"github.com/machineservice/machineservice/internal/servertest"
)

// TestAgentAuthProblemsAreNamed: the agent command tells a refused token
// from an authentication service that is down, and keeps running in
// both cases.
func TestAgentAuthProblemsAreNamed(t *testing.T) {
	api := localAPI(t)
	for _, tc := range []struct {
		name  string
		base  func(t *testing.T) string
		token string
		want  string
	}{
		{"refused token", startServer, "not-a-token", `level=ERROR msg="the server refused the token: check --token or --token-file`},
		{"controller down", serveWithoutController, servertest.AgentToken, `level=WARN msg="the server's authentication service is unavailable`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, "agent", "--server", tc.base(t), "--token", tc.token, "--forward", api.URL)
			servertest.WaitFor(t, "the agent to log "+tc.want, func() bool { return strings.Contains(p.stderr.String(), tc.want) })
			select {
			case <-p.exited:
				t.Fatalf("the agent exited (%v); it should keep trying", p.err)
			default:
			}
		})
	}
}
