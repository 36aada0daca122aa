package server_test

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

func TestHTTPRoutes(t *testing.T) {
	e := start(t)
	tests := []struct {
		name, path string
		status     int
		body       string // a substring of the answer
	}{
		{"root without redirect", "/", http.StatusNotFound, ""},
		{"health", "/health", http.StatusOK, ""},
		{"plain agent", "/agent", http.StatusBadRequest, "Only websocket clients are allowed"},
		{"plain portal", "/portal", http.StatusBadRequest, "Only websocket clients are allowed"},
		{"unknown", "/nothing-here", http.StatusNotFound, ""},
		{"unknown below agent", "/agent/x", http.StatusNotFound, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := httpGet(t, e.base, tt.path)
			if resp.StatusCode != tt.status {
				t.Fatalf("GET %s = %d, want %d", tt.path, resp.StatusCode, tt.status)
			}
			if !strings.Contains(body, tt.body) {
				t.Fatalf("GET %s body %q, want it to contain %q", tt.path, body, tt.body)
			}
		})
	}
}

func TestHTTPRedirect(t *testing.T) {
	const target = "https://console.example.invalid/machines"
	e := start(t, withConfig(func(c *config.Config) { c.RedirectURL = target }))
	resp, _ := httpGet(t, e.base, "/")
	if resp.StatusCode < 300 || resp.StatusCode > 399 {
		t.Fatalf("GET / = %d, want a redirect", resp.StatusCode)
	}
	if got := resp.Header.Get("Location"); got != target {
		t.Fatalf("redirect to %q, want %q", got, target)
	}
	// Only the root redirects.
	if resp, _ := httpGet(t, e.base, "/other"); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /other = %d, want 404", resp.StatusCode)
	}
}

func TestCertificates(t *testing.T) {
	e := start(t)
	resp, body := httpGet(t, e.base, "/certificates")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /certificates = %d", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("content type %q", ct)
	}
	var raw []map[string]any
	if err := json.Unmarshal([]byte(body), &raw); err != nil {
		t.Fatalf("certificates %q: %v", body, err)
	}
	if len(raw) != 1 {
		t.Fatalf("%d certificates, want 1", len(raw))
	}
	for _, k := range []string{"publicKeyHash", "publicKey", "obtained", "expiry"} {
		if _, ok := raw[0][k]; !ok {
			t.Errorf("certificate has no %q: %v", k, raw[0])
		}
	}
	var certs []wire.Certificate
	if err := json.Unmarshal([]byte(body), &certs); err != nil {
		t.Fatal(err)
	}
	serverKey := &testclient.Key(t, serverKeyIndex).PublicKey
	c := certs[0]
	if c.PublicKeyHash != wire.PublicKeyHash(serverKey) || len(c.PublicKeyHash) != 16 {
		t.Fatalf("publicKeyHash %q, want %q", c.PublicKeyHash, wire.PublicKeyHash(serverKey))
	}
	block, _ := pem.Decode([]byte(c.PublicKey))
	if block == nil {
		t.Fatalf("publicKey is not PEM: %q", c.PublicKey)
	}
	var key any
	var err error
	switch block.Type {
	case "RSA PUBLIC KEY":
		key, err = x509.ParsePKCS1PublicKey(block.Bytes)
	case "PUBLIC KEY":
		key, err = x509.ParsePKIXPublicKey(block.Bytes)
	default:
		t.Fatalf("publicKey PEM type %q", block.Type)
	}
	if err != nil {
		t.Fatalf("publicKey does not parse: %v", err)
	}
	if !serverKey.Equal(key) {
		t.Fatal("publicKey is not the server key")
	}
	if c.Obtained.IsZero() || !c.Expiry.After(c.Obtained) {
		t.Fatalf("obtained %v, expiry %v", c.Obtained, c.Expiry)
	}
	// The welcome names the same key.
	a := e.agentT(t, 1)
	var w wire.Welcome
	if err := a.Welcome.DecodePayload(&w); err != nil || w.PublicKeyHash != c.PublicKeyHash {
		t.Fatalf("welcome key hash %q (%v), certificate %q", w.PublicKeyHash, err, c.PublicKeyHash)
	}
}

// TestWelcome checks the welcome frame byte for byte as a client written
// from the reference reads it: plain, camelCase, payload a JSON string.
func TestWelcome(t *testing.T) {
	e := start(t)
	seen := map[string]bool{}
	for _, path := range []string{"/agent", "/portal", "/agent"} {
		t.Run(path, func(t *testing.T) {
			_, data := rawDial(t, e.base, path)
			var env map[string]json.RawMessage
			if err := json.Unmarshal(data, &env); err != nil {
				t.Fatalf("welcome is not plain JSON: %.200s", data)
			}
			str := func(k string) string {
				var s string
				if err := json.Unmarshal(env[k], &s); err != nil {
					t.Fatalf("welcome %s = %s, want a string", k, env[k])
				}
				return s
			}
			if str("type") != "welcome" || str("from") != "test-instance" || str("to") != "unknown client" {
				t.Fatalf("welcome envelope %s", data)
			}
			id := str("messageId")
			if id == "" || seen[id] {
				t.Fatalf("welcome message id %q is empty or repeated", id)
			}
			seen[id] = true
			if em, ok := env["errorMessage"]; ok && string(em) != "null" {
				t.Fatalf("welcome errorMessage %s", em)
			}
			inner := str("payload")
			var p map[string]json.RawMessage
			if err := json.Unmarshal([]byte(inner), &p); err != nil {
				t.Fatalf("welcome payload %q is not JSON: %v", inner, err)
			}
			want := map[string]string{
				"publicKeyHash":             `"` + wire.PublicKeyHash(&testclient.Key(t, serverKeyIndex).PublicKey) + `"`,
				"machineName":               `"test-machine"`,
				"serverVersion":             `"test"`,
				"nonce":                     `null`,
				"supportedProtocolVersions": `[1]`,
			}
			for k, v := range want {
				got, ok := p[k]
				if !ok || string(got) != v {
					t.Errorf("welcome payload %s = %s, want %s", k, got, v)
				}
			}
		})
	}
}

// TestTrickledUpgrade sends an upgrade request's headers a byte at a time,
// as a client holding sockets open would: the server's header timeout
// (10 s, well before the 30 s request timeout) closes the socket.
func TestTrickledUpgrade(t *testing.T) {
	t.Parallel()
	e := start(t)
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	began := time.Now()
	if _, err := conn.Write([]byte("GET /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		buf := make([]byte, 512)
		_ = conn.SetReadDeadline(time.Now().Add(time.Minute))
		for {
			if _, err := conn.Read(buf); err != nil {
				return
			}
		}
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-closed:
			if d := time.Since(began); d > 25*time.Second {
				t.Fatalf("closed after %v, not by the header timeout", d)
			}
			return
		case <-tick.C:
			if _, err := conn.Write([]byte("X")); err != nil {
				<-closed // the server has closed; the reader sees it too
				return
			}
		}
	}
}
