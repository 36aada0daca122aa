// Package protect is the HTTP front of the server: the rules every request
// passes before it reaches a route. In order: the client address is
// established (the socket peer, or X-Forwarded-For from a trusted proxy);
// a blacklisted address gets 403; over the rate limit, 429; a scanner
// path, 404; a browser upgrade to /portal from an origin not allowed,
// 403; a WebSocket upgrade beyond the connection caps, 503. Allowed
// origins get CORS headers.
package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
)

// Errors returned by this package.
var (
	// ErrBadRules means stored blacklist data is not a JSON list of rules.
	ErrBadRules = errors.New("invalid IP blacklist")
	// ErrBadSource means the blacklist storage settings are unusable.
	ErrBadSource = errors.New("invalid IP blacklist storage")
)

// Texts of the answers to refused requests.
const (
	TextBlocked               = "Forbidden"
	TextTooManyRequests       = "Too many requests"
	TextOriginNotAllowed      = "Origin not allowed"
	TextTooManyConnections    = "Too many connections"
	TextTooManyConnectionsNow = "Too many connections from this address"
)

// Rule names, as counted.
const (
	ruleBlacklist           = metrics.RuleBlacklist
	ruleRateLimit           = metrics.RuleRateLimit
	ruleScanner             = metrics.RuleScanner
	ruleOrigin              = metrics.RuleOrigin
	ruleMaxConnections      = metrics.RuleMaxConnections
	ruleMaxConnectionsPerIP = metrics.RuleMaxConnectionsPerIP
)

// ruleNames index Guard.rejected.
var ruleNames = [...]string{ruleBlacklist, ruleRateLimit, ruleScanner, ruleOrigin, ruleMaxConnections, ruleMaxConnectionsPerIP}

// Deps are what a Guard works with; all are optional.
type Deps struct {
	Logger  *slog.Logger
	Stats   *stats.Stats     // counts RateLimitExceeded
	Metrics *metrics.Metrics // counts the other refusals
	// Now is the rate limiter's clock; nil means time.Now.
	Now func() time.Time
	// HTTPClient reads an http(s) blacklist; nil means a client with a
	// 30 s timeout.
	HTTPClient *http.Client
}

// Guard applies the rules. It is safe for concurrent use.
type Guard struct {
	log       *slog.Logger
	stats     *stats.Stats
	metrics   *metrics.Metrics
	trusted   []netip.Prefix
	blacklist *Blacklist // nil: none configured
	limiter   *limiters  // nil: no rate limit
	conns     *connCounter
	origins   *origins // nil: every origin
	filter    bool

	rejected [len(ruleNames)]atomic.Int64
}

// New builds the guard from the settings. A configured blacklist is read
// once now: the server does not start with rules it cannot read.
func New(ctx context.Context, cfg *config.Config, d Deps) (*Guard, error) {
	if d.Logger == nil {
		d.Logger = slog.New(slog.DiscardHandler)
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	g := &Guard{
		log:     d.Logger,
		stats:   d.Stats,
		metrics: d.Metrics,
		trusted: cfg.TrustedProxies,
		conns:   &connCounter{max: cfg.MaxConnections, maxPerAddr: cfg.MaxConnectionsPerIP, perAddr: map[netip.Addr]int{}},
		origins: newOrigins(cfg.AllowedOrigins),
		filter:  cfg.FilterPatterns,
	}
	if cfg.RateLimitEnabled {
		g.limiter = newLimiters(cfg.MaxRequestsPerSecond, d.Now)
	}
	if cfg.BlacklistStorage != "" {
		src, err := NewSource(cfg.BlacklistStorage, cfg.BlacklistEntry, d.HTTPClient)
		if err != nil {
			return nil, err
		}
		g.blacklist = NewBlacklist(src, cfg.BlacklistLifetime, d.Logger)
		if err := g.blacklist.Load(ctx); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// Run reloads the blacklist until ctx ends.
func (g *Guard) Run(ctx context.Context) {
	if g.blacklist != nil {
		g.blacklist.Run(ctx)
	}
}

// Blacklist returns the blacklist, or nil when none is configured.
func (g *Guard) Blacklist() *Blacklist { return g.blacklist }

// Rejected returns how many requests each rule has refused.
func (g *Guard) Rejected() map[string]int64 {
	out := make(map[string]int64, len(ruleNames))
	for i, name := range ruleNames {
		out[name] = g.rejected[i].Load()
	}
	return out
}

func (g *Guard) count(rule string) {
	for i, name := range ruleNames {
		if name == rule {
			g.rejected[i].Add(1)
		}
	}
	if rule == ruleRateLimit {
		if g.stats != nil {
			g.stats.Inc(stats.RateLimitExceeded) // the metric follows through the stats observer
		}
		return
	}
	g.metrics.Rejected(rule)
}

// Wrap returns next behind the rules.
func (g *Guard) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.serve(next, w, r)
	})
}

func (g *Guard) serve(next http.Handler, w http.ResponseWriter, r *http.Request) {
	addr := ClientAddr(r, g.trusted)
	if g.blacklist != nil {
		if why, blocked := g.blacklist.Match(addr); blocked {
			g.count(ruleBlacklist)
			g.log.Debug("request from a blacklisted address refused", "remote", addr.String(), "rule", why, "path", r.URL.Path, "user_agent", r.UserAgent())
			http.Error(w, TextBlocked, http.StatusForbidden)
			return
		}
	}
	if g.limiter != nil && !g.limiter.allow(addr) {
		g.count(ruleRateLimit)
		g.log.Debug("rate limit exceeded", "remote", addr.String(), "path", r.URL.Path)
		w.Header().Set("Retry-After", "1")
		http.Error(w, TextTooManyRequests, http.StatusTooManyRequests)
		return
	}
	if g.filter && IsScannerPath(r.URL.Path) {
		g.count(ruleScanner) // and not logged: scanners are many and dull
		http.NotFound(w, r)
		return
	}

	upgrade := websocket.IsWebSocketUpgrade(r)
	path := strings.ToLower(r.URL.Path)
	if origin := r.Header.Get("Origin"); origin != "" && g.origins != nil {
		allowed := g.origins.allowed(origin)
		switch {
		case upgrade && path == "/portal" && !allowed:
			g.count(ruleOrigin)
			g.log.Info("portal upgrade from an origin not allowed refused", "remote", addr.String(), "origin", origin)
			http.Error(w, TextOriginNotAllowed, http.StatusForbidden)
			return
		case upgrade:
		case allowed:
			g.origins.setHeaders(w.Header(), origin)
			if isPreflight(r) {
				setPreflight(w.Header(), r)
				w.WriteHeader(http.StatusNoContent)
				return
			}
		case isPreflight(r):
			g.count(ruleOrigin)
			http.Error(w, TextOriginNotAllowed, http.StatusForbidden)
			return
		}
	}

	ctx := r.Context()
	if addr.IsValid() {
		ctx = server.WithClientIP(ctx, addr.String())
	}
	if !upgrade || (path != "/agent" && path != "/portal") {
		next.ServeHTTP(w, r.WithContext(ctx))
		return
	}
	release, refused := g.conns.acquire(addr)
	if refused != "" {
		g.count(refused)
		total, fromAddr := g.conns.open(addr)
		g.log.Info("websocket upgrade refused: too many connections", "remote", addr.String(), "rule", refused, "open", total, "open_from_address", fromAddr)
		text := TextTooManyConnections
		if refused == ruleMaxConnectionsPerIP {
			text = TextTooManyConnectionsNow
		}
		http.Error(w, text, http.StatusServiceUnavailable)
		return
	}
	// The server takes the place over when it accepts the connection, and
	// gives it back when the connection ends; an upgrade that fails gives
	// it back here. accept runs in this goroutine, so accepted needs no
	// lock.
	accepted := false
	ctx = server.WithConnHook(ctx, func() func() {
		accepted = true
		return release
	})
	next.ServeHTTP(w, r.WithContext(ctx))
	if !accepted {
		release()
	}
}

// String describes the rules in force, for the start-up log.
func (g *Guard) String() string {
	var parts []string
	if g.blacklist != nil {
		n, _, _ := g.blacklist.Status()
		parts = append(parts, fmt.Sprintf("blacklist %s (%d rules)", g.blacklist.src, n))
	}
	if g.limiter != nil {
		parts = append(parts, fmt.Sprintf("rate limit %v/s per address", float64(g.limiter.perSecond)))
	}
	if g.conns.max > 0 {
		parts = append(parts, fmt.Sprintf("at most %d connections", g.conns.max))
	}
	if g.conns.maxPerAddr > 0 {
		parts = append(parts, fmt.Sprintf("at most %d connections per address", g.conns.maxPerAddr))
	}
	if g.filter {
		parts = append(parts, "scanner paths filtered")
	}
	if g.origins != nil {
		parts = append(parts, "origins restricted")
	}
	if len(g.trusted) > 0 {
		parts = append(parts, fmt.Sprintf("%d trusted proxies", len(g.trusted)))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
