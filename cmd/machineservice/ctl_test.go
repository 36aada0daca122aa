package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/machineservice/machineservice/internal/config"
)

func TestCtlUsage(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.sock")
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"help", []string{"ctl", "help"}, 0, "loglevel debug|info|warn|error|reset", ""},
		{"-h", []string{"ctl", "-h"}, 0, "trace CLIENTID|off", ""},
		{"unknown flag", []string{"ctl", "--sock", "x", "stats"}, 2, "", "flag provided but not defined"},
		{"no command", []string{"ctl", "--socket", missing}, 2, "", "no command"},
		{"no server", []string{"ctl", "--socket", missing, "stats"}, 2, "", "connect to the control socket " + missing},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := run(tt.args, &out, &errOut); code != tt.code {
				t.Fatalf("exit %d, want %d (stderr %q)", code, tt.code, errOut.String())
			}
			if !strings.Contains(out.String(), tt.stdout) || !strings.Contains(errOut.String(), tt.stderr) {
				t.Fatalf("stdout %q, stderr %q", out.String(), errOut.String())
			}
		})
	}
}

func TestCtlSocket(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	env := func(kv ...string) func(string) string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) string { return m[k] }
	}
	prodExists := false
	if _, err := os.Stat(config.DefaultControlSocket); err == nil {
		prodExists = true
	}
	tests := []struct {
		name   string
		flag   string
		getenv func(string) string
		want   string
	}{
		{"flag wins", "/tmp/x.sock", env("ENVIRONMENT__CONTROLSOCKET", "/tmp/y.sock"), "/tmp/x.sock"},
		{"environment", "", env("ENVIRONMENT__CONTROLSOCKET", "/tmp/y.sock"), "/tmp/y.sock"},
		{"development", "", env("ENVIRONMENT__DEV", "true"), config.DevControlSocket},
		{"production", "", env(), config.DefaultControlSocket},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ctlSocket(tt.flag, tt.getenv); got != tt.want {
				t.Fatalf("ctlSocket = %q, want %q", got, tt.want)
			}
		})
	}
	if !prodExists {
		// Only a development server runs here: its socket is found.
		if err := os.WriteFile(filepath.Join(dir, config.DevControlSocket), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if got := ctlSocket("", env()); got != config.DevControlSocket {
			t.Fatalf("with only the development socket present: %q", got)
		}
	}
}
