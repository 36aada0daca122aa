// Package logging builds the server's slog handler and the run-time
// controls behind it: a minimum level that can be changed while the server
// runs, and a trace that logs everything about one client at debug level
// whatever the minimum level is.
package logging

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
)

// Levels beyond slog's four, for the original's level names.
const (
	// LevelTrace is below debug: the original's Verbose and Trace.
	LevelTrace = slog.LevelDebug - 4
	// LevelFatal is above error: the original's Fatal and Critical. The
	// server logs nothing at it, so it silences all but the worst.
	LevelFatal = slog.LevelError + 4
	// LevelNone turns logging off.
	LevelNone = slog.Level(math.MaxInt32)
)

// ErrUnknownLevel means a level name is not one ParseLevel knows.
var ErrUnknownLevel = errors.New("unknown log level")

// ParseLevel reads a level name: slog's (debug, info, warn, error) or the
// original server's Serilog and .NET names (Verbose, Debug, Information,
// Warning, Error, Fatal, Trace, Critical, None), in any case.
func ParseLevel(name string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "verbose", "trace":
		return LevelTrace, nil
	case "debug":
		return slog.LevelDebug, nil
	case "information", "info":
		return slog.LevelInfo, nil
	case "warning", "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	case "fatal", "critical":
		return LevelFatal, nil
	case "none", "off":
		return LevelNone, nil
	}
	return 0, fmt.Errorf("%w %q: use debug, info, warn or error (or Verbose, Information, Warning, Fatal, Trace, Critical, None)", ErrUnknownLevel, name)
}

// LevelName names a level the way ParseLevel reads it back.
func LevelName(l slog.Level) string {
	switch l {
	case LevelTrace:
		return "trace"
	case slog.LevelDebug:
		return "debug"
	case slog.LevelInfo:
		return "info"
	case slog.LevelWarn:
		return "warn"
	case slog.LevelError:
		return "error"
	case LevelFatal:
		return "fatal"
	case LevelNone:
		return "none"
	}
	return l.String()
}

// Control is the run-time state of the handlers built by NewHandler. It is
// safe for concurrent use.
type Control struct {
	def   slog.Level
	level slog.LevelVar
	trace atomic.Pointer[trace]
}

// NewControl returns a Control whose level starts at, and resets to, def.
func NewControl(def slog.Level) *Control {
	c := &Control{def: def}
	c.level.Set(def)
	return c
}

// Level returns the minimum level in force.
func (c *Control) Level() slog.Level { return c.level.Level() }

// Default returns the level Reset returns to.
func (c *Control) Default() slog.Level { return c.def }

// SetLevel changes the minimum level.
func (c *Control) SetLevel(l slog.Level) { c.level.Set(l) }

// Reset returns to the configured level.
func (c *Control) Reset() { c.level.Set(c.def) }

// Trace logs everything about clientID at debug level from now on,
// replacing any earlier trace. Records count as being about the client
// when they carry client=clientID, or conn= one of connIDs or of the
// connections later seen carrying client=clientID.
func (c *Control) Trace(clientID string, connIDs ...string) {
	t := &trace{client: clientID, conns: map[string]struct{}{}}
	for _, id := range connIDs {
		t.conns[id] = struct{}{}
	}
	c.trace.Store(t)
}

// TraceOff ends the trace.
func (c *Control) TraceOff() { c.trace.Store(nil) }

// Traced returns the client being traced, or "".
func (c *Control) Traced() string {
	if t := c.trace.Load(); t != nil {
		return t.client
	}
	return ""
}

// maxTracedConns bounds the connection ids a trace remembers: a client
// that reconnects all day must not grow it without end.
const maxTracedConns = 1024

type trace struct {
	client string

	mu    sync.Mutex
	conns map[string]struct{}
}

func (t *trace) hasConn(id string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.conns[id]
	return ok
}

func (t *trace) addConn(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.conns[id]; !ok && len(t.conns) < maxTracedConns {
		t.conns[id] = struct{}{}
	}
}

// The attribute keys that tie a record to a client. The server's
// per-connection loggers carry both once the client is authenticated.
const (
	KeyClient = "client"
	KeyConn   = "conn"
)

// New returns a logger writing to w, as JSON or as text, controlled by c.
func New(w io.Writer, json bool, c *Control) *slog.Logger {
	opts := &slog.HandlerOptions{Level: LevelTrace}
	var inner slog.Handler
	if json {
		inner = slog.NewJSONHandler(w, opts)
	} else {
		inner = slog.NewTextHandler(w, opts)
	}
	return slog.New(NewHandler(inner, c))
}

// NewHandler wraps inner, which must be enabled down to LevelTrace, so that
// c decides which records pass.
func NewHandler(inner slog.Handler, c *Control) slog.Handler {
	return &handler{inner: inner, ctl: c}
}

type handler struct {
	inner slog.Handler
	ctl   *Control
	// client and conn are the values given to WithAttrs outside any
	// group, so a logger made with With("client", id) is recognised
	// without looking at each record.
	client, conn string
	grouped      bool
}

func (h *handler) Enabled(ctx context.Context, l slog.Level) bool {
	if l >= h.ctl.level.Level() {
		return h.inner.Enabled(ctx, l)
	}
	t := h.ctl.trace.Load()
	if t == nil || l < slog.LevelDebug {
		return false
	}
	if h.client != "" && h.client != t.client && (h.conn == "" || !t.hasConn(h.conn)) {
		return false
	}
	// The record's own attributes may still name the client; Handle
	// decides.
	return h.inner.Enabled(ctx, l)
}

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= h.ctl.level.Level() {
		return h.inner.Handle(ctx, r)
	}
	t := h.ctl.trace.Load()
	if t == nil {
		return nil
	}
	client, conn := h.client, h.conn
	if !h.grouped {
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case KeyClient:
				client = a.Value.String()
			case KeyConn:
				conn = a.Value.String()
			}
			return true
		})
	}
	switch {
	case client == t.client:
		if conn != "" {
			t.addConn(conn)
		}
	case conn != "" && t.hasConn(conn):
	default:
		return nil
	}
	return h.inner.Handle(ctx, r)
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	n := *h
	n.inner = h.inner.WithAttrs(attrs)
	if !h.grouped {
		for _, a := range attrs {
			switch a.Key {
			case KeyClient:
				n.client = a.Value.String()
			case KeyConn:
				n.conn = a.Value.String()
			}
		}
	}
	return &n
}

func (h *handler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	n := *h
	n.inner = h.inner.WithGroup(name)
	n.grouped = true
	return &n
}
