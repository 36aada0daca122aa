package server_test

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// withConfig changes the configuration before the server starts.
func withConfig(f func(*config.Config)) option {
	return func(c *config.Config, _ *server.Deps) { f(c) }
}

// withController replaces the test controller; f gets the static one the
// harness built, to delegate to.
func withController(f func(static controller.Controller) controller.Controller) option {
	return func(_ *config.Config, d *server.Deps) { d.Controller = f(d.Controller) }
}

// withRegistry hands the registry the server uses to *reg.
func withRegistry(reg *registry.Registry) option {
	return func(_ *config.Config, d *server.Deps) { *reg = d.Registry }
}

// gate is a controller that holds every agent validation until the test
// releases it: a fake of timing only, the answers are the real ones.
type gate struct {
	controller.Controller
	entered chan string   // receives the token of each validation that started
	release chan struct{} // closed to let validations finish
	once    sync.Once
	portals bool // hold portal validations too
}

func newGate(inner controller.Controller) *gate {
	return &gate{Controller: inner, entered: make(chan string, 16), release: make(chan struct{})}
}

func (g *gate) ValidateAgent(ctx context.Context, token string) (controller.Agent, error) {
	select {
	case g.entered <- token:
	default: // nobody counts
	}
	select {
	case <-g.release:
	case <-ctx.Done():
		return controller.Agent{}, errors.Join(controller.ErrUnavailable, ctx.Err())
	}
	return g.Controller.ValidateAgent(ctx, token)
}

func (g *gate) ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (controller.Portal, error) {
	if g.portals {
		select {
		case <-g.release:
		case <-ctx.Done():
			return controller.Portal{}, errors.Join(controller.ErrUnavailable, ctx.Err())
		}
	}
	return g.Controller.ValidatePortal(ctx, token, includeSubOrgs)
}

func (g *gate) open() { g.once.Do(func() { close(g.release) }) }

// waitEntered waits until a validation has reached the controller.
func (g *gate) waitEntered(t *testing.T) string {
	t.Helper()
	select {
	case tok := <-g.entered:
		return tok
	case <-time.After(10 * time.Second):
		t.Fatal("no validation reached the controller")
		return ""
	}
}

// slowRegistry holds one Register call until the test releases it: a fake
// of timing only, the registry underneath is the real one.
type slowRegistry struct {
	registry.Registry
	mu      sync.Mutex
	hold    chan struct{} // non-nil: the next Register waits for it
	entered chan struct{}
}

// holdNext makes the next Register wait; the returned func releases it.
func (r *slowRegistry) holdNext(t *testing.T) (release func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	hold := make(chan struct{})
	r.hold = hold
	r.entered = make(chan struct{}, 1)
	var once sync.Once
	release = func() { once.Do(func() { close(hold) }) }
	t.Cleanup(release)
	return release
}

func (r *slowRegistry) waitEntered(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	entered := r.entered
	r.mu.Unlock()
	select {
	case <-entered:
	case <-time.After(testclient.Timeout):
		t.Fatal("no registration started")
	}
}

func (r *slowRegistry) Register(ctx context.Context, c registry.Client) error {
	r.mu.Lock()
	hold, entered := r.hold, r.entered
	r.hold = nil
	r.mu.Unlock()
	if hold != nil {
		entered <- struct{}{}
		select {
		case <-hold:
		case <-ctx.Done():
		}
	}
	return r.Registry.Register(ctx, c)
}

// rawDial opens a WebSocket without the test client and returns the
// welcome frame as it was sent.
func rawDial(t *testing.T, base, path string) (*websocket.Conn, []byte) {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: testclient.Timeout}
	ws, resp, err := d.Dial(testclient.WSURL(base, path), nil)
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close()
	}
	if err != nil {
		t.Fatalf("dial %s: %v", path, err)
	}
	t.Cleanup(func() { _ = ws.Close() })
	_ = ws.SetReadDeadline(time.Now().Add(testclient.Timeout))
	mt, data, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("read welcome: %v", err)
	}
	if mt != websocket.TextMessage {
		t.Fatalf("welcome is frame type %d, want text", mt)
	}
	return ws, data
}

// readRaw reads the next text frame as sent.
func readRaw(t *testing.T, c *testclient.Conn) []byte {
	t.Helper()
	_ = c.WS.SetReadDeadline(time.Now().Add(testclient.Timeout))
	for {
		mt, data, err := c.WS.ReadMessage()
		if err != nil {
			t.Fatalf("%s: read: %v", c.Role, err)
		}
		if mt == websocket.TextMessage {
			return data
		}
	}
}

// jweHeader checks that data is a compact JWE with the protocol's
// algorithms and header extras.
func jweHeader(t *testing.T, data []byte) {
	t.Helper()
	parts := strings.Split(string(data), ".")
	if len(parts) != 5 {
		t.Fatalf("frame is not a compact JWE (%d parts): %.80s", len(parts), data)
	}
	var h map[string]any
	raw, err := decodeSegment(parts[0])
	if err != nil || json.Unmarshal(raw, &h) != nil {
		t.Fatalf("JWE header %q does not decode: %v", parts[0], err)
	}
	want := map[string]any{"alg": "RSA-OAEP-256", "enc": "A256CBC-HS512", "encrypted": "true", "version": "1"}
	for k, v := range want {
		if h[k] != v {
			t.Errorf("JWE header %s = %v, want %v (header %v)", k, h[k], v, h)
		}
	}
}

// authRequest is the auth payload the Duplicati agent sends, with a key.
func authRequest(c *testclient.Conn, token string) wire.AuthRequest {
	return wire.AuthRequest{
		Token:           token,
		PublicKey:       wire.EncodePublicKey(&c.Key.PublicKey),
		ClientVersion:   "2.1.0.0",
		ProtocolVersion: wire.ProtocolVersion,
	}
}

// authResult reads the answer to an auth or authportal.
func authResult(t *testing.T, c *testclient.Conn, typ, messageID string) wire.AuthResult {
	t.Helper()
	env := c.Expect(typ)
	if env.MessageID != messageID {
		t.Fatalf("%s answer has message id %q, want %q", typ, env.MessageID, messageID)
	}
	var res wire.AuthResult
	if err := env.DecodePayload(&res); err != nil {
		t.Fatalf("%s answer payload %s: %v", typ, env.Payload, err)
	}
	return res
}

// spkiPEM writes key as an SPKI "PUBLIC KEY" PEM.
func spkiPEM(t *testing.T, key *rsa.PublicKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// ping sends a ping envelope and waits for the pong; lists pushed to a
// portal meanwhile are skipped.
func ping(t *testing.T, c *testclient.Conn) wire.Envelope {
	t.Helper()
	c.Send(testclient.Message(wire.TypePing, "server", nil))
	return testclient.Next(t, c, wire.TypePong)
}

// closes returns how many connections closed for the named reason.
func (e *env) closes(reason string) int64 {
	return e.stats.Snapshot().Closes[reason]
}

// list asks for the list and returns the answer, skipping lists the
// server pushed meanwhile.
func list(t *testing.T, p *testclient.Conn) []wire.ClientRegistration {
	t.Helper()
	req := testclient.Message(wire.TypeList, "MachineService", nil)
	p.Send(req)
	for {
		env := p.Expect(wire.TypeList)
		if env.MessageID == req.MessageID {
			return testclient.DecodeList(t, env)
		}
	}
}

// listIDs lists the client ids a portal sees.
func listIDs(t *testing.T, p *testclient.Conn) []string {
	t.Helper()
	ids := []string{}
	for _, r := range list(t, p) {
		ids = append(ids, r.ClientID)
	}
	return ids
}

// Dialling helpers bound to the calling (sub)test, so that a failing
// expectation stops that test and not its parent.

func (e *env) agentT(t *testing.T, n int) *testclient.Conn {
	t.Helper()
	return testclient.DialAgent(t, e.base, &testclient.Key(t, serverKeyIndex).PublicKey, n)
}

func (e *env) authedAgentT(t *testing.T, n int, token string) *testclient.Conn {
	t.Helper()
	a := e.agentT(t, n)
	if res := e.authAgentT(t, a, token); !res.Accepted {
		t.Fatalf("agent auth with %q refused", token)
	}
	return a
}

// authAgentT authenticates a as the Duplicati agent does, with its client
// id in the metadata. The answer is queued before the connection can be
// found; when it is accepted, authAgentT also waits for the Connected
// activity, published once the agent can be reached and is registered.
func (e *env) authAgentT(t *testing.T, a *testclient.Conn, token string) wire.AuthResult {
	t.Helper()
	before := e.connected(a.ClientID)
	p := authRequest(a, token)
	p.Metadata = map[string]*string{"client-id": &a.ClientID, "machine-name": &a.ClientID}
	req := testclient.Message(wire.TypeAuth, "server", p)
	a.Send(req)
	res := authResult(t, a, wire.TypeAuth, req.MessageID)
	if res.Accepted {
		waitFor(t, "the Connected activity", func() bool { return e.connected(a.ClientID) > before })
	}
	return res
}

// connected counts the Connected activities of a client id.
func (e *env) connected(clientID string) int {
	n := 0
	for _, a := range e.activities() {
		if v := a.Metadata["client-id"]; a.ActivityType == bus.ActivityConnected && v != nil && *v == clientID {
			n++
		}
	}
	return n
}

// waitCounter waits for a counter to reach want: counters are moved
// right after the message that tells the client is queued.
func (e *env) waitCounter(t *testing.T, c stats.Counter, want int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for e.stats.Get(c) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s = %d, want %d", c, e.stats.Get(c), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (e *env) portalT(t *testing.T) *testclient.Conn {
	t.Helper()
	return testclient.DialPortal(t, e.base)
}

func (e *env) authedPortalT(t *testing.T, token string, includeSubOrgs bool) *testclient.Conn {
	t.Helper()
	p := e.portalT(t)
	if res := p.AuthPortal(token, includeSubOrgs); !res.Accepted {
		t.Fatalf("portal auth with %q refused", token)
	}
	// The answer is queued before the portal can be found; the pong
	// follows its indexing.
	ping(t, p)
	return p
}

// command builds a command envelope to a client.
func command(to string, payload any) *wire.Envelope {
	env := testclient.Message(wire.TypeCommand, to, payload)
	env.MessageID = uuid.NewString()
	return env
}

// httpGet fetches path without following redirects.
func httpGet(t *testing.T, base, path string) (*http.Response, string) {
	t.Helper()
	client := &http.Client{
		Timeout:       testclient.Timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := client.Get(base + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	return resp, string(body)
}

func decodeSegment(s string) ([]byte, error) { return base64.RawURLEncoding.DecodeString(s) }
