package agent

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/wsauth"
	"github.com/machineservice/machineservice/wire"
)

// closeGrace bounds the wait for the server's answer to our close frame.
const closeGrace = time.Second

// Run connects and stays connected until ctx ends, reconnecting after
// every drop. It returns ctx's error once ctx ends (after closing the
// connection with a close frame and waiting for the handlers), or
// ErrRunning when another Run of a is going.
func (a *Agent) Run(ctx context.Context) error {
	a.mu.Lock()
	if a.running {
		a.mu.Unlock()
		return ErrRunning
	}
	a.running = true
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.running = false
		a.mu.Unlock()
	}()

	failures := 0
	for {
		a.emit(Event{State: Connecting})
		res := a.session(ctx)
		if ctx.Err() != nil {
			a.emit(Event{State: Stopped, Err: ctx.Err(), ServerKeyHash: res.keyHash})
			return ctx.Err()
		}
		// Only a connection that lasted resets the backoff, so a server
		// that accepts and then drops the agent at once is not hammered.
		if res.authenticated && res.lasted >= a.cfg.MaxBackoff {
			failures = 0
		}
		failures++
		state, wait := Disconnected, a.backoff(failures)
		if errors.Is(res.err, ErrAuthRejected) {
			// The token may be re-issued, so the agent keeps trying;
			// sooner than at the cap would only load the controller
			// with a token it has refused.
			state, wait = Rejected, jitter(a.cfg.MaxBackoff)
		}
		if d := time.Until(res.pauseUntil); d > wait {
			wait = d
		}
		a.emit(Event{State: state, Err: res.err, RetryIn: wait, Attempt: failures, ServerKeyHash: res.keyHash})
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			a.emit(Event{State: Stopped, Err: ctx.Err()})
			return ctx.Err()
		case <-t.C:
		}
	}
}

type sessionResult struct {
	err           error
	keyHash       string
	authenticated bool
	lasted        time.Duration // how long it was authenticated
	pauseUntil    time.Time
}

// session is one connection.
type session struct {
	// static after dial
	a  *Agent
	ws *websocket.Conn

	// set during the handshake, read-only after
	welcome   wire.Envelope
	serverKey *rsa.PublicKey

	// ctx ends when the connection ends; handlers run under it
	ctx    context.Context
	cancel context.CancelFunc

	stopping atomic.Bool   // Run's ctx ended; the close frame is sent
	admitted chan struct{} // commands accepted, running or waiting
	running  chan struct{} // commands running
	handlers sync.WaitGroup

	writeMu sync.Mutex

	mu      sync.Mutex
	failErr error     // why the session was cut from outside the read loop
	pause   time.Time // from a control answer
}

func (a *Agent) session(ctx context.Context) (res sessionResult) {
	dctx, cancel := context.WithTimeout(ctx, a.cfg.HandshakeTimeout)
	ws, resp, err := a.dialer.DialContext(dctx, a.wsURL, nil)
	cancel()
	if resp != nil && resp.Body != nil {
		_ = resp.Body.Close() // the handshake answer has no body we need
	}
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return sessionResult{err: fmt.Errorf("dial %s: %w (HTTP %s)", a.wsURL, err, resp.Status)}
		}
		return sessionResult{err: fmt.Errorf("dial %s: %w", a.wsURL, err)}
	}
	s := &session{a: a, ws: ws,
		admitted: make(chan struct{}, 8*a.cfg.MaxConcurrent),
		running:  make(chan struct{}, a.cfg.MaxConcurrent)}
	s.ctx, s.cancel = context.WithCancel(ctx)
	defer func() {
		s.cancel()
		_ = ws.Close() // the connection is done with; its error says nothing new
		s.handlers.Wait()
	}()
	ws.SetReadLimit(int64(2*a.cfg.MaxMessageSize) + 64<<10)
	stop := context.AfterFunc(ctx, s.stop)
	defer stop()

	_ = ws.SetReadDeadline(time.Now().Add(a.cfg.HandshakeTimeout)) // an error shows on the next read
	res.keyHash, err = s.readWelcome(ctx)
	if err == nil {
		err = s.authenticate()
	}
	if err != nil {
		res.err = s.result(err)
		return res
	}
	res.authenticated = true
	since := time.Now()
	a.emit(Event{State: Connected, ServerKeyHash: res.keyHash})
	err = s.serve()
	res.lasted = time.Since(since)
	res.err = s.result(err)
	s.mu.Lock()
	res.pauseUntil = s.pause
	s.mu.Unlock()
	return res
}

// result prefers the reason the session was cut over the read error it
// caused.
func (s *session) result(err error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failErr != nil {
		return s.failErr
	}
	return err
}

// stop runs when Run's ctx ends: it says goodbye with a close frame and
// gives the server closeGrace to answer it.
func (s *session) stop() {
	s.stopping.Store(true)
	_ = s.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, "agent stopping"), time.Now().Add(closeGrace))
	_ = s.ws.SetReadDeadline(time.Now().Add(closeGrace)) // see touch
}

// fail cuts the session from outside the read loop; the first reason
// wins.
func (s *session) fail(err error, closeText string) {
	s.mu.Lock()
	first := s.failErr == nil
	if first {
		s.failErr = err
	}
	s.mu.Unlock()
	if !first {
		return
	}
	if closeText != "" {
		_ = s.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, closeText), time.Now().Add(closeGrace))
	}
	_ = s.ws.NetConn().Close() // ends the read loop; an error means it is closed already
}

// touch restarts the idle timer; it runs on every frame received.
func (s *session) touch() {
	if s.stopping.Load() {
		return
	}
	// An error means the connection is gone, which the next read reports.
	_ = s.ws.SetReadDeadline(time.Now().Add(s.a.cfg.IdleTimeout))
}

// readErr explains why a read ended.
func (s *session) readErr(err error, phase string) error {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &ce):
		return fmt.Errorf("connection closed by the server: %w", err)
	case errors.As(err, &ne) && ne.Timeout():
		if phase == "" {
			return fmt.Errorf("%w (%s)", ErrIdleTimeout, s.a.cfg.IdleTimeout)
		}
		return fmt.Errorf("%s: timed out after %s", phase, s.a.cfg.HandshakeTimeout)
	}
	if phase == "" {
		return fmt.Errorf("read: %w", err)
	}
	return fmt.Errorf("%s: %w", phase, err)
}

func (s *session) readWelcome(ctx context.Context) (string, error) {
	mt, data, err := s.ws.ReadMessage()
	if err != nil {
		return "", s.readErr(err, "read welcome")
	}
	if mt != websocket.TextMessage {
		return "", fmt.Errorf("%w: the welcome is not a text frame", ErrProtocol)
	}
	env, err := wire.DecodeEnvelope(data)
	if err != nil {
		return "", fmt.Errorf("%w: welcome: %v", ErrProtocol, err)
	}
	if env.Type != wire.TypeWelcome {
		return "", fmt.Errorf("%w: expected a welcome, got %q", ErrProtocol, env.Type)
	}
	var w wire.Welcome
	if err := env.DecodePayload(&w); err != nil {
		return "", fmt.Errorf("%w: welcome: %v", ErrProtocol, err)
	}
	if w.PublicKeyHash == "" {
		return "", fmt.Errorf("%w: the welcome names no server key", ErrProtocol)
	}
	if len(w.SupportedProtocolVersions) > 0 && !slices.Contains(w.SupportedProtocolVersions, wire.ProtocolVersion) {
		return w.PublicKeyHash, fmt.Errorf("%w: the server speaks protocol versions %v, this agent %d", ErrProtocol, w.SupportedProtocolVersions, wire.ProtocolVersion)
	}
	key := s.a.certs.find(w.PublicKeyHash)
	if key == nil {
		if err := s.a.certs.refresh(ctx); err != nil {
			return w.PublicKeyHash, fmt.Errorf("server key %s is unknown: %w", w.PublicKeyHash, err)
		}
		if key = s.a.certs.find(w.PublicKeyHash); key == nil {
			return w.PublicKeyHash, fmt.Errorf("%w: %s, not in %s", ErrUnknownServerKey, w.PublicKeyHash, s.a.certs.url)
		}
	}
	s.welcome = env
	s.serverKey = key
	return w.PublicKeyHash, nil
}

func (s *session) authenticate() error {
	a := s.a
	env := wire.Envelope{From: a.cfg.ClientID, To: s.welcome.From, Type: wire.TypeAuth, MessageID: s.welcome.MessageID}
	data, err := s.seal(&env, wire.AuthRequest{
		Token:           a.Token(),
		PublicKey:       a.pubPEM,
		ClientVersion:   a.cfg.ClientVersion,
		ProtocolVersion: wire.ProtocolVersion,
		Metadata:        a.metadata(),
	})
	if err != nil {
		return err
	}
	if err := s.write(data); err != nil {
		return fmt.Errorf("send auth: %w", err)
	}
	ans, err := s.read("read auth answer")
	if err != nil {
		if refused := closeRefusal(err); refused != nil {
			return refused
		}
		return err
	}
	switch ans.Type {
	case wire.TypeAuth:
	case wire.TypeWarning:
		return fmt.Errorf("%w: %s", ErrServerWarning, ans.ErrorMessage)
	default:
		return fmt.Errorf("%w: expected the auth answer, got %q", ErrProtocol, ans.Type)
	}
	var r wire.AuthResult
	if err := ans.DecodePayload(&r); err != nil {
		return fmt.Errorf("%w: auth answer: %v", ErrProtocol, err)
	}
	if !r.Accepted {
		return s.refusal()
	}
	if r.WillReplaceToken && r.NewToken != nil && *r.NewToken != "" {
		a.setToken(*r.NewToken)
		if a.cfg.OnToken != nil {
			a.cfg.OnToken(*r.NewToken)
		}
	}
	return nil
}

// authErrors are this package's errors for a refused authentication.
var authErrors = wsauth.Errors{Rejected: ErrAuthRejected, Unavailable: ErrAuthUnavailable}

// refusal reads the close frame that follows accepted:false and tells a
// refused token from an authentication service that is unavailable.
func (s *session) refusal() error { return authErrors.Read(s.ws) }

// closeRefusal explains a close frame that ends an authentication, or
// gives nil for any other error.
func closeRefusal(err error) error { return authErrors.FromClose(err) }

// read reads the next message: a JWE to the agent's key, or a JWS signed
// by the server key (what the server sends an agent whose key it does not
// hold). phase is empty once authenticated.
func (s *session) read(phase string) (wire.Envelope, error) {
	for {
		mt, data, err := s.ws.ReadMessage()
		if err != nil {
			return wire.Envelope{}, s.readErr(err, phase)
		}
		s.touchIf(phase)
		if mt != websocket.TextMessage {
			continue // the protocol has text frames only; binary ones mean nothing
		}
		var env wire.Envelope
		if strings.Count(string(data), ".") == 2 {
			var plain []byte
			if plain, err = wire.Verify(data, s.serverKey); err == nil {
				env, err = wire.DecodeEnvelope(plain)
			}
		} else {
			env, err = wire.OpenEnvelope(data, s.a.key)
		}
		if err != nil {
			return wire.Envelope{}, fmt.Errorf("%w: undecodable message: %v", ErrProtocol, err)
		}
		return env, nil
	}
}

func (s *session) touchIf(phase string) {
	if phase == "" {
		s.touch()
	}
}

// seal encodes env with payload v for the server.
func (s *session) seal(env *wire.Envelope, v any) ([]byte, error) {
	if err := env.SetPayload(v); err != nil {
		return nil, err
	}
	data, err := wire.SealEnvelope(env, wire.StyleString, s.serverKey)
	if err != nil {
		return nil, fmt.Errorf("encrypt %s: %w", env.Type, err)
	}
	return data, nil
}

func (s *session) write(data []byte) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.ws.SetWriteDeadline(time.Now().Add(s.a.cfg.WriteTimeout)); err != nil {
		return err
	}
	return s.ws.WriteMessage(websocket.TextMessage, data)
}

// serve is the authenticated read loop.
func (s *session) serve() error {
	ws := s.ws
	ws.SetPingHandler(func(data string) error {
		s.touch()
		err := ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(s.a.cfg.WriteTimeout))
		var ne net.Error
		if err == nil || errors.Is(err, websocket.ErrCloseSent) || (errors.As(err, &ne) && ne.Timeout()) {
			return nil // a missed pong is not fatal
		}
		return err
	})
	ws.SetPongHandler(func(string) error { s.touch(); return nil })
	s.touch()
	s.handlers.Add(1)
	go s.pingLoop()

	for {
		env, err := s.read("")
		if err != nil {
			if s.stopping.Load() {
				return context.Canceled
			}
			if errors.Is(err, ErrProtocol) {
				s.fail(err, "Unexpected message")
			}
			return err
		}
		switch env.Type {
		case wire.TypePong:
		case wire.TypeCommand:
			s.dispatch(env, s.handleCommand, s.busyCommand)
		case wire.TypeControl:
			s.dispatch(env, s.handleControl, s.busyControl)
		case wire.TypeWarning:
			err := fmt.Errorf("%w: %s", ErrServerWarning, env.ErrorMessage)
			s.fail(err, "")
			return err
		default:
			// As the Duplicati agent: an unexpected message ends the
			// connection, and the next one starts afresh.
			err := fmt.Errorf("%w: unexpected message of type %q", ErrProtocol, env.Type)
			s.fail(err, "Unexpected message")
			return err
		}
	}
}

func (s *session) pingLoop() {
	defer s.handlers.Done()
	t := time.NewTicker(s.a.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		env := wire.Envelope{From: s.a.cfg.ClientID, To: "server", Type: wire.TypePing, MessageID: uuid.NewString()}
		data, err := wire.SealEnvelope(&env, wire.StyleString, s.serverKey)
		if err == nil {
			err = s.write(data)
		}
		if err != nil {
			s.fail(fmt.Errorf("send ping: %w", err), "")
			return
		}
	}
}

// dispatch runs handle in a goroutine of its own. At most MaxConcurrent
// run at once and as many again times seven wait their turn; beyond that
// the command is answered busy at once.
func (s *session) dispatch(env wire.Envelope, handle, busy func(wire.Envelope)) {
	select {
	case s.admitted <- struct{}{}:
	default:
		busy(env)
		return
	}
	s.handlers.Add(1)
	go func() {
		defer s.handlers.Done()
		defer func() { <-s.admitted }()
		select {
		case s.running <- struct{}{}:
		case <-s.ctx.Done():
			return // the connection is gone; the answer could not be sent
		}
		defer func() { <-s.running }()
		handle(env)
	}()
}

func (s *session) busyCommand(env wire.Envelope) {
	s.answerCommand(env, textResponse(http.StatusServiceUnavailable,
		fmt.Sprintf("agent busy: %d requests in progress or waiting", cap(s.admitted))))
}

func (s *session) busyControl(env wire.Envelope) {
	s.answerControl(env, &ControlResponse{ErrorMessage: fmt.Sprintf("agent busy: %d requests in progress or waiting", cap(s.admitted))})
}

func (s *session) handleCommand(env wire.Envelope) {
	req, bad := decodeCommand(env)
	resp := bad
	if resp == nil {
		h := s.a.cfg.Handler
		if h == nil {
			resp = textResponse(http.StatusNotImplemented, "this agent has no command handler")
		} else {
			ctx, cancel := context.WithTimeout(s.ctx, s.a.cfg.CommandTimeout)
			resp = h.ServeCommand(ctx, req)
			cancel()
			if resp == nil {
				resp = textResponse(http.StatusInternalServerError, "the agent's handler gave no response")
			}
		}
	}
	s.answerCommand(env, resp)
}

func decodeCommand(env wire.Envelope) (*Request, *Response) {
	var c wire.CommandRequest
	if err := env.DecodePayload(&c); err != nil {
		return nil, textResponse(http.StatusBadRequest, fmt.Sprintf("invalid command payload: %v", err))
	}
	req := &Request{
		Method:    c.Method,
		Path:      c.Path,
		Header:    wire.UnflattenHeader(c.Headers),
		From:      env.From,
		MessageID: env.MessageID,
		Payload:   env.Payload,
	}
	if c.Body != nil && *c.Body != "" {
		body, err := base64.StdEncoding.DecodeString(*c.Body)
		if err != nil {
			return nil, textResponse(http.StatusBadRequest, fmt.Sprintf("invalid command body: not base64: %v", err))
		}
		req.Body = body
	}
	return req, nil
}

func commandPayload(r *Response) wire.CommandResponse {
	body := base64.StdEncoding.EncodeToString(r.Body)
	return wire.CommandResponse{StatusCode: r.StatusCode, Body: &body, Headers: wire.FlattenHeader(r.Header)}
}

// answerCommand sends a command's answer back to the portal that sent it.
// An answer too large for the server is replaced by a 502 that says so,
// rather than letting the server close the connection over it.
func (s *session) answerCommand(env wire.Envelope, r *Response) {
	out := wire.Envelope{From: s.a.cfg.ClientID, To: env.From, Type: wire.TypeCommand, MessageID: env.MessageID}
	data, err := s.seal(&out, commandPayload(r))
	if err == nil && len(data) > s.a.cfg.MaxMessageSize {
		msg := fmt.Sprintf("the response is too large to relay: %d bytes encrypted, the server takes at most %d (a body of about %d bytes)",
			len(data), s.a.cfg.MaxMessageSize, s.a.cfg.MaxMessageSize*9/16-2048)
		data, err = s.seal(&out, commandPayload(textResponse(http.StatusBadGateway, msg)))
	}
	s.send(data, err)
}

// send writes an answer; a failure ends the session, since the
// connection can no longer be trusted to carry answers.
func (s *session) send(data []byte, err error) {
	if err == nil {
		err = s.write(data)
	}
	if err != nil && s.ctx.Err() == nil {
		s.fail(fmt.Errorf("send answer: %w", err), "")
	}
}

func (s *session) handleControl(env wire.Envelope) {
	var c wire.ControlRequest
	var resp *ControlResponse
	switch err := env.DecodePayload(&c); {
	case err != nil:
		resp = &ControlResponse{ErrorMessage: fmt.Sprintf("invalid control payload: %v", err)}
	case s.a.cfg.Control == nil:
		resp = &ControlResponse{ErrorMessage: "this agent does not handle control requests"}
	default:
		ctx, cancel := context.WithTimeout(s.ctx, s.a.cfg.CommandTimeout)
		resp = s.a.cfg.Control.HandleControl(ctx, &ControlRequest{Command: c.Command, Parameters: c.Parameters, MessageID: env.MessageID})
		cancel()
		if resp == nil {
			resp = &ControlResponse{ErrorMessage: "the agent's control handler gave no response"}
		}
	}
	s.answerControl(env, resp)
	if resp.PauseUntil.After(time.Now()) {
		s.mu.Lock()
		s.pause = resp.PauseUntil
		s.mu.Unlock()
		s.fail(fmt.Errorf("%w until %s", ErrDisconnectRequested, resp.PauseUntil.Format(time.RFC3339)), "Disconnect requested")
	}
}

func (s *session) answerControl(env wire.Envelope, r *ControlResponse) {
	out := wire.Envelope{From: s.a.cfg.ClientID, To: env.From, Type: wire.TypeControl, MessageID: env.MessageID}
	p := wire.ControlResponse{Success: r.Success, Output: r.Output}
	if p.Output == nil {
		p.Output = map[string]*string{}
	}
	if r.ErrorMessage != "" {
		p.ErrorMessage = &r.ErrorMessage
	}
	data, err := s.seal(&out, p)
	s.send(data, err)
}
