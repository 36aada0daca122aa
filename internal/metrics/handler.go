package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Checker is implemented by the dependencies whose reachability decides
// readiness: a database registry, a message bus. In-memory ones need not
// implement it; they are always ready.
type Checker interface {
	// Ready returns nil when the dependency can serve requests now.
	Ready(ctx context.Context) error
}

// CheckerFunc adapts a function to Checker.
type CheckerFunc func(ctx context.Context) error

// Ready calls f.
func (f CheckerFunc) Ready(ctx context.Context) error { return f(ctx) }

// Check is one named readiness check.
type Check struct {
	Name    string
	Checker Checker
}

// CheckOf returns a check for dep when it implements Checker.
func CheckOf(name string, dep any) (Check, bool) {
	c, ok := dep.(Checker)
	if !ok || c == nil {
		return Check{}, false
	}
	return Check{Name: name, Checker: c}, true
}

// CheckTimeout bounds one readiness probe; a dependency slower than this
// counts as unreachable.
const CheckTimeout = 3 * time.Second

// Ready runs the checks at once and joins their failures, each prefixed
// with its name.
func Ready(ctx context.Context, checks []Check) error {
	ctx, cancel := context.WithTimeout(ctx, CheckTimeout)
	defer cancel()
	errs := make([]error, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Go(func() {
			if err := c.Checker.Ready(ctx); err != nil {
				errs[i] = fmt.Errorf("%s: %w", c.Name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Handler serves /metrics from g and /ready from the checks: 200 "ready"
// when every check passes, 503 with the failures otherwise.
func Handler(g prometheus.Gatherer, checks []Check) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if err := Ready(r.Context(), checks); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = fmt.Fprintf(w, "not ready: %s\n", strings.ReplaceAll(err.Error(), "\n", "; ")) // a failed write means the prober left
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	return mux
}
