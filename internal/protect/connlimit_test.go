package protect_test

import (
	"net/http"
	"testing"

	"github.com/machineservice/machineservice/internal/protect"
)

// TestMaxConnectionsPerIPv6Network checks over real sockets that the
// per-address cap counts an IPv6 /64 as one address, as the rate limit
// does. Loopback has one IPv6 address, so the clients' addresses come from
// a trusted proxy's X-Forwarded-For.
func TestMaxConnectionsPerIPv6Network(t *testing.T) {
	e := start(t, map[string]string{"SECURITY__MAXCONNECTIONSPERIP": "1", "SECURITY__TRUSTEDPROXIES": "127.0.0.1"})
	from := func(ip string) http.Header { return http.Header{"X-Forwarded-For": {ip}} }
	if _, code, _ := e.dial("127.0.0.1", "/agent", from("2001:db8:1:2::1")); code != http.StatusSwitchingProtocols {
		t.Fatalf("first of the /64: %d", code)
	}
	if _, code, body := e.dial("127.0.0.1", "/agent", from("2001:db8:1:2::2")); code != http.StatusServiceUnavailable || body != protect.TextTooManyConnectionsNow {
		t.Fatalf("another address of the same /64: %d %q, want 503 %q", code, body, protect.TextTooManyConnectionsNow)
	}
	if _, code, _ := e.dial("127.0.0.1", "/portal", from("2001:db8:1:3::1")); code != http.StatusSwitchingProtocols {
		t.Fatalf("an address of another /64: %d", code)
	}
	if got := e.guard.Rejected()["max_connections_per_ip"]; got != 1 {
		t.Fatalf("refusals counted %d, want 1", got)
	}
}
