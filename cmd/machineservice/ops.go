package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/ctl"
	"github.com/machineservice/machineservice/internal/logging"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/protect"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
)

type opsDeps struct {
	logging  *logging.Control
	server   *server.Server
	stats    *stats.Stats
	guard    *protect.Guard
	gatherer prometheus.Gatherer // nil when metrics are off
	checks   []metrics.Check
}

// readinessChecks lists what /ready asks: the server itself, and each
// dependency that can tell whether it is reachable.
func readinessChecks(srv *server.Server, deps ...any) []metrics.Check {
	checks := []metrics.Check{{Name: "server", Checker: srv}}
	names := []string{"registry", "bus", "controller", "database"}
	for i, d := range deps {
		name := fmt.Sprintf("dependency %d", i)
		if i < len(names) {
			name = names[i]
		}
		if c, ok := metrics.CheckOf(name, d); ok {
			checks = append(checks, c)
		}
	}
	return checks
}

// metricsShutdownTimeout bounds the metrics listener's shutdown, which
// comes after the server's: /ready answers 503 all through that.
const metricsShutdownTimeout = 2 * time.Second

// startOps starts the metrics and readiness listener and the control
// socket. The returned function stops both.
func startOps(cfg *config.Config, log *slog.Logger, d opsDeps) (stop func(), err error) {
	var stops []func()
	stop = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	if cfg.MetricsListen != config.Off {
		ml, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			return nil, fmt.Errorf("listen on %s (METRICS__LISTEN, --metrics-listen): %w", cfg.MetricsListen, err)
		}
		hs := &http.Server{
			Handler:           metrics.Handler(d.gatherer, d.checks),
			ReadHeaderTimeout: 10 * time.Second,
			WriteTimeout:      30 * time.Second,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := hs.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics listener stopped", "err", err)
			}
		}()
		log.Info("metrics and readiness listening", "addr", ml.Addr().String())
		stops = append(stops, func() {
			ctx, cancel := context.WithTimeout(context.Background(), metricsShutdownTimeout)
			defer cancel()
			_ = hs.Shutdown(ctx) // a prober still connected after the grace is cut
			<-done
		})
	}
	if cfg.ControlSocket != config.Off {
		cs, err := ctl.Listen(cfg.ControlSocket, ctl.Deps{
			Logging: d.logging,
			Server:  d.server,
			Stats:   d.stats,
			Extra: func() map[string]int64 {
				out := map[string]int64{}
				for k, v := range d.guard.Rejected() {
					out["rejected."+k] = v
				}
				return out
			},
			Logger: log,
		})
		if err != nil {
			stop()
			return nil, fmt.Errorf("%w (ENVIRONMENT__CONTROLSOCKET: set a writable path, or off)", err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := cs.Serve(); err != nil {
				log.Error("control socket stopped", "err", err)
			}
		}()
		log.Info("control socket listening", "path", cs.Path())
		stops = append(stops, func() {
			if err := cs.Close(); err != nil {
				log.Warn("closing the control socket", "err", err)
			}
			<-done
		})
	}
	return stop, nil
}
