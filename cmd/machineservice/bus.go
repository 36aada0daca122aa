package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/logging"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
)

// busCloseTimeout bounds draining the bus connection at exit.
const busCloseTimeout = 10 * time.Second

// dialBus connects to the NATS bus when MESSAGING__CONNECTIONSTRING is set;
// it returns nil without one.
func dialBus(cfg *config.Config, name string, log *slog.Logger) (*bus.NATS, error) {
	if cfg.MessagingURL == "" {
		return nil, nil
	}
	if f := cfg.MessagingCredentialsFile; f != "" {
		if _, err := os.Stat(f); err != nil { //nolint:gosec // the operator names the file
			return nil, fmt.Errorf("%w: MESSAGING__CREDENTIALSFILE: %v", config.ErrUsage, err)
		}
	}
	nb, err := bus.DialNATS(bus.NATSOptions{
		URL:             cfg.MessagingURL,
		CredentialsFile: cfg.MessagingCredentialsFile,
		SubjectPrefix:   cfg.MessagingSubjectPrefix,
		Name:            name,
		AuthTimeout:     cfg.ControllerTimeout,
		Logger:          log.With("component", "bus"),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: MESSAGING__CONNECTIONSTRING: %v", config.ErrUsage, err)
	}
	log.Info("message bus on NATS", "url", redactURLs(cfg.MessagingURL), "subject_prefix", cfg.MessagingSubjectPrefix)
	return nb, nil
}

// useBus makes the bus the server's controller, publisher and way to the
// other instances; with a built-in controller configured (ctrl not nil) it
// also answers token validations on the bus.
func useBus(nb *bus.NATS, ctrl controller.Controller, cfg *config.Config, deps *server.Deps, log *slog.Logger) error {
	if ctrl != nil {
		if _, err := nb.ServeController(ctrl, bus.ControllerOptions{Timeout: cfg.ControllerTimeout}); err != nil {
			return fmt.Errorf("serve the built-in controller on the bus: %w", err)
		}
		log.Info("the built-in controller answers on the bus in this process")
	} else {
		log.Info("tokens are validated by the controller on the bus")
	}
	if _, ok := deps.Registry.(*registry.Memory); ok {
		log.Info("the registry is in memory: relays and control requests reach only this instance's clients; instances share them through a shared registry")
	}
	deps.Controller = nb
	deps.Events = nb
	deps.Remote = nb
	return nil
}

func closeBus(nb *bus.NATS, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), busCloseTimeout)
	defer cancel()
	if err := nb.Close(ctx); err != nil {
		log.Warn("closing the bus connection", "err", err)
	}
}

// redactURLs returns the comma-separated URLs with passwords masked.
func redactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if u, err := url.Parse(p); err == nil {
			if u.User != nil {
				u.User = url.User("xxxxx")
			}
			p = u.String()
		}
		parts[i] = p
	}
	return strings.Join(parts, ",")
}

// controllerCommand runs the built-in controller alone on the bus, for
// deployments whose instances carry no secrets.
func controllerCommand(args []string, stderr io.Writer) error {
	cfg, err := config.LoadController(args, os.Getenv)
	if errors.Is(err, config.ErrHelp) {
		fmt.Fprint(stderr, "usage: machineservice controller [--tokens FILE] [--nats URL] [--dev]\n\nEvery setting is also read from its environment variable; see machineservice env.\n")
		return nil
	}
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return runController(ctx, cfg, logging.New(stderr, !cfg.Dev, logging.NewControl(cfg.LogLevel())))
}

// runController answers token validations and logs the events on the bus
// until ctx ends.
func runController(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	ctrl, err := builtinController(cfg, log)
	if err != nil {
		return err
	}
	if ctrl == nil {
		return fmt.Errorf("%w: AUTH__TOKENSFILE (--tokens): the controller needs a token source", config.ErrUsage)
	}
	host, _ := os.Hostname() // only names the connection
	nb, err := dialBus(cfg, "machineservice-controller-"+host, log)
	if err != nil {
		return err
	}
	defer closeBus(nb, log)
	stopServing, err := nb.ServeController(ctrl, bus.ControllerOptions{Timeout: cfg.ControllerTimeout, LogEvents: true})
	if err != nil {
		return fmt.Errorf("serve the controller on the bus: %w", err)
	}
	log.Info("controller answering on the bus", "version", version)
	<-ctx.Done()
	stopServing()
	log.Info("controller stopped")
	return nil
}
