// Package server is the Machine Services relay: the HTTP routes, the
// WebSocket connections of agents and portals, authentication through the
// controller, the relay of command and control messages, and shutdown.
package server

import (
	"context"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// Deps are the parts a Server works with.
type Deps struct {
	Key         *rsa.PrivateKey
	KeyObtained time.Time
	KeyExpires  time.Time
	Controller  controller.Controller
	Registry    registry.Registry
	Events      bus.Publisher
	Remote      Remote // the other instances, over the bus; nil when stand-alone
	Stats       *stats.Stats
	Logger      *slog.Logger
	Version     string
	// Now is the clock for token expiry and control staleness; nil means
	// time.Now.
	Now func() time.Time

	// Metrics, when set, receives the connection gauge, close reasons and
	// round-trip times (the counters arrive through Stats' observer).
	Metrics *metrics.Metrics
	// Middleware, when set, wraps the HTTP handler: the protection rules.
	Middleware func(http.Handler) http.Handler
}

// Server is one Machine Services instance.
type Server struct {
	// static after New
	cfg        *config.Config
	key        *rsa.PrivateKey
	keyHash    string
	keyExpires time.Time
	certs      []byte // the /certificates answer
	ctrl       controller.Controller
	reg        registry.Registry
	events     bus.Publisher
	remote     Remote // nil: no other instances
	stats      *stats.Stats
	log        *slog.Logger
	version    string
	now        func() time.Time
	metrics    *metrics.Metrics
	upgrader   websocket.Upgrader
	http       *http.Server

	// ctx ends when shutdown starts; it bounds controller and registry
	// calls.
	ctx    context.Context
	cancel context.CancelFunc
	// authCtx ends when shutdown starts, so that no connection waits on
	// the controller then; ctx (registry and bus calls) ends after the
	// connections have been unregistered.
	authCtx    context.Context
	authCancel context.CancelFunc

	listMu  sync.Mutex
	listDue map[string]bool // organizations with a list push on its way

	hub     hub
	pending pendingControls
	readers sync.WaitGroup // one per open connection

	relayTimes relayTimes // commands awaiting their answer, for the relay histogram

	mu       sync.Mutex
	serving  bool
	closing  bool
	shutdown chan struct{} // closed when Shutdown starts
}

// New builds a server. It does not listen yet.
func New(cfg *config.Config, d Deps) (*Server, error) {
	if d.Key == nil {
		return nil, errors.New("server: no key")
	}
	if d.Controller == nil {
		d.Controller = controller.None{}
	}
	if d.Registry == nil {
		d.Registry = registry.NewMemory(0, d.Now)
	}
	if d.Events == nil {
		d.Events = bus.NewLocal(d.Logger)
	}
	if d.Stats == nil {
		d.Stats = stats.New()
	}
	if d.Logger == nil {
		d.Logger = slog.New(slog.DiscardHandler)
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	if d.Version == "" {
		d.Version = "dev"
	}
	certs, err := json.Marshal([]wire.Certificate{{
		PublicKeyHash: wire.PublicKeyHash(&d.Key.PublicKey),
		PublicKey:     wire.EncodePublicKey(&d.Key.PublicKey),
		Obtained:      d.KeyObtained.UTC(),
		Expiry:        d.KeyExpires.UTC(),
	}})
	if err != nil {
		return nil, fmt.Errorf("server: certificates: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	authCtx, authCancel := context.WithCancel(ctx)
	s := &Server{
		cfg:        cfg,
		key:        d.Key,
		keyHash:    wire.PublicKeyHash(&d.Key.PublicKey),
		keyExpires: d.KeyExpires.UTC(),
		certs:      certs,
		ctrl:       d.Controller,
		reg:        d.Registry,
		events:     d.Events,
		remote:     d.Remote,
		stats:      d.Stats,
		log:        d.Logger,
		version:    d.Version,
		now:        d.Now,
		metrics:    d.Metrics,
		ctx:        ctx,
		authCtx:    authCtx,
		authCancel: authCancel,
		listDue:    map[string]bool{},
		cancel:     cancel,
		shutdown:   make(chan struct{}),
	}
	s.hub.init()
	s.pending.init()
	s.upgrader = websocket.Upgrader{
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   cfg.ReceiveBufferSize,
		WriteBufferSize:  4096,
		WriteBufferPool:  &sync.Pool{},
		// Origins are not restricted: agents are native clients and
		// portals authenticate with a token.
		CheckOrigin: func(*http.Request) bool { return true },
		Error: func(w http.ResponseWriter, _ *http.Request, status int, reason error) {
			http.Error(w, reason.Error(), status)
		},
	}
	var handler http.Handler = s
	if d.Middleware != nil {
		handler = d.Middleware(s)
	}
	s.http = &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(d.Logger.Handler(), slog.LevelDebug),
	}
	return s, nil
}

// InstanceID returns this instance's id.
func (s *Server) InstanceID() string { return s.cfg.InstanceID }

// Stats returns the server's counters.
func (s *Server) Stats() *stats.Stats { return s.stats }

// ServeHTTP answers the HTTP routes and upgrades /agent and /portal.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch strings.ToLower(r.URL.Path) {
	case "/":
		if s.cfg.RedirectURL == "" {
			http.NotFound(w, r)
			return
		}
		http.Redirect(w, r, s.cfg.RedirectURL, http.StatusFound)
	case "/health":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("OK\n")) // a failed write means the client left
	case "/certificates":
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "max-age=300")
		_, _ = w.Write(s.certs)
	case "/agent":
		s.accept(w, r, wire.ClientTypeAgent)
	case "/portal":
		s.accept(w, r, wire.ClientTypePortal)
	default:
		http.NotFound(w, r)
	}
}

func (s *Server) accept(w http.ResponseWriter, r *http.Request, role wire.ClientType) {
	if !websocket.IsWebSocketUpgrade(r) {
		http.Error(w, "Only websocket clients are allowed", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	closing := s.closing
	if !closing {
		s.readers.Add(1)
	}
	s.mu.Unlock()
	if closing {
		http.Error(w, wire.TextShuttingDown, http.StatusServiceUnavailable)
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		s.readers.Done()
		s.log.Debug("websocket upgrade failed", "remote", r.RemoteAddr, "err", err)
		return // the upgrader has answered the client
	}
	c := newConn(s, ws, role, clientIP(r))
	c.onClosed = connHook(r)
	go c.run()
}

func clientIP(r *http.Request) string {
	if ip, ok := frontClientIP(r); ok {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// Serve accepts connections on l until Shutdown. It returns
// ErrServerClosed after a shutdown.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	s.serving = true
	s.mu.Unlock()
	go s.pingLoop()
	err := s.http.Serve(meteredListener{l})
	if errors.Is(err, http.ErrServerClosed) {
		return ErrServerClosed
	}
	return err
}

// Shutdown stops accepting connections, closes every connection with a
// close frame, waits for them to finish within ctx, then cuts the rest.
// Their registrations are removed.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return nil
	}
	s.closing = true
	close(s.shutdown)
	s.mu.Unlock()

	// Pending controller calls end now, so no connection waits on one.
	s.authCancel()
	defer s.cancel()
	httpDone := make(chan error, 1)
	go func() { httpDone <- s.http.Shutdown(ctx) }()

	for _, c := range s.hub.snapshot() {
		c.close(reasonShuttingDown)
	}
	done := make(chan struct{})
	go func() { s.readers.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("shutdown: %d connections did not close in time: %w", s.hub.count(), ctx.Err())
		for _, c := range s.hub.snapshot() {
			c.abort()
		}
		<-done
	}
	if herr := <-httpDone; herr != nil && err == nil && !errors.Is(herr, context.Canceled) && !errors.Is(herr, context.DeadlineExceeded) {
		err = fmt.Errorf("shutdown http: %w", herr)
	}
	return err
}

// shuttingDown reports whether Shutdown has started.
func (s *Server) shuttingDown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// pingLoop sends every connection a WebSocket ping each interval.
func (s *Server) pingLoop() {
	t := time.NewTicker(s.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-s.shutdown:
			return
		case <-t.C:
			for _, c := range s.hub.snapshot() {
				c.enqueue(outFrame{kind: framePing}, false)
			}
		}
	}
}

// PublishCertificate announces the server key on the bus until it
// succeeds, then again every interval, until ctx ends.
func (s *Server) PublishCertificate(ctx context.Context, every time.Duration) {
	cert := bus.Certificate{
		HashedPublicKey: s.keyHash,
		PublicKey:       wire.EncodePublicKey(&s.key.PublicKey),
		ClientID:        s.cfg.InstanceID,
		Expires:         s.keyExpires,
	}
	retry := time.Second
	for {
		wait := every
		if err := s.events.PublishCertificate(ctx, cert); err != nil {
			s.log.Warn("publishing the server certificate failed; will retry", "err", err, "retry_in", retry)
			wait, retry = retry, min(retry*2, time.Minute)
		} else {
			retry = time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}
