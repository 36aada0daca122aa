package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/wire"
)

const agentUsage = `usage: machineservice agent --server URL (--token TOKEN | --token-file FILE) --forward http://127.0.0.1:PORT [--certificates URL]

Connects to the server as an agent and forwards the requests that portals
send through the relay to the local HTTP API at --forward. Runs until
interrupted (SIGINT or SIGTERM). With --token-file, renewed tokens are
written back to the file.
`

// agentCmd runs the agent until SIGINT or SIGTERM.
func agentCmd(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	server := fs.String("server", "", "server base URL, http://host:port or https://host:port")
	token := fs.String("token", "", "agent token")
	tokenFile := fs.String("token-file", "", "file holding the agent token; renewed tokens are written back")
	forward := fs.String("forward", "", "local HTTP API to forward to, e.g. http://127.0.0.1:8200")
	certs := fs.String("certificates", "", "URL of the server certificate list (default: URL/certificates)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stderr, agentUsage)
			return nil
		}
		return fmt.Errorf("%w: agent: %v\n\n%s", config.ErrUsage, err, agentUsage)
	}
	usage := func(format string, a ...any) error {
		return fmt.Errorf("%w: agent: %s\n\n%s", config.ErrUsage, fmt.Sprintf(format, a...), agentUsage)
	}
	switch {
	case fs.NArg() > 0:
		return usage("unexpected argument %q", fs.Arg(0))
	case *server == "":
		return usage("--server is required")
	case *forward == "":
		return usage("--forward is required")
	case *token == "" && *tokenFile == "":
		return usage("--token or --token-file is required")
	case *token != "" && *tokenFile != "":
		return usage("give --token or --token-file, not both")
	}
	tok := *token
	if *tokenFile != "" {
		data, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("%w: agent: --token-file: %v", config.ErrUsage, err)
		}
		if tok = strings.TrimSpace(string(data)); tok == "" {
			return fmt.Errorf("%w: agent: --token-file %s is empty", config.ErrUsage, *tokenFile)
		}
	}

	status := newStatusLine(stderr)
	log := slog.New(slog.NewTextHandler(status, &slog.HandlerOptions{Level: slog.LevelInfo}))
	fwd, err := agent.NewForwarder(*forward, nil)
	if err != nil {
		return fmt.Errorf("%w: --forward: %v", config.ErrUsage, err)
	}
	defer fwd.Close()
	a, err := agent.New(agent.Config{
		Server:          *server,
		Token:           tok,
		CertificatesURL: *certs,
		Handler:         fwd,
		OnToken: func(newToken string) {
			if *tokenFile == "" {
				log.Warn("the server renewed the token; it is used until the agent stops (use --token-file to keep it)")
				return
			}
			if err := writeFileAtomic(*tokenFile, []byte(newToken+"\n")); err != nil {
				log.Error("storing the renewed token failed; it is used until the agent stops", "file", *tokenFile, "err", err)
				return
			}
			log.Info("stored the renewed token", "file", *tokenFile)
		},
		OnCertificates: func(list []wire.Certificate) {
			log.Info("fetched the server certificates", "count", len(list))
		},
		OnState: func(e agent.Event) { logState(log, status, *server, e) },
	})
	if err != nil {
		if errors.Is(err, agent.ErrInvalidConfig) {
			return fmt.Errorf("%w: %v", config.ErrUsage, err)
		}
		return err
	}
	log.Info("agent starting", "server", *server, "forward", *forward, "client", a.ClientID(), "version", version)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	status.Set("")
	return nil
}

func logState(log *slog.Logger, status *statusLine, server string, e agent.Event) {
	switch e.State {
	case agent.Connecting:
		status.Set("connecting to " + server + " ...")
	case agent.Connected:
		status.Set("")
		log.Info("connected", "key_hash", e.ServerKeyHash)
	case agent.Rejected:
		log.Error("the server refused the token: check --token or --token-file; retrying at the slowest pace in case it is re-issued",
			"err", e.Err, "retry_in", e.RetryIn.Round(100*time.Millisecond).String(), "attempt", e.Attempt)
		status.Countdown("token refused; retrying in %d s", e.RetryIn)
	case agent.Disconnected:
		msg := "disconnected"
		if errors.Is(e.Err, agent.ErrAuthUnavailable) {
			msg = "the server's authentication service is unavailable; the token was not checked, retrying"
		}
		log.Warn(msg, "err", e.Err, "retry_in", e.RetryIn.Round(100*time.Millisecond).String(), "attempt", e.Attempt)
		status.Countdown("retrying in %d s", e.RetryIn)
	case agent.Stopped:
		status.Set("")
		log.Info("stopped")
	}
}

// writeFileAtomic replaces path with data through a temporary file in the
// same directory, keeping the file's mode (0600 for a new file), so that a
// crash never leaves a half-written token behind.
func writeFileAtomic(path string, data []byte) error {
	mode := os.FileMode(0o600)
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	name := tmp.Name()
	defer os.Remove(name) // after the rename there is nothing to remove
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(name, path)
}
