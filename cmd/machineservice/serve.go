package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/logging"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/protect"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// devKeyLifetime is how long a generated development key is announced as
// valid.
const devKeyLifetime = 90 * 24 * time.Hour

// certificateInterval is how often the server key is announced again.
const certificateInterval = 48 * time.Hour

func serve(args []string, stdout, stderr io.Writer) error {
	// Catch the signals first: one that arrives while the key is made
	// still ends the start cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cfg, err := config.Load(args, os.Getenv)
	if errors.Is(err, config.ErrHelp) {
		fmt.Fprint(stdout, "usage: machineservice serve [flags]\n\nEvery setting is also read from its environment variable; see machineservice env.\n\n")
		return config.PrintFlags(stdout)
	}
	if err != nil {
		return err
	}
	logCtl := logging.NewControl(cfg.LogLevel())
	log := logging.New(stderr, !cfg.Dev, logCtl)

	// The controller settings are checked first: a refused start should
	// not have generated and written a development key.
	ctrl, err := builtinController(cfg, log)
	if err != nil {
		return err
	}
	key, obtained, expires, err := serverKey(cfg, log)
	if err != nil {
		return err
	}
	if expires.Before(time.Now()) {
		log.Warn("the server key has expired: agents will refuse it", "expired", expires.Format(time.RFC3339))
	}
	nb, err := dialBus(cfg, cfg.InstanceID, log)
	if err != nil {
		return err
	}
	if nb != nil {
		defer closeBus(nb, log) // after the shutdown, which still publishes
	}
	st := stats.New()
	be, err := openBackends(context.Background(), cfg, log)
	if err != nil {
		return err
	}
	bg, cancelBG := context.WithCancel(context.Background())
	var statsDone sync.WaitGroup
	// Runs last: after the shutdown has unregistered every connection, stop
	// the statistics, then remove this instance from the database.
	defer func() { cancelBG(); statsDone.Wait(); be.close(log) }()
	var m *metrics.Metrics
	var gatherer *prometheus.Registry
	if cfg.MetricsListen != config.Off {
		gatherer = prometheus.NewRegistry()
		gatherer.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		if m, err = metrics.New(gatherer, server.ReasonNames()); err != nil {
			return err
		}
		st.SetObserver(m)
	}
	guard, err := protect.New(bg, cfg, protect.Deps{Logger: log, Stats: st, Metrics: m})
	if err != nil {
		return fmt.Errorf("IP blacklist (IPBLACKLIST__STORAGE, IPBLACKLIST__ENTRY): %w", err)
	}
	events := bus.NewLocal(log)
	deps := server.Deps{
		Key:         key,
		KeyObtained: obtained,
		KeyExpires:  expires,
		Controller:  ctrl,
		Registry:    be.registry,
		Events:      events,
		Stats:       st,
		Logger:      log,
		Version:     version,
		Metrics:     m,
		Middleware:  guard.Wrap,
	}
	if nb != nil {
		if err := useBus(nb, ctrl, cfg, &deps, log); err != nil {
			return err
		}
	}
	if m != nil {
		deps.Controller = metrics.TimeController(deps.Controller, m)
	}
	srv, err := server.New(cfg, deps)
	if err != nil {
		return err
	}
	be.onAgentsChanged(srv.AgentsChanged)
	if nb != nil {
		if err := nb.Attach(srv); err != nil {
			return fmt.Errorf("serve the instance on the bus: %w", err)
		}
	}
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s (ENVIRONMENT__LISTEN, --listen): %w", cfg.Listen, err)
	}
	defer l.Close() // after Serve it is closed already; this covers the early returns
	stopOps, err := startOps(cfg, log, opsDeps{
		logging:  logCtl,
		server:   srv,
		stats:    st,
		guard:    guard,
		gatherer: gatherer,
		checks:   readinessChecks(srv, deps.Registry, deps.Events, deps.Controller, be.statisticsCheck()),
	})
	if err != nil {
		return err
	}
	defer stopOps()

	if ctx.Err() != nil {
		return nil // stopped before it started
	}
	statsDone.Go(func() { st.Run(bg, log, cfg.StatusReportInterval, cfg.StatisticsInterval, be.exporter) })
	go srv.PublishCertificate(bg, certificateInterval)
	go guard.Run(bg)

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	log.Info("machineservice listening",
		"addr", l.Addr().String(),
		"instance", cfg.InstanceID,
		"dev", cfg.Dev,
		"key_hash", wire.PublicKeyHash(&key.PublicKey),
		"version", version,
		"protection", guard.String())

	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	stop()
	log.Info("shutting down", "timeout", cfg.ShutdownTimeout.String())
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	err = srv.Shutdown(sctx)
	if e := <-serveErr; e != nil && !errors.Is(e, server.ErrServerClosed) && err == nil {
		err = e
	}
	if err != nil {
		log.Warn("shutdown incomplete", "err", err)
	}
	log.Info("stopped")
	return nil
}

// serverKey returns the configured key or, in development mode, the key
// kept in the development key file: generated the first time, and again
// once the expiry announced for it (its file's time plus devKeyLifetime)
// has passed, since agents refuse an expired key.
func serverKey(cfg *config.Config, log *slog.Logger) (*rsa.PrivateKey, time.Time, time.Time, error) {
	if cfg.PrivateKey != "" {
		key, err := wire.ParsePrivateKey(cfg.PrivateKey)
		if err != nil {
			return nil, time.Time{}, time.Time{}, fmt.Errorf("%w: ENVIRONMENT__MACHINESERVERPRIVATE: %v", config.ErrUsage, err)
		}
		expires := cfg.KeyExpires
		if expires.IsZero() {
			expires = time.Now().Add(devKeyLifetime)
		}
		return key, time.Now(), expires, nil
	}
	path := cfg.DevKeyFile
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return generateDevKey(cfg, log, "generated a development key")
	case err != nil:
		return nil, time.Time{}, time.Time{}, fmt.Errorf("read development key file: %w", err)
	}
	key, err := wire.ParsePrivateKey(string(data))
	if err != nil {
		return nil, time.Time{}, time.Time{}, fmt.Errorf("%w: development key file %s (ENVIRONMENT__DEVELOPMENTKEYFILE): %v", config.ErrUsage, path, err)
	}
	obtained := time.Now()
	if fi, err := os.Stat(path); err == nil {
		obtained = fi.ModTime()
	}
	expires := cfg.KeyExpires
	if expires.IsZero() {
		expires = obtained.Add(devKeyLifetime)
		if !expires.After(time.Now()) {
			// A configured expiry is kept: a new key would get it too.
			log.Info("the development key has expired", "file", path, "expired", expires.Format(time.RFC3339))
			return generateDevKey(cfg, log, "generated a new development key")
		}
	}
	log.Info("using the development key", "file", path, "expires", expires.Format(time.RFC3339))
	return key, obtained, expires, nil
}

// generateDevKey makes a development key and writes it to the development
// key file, replacing any file there at once so that a server starting
// beside this one reads either the old key or the new one.
func generateDevKey(cfg *config.Config, log *slog.Logger, msg string) (*rsa.PrivateKey, time.Time, time.Time, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, time.Time{}, time.Time{}, fmt.Errorf("generate development key: %w", err)
	}
	// A new file gets mode 0600, a replaced one keeps its mode.
	if err := writeFileAtomic(cfg.DevKeyFile, wire.EncodePrivateKey(key)); err != nil {
		return nil, time.Time{}, time.Time{}, fmt.Errorf("write development key file (ENVIRONMENT__DEVELOPMENTKEYFILE): %w", err)
	}
	now := time.Now()
	expires := cfg.KeyExpires
	if expires.IsZero() {
		expires = now.Add(devKeyLifetime)
	}
	log.Info(msg, "file", cfg.DevKeyFile, "key_hash", wire.PublicKeyHash(&key.PublicKey), "expires", expires.Format(time.RFC3339))
	return key, now, expires, nil
}

// builtinController builds the controller from the tokens file and the JWT
// settings. With a bus and neither, it returns nil: the controller is
// another process on the bus.
func builtinController(cfg *config.Config, log *slog.Logger) (controller.Controller, error) {
	b := &controller.Builtin{}
	if cfg.TokensFile != "" {
		st, err := controller.LoadTokensFile(cfg.TokensFile, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: AUTH__TOKENSFILE (--tokens): %v", config.ErrUsage, err)
		}
		agents, portals := st.Len()
		log.Info("loaded tokens", "file", cfg.TokensFile, "agents", agents, "portals", portals)
		b.Static = st
	}
	switch {
	case cfg.JWTSecret != "":
		j, err := controller.NewJWTSecret([]byte(cfg.JWTSecret), cfg.JWTIssuer, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: AUTH__JWTSECRET: %v", config.ErrUsage, err)
		}
		b.JWT = j
	case cfg.JWTPublicKeyFile != "":
		j, err := controller.LoadJWTPublicKeyFile(cfg.JWTPublicKeyFile, cfg.JWTIssuer, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: AUTH__JWTPUBLICKEYFILE: %v", config.ErrUsage, err)
		}
		b.JWT = j
	}
	if b.Static == nil && b.JWT == nil {
		if cfg.MessagingURL != "" {
			return nil, nil // the controller answers on the bus
		}
		if !cfg.Dev {
			return nil, fmt.Errorf("%w: no controller: set AUTH__TOKENSFILE (--tokens), AUTH__JWTSECRET or AUTH__JWTPUBLICKEYFILE", config.ErrUsage)
		}
		log.Warn("no tokens configured: every authentication will be refused (use --tokens FILE)")
		return controller.None{}, nil
	}
	return b, nil
}
