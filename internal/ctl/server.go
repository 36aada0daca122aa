package ctl

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/logging"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
)

// Deps are what the commands act on.
type Deps struct {
	Logging *logging.Control
	Server  *server.Server
	Stats   *stats.Stats
	// Extra adds counters to the stats output under their names, e.g.
	// the protection rules' refusals.
	Extra  func() map[string]int64
	Logger *slog.Logger
}

// Server serves the control socket.
type Server struct {
	d    Deps
	l    *net.UnixListener
	path string
	fi   os.FileInfo // the socket file as created, to remove only our own

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// Listen creates the socket at path with mode 0600, and its directory
// when missing. A stale socket left by a crashed server is replaced; a
// live one is an error (ErrSocketInUse).
func Listen(path string, d Deps) (*Server, error) {
	if d.Logger == nil {
		d.Logger = slog.New(slog.DiscardHandler)
	}
	if dir := filepath.Dir(path); dir != "." {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("control socket directory: %w", err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("control socket %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			_ = c.Close() // only probing
			return nil, fmt.Errorf("%w: %s", ErrSocketInUse, path)
		}
	}
	// Bind under a temporary name, restrict it, then move it into place,
	// so the socket is never reachable at its path with looser
	// permissions, and a stale socket is replaced in one step.
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	_ = os.Remove(tmp) // a leftover of this pid's earlier life, if any
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	fail := func(err error) (*Server, error) {
		_ = l.Close()
		_ = os.Remove(tmp)
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{d: d, l: l, path: path, fi: fi, ctx: ctx, cancel: cancel}, nil
}

// Path returns the socket's path.
func (s *Server) Path() string { return s.path }

// Serve answers requests until Close. It returns nil after Close.
func (s *Server) Serve() error {
	for {
		c, err := s.l.AcceptUnix()
		if err != nil {
			if s.ctx.Err() != nil {
				return nil
			}
			// Out of file descriptors, most likely: wait, as net/http
			// does, rather than give up the socket.
			s.d.Logger.Warn("control socket accept failed", "err", err)
			select {
			case <-s.ctx.Done():
				return nil
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.handle(c)
		}()
	}
}

// Close stops Serve, cancels running commands, waits for them and removes
// the socket.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.cancel()
		s.closeErr = s.l.Close()
		s.wg.Wait()
		if fi, err := os.Lstat(s.path); err == nil && os.SameFile(fi, s.fi) {
			if err := os.Remove(s.path); err != nil && s.closeErr == nil {
				s.closeErr = err
			}
		}
	})
	return s.closeErr
}

func (s *Server) handle(c *net.UnixConn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(requestTimeout)) // fails only on a closed conn, which the read sees
	line, err := bufio.NewReader(io.LimitReader(c, maxRequestSize)).ReadBytes('\n')
	if err != nil && (!errors.Is(err, io.EOF) || len(line) == 0) {
		s.d.Logger.Debug("control request not read", "err", err)
		return
	}
	var req Request
	var resp Response
	if err := json.Unmarshal(line, &req); err != nil {
		resp = Response{Error: "request is not JSON: " + err.Error(), Usage: true}
	} else {
		_ = c.SetDeadline(time.Now().Add(commandTimeout))
		ctx, cancel := context.WithTimeout(s.ctx, commandTimeout)
		out, err := s.run(ctx, req)
		cancel()
		resp = Response{OK: err == nil, Output: out}
		if err != nil {
			resp.Error = err.Error()
			resp.Usage = errors.Is(err, ErrUsage)
		}
		lvl := slog.LevelInfo
		if req.Command == "connections" || req.Command == "stats" {
			lvl = slog.LevelDebug // read-only, and scripts poll them
		}
		s.d.Logger.Log(ctx, lvl, "control command", "command", req.Command, "args", req.Args, "ok", resp.OK, "err", resp.Error)
	}
	data, _ := json.Marshal(resp)      // a struct of strings always marshals
	_, _ = c.Write(append(data, '\n')) // the client may have gone; nothing to do then
}

func usagef(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUsage, fmt.Sprintf(format, args...))
}

func (s *Server) run(ctx context.Context, req Request) (string, error) {
	args := req.Args
	switch req.Command {
	case "loglevel":
		if len(args) != 1 {
			return "", usagef("loglevel debug|info|warn|error|reset")
		}
		return s.logLevel(args[0])
	case "trace":
		if len(args) != 1 || args[0] == "" {
			return "", usagef("trace CLIENTID|off")
		}
		return s.trace(args[0])
	case "connections":
		if len(args) != 0 {
			return "", usagef("connections takes no arguments")
		}
		return s.connections(), nil
	case "stats":
		if len(args) != 0 {
			return "", usagef("stats takes no arguments")
		}
		return s.stats(), nil
	case "control":
		if len(args) < 2 {
			return "", usagef("control AGENTID COMMAND [KEY=VALUE]...")
		}
		return s.control(ctx, args[0], args[1], args[2:])
	case "":
		return "", usagef("no command")
	}
	return "", usagef("unknown command %q", req.Command)
}

func (s *Server) logLevel(name string) (string, error) {
	lc := s.d.Logging
	if lc == nil {
		return "", errors.New("log level control not available")
	}
	was := logging.LevelName(lc.Level())
	if strings.EqualFold(name, "reset") {
		lc.Reset()
		return fmt.Sprintf("log level %s (the configured level; was %s)\n", logging.LevelName(lc.Level()), was), nil
	}
	l, err := logging.ParseLevel(name)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrUsage, err)
	}
	lc.SetLevel(l)
	return fmt.Sprintf("log level %s (was %s)\n", logging.LevelName(l), was), nil
}

func (s *Server) trace(clientID string) (string, error) {
	lc := s.d.Logging
	if lc == nil {
		return "", errors.New("log control not available")
	}
	if strings.EqualFold(clientID, "off") || strings.EqualFold(clientID, "reset") {
		was := lc.Traced()
		lc.TraceOff()
		if was == "" {
			return "trace off (none was running)\n", nil
		}
		return fmt.Sprintf("trace off (was %s)\n", was), nil
	}
	var conns []string
	if s.d.Server != nil {
		for _, c := range s.d.Server.Connections() {
			if c.ClientID == clientID {
				conns = append(conns, c.ConnID)
			}
		}
	}
	lc.Trace(clientID, conns...)
	return fmt.Sprintf("tracing client %s at debug level (%d open connections)\n", clientID, len(conns)), nil
}

func (s *Server) connections() string {
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tROLE\tORGANIZATION\tAUTHENTICATED\tREMOTE\tSINCE\tBYTES_IN\tBYTES_OUT")
	if s.d.Server != nil {
		for _, c := range s.d.Server.Connections() {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%s\t%s\t%d\t%d\n",
				dash(c.ClientID), c.Role, dash(c.OrganizationID), c.Authenticated, dash(c.RemoteIP),
				c.ConnectedAt.UTC().Format(time.RFC3339), c.BytesIn, c.BytesOut)
		}
	}
	_ = tw.Flush() // writes to a strings.Builder do not fail
	return b.String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (s *Server) stats() string {
	var b strings.Builder
	if st := s.d.Stats; st != nil {
		snap := st.Snapshot()
		writeSorted(&b, "", snap.Counters)
		writeSorted(&b, "closes.", snap.Closes)
		fmt.Fprintf(&b, "openConnections %d\n", snap.OpenConnections)
		fmt.Fprintf(&b, "totalConnections %d\n", snap.TotalConnections)
		fmt.Fprintf(&b, "maxSimultaneous %d\n", snap.MaxSimultaneous)
		fmt.Fprintf(&b, "messagesReceived %d\n", snap.MessagesReceived)
		fmt.Fprintf(&b, "uptime %s\n", snap.Uptime)
	}
	if s.d.Extra != nil {
		writeSorted(&b, "", s.d.Extra())
	}
	return b.String()
}

func writeSorted(b *strings.Builder, prefix string, m map[string]int64) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(b, "%s%s %d\n", prefix, k, m[k])
	}
}

func (s *Server) control(ctx context.Context, agentID, command string, kv []string) (string, error) {
	if s.d.Server == nil {
		return "", errors.New("no server")
	}
	settings := make(map[string]*string, len(kv))
	for _, p := range kv {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return "", usagef("setting %q is not KEY=VALUE", p)
		}
		settings[k] = &v
	}
	resp, err := s.d.Server.RouteControl(ctx, bus.ControlRequest{
		AgentID:  agentID,
		Command:  command,
		Settings: settings,
		SentTime: time.Now(),
	})
	var b strings.Builder
	fmt.Fprintf(&b, "success: %t\n", resp.Success)
	if resp.Message != "" {
		fmt.Fprintf(&b, "message: %s\n", resp.Message)
	}
	if len(resp.Settings) > 0 {
		fmt.Fprintln(&b, "settings:")
		keys := make([]string, 0, len(resp.Settings))
		for k := range resp.Settings {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			v := "(null)"
			if p := resp.Settings[k]; p != nil {
				v = *p
			}
			fmt.Fprintf(&b, "  %s=%s\n", k, v)
		}
	}
	switch {
	case err != nil:
		return b.String(), fmt.Errorf("control %s to agent %s: %w", command, agentID, err)
	case !resp.Success:
		return b.String(), fmt.Errorf("%w: agent %s answered control %s without success", ErrCommandFailed, agentID, command)
	}
	return b.String(), nil
}
