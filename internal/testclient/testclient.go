// Package testclient is a bare protocol client for tests: it dials the
// server as an agent or a portal and sends and reads single envelopes, so
// tests can drive every step and every error path by hand.
package testclient

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/wire"
)

// Timeout bounds every read of a test client.
const Timeout = 10 * time.Second

var (
	keysMu sync.Mutex
	keys   []*rsa.PrivateKey
)

// Key returns the n-th RSA-2048 test key, generated once per test binary.
func Key(t testing.TB, n int) *rsa.PrivateKey {
	t.Helper()
	keysMu.Lock()
	defer keysMu.Unlock()
	for len(keys) <= n {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatalf("generate key: %v", err)
		}
		keys = append(keys, k)
	}
	return keys[n]
}

// Conn is one test connection.
type Conn struct {
	t  testing.TB
	WS *websocket.Conn
	// Role is the route dialled.
	Role wire.ClientType
	// ClientID is sent as "from".
	ClientID string
	// Style is the payload style Send uses.
	Style wire.Style
	// Key is the agent's own key; ServerKey the server's public key.
	Key       *rsa.PrivateKey
	ServerKey *rsa.PublicKey
	// Welcome is the welcome message the server sent.
	Welcome wire.Envelope
}

// WSURL turns an http:// base URL into the ws:// URL of path.
func WSURL(base, path string) string {
	return "ws" + strings.TrimPrefix(base, "http") + path
}

// Dial connects to base+path and reads the welcome.
func Dial(t testing.TB, base, path string) *Conn {
	t.Helper()
	c, err := DialErr(t, base, path, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", path, err)
	}
	return c
}

// DialErr is Dial that returns the error, with optional request headers.
func DialErr(t testing.TB, base, path string, h http.Header) (*Conn, error) {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: Timeout}
	ws, resp, err := d.Dial(WSURL(base, path), h)
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close()
	}
	if err != nil {
		return nil, err
	}
	c := &Conn{t: t, WS: ws, ClientID: uuid.NewString()}
	t.Cleanup(func() { _ = ws.Close() })
	switch path {
	case "/agent":
		c.Role = wire.ClientTypeAgent
	case "/portal":
		c.Role = wire.ClientTypePortal
	}
	_ = ws.SetReadDeadline(time.Now().Add(Timeout))
	_, data, err := ws.ReadMessage()
	if err != nil {
		return nil, fmt.Errorf("read welcome: %w", err)
	}
	c.Welcome, err = wire.DecodeEnvelope(data)
	if err != nil {
		return nil, fmt.Errorf("decode welcome %q: %w", data, err)
	}
	if c.Welcome.Type != wire.TypeWelcome {
		return nil, fmt.Errorf("first message is %q, not welcome", c.Welcome.Type)
	}
	return c, nil
}

// DialAgent connects to /agent as an agent with key n of Key.
func DialAgent(t testing.TB, base string, serverKey *rsa.PublicKey, n int) *Conn {
	t.Helper()
	c := Dial(t, base, "/agent")
	c.Key = Key(t, n)
	c.ServerKey = serverKey
	return c
}

// DialPortal connects to /portal.
func DialPortal(t testing.TB, base string) *Conn {
	t.Helper()
	return Dial(t, base, "/portal")
}

// Encode wraps env as this client sends it: a JWE to the server key for
// agents, plain JSON for portals.
func (c *Conn) Encode(env *wire.Envelope) []byte {
	c.t.Helper()
	if c.Role == wire.ClientTypeAgent {
		data, err := wire.SealEnvelope(env, c.Style, c.ServerKey)
		if err != nil {
			c.t.Fatalf("seal: %v", err)
		}
		return data
	}
	data, err := env.Marshal(c.Style)
	if err != nil {
		c.t.Fatalf("marshal: %v", err)
	}
	return data
}

// Send sends env, filling From with ClientID and MessageID when empty.
func (c *Conn) Send(env *wire.Envelope) {
	c.t.Helper()
	if env.From == "" {
		env.From = c.ClientID
	}
	if env.MessageID == "" {
		env.MessageID = uuid.NewString()
	}
	c.SendRaw(c.Encode(env))
}

// SendRaw writes one text frame.
func (c *Conn) SendRaw(data []byte) {
	c.t.Helper()
	if err := c.WS.WriteMessage(websocket.TextMessage, data); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// Message builds an envelope with payload p (nil for none).
func Message(typ, to string, p any) *wire.Envelope {
	env := &wire.Envelope{Type: typ, To: to}
	if p != nil {
		if err := env.SetPayload(p); err != nil {
			panic(err)
		}
	}
	return env
}

// Read reads and decodes the next message: decrypted with the agent's key
// (or verified with the server key when it is signed) for agents, plain
// for portals.
func (c *Conn) Read() (wire.Envelope, error) {
	_ = c.WS.SetReadDeadline(time.Now().Add(Timeout))
	for {
		mt, data, err := c.WS.ReadMessage()
		if err != nil {
			return wire.Envelope{}, err
		}
		if mt != websocket.TextMessage {
			continue
		}
		return c.decode(data)
	}
}

func (c *Conn) decode(data []byte) (wire.Envelope, error) {
	if c.Role != wire.ClientTypeAgent {
		return wire.DecodeEnvelope(data)
	}
	switch strings.Count(string(data), ".") {
	case 4:
		return wire.OpenEnvelope(data, c.Key)
	case 2:
		plain, err := wire.Verify(data, c.ServerKey)
		if err != nil {
			return wire.Envelope{}, err
		}
		return wire.DecodeEnvelope(plain)
	}
	return wire.Envelope{}, fmt.Errorf("agent received an unwrapped frame: %.200s", data)
}

// Expect reads the next message and fails unless it has type typ.
func (c *Conn) Expect(typ string) wire.Envelope {
	c.t.Helper()
	env, err := c.Read()
	// A portal is pushed a list whenever an agent of its organization comes
	// or goes; that may come before the message awaited.
	for err == nil && c.Role == wire.ClientTypePortal && typ != wire.TypeList && env.Type == wire.TypeList {
		c.t.Logf("%s: skipping a pushed list while waiting for %q", c.Role, typ)
		env, err = c.Read()
	}
	if err != nil {
		c.t.Fatalf("%s: waiting for %q: %v", c.Role, typ, err)
	}
	if env.Type != typ {
		c.t.Fatalf("%s: got %q (%+v), want %q", c.Role, env.Type, env, typ)
	}
	return env
}

// Next reads until a message of type typ arrives, skipping the lists the
// server pushes when an agent of the organization connects or leaves:
// one may arrive at any time after a portal authenticated, even for an
// agent whose auth answer came before. Any other message fails the test.
func (c *Conn) Next(typ string) wire.Envelope {
	c.t.Helper()
	return Next(c.t, c, typ)
}

// Next is c.Next failing t instead of the test that dialed c, for a
// subtest reading a connection of its parent's.
func Next(t testing.TB, c *Conn, typ string) wire.Envelope {
	t.Helper()
	for {
		env, err := c.Read()
		if err != nil {
			t.Fatalf("%s: waiting for %q: %v", c.Role, typ, err)
		}
		if env.Type == typ {
			return env
		}
		if env.Type != wire.TypeList {
			t.Fatalf("%s: got %q (%+v), want %q", c.Role, env.Type, env, typ)
		}
		t.Logf("%s: skipped a pushed list while waiting for %q", c.Role, typ)
	}
}

// ExpectClose reads until the connection closes and checks the close code
// and reason text.
func (c *Conn) ExpectClose(code int, text string) {
	c.t.Helper()
	for {
		env, err := c.Read()
		if err == nil {
			c.t.Logf("%s: message before close: %s %q", c.Role, env.Type, env.ErrorMessage)
			continue
		}
		var ce *websocket.CloseError
		if !errors.As(err, &ce) {
			c.t.Fatalf("%s: want close %d %q, got %v", c.Role, code, text, err)
		}
		if ce.Code != code || ce.Text != text {
			c.t.Fatalf("%s: closed with %d %q, want %d %q", c.Role, ce.Code, ce.Text, code, text)
		}
		return
	}
}

// AuthAgent authenticates as an agent with token and returns the result.
func (c *Conn) AuthAgent(token string) wire.AuthResult {
	c.t.Helper()
	c.Send(Message(wire.TypeAuth, "server", wire.AuthRequest{
		Token:           token,
		PublicKey:       wire.EncodePublicKey(&c.Key.PublicKey),
		ClientVersion:   "2.1.0.0",
		ProtocolVersion: wire.ProtocolVersion,
		Metadata:        map[string]*string{"machine-name": ptr("test-machine")},
	}))
	return c.authResult(wire.TypeAuth)
}

// AuthPortal authenticates as a portal with token.
func (c *Conn) AuthPortal(token string, includeSubOrgs bool) wire.AuthResult {
	c.t.Helper()
	c.Send(Message(wire.TypeAuthPortal, "MachineService", wire.AuthRequest{
		Token:           token,
		ClientVersion:   "portal-test",
		ProtocolVersion: wire.ProtocolVersion,
		IncludeSubOrgs:  includeSubOrgs,
	}))
	return c.authResult(wire.TypeAuthPortal)
}

func (c *Conn) authResult(typ string) wire.AuthResult {
	c.t.Helper()
	env := c.Expect(typ)
	var res wire.AuthResult
	if err := env.DecodePayload(&res); err != nil {
		c.t.Fatalf("auth result payload: %v", err)
	}
	return res
}

// List sends a list request and returns the agents listed. Lists the
// server pushes meanwhile (an agent connected or left) are skipped.
func (c *Conn) List() []wire.ClientRegistration {
	c.t.Helper()
	req := Message(wire.TypeList, "MachineService", nil)
	c.Send(req)
	for {
		env := c.Expect(wire.TypeList)
		if env.MessageID == req.MessageID {
			return DecodeList(c.t, env)
		}
		c.t.Logf("%s: skipped a pushed list while waiting for the answer", c.Role)
	}
}

// DecodeList decodes a list message's payload.
func DecodeList(t testing.TB, env wire.Envelope) []wire.ClientRegistration {
	t.Helper()
	if env.ErrorMessage != "" {
		t.Fatalf("list failed: %s", env.ErrorMessage)
	}
	var list []wire.ClientRegistration
	if err := env.DecodePayload(&list); err != nil {
		t.Fatalf("list payload %s: %v", env.Payload, err)
	}
	return list
}

// RawJSON returns v marshalled, for building payloads by hand.
func RawJSON(v any) json.RawMessage {
	data, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return data
}

func ptr(s string) *string { return &s }
