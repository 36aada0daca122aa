// Package portal is the client library for a Machine Services portal: it
// connects to the relay server's /portal route, authenticates with a
// portal token, lists the organization's connected agents, follows the
// lists the server pushes when agents come and go, and sends HTTP
// requests to an agent through the relay.
//
// Transport returns an http.RoundTripper, so any Go HTTP client can call
// an agent's local API:
//
//	c, err := portal.Dial(ctx, portal.Config{Server: "http://relay:8080", Token: token})
//	...
//	hc := &http.Client{Transport: c.Transport(agentID)}
//	resp, err := hc.Get("http://agent/api/v1/serverstate")
//
// The request becomes a command message (method, path and query, headers,
// base64 body); the agent's answer becomes the *http.Response. The scheme
// and host of the URL are not sent: with Transport(""), the host names
// the agent instead. Headers travel as one string per name: repeated
// values joined with ", " (Cookie with "; "), except Set-Cookie, whose
// values may hold commas and are joined with "\n" and split again, so
// every cookie of the answer arrives whole (wire.FlattenHeader).
//
// A Client is one connection; it is safe for concurrent use. The server
// pings every minute (ENVIRONMENT__PINGINTERVALSECONDS); when nothing at
// all arrives for Config.IdleTimeout, the connection is taken for dead and
// closed, so a network path that fails silently is noticed. When the
// connection ends, for that or any other reason, every waiting and later
// call fails with an error wrapping ErrClosed, Updates is closed, and a new
// Client has to be dialled. The library never logs.
package portal

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/wsauth"
	"github.com/machineservice/machineservice/wire"
)

// Defaults.
const (
	DefaultRequestTimeout   = 60 * time.Second
	DefaultHandshakeTimeout = 30 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
	// DefaultIdleTimeout is twice the server's default ping interval.
	DefaultIdleTimeout = 120 * time.Second
	// DefaultMaxMessageSize is the server's default limit on one message.
	DefaultMaxMessageSize = 1 << 20
	// DefaultClientVersion is sent as the client version.
	DefaultClientVersion = "machineservice-portal/1"
)

// Config configures a Client. Server and Token are required.
type Config struct {
	// Server is the server's base URL, http://host:port or
	// https://host:port; the client dials ws(s)://host:port/portal.
	Server string
	// Token is the portal's access token.
	Token string
	// IncludeSubOrgs asks to see the agents of the sub-organizations the
	// token grants, too.
	IncludeSubOrgs bool
	// ClientID is sent as "from"; default a new UUID.
	ClientID string
	// ClientVersion is sent in the authportal message.
	ClientVersion string

	// RequestTimeout bounds each request through the relay and each
	// list, on top of the request's own context. Default 60 s.
	RequestTimeout time.Duration
	// HandshakeTimeout bounds dialling and authenticating. Default 30 s.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds one write. Default 10 s.
	WriteTimeout time.Duration
	// IdleTimeout is how long the connection may stay silent before it
	// is taken for dead and closed. Every frame counts, the server's
	// pings too, so about twice the server's ping interval (its
	// ENVIRONMENT__PINGINTERVALSECONDS, 60 s by default) is right.
	// Default 120 s.
	IdleTimeout time.Duration
	// MaxMessageSize is the largest message the server accepts (its
	// ENVIRONMENT__MAXMESSAGESIZE); a larger request fails with
	// ErrRequestTooLarge before it is sent. Default 1 MiB.
	MaxMessageSize int
	// Dialer dials the WebSocket; nil uses a default one (which honours
	// the proxy environment variables).
	Dialer *websocket.Dialer
}

// Agent is one entry of the list of connected agents.
type Agent = wire.ClientRegistration

// Client is an authenticated portal connection.
type Client struct {
	// static after Dial
	cfg Config
	ws  *websocket.Conn

	writeMu sync.Mutex

	updates chan []Agent // owned by the read loop, which closes it
	done    chan struct{}

	mu      sync.Mutex
	pending map[string]chan wire.Envelope // by message id
	err     error                         // why the connection ended
	warning string                        // the server's last warning
}

// Dial connects to the server and authenticates. It returns an error
// wrapping ErrAuthRejected when the token is refused, and one wrapping
// ErrAuthUnavailable when the server could not have it checked (its
// controller did not answer); that one is worth retrying later.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	wsURL, err := endpoint(cfg.Server)
	if err != nil {
		return nil, err
	}
	if cfg.Token == "" {
		return nil, fmt.Errorf("%w: Token is empty", ErrInvalidConfig)
	}
	if cfg.ClientID == "" {
		cfg.ClientID = uuid.NewString()
	}
	if cfg.ClientVersion == "" {
		cfg.ClientVersion = DefaultClientVersion
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxMessageSize <= 0 {
		cfg.MaxMessageSize = DefaultMaxMessageSize
	}
	d := websocket.Dialer{Proxy: http.ProxyFromEnvironment}
	if cfg.Dialer != nil {
		d = *cfg.Dialer
	}
	d.HandshakeTimeout = cfg.HandshakeTimeout

	hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	ws, resp, err := d.DialContext(hctx, wsURL, nil)
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close() // the handshake answer has no body we need
	}
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, fmt.Errorf("portal: dial %s: %w (HTTP %s)", wsURL, err, resp.Status)
		}
		return nil, fmt.Errorf("portal: dial %s: %w", wsURL, err)
	}
	// Answers from agents are at most the server's limit after
	// decryption; pushed lists can be longer.
	ws.SetReadLimit(int64(4*cfg.MaxMessageSize) + 64<<10)
	c := &Client{
		cfg:     cfg,
		ws:      ws,
		updates: make(chan []Agent, 1),
		done:    make(chan struct{}),
		pending: map[string]chan wire.Envelope{},
	}
	stop := context.AfterFunc(hctx, func() { _ = ws.NetConn().Close() }) // unblocks the handshake reads
	err = c.handshake()
	if !stop() && err == nil {
		err = hctx.Err()
	}
	if err != nil {
		_ = ws.Close() // the handshake failed; nothing more to say
		if hctx.Err() != nil && !errors.Is(err, ErrAuthRejected) && !errors.Is(err, ErrAuthUnavailable) {
			err = fmt.Errorf("portal: connect %s: %w", cfg.Server, hctx.Err())
		}
		return nil, err
	}
	c.keepalive()
	go c.readLoop()
	return c, nil
}

// endpoint derives the WebSocket URL of /portal from the base URL.
func endpoint(server string) (string, error) {
	if server == "" {
		return "", fmt.Errorf("%w: Server is empty", ErrInvalidConfig)
	}
	wsURL, _, err := wire.Endpoint(server, wire.RoutePortal)
	if err != nil {
		return "", fmt.Errorf("%w: Server %q: %v", ErrInvalidConfig, server, err)
	}
	return wsURL, nil
}

func (c *Client) handshake() error {
	_ = c.ws.SetReadDeadline(time.Now().Add(c.cfg.HandshakeTimeout)) // an error shows on the read
	welcome, err := c.readEnvelope(false)
	if err != nil {
		return fmt.Errorf("portal: read welcome: %w", err)
	}
	if welcome.Type != wire.TypeWelcome {
		return fmt.Errorf("%w: expected a welcome, got %q", ErrProtocol, welcome.Type)
	}
	env := wire.Envelope{From: c.cfg.ClientID, To: welcome.From, Type: wire.TypeAuthPortal, MessageID: uuid.NewString()}
	if err := env.SetPayload(wire.AuthRequest{
		Token:           c.cfg.Token,
		ClientVersion:   c.cfg.ClientVersion,
		ProtocolVersion: wire.ProtocolVersion,
		IncludeSubOrgs:  c.cfg.IncludeSubOrgs,
	}); err != nil {
		return err
	}
	if err := c.write(&env); err != nil {
		return fmt.Errorf("portal: send authportal: %w", err)
	}
	for {
		ans, err := c.readEnvelope(false)
		if err != nil {
			if refused := closeRefusal(err); refused != nil {
				return refused
			}
			return fmt.Errorf("portal: read auth answer: %w", err)
		}
		switch ans.Type {
		case wire.TypeAuthPortal:
		case wire.TypePong:
			continue
		default:
			return fmt.Errorf("%w: expected the authportal answer, got %q", ErrProtocol, ans.Type)
		}
		var r wire.AuthResult
		if err := ans.DecodePayload(&r); err != nil {
			return fmt.Errorf("%w: auth answer: %v", ErrProtocol, err)
		}
		if !r.Accepted {
			return c.refusal()
		}
		return nil
	}
}

// authErrors are this package's errors for a refused authentication.
var authErrors = wsauth.Errors{Rejected: ErrAuthRejected, Unavailable: ErrAuthUnavailable}

// refusal reads the close frame that follows accepted:false and tells a
// refused token from an authentication service that is unavailable.
func (c *Client) refusal() error { return authErrors.Read(c.ws) }

// closeRefusal explains a close frame that ends an authentication, or
// gives nil for any other error.
func closeRefusal(err error) error { return authErrors.FromClose(err) }

// keepalive arms the idle timer for the read loop: the read deadline is
// pushed back by every frame, pings and pongs included. It runs before
// the read loop starts, as the handlers may not change under a read.
func (c *Client) keepalive() {
	ws := c.ws
	ws.SetPingHandler(func(data string) error {
		c.touch()
		err := ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(c.cfg.WriteTimeout))
		var ne net.Error
		if err == nil || errors.Is(err, websocket.ErrCloseSent) || (errors.As(err, &ne) && ne.Timeout()) {
			return nil // a missed pong is not fatal; the server pings again
		}
		return err
	})
	ws.SetPongHandler(func(string) error { c.touch(); return nil })
	c.touch()
}

// touch restarts the idle timer. It runs on the read loop's goroutine
// only (the ping and pong handlers run inside its reads).
func (c *Client) touch() {
	// An error means the connection is gone, which the next read reports.
	_ = c.ws.SetReadDeadline(time.Now().Add(c.cfg.IdleTimeout))
}

// readEnvelope reads the next text frame as a plain envelope; live says
// that each frame restarts the idle timer.
func (c *Client) readEnvelope(live bool) (wire.Envelope, error) {
	for {
		mt, data, err := c.ws.ReadMessage()
		if err != nil {
			return wire.Envelope{}, err
		}
		if live {
			c.touch()
		}
		if mt != websocket.TextMessage {
			continue // the protocol has text frames only
		}
		env, err := wire.DecodeEnvelope(data)
		if err != nil {
			return wire.Envelope{}, fmt.Errorf("%w: %v", ErrProtocol, err)
		}
		return env, nil
	}
}

// write sends env as the portal speaks: plain JSON, embedded payloads.
func (c *Client) write(env *wire.Envelope) error {
	data, err := env.Marshal(wire.StyleEmbedded)
	if err != nil {
		return err
	}
	if len(data) > c.cfg.MaxMessageSize {
		return fmt.Errorf("%w: %d bytes, the server takes at most %d", ErrRequestTooLarge, len(data), c.cfg.MaxMessageSize)
	}
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if err := c.ws.SetWriteDeadline(time.Now().Add(c.cfg.WriteTimeout)); err != nil {
		return err
	}
	return c.ws.WriteMessage(websocket.TextMessage, data)
}

// readLoop hands answers to the requests waiting for them and pushed
// lists to Updates.
func (c *Client) readLoop() {
	var err error
	for {
		var env wire.Envelope
		env, err = c.readEnvelope(true)
		if err != nil {
			break
		}
		if ch := c.take(env.MessageID); ch != nil {
			ch <- env
			continue
		}
		switch env.Type {
		case wire.TypeList:
			if list, lerr := decodeList(env); lerr == nil {
				c.push(list)
			}
			// A pushed list that does not decode is skipped: the next
			// push or a List call brings the state again.
		case wire.TypeWarning:
			c.mu.Lock()
			c.warning = env.ErrorMessage
			c.mu.Unlock()
		default:
			// Pongs, and answers that come after their request gave up
			// (timed out or cancelled): nobody waits for them.
		}
	}
	c.finish(err)
}

// push offers the newest list to Updates, replacing one not yet read:
// each list is the whole state, so only the latest matters.
func (c *Client) push(list []Agent) {
	for {
		select {
		case c.updates <- list:
			return
		default:
		}
		select {
		case <-c.updates:
		default:
		}
	}
}

func (c *Client) finish(err error) {
	c.mu.Lock()
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case c.err != nil:
	case c.warning != "":
		c.err = fmt.Errorf("%w: server warning %q: %v", ErrClosed, c.warning, err)
	case errors.As(err, &ce):
		c.err = fmt.Errorf("%w by the server: %d %s", ErrClosed, ce.Code, ce.Text)
	case errors.As(err, &ne) && ne.Timeout():
		c.err = &idleError{after: c.cfg.IdleTimeout}
	default:
		c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	}
	// Waiters see done closed and report c.err.
	c.pending = map[string]chan wire.Envelope{}
	c.mu.Unlock()
	close(c.updates)
	close(c.done)
	_ = c.ws.Close() // already broken or closed; the error says nothing new
}

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err says why the connection ended, or nil while it is open.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// ClientID is the id the portal is known by on the server.
func (c *Client) ClientID() string { return c.cfg.ClientID }

// Updates delivers the lists the server pushes when an agent of the
// organization connects or leaves. Only the newest unread list is kept.
// The channel is closed when the connection ends, whether it was closed
// or found dead after Config.IdleTimeout of silence; Err then says why.
// It is shared: use one reader.
func (c *Client) Updates() <-chan []Agent { return c.updates }

// Close says goodbye with a close frame and waits briefly for the
// server's answer. Requests still waiting fail with ErrClosed.
func (c *Client) Close() error {
	select {
	case <-c.done:
		return nil // the connection has ended already
	default:
	}
	c.mu.Lock()
	if c.err == nil {
		c.err = fmt.Errorf("%w: closed by the client", ErrClosed)
	}
	c.mu.Unlock()
	c.writeMu.Lock()
	err := c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	c.writeMu.Unlock()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
		_ = c.ws.NetConn().Close() // the server did not answer; cut it
		<-c.done
	}
	if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
		return fmt.Errorf("portal: close: %w", err)
	}
	return nil
}

func (c *Client) register(id string) (chan wire.Envelope, error) {
	ch := make(chan wire.Envelope, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.done:
		return nil, c.err
	default:
	}
	c.pending[id] = ch
	return ch, nil
}

func (c *Client) take(id string) chan wire.Envelope {
	if id == "" {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.pending[id]
	delete(c.pending, id)
	return ch
}

// exchange sends env and waits for the answer with the same message id.
func (c *Client) exchange(ctx context.Context, env *wire.Envelope, agent string) (wire.Envelope, error) {
	env.From = c.cfg.ClientID
	env.MessageID = uuid.NewString()
	ch, err := c.register(env.MessageID)
	if err != nil {
		return wire.Envelope{}, err
	}
	if err := c.write(env); err != nil {
		c.take(env.MessageID)
		if errors.Is(err, ErrRequestTooLarge) {
			return wire.Envelope{}, err
		}
		return wire.Envelope{}, fmt.Errorf("%w: send: %v", ErrClosed, err)
	}
	t := time.NewTimer(c.cfg.RequestTimeout)
	defer t.Stop()
	select {
	case ans := <-ch:
		return ans, nil
	case <-ctx.Done():
		c.take(env.MessageID)
		return wire.Envelope{}, ctx.Err()
	case <-t.C:
		c.take(env.MessageID)
		return wire.Envelope{}, &timeoutError{agent: agent, after: c.cfg.RequestTimeout}
	case <-c.done:
		return wire.Envelope{}, c.Err()
	}
}

// List asks for the connected agents.
func (c *Client) List(ctx context.Context) ([]Agent, error) {
	raw, err := c.ListJSON(ctx)
	if err != nil {
		return nil, err
	}
	var list []Agent
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("%w: list: %v", ErrProtocol, err)
	}
	return list, nil
}

// ListJSON asks for the connected agents and returns the JSON array as the
// server sent it.
func (c *Client) ListJSON(ctx context.Context) (json.RawMessage, error) {
	ans, err := c.exchange(ctx, &wire.Envelope{To: "MachineService", Type: wire.TypeList}, "server")
	if err != nil {
		return nil, err
	}
	if ans.ErrorMessage != "" {
		return nil, fmt.Errorf("%w: list: %s", ErrRelay, ans.ErrorMessage)
	}
	if ans.Type != wire.TypeList {
		return nil, fmt.Errorf("%w: list answered with %q", ErrProtocol, ans.Type)
	}
	return innerJSON(ans.Payload)
}

// innerJSON returns a payload's JSON, unwrapping the string style.
func innerJSON(p json.RawMessage) (json.RawMessage, error) {
	p = bytes.TrimSpace(p)
	if len(p) == 0 {
		return json.RawMessage("[]"), nil
	}
	if p[0] == '"' {
		var s string
		if err := json.Unmarshal(p, &s); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrProtocol, err)
		}
		p = json.RawMessage(strings.TrimSpace(s))
	}
	if !json.Valid(p) {
		return nil, fmt.Errorf("%w: payload is not JSON", ErrProtocol)
	}
	return p, nil
}

func decodeList(env wire.Envelope) ([]Agent, error) {
	raw, err := innerJSON(env.Payload)
	if err != nil {
		return nil, err
	}
	var list []Agent
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, err
	}
	return list, nil
}
