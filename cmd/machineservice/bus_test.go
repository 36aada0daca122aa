package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/internal/testwait"
	"github.com/machineservice/machineservice/wire"
)

// waitFor polls cond until it holds or 15 seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, what, 15*time.Second, cond)
}

// TestConfigurationErrors: a missing or wrong bus setting stops the start
// with exit status 2 and names the setting.
func TestConfigurationErrors(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	prod := map[string]string{
		"ENVIRONMENT__MACHINESERVERPRIVATE":    base64.StdEncoding.EncodeToString(wire.EncodePrivateKey(key)),
		"ENVIRONMENT__MACHINESERVERKEYEXPIRES": "2035-01-01T00:00:00Z",
		"AUTH__TOKENSFILE":                     "../../examples/tokens.json",
	}
	cases := []struct {
		name   string
		env    map[string]string
		args   []string
		want   []string
		forbid string
	}{
		{"production without a bus", prod, []string{"serve"}, []string{"MESSAGING__CONNECTIONSTRING", "required in production"}, ""},
		{"not a NATS URL", map[string]string{"MESSAGING__CONNECTIONSTRING": "Host=db;Password=hunter2"}, []string{"serve", "--dev"},
			[]string{"MESSAGING__CONNECTIONSTRING: entry 1"}, "hunter2"},
		{"wrong scheme", map[string]string{"MESSAGING__CONNECTIONSTRING": "nats://a:4222, postgres://u:hunter2@db/x"}, []string{"serve", "--dev"},
			[]string{"entry 2 has scheme \"postgres\""}, "hunter2"},
		{"bad subject prefix", map[string]string{"MESSAGING__SUBJECTPREFIX": "a.*"}, []string{"serve", "--dev"}, []string{"MESSAGING__SUBJECTPREFIX"}, ""},
		{"controller without a bus or tokens", nil, []string{"controller"}, []string{"MESSAGING__CONNECTIONSTRING (--nats)", "AUTH__TOKENSFILE (--tokens)"}, ""},
		{"controller with a missing credentials file", map[string]string{"MESSAGING__CREDENTIALSFILE": "/nonexistent/nats.creds"},
			[]string{"controller", "--nats", "nats://127.0.0.1:1", "--tokens", "../../examples/tokens.json"}, []string{"MESSAGING__CREDENTIALSFILE"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var stdout, stderr bytes.Buffer
			if code := run(tc.args, &stdout, &stderr); code != 2 {
				t.Fatalf("exit status %d, want 2; stderr: %s", code, stderr.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr does not name %q: %s", w, stderr.String())
				}
			}
			if tc.forbid != "" && strings.Contains(stderr.String(), tc.forbid) {
				t.Errorf("stderr repeats a secret: %s", stderr.String())
			}
		})
	}
}

// TestControllerCommand runs the controller command's loop against NATS
// and asks it, as an instance does, over the bus.
func TestControllerCommand(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mscmd")
	cfg, err := config.LoadController([]string{"--nats", url, "--tokens", "../../examples/tokens.json"}, func(k string) string {
		if k == "MESSAGING__SUBJECTPREFIX" {
			return pfx
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	var logs testlog.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- runController(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil))) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("controller: %v", err)
		}
	}()
	waitFor(t, "the controller to start", func() bool { return strings.Contains(logs.String(), "controller answering on the bus") })

	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	msg, err := nc.Request(pfx+".auth.agent", []byte(`{"token":"dev-agent-token-1"}`), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var r map[string]any
	if err := json.Unmarshal(msg.Data, &r); err != nil || r["success"] != true || r["registeredAgentId"] != "agent-1" {
		t.Fatalf("reply %s", msg.Data)
	}
	msg, err = nc.Request(pfx+".auth.portal", []byte(`{"token":"dev-portal-token","includeSubOrgs":false}`), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(msg.Data, &r); err != nil || r["success"] != true || r["organizationId"] != "11111111-1111-1111-1111-111111111111" {
		t.Fatalf("reply %s", msg.Data)
	}
	if err := nc.Publish(pfx+".events.activity", []byte(`{"activityType":"Connected","activityTimestamp":"2030-01-01T00:00:00Z","registeredAgentId":"agent-1","organizationId":"o","clientVersion":"2.1","metadata":null}`)); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Log(logs.String())
		}
	}()
	waitFor(t, "the activity event in the log", func() bool {
		l := logs.String()
		return strings.Contains(l, `msg="agent activity"`) && strings.Contains(l, "type=Connected") && strings.Contains(l, "agent=agent-1")
	})
}

// TestServeOnBus runs `serve --dev --nats URL --tokens FILE`: the built-in
// controller answers on the bus in the same process and agents
// authenticate through it. It stops the command with SIGTERM, as an
// operator would.
func TestServeOnBus(t *testing.T) {
	url, pfx := natstest.URL(t), natstest.Prefix(t, "mscmd")
	t.Setenv("MESSAGING__SUBJECTPREFIX", pfx)
	t.Setenv("ENVIRONMENT__STATUSREPORTINTERVALSECONDS", "0")
	keyFile := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(keyFile, wire.EncodePrivateKey(testclient.Key(t, 0)), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout testlog.Buffer
	var stderr testlog.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"serve", "--dev", "--listen", "127.0.0.1:0", "--dev-key-file", keyFile,
			"--nats", url, "--tokens", "../../examples/tokens.json"}, &stdout, &stderr)
	}()
	addr := regexp.MustCompile(`msg="machineservice listening" addr=(\S+)`)
	var base string
	waitFor(t, "the server to listen", func() bool {
		if m := addr.FindStringSubmatch(stderr.String()); m != nil {
			base = "http://" + m[1]
			return true
		}
		select {
		case code := <-done:
			t.Fatalf("serve exited with %d: %s", code, stderr.String())
		default:
		}
		return false
	})

	agent := testclient.DialAgent(t, base, &testclient.Key(t, 0).PublicKey, 1)
	if res := agent.AuthAgent("dev-agent-token-1"); !res.Accepted {
		t.Fatalf("agent refused; log: %s", stderr.String())
	}
	portal := testclient.DialPortal(t, base)
	if res := portal.AuthPortal("dev-portal-token", false); !res.Accepted {
		t.Fatal("portal refused")
	}

	// The same controller answers anyone on the bus.
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	msg, err := nc.Request(pfx+".auth.agent", []byte(`{"token":"dev-agent-token-2"}`), 10*time.Second)
	if err != nil || !strings.Contains(string(msg.Data), `"registeredAgentId":"agent-2"`) {
		t.Fatalf("reply %v %v", msg, err)
	}
	// And the instance answers control requests.
	msg, err = nc.Request(pfx+".control", []byte(`{"agentId":"nobody","organizationId":"o","command":"x","settings":{},"sentTime":"`+time.Now().UTC().Format(time.RFC3339)+`"}`), 10*time.Second)
	if err != nil || !strings.Contains(string(msg.Data), wire.TextDestinationNotConnected) {
		t.Fatalf("control reply %v %v", msg, err)
	}

	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exited with %d: %s", code, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
	agent.ExpectClose(1001, wire.TextShuttingDown)
}
