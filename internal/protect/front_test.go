package protect_test

import (
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/protect"
	"github.com/machineservice/machineservice/internal/stats"
)

func TestClientAddr(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32"), netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}
	tests := []struct {
		name, peer string
		xff        []string
		want       string
	}{
		{"no header", "192.0.2.1:1234", nil, "192.0.2.1"},
		{"untrusted peer ignores the header", "192.0.2.1:1234", []string{"198.51.100.7"}, "192.0.2.1"},
		{"trusted peer", "127.0.0.1:1234", []string{"198.51.100.7"}, "198.51.100.7"},
		{"client-written hops on the left are ignored", "127.0.0.1:1234", []string{"1.2.3.4, 198.51.100.7"}, "198.51.100.7"},
		{"trusted hops on the right are skipped", "127.0.0.1:1234", []string{"198.51.100.7, 10.1.2.3"}, "198.51.100.7"},
		{"several headers", "127.0.0.1:1234", []string{"1.2.3.4", "198.51.100.7", "10.9.9.9"}, "198.51.100.7"},
		{"only trusted hops", "127.0.0.1:1234", []string{"10.1.1.1, 10.2.2.2"}, "10.1.1.1"},
		{"garbage keeps the peer", "127.0.0.1:1234", []string{"198.51.100.7, garbage"}, "127.0.0.1"},
		{"hop with a port", "127.0.0.1:1234", []string{"198.51.100.7:5555"}, "198.51.100.7"},
		{"IPv6 hop", "[fd00::1]:1234", []string{"[2001:db8::5]:443"}, "2001:db8::5"},
		{"IPv4-mapped peer", "[::ffff:127.0.0.1]:1234", []string{"198.51.100.7"}, "198.51.100.7"},
		{"empty header", "127.0.0.1:1234", []string{""}, "127.0.0.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := http.NewRequest(http.MethodGet, "/", nil)
			r.RemoteAddr = tt.peer
			for _, v := range tt.xff {
				r.Header.Add("X-Forwarded-For", v)
			}
			if got := protect.ClientAddr(r, trusted); got.String() != tt.want {
				t.Fatalf("ClientAddr = %s, want %s", got, tt.want)
			}
		})
	}
}

// TestForwardedFor checks over real sockets that X-Forwarded-For from an
// untrusted peer changes nothing, and that from a trusted proxy it decides
// the blacklist and the address the server records.
func TestForwardedFor(t *testing.T) {
	dir := t.TempDir()
	writeRules(t, filepath.Join(dir, "rules.json"), `[{"cidr":"198.51.100.66"}]`)
	vars := map[string]string{"IPBLACKLIST__STORAGE": dir, "IPBLACKLIST__ENTRY": "rules.json"}
	spoof := http.Header{"X-Forwarded-For": {"198.51.100.66"}}
	fromClient := http.Header{"X-Forwarded-For": {"198.51.100.66, 203.0.113.9"}}

	t.Run("untrusted peer", func(t *testing.T) {
		e := start(t, vars)
		if code, _, _ := e.get("127.0.0.1", "/health", spoof); code != http.StatusOK {
			t.Fatalf("a spoofed header decided the blacklist: %d", code)
		}
		e.dial("127.0.0.2", "/agent", http.Header{"X-Forwarded-For": {"203.0.113.9"}})
		waitFor(t, "the connection", func() bool { return len(e.remoteIPs()) == 1 })
		if got := e.remoteIPs(); got[0] != "127.0.0.2" {
			t.Fatalf("server recorded %v, want the socket peer", got)
		}
	})
	t.Run("trusted proxy", func(t *testing.T) {
		v := map[string]string{"SECURITY__TRUSTEDPROXIES": "127.0.0.1/32; 127.0.0.3"}
		for k, x := range vars {
			v[k] = x
		}
		e := start(t, v)
		if code, _, _ := e.get("127.0.0.1", "/health", spoof); code != http.StatusForbidden {
			t.Fatalf("the proxy's client was not blacklisted: %d", code)
		}
		if code, _, _ := e.get("127.0.0.1", "/health", fromClient); code != http.StatusOK {
			t.Fatalf("an address the client wrote decided the blacklist: %d", code)
		}
		if code, _, _ := e.get("127.0.0.2", "/health", spoof); code != http.StatusOK {
			t.Fatalf("127.0.0.2 is not a trusted proxy: %d", code)
		}
		e.dial("127.0.0.3", "/agent", http.Header{"X-Forwarded-For": {"203.0.113.9, 127.0.0.1"}})
		waitFor(t, "the connection", func() bool { return len(e.remoteIPs()) == 1 })
		if got := e.remoteIPs(); got[0] != "203.0.113.9" {
			t.Fatalf("server recorded %v, want the forwarded client", got)
		}
	})
}

func TestRateLimit(t *testing.T) {
	e := start(t, map[string]string{"SECURITY__RATELIMITENABLED": "true", "SECURITY__MAXREQUESTSPERSECONDPERIP": "3"})
	for i := range 3 {
		if code, _, _ := e.get("127.0.0.1", "/health", nil); code != http.StatusOK {
			t.Fatalf("request %d: %d", i+1, code)
		}
	}
	code, body, h := e.get("127.0.0.1", "/health", nil)
	if code != http.StatusTooManyRequests || body != protect.TextTooManyRequests || h.Get("Retry-After") != "1" {
		t.Fatalf("4th request: %d %q Retry-After %q", code, body, h.Get("Retry-After"))
	}
	if _, code, _ := e.dial("127.0.0.1", "/agent", nil); code != http.StatusTooManyRequests {
		t.Fatalf("upgrade over the limit: %d", code)
	}
	if got := e.stats.Get(stats.RateLimitExceeded); got != 2 {
		t.Fatalf("RateLimitExceeded = %d, want 2", got)
	}
	if code, _, _ := e.get("127.0.0.2", "/health", nil); code != http.StatusOK {
		t.Fatalf("another address was limited too: %d", code)
	}

	e.clock.Advance(time.Second)
	if _, code, _ := e.dial("127.0.0.1", "/agent", nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade after a second: %d", code)
	}
	for i := range 2 {
		if code, _, _ := e.get("127.0.0.1", "/health", nil); code != http.StatusOK {
			t.Fatalf("request %d after a second: %d", i+1, code)
		}
	}
	if code, _, _ := e.get("127.0.0.1", "/health", nil); code != http.StatusTooManyRequests {
		t.Fatalf("over the limit again: %d", code)
	}
}

func TestMaxConnectionsPerIP(t *testing.T) {
	e := start(t, map[string]string{"SECURITY__MAXCONNECTIONSPERIP": "2"})
	first, code, _ := e.dial("127.0.0.1", "/agent", nil)
	if code != http.StatusSwitchingProtocols {
		t.Fatalf("first: %d", code)
	}
	if _, code, _ := e.dial("127.0.0.1", "/portal", nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("second: %d", code)
	}
	if _, code, body := e.dial("127.0.0.1", "/agent", nil); code != http.StatusServiceUnavailable || body != protect.TextTooManyConnectionsNow {
		t.Fatalf("third: %d %q", code, body)
	}
	if _, code, _ := e.dial("127.0.0.2", "/agent", nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("another address: %d", code)
	}
	if code, _, _ := e.get("127.0.0.1", "/health", nil); code != http.StatusOK {
		t.Fatalf("plain HTTP is not capped: %d", code)
	}
	if got := e.guard.Rejected()["max_connections_per_ip"]; got != 1 {
		t.Fatalf("refusals counted %d", got)
	}

	_ = first.Close()
	waitFor(t, "a place to free up", func() bool {
		ws, code, _ := e.dial("127.0.0.1", "/agent", nil)
		if ws != nil {
			_ = ws.Close()
		}
		return code == http.StatusSwitchingProtocols
	})
}

func TestMaxConnections(t *testing.T) {
	e := start(t, map[string]string{"SECURITY__MAXCONNECTIONS": "2"})
	first, code, _ := e.dial("127.0.0.1", "/agent", nil)
	if code != http.StatusSwitchingProtocols {
		t.Fatalf("from 127.0.0.1: %d", code)
	}
	if _, code, _ := e.dial("127.0.0.2", "/agent", nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("from 127.0.0.2: %d", code)
	}
	if _, code, body := e.dial("127.0.0.3", "/portal", nil); code != http.StatusServiceUnavailable || body != protect.TextTooManyConnections {
		t.Fatalf("third: %d %q", code, body)
	}
	if got := e.guard.Rejected()["max_connections"]; got != 1 {
		t.Fatalf("refusals counted %d", got)
	}
	_ = first.Close()
	waitFor(t, "a place to free up", func() bool {
		ws, code, _ := e.dial("127.0.0.3", "/portal", nil)
		if ws != nil {
			_ = ws.Close()
		}
		return code == http.StatusSwitchingProtocols
	})
}

func TestMaxConnectionsFreedByFailedUpgrade(t *testing.T) {
	e := start(t, map[string]string{"SECURITY__MAXCONNECTIONS": "1"})
	// Not a valid upgrade (no key): the server refuses it after the cap
	// was taken, and the cap must be given back.
	for range 3 {
		if code, _, _ := e.get("127.0.0.1", "/agent", http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}}); code != http.StatusBadRequest {
			t.Fatalf("bad upgrade: %d", code)
		}
	}
	if _, code, _ := e.dial("127.0.0.1", "/agent", nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("after failed upgrades: %d", code)
	}
}

func TestFilterPatterns(t *testing.T) {
	scanner := []string{"/wp-admin/setup.php", "/index.php", "/.env", "/.git/config", "/cgi-bin/luci", "/phpmyadmin/", "/backup.sql", "/x/../../etc/passwd"}
	t.Run("on", func(t *testing.T) {
		e := start(t, map[string]string{"SECURITY__FILTERPATTERNS": "true"})
		for _, p := range scanner {
			if code, _, _ := e.get("127.0.0.1", p, nil); code != http.StatusNotFound {
				t.Errorf("GET %s: %d", p, code)
			}
		}
		for _, p := range []string{"/health", "/certificates"} {
			if code, _, _ := e.get("127.0.0.1", p, nil); code != http.StatusOK {
				t.Errorf("GET %s: %d", p, code)
			}
		}
		if _, code, _ := e.dial("127.0.0.1", "/agent", nil); code != http.StatusSwitchingProtocols {
			t.Errorf("upgrade: %d", code)
		}
		if got := e.guard.Rejected()["scanner"]; got != int64(len(scanner)) {
			t.Errorf("counted %d scanner requests, want %d", got, len(scanner))
		}
	})
	t.Run("off", func(t *testing.T) {
		e := start(t, nil)
		if code, _, _ := e.get("127.0.0.1", "/.env", nil); code != http.StatusNotFound {
			t.Errorf("GET /.env: %d", code)
		}
		if got := e.guard.Rejected()["scanner"]; got != 0 {
			t.Errorf("counted %d with the filter off", got)
		}
	})
	for _, p := range []string{"/", "/health", "/certificates", "/agent", "/portal", "/AGENT"} {
		if protect.IsScannerPath(p) {
			t.Errorf("route %s is taken for a scanner path", p)
		}
	}
}

func TestAllowedOrigins(t *testing.T) {
	const console = "https://console.example.com"
	e := start(t, map[string]string{"CORS__ALLOWEDORIGINS": console + "; https://other.example.com:8443"})
	origin := func(o string) http.Header { return http.Header{"Origin": {o}} }

	tests := []struct {
		name, path string
		h          http.Header
		want       int
	}{
		{"listed origin", "/portal", origin(console), http.StatusSwitchingProtocols},
		{"listed origin, other case", "/portal", origin("HTTPS://Console.Example.com"), http.StatusSwitchingProtocols},
		{"second listed origin", "/portal", origin("https://other.example.com:8443"), http.StatusSwitchingProtocols},
		{"no origin: a native client", "/portal", nil, http.StatusSwitchingProtocols},
		{"origin not listed", "/portal", origin("https://evil.example"), http.StatusForbidden},
		{"listed host, other scheme", "/portal", origin("http://console.example.com"), http.StatusForbidden},
		{"agents are not checked", "/agent", origin("https://evil.example"), http.StatusSwitchingProtocols},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ws, code, body := e.dial("127.0.0.1", tt.path, tt.h)
			if ws != nil {
				_ = ws.Close()
			}
			if code != tt.want {
				t.Fatalf("upgrade: %d %q, want %d", code, body, tt.want)
			}
		})
	}

	_, _, h := e.get("127.0.0.1", "/health", origin(console))
	if h.Get("Access-Control-Allow-Origin") != console || !slices.Contains(h.Values("Vary"), "Origin") {
		t.Fatalf("CORS headers for a listed origin: %v", h)
	}
	code, _, h := e.get("127.0.0.1", "/health", origin("https://evil.example"))
	if code != http.StatusOK || h.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("unlisted origin: %d %v", code, h)
	}
	code, _, h = e.do("127.0.0.1", http.MethodOptions, "/certificates", http.Header{
		"Origin": {console}, "Access-Control-Request-Method": {"GET"}, "Access-Control-Request-Headers": {"X-Test"},
	})
	if code != http.StatusNoContent || h.Get("Access-Control-Allow-Origin") != console ||
		h.Get("Access-Control-Allow-Methods") == "" || h.Get("Access-Control-Allow-Headers") != "X-Test" {
		t.Fatalf("preflight: %d %v", code, h)
	}
	if code, _, _ := e.do("127.0.0.1", http.MethodOptions, "/certificates", http.Header{
		"Origin": {"https://evil.example"}, "Access-Control-Request-Method": {"GET"},
	}); code != http.StatusForbidden {
		t.Fatalf("preflight from an unlisted origin: %d", code)
	}
	if got := e.guard.Rejected()["origin"]; got != 3 {
		t.Fatalf("origin refusals counted %d, want 3", got)
	}

	t.Run("empty setting allows every origin", func(t *testing.T) {
		e := start(t, nil)
		if _, code, _ := e.dial("127.0.0.1", "/portal", origin("https://evil.example")); code != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade: %d", code)
		}
		if _, _, h := e.get("127.0.0.1", "/health", origin(console)); h.Get("Access-Control-Allow-Origin") != "" {
			t.Fatalf("CORS headers without the setting: %v", h)
		}
	})
}

// TestStartRefusesUnreadableBlacklist runs the guard's constructor the way
// the command does.
func TestStartRefusesUnreadableBlacklist(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "other.json"), []byte(`[]`), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := protect.New(t.Context(), mustConfig(t, map[string]string{"IPBLACKLIST__STORAGE": dir, "IPBLACKLIST__ENTRY": "missing.json"}), protect.Deps{})
	if err == nil {
		t.Fatal("a missing blacklist was accepted")
	}
}
