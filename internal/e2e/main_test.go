package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/natstest"
	"github.com/machineservice/machineservice/internal/pgtest"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testlog"
	"github.com/machineservice/machineservice/portal"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// cluster is what the instances of one test share: a fresh, migrated
// schema and a subject prefix of their own on one NATS server.
type cluster struct {
	t      *testing.T
	conn   string
	nats   string
	prefix string
}

// newCluster prepares the database and the bus for a test; without
// MACHINESERVICE_TEST_POSTGRES the test is skipped.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	conn, _ := pgtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := registry.OpenPool(ctx, conn, 5*time.Second)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	defer pool.Close()
	if _, err := registry.Migrate(ctx, pool); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	return &cluster{t: t, conn: conn, nats: natstest.URL(t), prefix: natstest.Prefix(t, "mse2e")}
}

// instance is one running server, wired as `machineservice serve` wires
// it with a database and a bus: the PostgreSQL registry, the NATS bus as
// controller, publisher and way to the other instances, the built-in
// controller answering on the bus, and the instance attached to the bus.
type instance struct {
	id    string
	base  string // http://127.0.0.1:port
	url   string // its ENVIRONMENT__PUBLICURL
	srv   *server.Server
	bus   *bus.NATS
	stats *stats.Stats
}

// start runs an instance until the test ends.
func (c *cluster) start(id string) *instance {
	c.t.Helper()
	return c.startOn(id, c.conn)
}

// startOn runs an instance whose registry reaches the cluster's database
// through conn (a proxy in front of it, say).
func (c *cluster) startOn(id, conn string) *instance {
	t := c.t
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load([]string{"--dev"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.InstanceID = id
	cfg.MachineName = "e2e-" + id
	cfg.PublicURL = "ws://" + l.Addr().String()
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.ControlTimeout = 10 * time.Second
	log := testlog.New(t).With("instance", id)
	in := &instance{id: id, base: "http://" + l.Addr().String(), url: cfg.PublicURL, stats: stats.New()}

	ctx := context.Background()
	pool, err := registry.OpenPool(ctx, conn, cfg.DatabaseTimeout)
	if err != nil {
		t.Fatalf("%s: open pool: %v", id, err)
	}
	t.Cleanup(pool.Close)
	nb, err := bus.DialNATS(bus.NATSOptions{
		URL:           c.nats,
		SubjectPrefix: c.prefix,
		Name:          id,
		AuthTimeout:   cfg.ControllerTimeout,
		ReconnectMin:  10 * time.Millisecond,
		ReconnectMax:  200 * time.Millisecond,
		Logger:        log.With("component", "bus"),
	})
	if err != nil {
		t.Fatalf("%s: dial bus: %v", id, err)
	}
	in.bus = nb
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := nb.Close(cctx); err != nil {
			t.Errorf("%s: close bus: %v", id, err)
		}
	})
	pg, err := registry.NewPostgres(ctx, pool, registry.PostgresOptions{
		InstanceID:        id,
		PublicURL:         cfg.PublicURL,
		ClientTimeout:     cfg.ClientTimeout,
		InstanceTimeout:   cfg.InstanceTimeout,
		HeartbeatInterval: cfg.HeartbeatInterval,
		Timeout:           cfg.DatabaseTimeout,
		History:           true,
		Logger:            log.With("component", "registry"),
	})
	if err != nil {
		t.Fatalf("%s: registry: %v", id, err)
	}
	t.Cleanup(func() {
		if err := pg.Close(context.Background()); err != nil {
			t.Errorf("%s: close registry: %v", id, err)
		}
	})
	ctrl, err := controller.NewStatic(servertest.Tokens(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nb.ServeController(ctrl, bus.ControllerOptions{Timeout: cfg.ControllerTimeout}); err != nil {
		t.Fatalf("%s: serve the controller: %v", id, err)
	}
	srv, err := server.New(cfg, server.Deps{
		Key:         servertest.Key(t),
		KeyObtained: time.Now(),
		KeyExpires:  time.Now().Add(90 * 24 * time.Hour),
		Controller:  nb,
		Registry:    pg,
		Events:      nb,
		Remote:      nb,
		Stats:       in.stats,
		Logger:      log,
		Version:     "e2e",
	})
	if err != nil {
		t.Fatal(err)
	}
	in.srv = srv
	if err := nb.Attach(srv); err != nil {
		t.Fatalf("%s: attach to the bus: %v", id, err)
	}
	servertest.ServeOn(t, id, srv, l)
	return in
}

// localAPI is the HTTP API behind an agent: it answers every request
// with its name, the method, path and body it got, and records the
// request's X-Test header; a request with ?size=N gets N bytes instead.
type localAPI struct {
	name string
	srv  *httptest.Server

	mu      sync.Mutex
	headers []string
}

func startLocalAPI(t *testing.T, name string) *localAPI {
	t.Helper()
	api := &localAPI{name: name}
	api.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body) // a short test body; an error leaves it empty, which the test sees
		api.mu.Lock()
		api.headers = append(api.headers, r.Header.Get("X-Test"))
		api.mu.Unlock()
		w.Header().Set("X-Served-By", name)
		if n, err := strconv.Atoi(r.URL.Query().Get("size")); err == nil {
			_, _ = w.Write(bytes.Repeat([]byte{'x'}, n)) // the test reads what arrived
			return
		}
		w.WriteHeader(http.StatusAccepted)
		fmt.Fprintf(w, "%s: %s %s body=%q", name, r.Method, r.URL.RequestURI(), body)
	}))
	t.Cleanup(api.srv.Close)
	return api
}

func (api *localAPI) seen() []string {
	api.mu.Lock()
	defer api.mu.Unlock()
	return append([]string(nil), api.headers...)
}

// startAgent runs the agent library with token against in, forwarding
// commands to its own local API and answering control requests with an
// echo of the "k" setting and its name. It returns once the agent is
// connected.
func (in *instance) startAgent(t *testing.T, token, name string) (*servertest.Agent, *localAPI) {
	t.Helper()
	api := startLocalAPI(t, name)
	fwd, err := agent.NewForwarder(api.srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fwd.Close)
	a := servertest.StartAgent(t, agent.Config{
		Server:  in.base,
		Token:   token,
		Handler: fwd,
		Control: agent.ControlHandlerFunc(func(_ context.Context, req *agent.ControlRequest) *agent.ControlResponse {
			who := name
			return &agent.ControlResponse{Success: true, Output: map[string]*string{
				"agent": &who, "command": &req.Command, "echo": req.Parameters["k"],
			}}
		}),
	})
	servertest.WaitFor(t, name+" connected to "+in.id, func() bool { return a.Count(agent.Connected) > 0 })
	return a, api
}

// portal dials and authenticates the portal library on in.
func (in *instance) portal(t *testing.T, token string) *portal.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := portal.Dial(ctx, portal.Config{Server: in.base, Token: token, RequestTimeout: 15 * time.Second})
	if err != nil {
		t.Fatalf("portal on %s: %v", in.id, err)
	}
	t.Cleanup(func() { _ = c.Close() }) // closing a finished connection is a no-op
	return c
}

// listed returns the entry of clientID in c's list, or false.
func listed(t *testing.T, c *portal.Client, clientID string) (portal.Agent, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := c.List(ctx)
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	for _, e := range list {
		if e.ClientID == clientID {
			return e, true
		}
	}
	return portal.Agent{}, false
}

// call sends a POST through the relay to agentID and returns the status,
// the X-Served-By header and the body of the answer.
func call(t *testing.T, c *portal.Client, agentID, path, body string) (int, string, string) {
	t.Helper()
	hc := &http.Client{Transport: c.Transport(agentID), Timeout: 20 * time.Second}
	req, err := http.NewRequest(http.MethodPost, "http://agent"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Test", path)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("POST %s to %s: %v", path, agentID, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("X-Served-By"), string(data)
}
