package server

import (
	"bytes"
	"context"
	"crypto/rsa"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// closeGrace bounds the wait for the client's close frame after ours.
const closeGrace = 2 * time.Second

// maxPendingFrames is how many frames an agent may send while its auth
// is being validated; they are discarded unread (each would cost an RSA
// decryption). One more closes the connection.
const maxPendingFrames = 3

// identity is what authentication established. It is replaced whole on
// re-authentication and never changed in place.
type identity struct {
	role              wire.ClientType
	clientID          string
	orgID             string
	orgs              []string // orgID first, then granted sub-organizations
	registeredAgentID string
	clientVersion     string
	impersonated      bool
	expires           time.Time      // zero: never
	key               *rsa.PublicKey // agents: messages to them are encrypted to it
}

type frameKind uint8

const (
	frameData frameKind = iota
	framePing
	frameClose
)

type outFrame struct {
	kind   frameKind
	data   []byte
	reason closeReason
}

// conn is one WebSocket client.
type conn struct {
	// static after construction
	srv         *Server
	ws          *websocket.Conn
	nc          *meteredConn
	role        wire.ClientType
	connID      string
	remoteIP    string
	connectedAt time.Time
	onClosed    func() // from the front middleware; nil: none

	gauge metrics.Conn // the connection's place in the connections gauge

	// set by the read loop, read by anyone
	id          atomic.Pointer[identity] // nil until authenticated
	embedded    atomic.Bool              // the client writes embedded payloads
	authPending atomic.Bool              // an agent auth awaits the controller
	authSeen    atomic.Bool              // an auth message arrived; the auth deadline no longer applies
	authRunning sync.WaitGroup           // an agent auth goroutine; teardown waits for it

	// owned by the read loop (and the frame handler it waits for)
	discarded  int  // frames discarded while the auth was pending
	drainInput bool // reading stopped with input unread; see drain

	// guarded by mu
	mu          sync.Mutex
	queue       []outFrame
	writing     bool // a writer goroutine is draining queue
	corked      bool // frames are queued but not written yet; see cork
	closing     bool
	reason      closeReason
	closeSent   chan struct{} // closed once the close frame is written or abandoned
	readExpires time.Time     // the read deadline the loop last set
}

func newConn(s *Server, ws *websocket.Conn, role wire.ClientType, remoteIP string) *conn {
	c := &conn{
		srv:         s,
		ws:          ws,
		role:        role,
		connID:      uuid.NewString(),
		remoteIP:    remoteIP,
		connectedAt: time.Now(),
	}
	c.nc, _ = ws.NetConn().(*meteredConn)
	if c.nc == nil {
		// Not accepted through Serve (a test's own listener): meter a
		// wrapper that sees no traffic, so accounting code stays simple.
		c.nc = &meteredConn{Conn: ws.NetConn()}
	}
	return c
}

func (c *conn) identity() *identity { return c.id.Load() }

func (c *conn) style() wire.Style {
	if c.embedded.Load() {
		return wire.StyleEmbedded
	}
	return wire.StyleString
}

// logger returns the server logger with this connection's attributes.
func (c *conn) logger() *slog.Logger {
	attrs := []any{"conn", c.connID, "role", c.role.String(), "remote", c.remoteIP}
	if id := c.identity(); id != nil {
		attrs = append(attrs, "client", id.clientID, "org", id.orgID)
	}
	return c.srv.log.With(attrs...)
}

// run is the read loop. It owns the connection's lifetime.
func (c *conn) run() {
	s := c.srv
	defer s.readers.Done()
	s.stats.Opened()
	s.metrics.Opened(&c.gauge, c.role)
	s.hub.add(c)
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()

	c.nc.limit.Store(c.nc.in.Load() + int64(s.cfg.MaxBytesBeforeAuth))
	_ = c.nc.SetWriteDeadline(time.Time{}) // the HTTP server's deadline no longer applies
	// Socket deadlines use the real clock; s.now is for token expiry.
	c.setReadDeadline(time.Now().Add(s.cfg.AuthTimeout))
	c.ws.SetPingHandler(func(data string) error {
		c.extendReadDeadline()
		err := c.ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(s.cfg.WriteTimeout))
		if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil // a missed pong is not fatal
			}
			return err
		}
		return nil
	})
	c.ws.SetPongHandler(func(string) error {
		c.extendReadDeadline()
		return nil
	})
	c.logger().Debug("connection opened")
	c.sendWelcome()
	if closing {
		c.close(reasonShuttingDown)
	}

	for {
		mt, r, err := c.ws.NextReader()
		if err != nil {
			c.readFailed(err)
			break
		}
		data, err := readMessage(r, s.cfg.MaxMessageSize)
		if err != nil {
			if errors.Is(err, errMessageTooLarge) {
				c.close(reasonMessageTooLarge)
				continue
			}
			c.readFailed(err)
			break
		}
		c.extendReadDeadline()
		if c.isClosing() {
			continue // after our close frame nothing more is handled
		}
		s.stats.MessageReceived()
		if mt != websocket.TextMessage {
			s.stats.Inc(stats.MessagesIgnored)
			c.logger().Debug("binary frame ignored", "bytes", len(data))
			continue
		}
		c.dispatch(data)
	}
	c.teardown()
}

// dispatch handles one frame on a goroutine of its own and waits for it.
// Decryption and handling need deep stacks; keeping them off the read
// loop's goroutine lets its stack stay small while it waits, idle, for
// the next frame, which is where a connection spends its life. Frames are
// still handled one at a time, in order.
func (c *conn) dispatch(data []byte) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.handleFrame(data)
	}()
	<-done
}

var errMessageTooLarge = errors.New("message too large")

func readMessage(r io.Reader, limit int) ([]byte, error) {
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		return nil, err
	}
	if n > int64(limit) {
		return nil, errMessageTooLarge
	}
	return buf.Bytes(), nil
}

// readFailed turns the read loop's final error into a close reason.
func (c *conn) readFailed(err error) {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case c.isClosing():
		// We closed first; this is the client's answer or the grace
		// deadline.
	case errors.Is(err, errPreAuthBudget):
		c.close(reasonPreAuthBudget)
		c.drainInput = true
	case errors.As(err, &ce):
		c.close(reasonClientClosed)
	case errors.As(err, &ne) && ne.Timeout():
		if c.authSeen.Load() {
			c.close(reasonIdleTimeout)
		} else {
			c.close(reasonAuthTimeout)
		}
	default:
		c.close(reasonConnectionLost)
	}
}

func (c *conn) setReadDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	c.readExpires = t
	_ = c.ws.SetReadDeadline(t) // fails only on a closed socket, which the read loop sees
}

// extendReadDeadline restarts the idle timer once the auth message has
// arrived; before that the auth deadline stands.
func (c *conn) extendReadDeadline() {
	if !c.authSeen.Load() && c.identity() == nil {
		return
	}
	c.setReadDeadline(time.Now().Add(2 * c.srv.cfg.PingInterval))
}

func (c *conn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// sendWelcome greets the client, always in plain text.
func (c *conn) sendWelcome() {
	s := c.srv
	env := wire.Envelope{From: s.cfg.InstanceID, To: "unknown client", Type: wire.TypeWelcome, MessageID: uuid.NewString()}
	_ = env.SetPayload(wire.Welcome{ // a fixed struct always marshals
		PublicKeyHash:             s.keyHash,
		MachineName:               s.cfg.MachineName,
		ServerVersion:             s.version,
		SupportedProtocolVersions: wire.SupportedProtocolVersions,
	})
	data, err := env.Marshal(wire.StyleString)
	if err != nil {
		c.logger().Error("encoding the welcome failed", "err", err)
		c.close(reasonWriteFailed)
		return
	}
	c.enqueue(outFrame{kind: frameData, data: data}, false)
}

// send encodes env for this client and queues it: plain for portals,
// encrypted to the agent's key for authenticated agents, and signed with
// the server key for an agent whose key is not known. It reports false
// when the connection is closing or has fallen behind.
func (c *conn) send(env *wire.Envelope) bool {
	var key *rsa.PublicKey
	if id := c.identity(); id != nil {
		key = id.key
	}
	return c.sendTo(env, key)
}

// sendTo is send with an explicit agent key, for the answer to an agent
// auth that is not (yet) accepted.
func (c *conn) sendTo(env *wire.Envelope, key *rsa.PublicKey) bool {
	data, err := env.Marshal(c.style())
	if err != nil {
		c.logger().Error("encoding a message failed", "type", env.Type, "err", err)
		return false
	}
	if c.role == wire.ClientTypeAgent {
		var token string
		if key != nil {
			token, err = wire.Encrypt(data, key)
		} else {
			token, err = wire.Sign(data, c.srv.key)
		}
		if err != nil {
			c.logger().Error("wrapping a message failed", "type", env.Type, "err", err)
			return false
		}
		data = []byte(token)
	}
	return c.enqueue(outFrame{kind: frameData, data: data}, false)
}

// enqueue adds a frame to the send queue and starts a writer when none
// runs. A full queue closes the connection: a client that cannot keep up
// never stalls its sender.
func (c *conn) enqueue(f outFrame, force bool) bool {
	c.mu.Lock()
	if c.closing && !force {
		c.mu.Unlock()
		return false
	}
	if !force && len(c.queue) >= c.srv.cfg.SendQueueLength {
		c.mu.Unlock()
		c.close(reasonSlowConsumer)
		return false
	}
	c.queue = append(c.queue, f)
	if !c.writing && !c.corked {
		c.writing = true
		go c.writeLoop()
	}
	c.mu.Unlock()
	return true
}

// cork holds queued frames back until uncork, so that what is queued
// meanwhile goes out together, in order, once the connection is ready.
func (c *conn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork writes what cork held back.
func (c *conn) uncork() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	if len(c.queue) > 0 && !c.writing {
		c.writing = true
		go c.writeLoop()
	}
}

// writeLoop drains the queue and exits when it is empty, so an idle
// connection has no writer goroutine.
func (c *conn) writeLoop() {
	s := c.srv
	for {
		c.mu.Lock()
		if len(c.queue) == 0 {
			c.writing = false
			c.queue = nil
			c.mu.Unlock()
			return
		}
		if c.corked {
			c.writing = false // uncork starts a writer again
			c.mu.Unlock()
			return
		}
		f := c.queue[0]
		c.queue[0] = outFrame{}
		c.queue = c.queue[1:]
		c.mu.Unlock()

		deadline := time.Now().Add(s.cfg.WriteTimeout)
		var err error
		switch f.kind {
		case frameData:
			if err = c.ws.SetWriteDeadline(deadline); err == nil {
				err = c.ws.WriteMessage(websocket.TextMessage, f.data)
			}
		case framePing:
			err = c.ws.WriteControl(websocket.PingMessage, nil, deadline)
		case frameClose:
			info := reasons[f.reason]
			err = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(info.code, info.text), deadline)
			c.closeWritten()
		}
		if err != nil {
			if !errors.Is(err, websocket.ErrCloseSent) {
				c.close(reasonWriteFailed)
			}
			c.abort()
			c.mu.Lock()
			c.queue = nil
			c.writing = false
			c.mu.Unlock()
			c.closeWritten()
			return
		}
	}
}

// closeWritten marks the close frame as sent (or abandoned) and gives the
// client closeGrace to answer it.
func (c *conn) closeWritten() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeSent != nil {
		select {
		case <-c.closeSent:
		default:
			close(c.closeSent)
		}
	}
	_ = c.ws.SetReadDeadline(time.Now().Add(closeGrace)) // see setReadDeadline
}

// close starts closing the connection for reason r: pending messages are
// still written, then a close frame when r calls for one. The first reason
// wins. It never blocks.
func (c *conn) close(r closeReason) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	c.closing = true
	c.reason = r
	c.closeSent = make(chan struct{})
	info := reasons[r]
	c.mu.Unlock()

	switch {
	case r == reasonSlowConsumer:
		// The client is not reading: a close frame would wait behind the
		// queue. Cut the connection.
		c.abort()
		c.markCloseSent()
	case info.code != 0:
		c.enqueue(outFrame{kind: frameClose, reason: r}, true)
	default:
		c.markCloseSent()
		if r != reasonClientClosed {
			c.abort()
		}
	}
}

func (c *conn) markCloseSent() {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closeSent:
	default:
		close(c.closeSent)
	}
}

// abort cuts the TCP connection; the read loop then ends.
func (c *conn) abort() {
	_ = c.nc.SetDeadline(time.Now()) // unblocks a writer stuck on a slow client
	_ = c.ws.NetConn().Close()       // errors only if already closed
}

// maxDrain bounds what drain reads.
const maxDrain = 1 << 20

// drain reads and drops what the client still sends, for closeGrace at
// most: closing a socket with unread input resets the connection, and the
// client would lose the close frame that tells it why.
func (c *conn) drain() {
	_ = c.nc.SetReadDeadline(time.Now().Add(closeGrace))            // a closed socket ends the copy at once
	_, _ = io.Copy(io.Discard, io.LimitReader(c.nc.Conn, maxDrain)) // ends on EOF, the deadline or the limit
}

// teardown runs once, at the end of the read loop.
func (c *conn) teardown() {
	s := c.srv
	c.mu.Lock()
	sent := c.closeSent
	reason := c.reason
	c.mu.Unlock()
	if sent != nil {
		select {
		case <-sent:
		case <-time.After(s.cfg.WriteTimeout):
		}
	}
	if c.drainInput {
		c.drain()
	}
	c.abort()
	// An agent auth still running would index and register the connection
	// after it is removed below; it ends within the controller timeout.
	c.authRunning.Wait()

	id := c.identity()
	s.hub.remove(c, id)
	s.pending.dropConn(c)
	s.relayTimes.dropConn(c)
	if id != nil {
		c.unregister(id)
	}
	s.stats.Closed(reason.String())
	s.metrics.Closed(&c.gauge, reason.String())
	if c.onClosed != nil {
		c.onClosed()
	}
	lvl := slog.LevelInfo
	if reason == reasonClientClosed || reason == reasonShuttingDown {
		lvl = slog.LevelDebug
	}
	c.logger().Log(context.Background(), lvl, "connection closed",
		"reason", reason.String(),
		"bytes_in", c.nc.in.Load(),
		"bytes_out", c.nc.out.Load(),
		"duration", time.Since(c.connectedAt).Round(time.Millisecond).String())
}
