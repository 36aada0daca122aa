package config_test

import (
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/logging"
)

func load(vars map[string]string, args ...string) (*config.Config, error) {
	return config.Load(append([]string{"--dev"}, args...), func(k string) string { return vars[k] })
}

func TestOpsDefaults(t *testing.T) {
	c, err := load(nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.MetricsListen != "127.0.0.1:9091" || c.ControlSocket != config.DevControlSocket || c.LogLevel() != slog.LevelInfo ||
		c.BlacklistLifetime.Hours() != 24 || c.RateLimitEnabled || c.MaxConnections != 0 || c.MaxConnectionsPerIP != 0 ||
		c.FilterPatterns || len(c.AllowedOrigins) != 0 || len(c.TrustedProxies) != 0 {
		t.Fatalf("defaults: %+v", c)
	}
	prod, err := config.Load(nil, func(k string) string {
		return map[string]string{"ENVIRONMENT__MACHINESERVERPRIVATE": "x", "ENVIRONMENT__MACHINESERVERKEYEXPIRES": "2030-01-01T00:00:00Z",
			"ENVIRONMENT__INMEMORYCLIENTLIST": "true", "ENVIRONMENT__DISABLEDATABASESTATISTICS": "true",
			"MESSAGING__CONNECTIONSTRING": "nats://127.0.0.1:4222"}[k]
	})
	if err != nil {
		t.Fatal(err)
	}
	if prod.ControlSocket != config.DefaultControlSocket {
		t.Fatalf("production control socket %q", prod.ControlSocket)
	}
}

func TestOpsSettings(t *testing.T) {
	c, err := load(map[string]string{
		"METRICS__LISTEN":                          "off",
		"ENVIRONMENT__CONTROLSOCKET":               "/tmp/ms.sock",
		"SERILOG__MINIMUMLEVEL__DEFAULT":           "Warning",
		"LOGGING__LOGLEVEL__DEFAULT":               "Debug",
		"SECURITY__TRUSTEDPROXIES":                 "10.0.0.0/8; 192.0.2.1, ::ffff:198.51.100.1 fd00::/8",
		"CORS__ALLOWEDORIGINS":                     "https://a.example; https://b.example:8443 ;",
		"SECURITY__RATELIMITENABLED":               "true",
		"SECURITY__MAXCONNECTIONSPERIP":            "5",
		"IPBLACKLIST__STORAGE":                     "https://store.example/lists",
		"IPBLACKLIST__ENTRY":                       "ip.json",
		"IPBLACKLIST__IPRULESCACHELIFETIMESECONDS": "60",
	}, "--metrics-listen", "127.0.0.1:9999")
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("198.51.100.1/32"), netip.MustParsePrefix("fd00::/8")}
	if c.MetricsListen != "127.0.0.1:9999" || c.ControlSocket != "/tmp/ms.sock" || c.LogLevel() != slog.LevelWarn ||
		!slices.Equal(c.TrustedProxies, want) || !slices.Equal(c.AllowedOrigins, []string{"https://a.example", "https://b.example:8443"}) ||
		c.MaxRequestsPerSecond != 10 || c.MaxConnectionsPerIP != 5 || c.BlacklistLifetime.Seconds() != 60 {
		t.Fatalf("settings: %+v", c)
	}
	c, err = load(map[string]string{"LOGGING__LOGLEVEL__DEFAULT": "Trace"})
	if err != nil || c.LogLevel() != logging.LevelTrace {
		t.Fatalf("LOGGING__LOGLEVEL__DEFAULT=Trace: %v %v", c.LogLevel(), err)
	}
}

func TestOpsSettingErrors(t *testing.T) {
	tests := []struct {
		env, value string
		also       map[string]string
	}{
		{"METRICS__LISTEN", "9091", nil},
		{"SERILOG__MINIMUMLEVEL__DEFAULT", "Loud", nil},
		{"LOGGING__LOGLEVEL__DEFAULT", "Loud", nil},
		{"SECURITY__TRUSTEDPROXIES", "10.0.0.0/40", nil},
		{"SECURITY__TRUSTEDPROXIES", "proxy.example", nil},
		{"IPBLACKLIST__ENTRY", "ip.json", nil},
		{"IPBLACKLIST__STORAGE", "s3://bucket", map[string]string{"IPBLACKLIST__ENTRY": "ip.json"}},
		{"IPBLACKLIST__ENTRY", "", map[string]string{"IPBLACKLIST__STORAGE": "/var/lib/ms"}},
		{"IPBLACKLIST__IPRULESCACHELIFETIMESECONDS", "0", nil},
		{"SECURITY__MAXREQUESTSPERSECONDPERIP", "0", map[string]string{"SECURITY__RATELIMITENABLED": "true"}},
		{"SECURITY__MAXCONNECTIONS", "-1", nil},
		{"SECURITY__MAXCONNECTIONSPERIP", "-1", nil},
		{"CORS__ALLOWEDORIGINS", "console.example.com", nil},
		{"CORS__ALLOWEDORIGINS", "https://console.example.com/path", nil},
		{"SECURITY__RATELIMITENABLED", "maybe", nil},
	}
	for _, tt := range tests {
		t.Run(tt.env+"="+tt.value, func(t *testing.T) {
			vars := map[string]string{tt.env: tt.value}
			for k, v := range tt.also {
				vars[k] = v
			}
			_, err := load(vars)
			if !errors.Is(err, config.ErrUsage) {
				t.Fatalf("error %v, want ErrUsage", err)
			}
			if !strings.Contains(err.Error(), tt.env) {
				t.Fatalf("error %q does not name %s", err, tt.env)
			}
		})
	}
}
