// Package agent is the client library for a Machine Services agent: a
// machine that dials out to the relay server, stays connected, and answers
// the commands that portals send it through the relay, typically by
// forwarding them to a local HTTP API (see Forwarder).
//
// An Agent behaves as the Duplicati agent does: it reads the server's
// welcome, checks the key hash it names against the server certificates
// (given in Config, or fetched from the server's /certificates, fetched
// again when the hash is unknown), authenticates with an RSA-2048 key of
// its own, sends every message as a JWE to the server key and reads JWEs
// to its own key. It pings every minute and drops the connection when
// nothing has arrived for two minutes. After any drop it reconnects with
// jittered exponential backoff; so it does after an authentication the
// server could not check because its controller was unavailable
// (ErrAuthUnavailable), which says nothing against the token. A refused
// token is reported as a Rejected event and retried too, in case it is
// re-issued, but at the slowest pace from the first refusal. A renewed
// token from the server is used from the next connection on and handed to
// Config.OnToken to be stored.
//
// Headers travel as one string per name: repeated values joined with ", "
// (Cookie with "; "), except Set-Cookie, whose values may hold commas and
// are joined with "\n", so that the portal library can split them into
// whole cookies again (wire.FlattenHeader). Hop-by-hop headers are not
// carried either way.
//
// The library never logs: it reports through Config.OnState and returns
// errors.
package agent

import (
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/wire"
)

// Defaults, those of the Duplicati agent where it has one.
const (
	DefaultPingInterval     = 60 * time.Second
	DefaultIdleTimeout      = 120 * time.Second
	DefaultHandshakeTimeout = 30 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
	DefaultCommandTimeout   = 100 * time.Second
	DefaultInitialBackoff   = 2 * time.Second
	DefaultMaxBackoff       = 60 * time.Second
	// DefaultMaxMessageSize is the server's default limit on one message.
	DefaultMaxMessageSize = 1 << 20
	// DefaultMaxConcurrent bounds the commands handled at once.
	DefaultMaxConcurrent = 16
	// DefaultClientVersion is sent as the client version.
	DefaultClientVersion = "machineservice-agent/1"
)

// Config configures an Agent. Server and Token are required; everything
// else has a default.
type Config struct {
	// Server is the server's base URL, http://host:port or
	// https://host:port; the agent dials ws(s)://host:port/agent.
	Server string
	// Token is the agent's access token.
	Token string

	// Certificates are server keys known in advance (for example stored
	// from an earlier OnCertificates). When the welcome names a key not
	// among them they are fetched from CertificatesURL, which defaults to
	// Server + "/certificates".
	Certificates    []wire.Certificate
	CertificatesURL string

	// Handler answers commands; nil answers every command with 501.
	Handler Handler
	// Control answers control requests; nil answers them as unsupported.
	Control ControlHandler

	// OnToken receives a renewed token, to be stored for the next start.
	// The agent uses it for its following connections either way.
	OnToken func(token string)
	// OnCertificates receives the certificate list after each fetch.
	OnCertificates func([]wire.Certificate)
	// OnState receives every state change. It is called from Run's
	// goroutine, so it should return quickly.
	OnState func(Event)

	// ClientID is sent as "from"; default a new UUID, kept across
	// reconnects.
	ClientID string
	// ClientVersion is sent in the auth message.
	ClientVersion string
	// Metadata is added to the auth metadata, over the defaults
	// client-version, client-id, client-uptime, machine-name and machine-os.
	Metadata map[string]string
	// Key is the agent's key; nil generates an RSA-2048 key in New.
	Key *rsa.PrivateKey

	// HTTPClient fetches the certificates; nil uses a client with a
	// 30 s timeout.
	HTTPClient *http.Client
	// Dialer dials the WebSocket; nil uses a default one (which honours
	// the proxy environment variables).
	Dialer *websocket.Dialer

	PingInterval     time.Duration // between pings, default 60 s
	IdleTimeout      time.Duration // drop after this much silence, default 120 s
	HandshakeTimeout time.Duration // dial, welcome and auth answer, default 30 s
	WriteTimeout     time.Duration // one write, default 10 s
	CommandTimeout   time.Duration // one command or control request, default 100 s
	InitialBackoff   time.Duration // first reconnect delay (jittered down to half), default 2 s
	MaxBackoff       time.Duration // largest reconnect delay, default 60 s
	// MaxMessageSize is the largest message the server accepts (its
	// ENVIRONMENT__MAXMESSAGESIZE); a larger answer is replaced by a 502
	// that says so. Default 1 MiB.
	MaxMessageSize int
	// MaxConcurrent bounds commands and control requests handled at
	// once; up to seven times as many more wait their turn, and beyond
	// that a command is answered with 503 at once. Default 16.
	MaxConcurrent int
}

// State is the connection state an Event reports.
type State int

// States.
const (
	// Connecting: dialling and authenticating.
	Connecting State = iota + 1
	// Connected: authenticated and serving commands.
	Connected
	// Disconnected: the connection or an attempt ended; the next attempt
	// follows after RetryIn. A refused token is reported as Rejected
	// instead.
	Disconnected
	// Stopped: Run is returning.
	Stopped
	// Rejected: the server refused the token (Err wraps ErrAuthRejected).
	// The agent keeps trying, as the token may be re-issued, but with the
	// backoff at its cap (MaxBackoff, jittered) from the first refusal on:
	// RetryIn says when.
	Rejected
)

func (s State) String() string {
	switch s {
	case Connecting:
		return "connecting"
	case Connected:
		return "connected"
	case Disconnected:
		return "disconnected"
	case Stopped:
		return "stopped"
	case Rejected:
		return "rejected"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Event is a state change.
type Event struct {
	State State
	// Err is why the connection or attempt ended (Disconnected,
	// Rejected), or what stopped Run (Stopped).
	Err error
	// RetryIn is the wait before the next attempt (Disconnected,
	// Rejected).
	RetryIn time.Duration
	// Attempt counts the attempts since the last lasting connection,
	// starting at 1.
	Attempt int
	// ServerKeyHash is the key hash of the server's welcome, once read.
	ServerKeyHash string
}

// Agent keeps one connection to the server. Create it with New and call
// Run once at a time.
type Agent struct {
	// static after New
	cfg      Config
	wsURL    string
	key      *rsa.PrivateKey
	pubPEM   string
	dialer   *websocket.Dialer
	certs    *certStore
	started  time.Time
	hostname string

	mu      sync.Mutex
	token   string
	running bool
}

// New checks cfg, fills in the defaults and makes an Agent.
func New(cfg Config) (*Agent, error) {
	wsURL, httpBase, err := endpoints(cfg.Server)
	if err != nil {
		return nil, err
	}
	if cfg.Token == "" {
		return nil, fmt.Errorf("%w: Token is empty", ErrInvalidConfig)
	}
	if cfg.CertificatesURL == "" {
		cfg.CertificatesURL = httpBase + "/certificates"
	} else if u, err := url.Parse(cfg.CertificatesURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: CertificatesURL %q: want an http or https URL", ErrInvalidConfig, cfg.CertificatesURL)
	}
	defDur := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defDur(&cfg.PingInterval, DefaultPingInterval)
	defDur(&cfg.IdleTimeout, DefaultIdleTimeout)
	defDur(&cfg.HandshakeTimeout, DefaultHandshakeTimeout)
	defDur(&cfg.WriteTimeout, DefaultWriteTimeout)
	defDur(&cfg.CommandTimeout, DefaultCommandTimeout)
	defDur(&cfg.InitialBackoff, DefaultInitialBackoff)
	defDur(&cfg.MaxBackoff, DefaultMaxBackoff)
	if cfg.MaxBackoff < cfg.InitialBackoff {
		cfg.MaxBackoff = cfg.InitialBackoff
	}
	if cfg.IdleTimeout <= cfg.PingInterval {
		return nil, fmt.Errorf("%w: IdleTimeout (%s) must be longer than PingInterval (%s)", ErrInvalidConfig, cfg.IdleTimeout, cfg.PingInterval)
	}
	if cfg.MaxMessageSize <= 0 {
		cfg.MaxMessageSize = DefaultMaxMessageSize
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = DefaultMaxConcurrent
	}
	if cfg.ClientID == "" {
		cfg.ClientID = uuid.NewString()
	}
	if cfg.ClientVersion == "" {
		cfg.ClientVersion = DefaultClientVersion
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 30 * time.Second}
	}
	key := cfg.Key
	if key == nil {
		key, err = rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, fmt.Errorf("agent: generate key: %w", err)
		}
	}
	dialer := cfg.Dialer
	if dialer == nil {
		dialer = &websocket.Dialer{Proxy: http.ProxyFromEnvironment}
	}
	d := *dialer
	d.HandshakeTimeout = cfg.HandshakeTimeout
	host, _ := os.Hostname() // metadata only; empty when unknown
	a := &Agent{
		cfg:      cfg,
		wsURL:    wsURL,
		key:      key,
		pubPEM:   wire.EncodePublicKey(&key.PublicKey),
		dialer:   &d,
		started:  time.Now(),
		hostname: host,
		token:    cfg.Token,
	}
	a.certs = &certStore{
		url:    cfg.CertificatesURL,
		client: cfg.HTTPClient,
		now:    time.Now,
		onNew:  cfg.OnCertificates,
		list:   append([]wire.Certificate(nil), cfg.Certificates...),
	}
	return a, nil
}

// endpoints derives the WebSocket URL of /agent and the HTTP base from
// the server's base URL.
func endpoints(server string) (wsURL, httpBase string, err error) {
	if server == "" {
		return "", "", fmt.Errorf("%w: Server is empty", ErrInvalidConfig)
	}
	wsURL, httpBase, err = wire.Endpoint(server, wire.RouteAgent)
	if err != nil {
		return "", "", fmt.Errorf("%w: Server %q: %v", ErrInvalidConfig, server, err)
	}
	return wsURL, httpBase, nil
}

// ClientID is the id the agent is known by on the server.
func (a *Agent) ClientID() string { return a.cfg.ClientID }

// Token is the token the next connection authenticates with.
func (a *Agent) Token() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.token
}

func (a *Agent) setToken(t string) {
	a.mu.Lock()
	a.token = t
	a.mu.Unlock()
}

func (a *Agent) emit(e Event) {
	if a.cfg.OnState != nil {
		a.cfg.OnState(e)
	}
}

// metadata is the auth metadata: the keys the Duplicati agent sends that
// apply here, then Config.Metadata.
func (a *Agent) metadata() map[string]*string {
	m := map[string]*string{}
	put := func(k, v string) { m[k] = &v }
	put("client-version", a.cfg.ClientVersion)
	put("client-id", a.cfg.ClientID)
	put("client-uptime", time.Since(a.started).Round(time.Second).String())
	if a.hostname != "" {
		put("machine-name", a.hostname)
	}
	put("machine-os", runtime.GOOS)
	for k, v := range a.cfg.Metadata {
		put(k, v)
	}
	return m
}

// backoff returns the wait before attempt n (1 for the first retry):
// exponential from InitialBackoff up to MaxBackoff, jittered down to half
// so that agents cut off together do not return together.
func (a *Agent) backoff(n int) time.Duration {
	d := a.cfg.InitialBackoff
	for i := 1; i < n && d < a.cfg.MaxBackoff; i++ {
		d *= 2
	}
	return jitter(min(d, a.cfg.MaxBackoff))
}

// jitter returns a random wait between d/2 and d.
func jitter(d time.Duration) time.Duration {
	half := d / 2
	return half + time.Duration(mrand.Int64N(int64(half)+1)) //nolint:gosec // jitter needs no secrecy
}
