package agent_test

import (
	"context"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/portal"
	"github.com/machineservice/machineservice/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// listed returns the agent's list entry as a new portal sees it.
func listed(t *testing.T, base, clientID string) (portal.Agent, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pc, err := portal.Dial(ctx, portal.Config{Server: base, Token: servertest.PortalToken})
	if err != nil {
		return portal.Agent{}, false // the server may be restarting
	}
	defer pc.Close()
	list, err := pc.List(ctx)
	if err != nil {
		return portal.Agent{}, false
	}
	i := slices.IndexFunc(list, func(a portal.Agent) bool { return a.ClientID == clientID })
	if i < 0 {
		return portal.Agent{}, false
	}
	return list[i], true
}

func waitListed(t *testing.T, base, clientID, registration string) {
	t.Helper()
	servertest.WaitFor(t, "agent listed as "+registration, func() bool {
		a, ok := listed(t, base, clientID)
		return ok && a.MachineRegistrationID == registration
	})
}

func firstErr(a *servertest.Agent, target error) bool {
	for _, e := range a.Events() {
		if e.State == agent.Disconnected && errors.Is(e.Err, target) {
			return true
		}
	}
	return false
}

func TestReconnectAfterServerRestart(t *testing.T) {
	srv := servertest.Start(t)
	a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: servertest.AgentToken})
	waitListed(t, srv.Base, a.ClientID(), "agent-1")

	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	servertest.WaitFor(t, "the agent to notice", func() bool { return a.Count(agent.Disconnected) > 0 })
	srv2 := servertest.StartAt(t, srv.Addr)
	waitListed(t, srv2.Base, a.ClientID(), "agent-1")
	servertest.WaitFor(t, "connected twice", func() bool { return a.Count(agent.Connected) == 2 })
}

func TestTokenRenewal(t *testing.T) {
	srv := servertest.Start(t)
	var mu sync.Mutex
	var stored []string
	a := servertest.StartAgent(t, agent.Config{
		Server: srv.Base,
		Token:  servertest.RenewingToken,
		OnToken: func(tok string) {
			mu.Lock()
			stored = append(stored, tok)
			mu.Unlock()
		},
	})
	waitListed(t, srv.Base, a.ClientID(), "agent-renewing")
	servertest.WaitFor(t, "connected", func() bool { return a.Count(agent.Connected) == 1 })
	mu.Lock()
	got := slices.Clone(stored)
	mu.Unlock()
	if !slices.Equal(got, []string{servertest.RenewedToken}) {
		t.Fatalf("stored tokens %q, want [%q]", got, servertest.RenewedToken)
	}
	if a.Token() != servertest.RenewedToken {
		t.Fatalf("Token() = %q", a.Token())
	}
	// The next connection authenticates with the renewed token, which
	// belongs to another registration.
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	srv2 := servertest.StartAt(t, srv.Addr)
	waitListed(t, srv2.Base, a.ClientID(), "agent-renewed")
}

// certServer serves the certificate lists in turn, the last one from then
// on.
func certServer(t *testing.T, lists ...[]wire.Certificate) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := int(hits.Add(1)) - 1
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(lists[min(n, len(lists)-1)])
	}))
	t.Cleanup(srv.Close)
	return srv, &hits
}

func cert(key *rsa.PublicKey) wire.Certificate {
	return wire.Certificate{
		PublicKeyHash: wire.PublicKeyHash(key),
		PublicKey:     wire.EncodePublicKey(key),
		Obtained:      time.Now(),
		Expiry:        time.Now().Add(time.Hour),
	}
}

func TestUnknownKeyRefreshesCertificates(t *testing.T) {
	srv := servertest.Start(t)
	stale := cert(&servertest.AgentKey(t).PublicKey) // any key but the server's
	right := cert(&servertest.Key(t).PublicKey)

	t.Run("stale list first, then the right one", func(t *testing.T) {
		certs, hits := certServer(t, []wire.Certificate{stale}, []wire.Certificate{right})
		var fetched atomic.Int32
		a := servertest.StartAgent(t, agent.Config{
			Server:          srv.Base,
			Token:           servertest.AgentToken,
			Certificates:    []wire.Certificate{stale},
			CertificatesURL: certs.URL,
			OnCertificates:  func([]wire.Certificate) { fetched.Add(1) },
		})
		servertest.WaitFor(t, "connected", func() bool { return a.Count(agent.Connected) == 1 })
		if !firstErr(a, agent.ErrUnknownServerKey) {
			t.Fatalf("no attempt failed with ErrUnknownServerKey: %v", a.Events())
		}
		if hits.Load() != 2 || fetched.Load() != 2 {
			t.Fatalf("certificates fetched %d times (%d reported), want 2", hits.Load(), fetched.Load())
		}
		if e := a.Events(); e[len(e)-1].ServerKeyHash != srv.KeyHash() {
			t.Fatalf("connected with key hash %q", e[len(e)-1].ServerKeyHash)
		}
	})
	t.Run("known key, no fetch", func(t *testing.T) {
		certs, hits := certServer(t, []wire.Certificate{stale})
		a := servertest.StartAgent(t, agent.Config{
			Server:          srv.Base,
			Token:           servertest.AgentToken,
			Certificates:    []wire.Certificate{right},
			CertificatesURL: certs.URL,
		})
		servertest.WaitFor(t, "connected", func() bool { return a.Count(agent.Connected) == 1 })
		if hits.Load() != 0 {
			t.Fatalf("certificates fetched %d times", hits.Load())
		}
	})
	t.Run("from the server's /certificates by default", func(t *testing.T) {
		a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: servertest.AgentToken})
		servertest.WaitFor(t, "connected", func() bool { return a.Count(agent.Connected) == 1 })
	})
	t.Run("an expired certificate does not count", func(t *testing.T) {
		old := right
		old.Expiry = time.Now().Add(-time.Minute)
		certs, hits := certServer(t, []wire.Certificate{old}, []wire.Certificate{right})
		a := servertest.StartAgent(t, agent.Config{
			Server:          srv.Base,
			Token:           servertest.AgentToken,
			Certificates:    []wire.Certificate{old},
			CertificatesURL: certs.URL,
		})
		servertest.WaitFor(t, "connected", func() bool { return a.Count(agent.Connected) == 1 })
		if !firstErr(a, agent.ErrCertificates) || hits.Load() != 2 {
			t.Fatalf("hits %d, events %v", hits.Load(), a.Events())
		}
	})
}

// TestAuthRejectedIsRetried: the static controller refuses an unknown
// token for good; the agent reports each refusal and keeps trying.
func TestAuthRejectedIsRetried(t *testing.T) {
	srv := servertest.Start(t)
	a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: "not-a-token"})
	servertest.WaitFor(t, "two refusals", func() bool { return a.Count(agent.Rejected) >= 2 })
	for _, e := range a.Events() {
		if e.State == agent.Rejected && !errors.Is(e.Err, agent.ErrAuthRejected) {
			t.Fatalf("rejected with %v, want ErrAuthRejected", e.Err)
		}
	}
}

func TestControl(t *testing.T) {
	srv := servertest.Start(t)
	var got atomic.Pointer[agent.ControlRequest]
	pause := make(chan time.Time, 1)
	a := servertest.StartAgent(t, agent.Config{
		Server: srv.Base,
		Token:  servertest.AgentToken,
		Control: agent.ControlHandlerFunc(func(_ context.Context, req *agent.ControlRequest) *agent.ControlResponse {
			got.Store(req)
			v := "done:" + *req.Parameters["level"]
			resp := &agent.ControlResponse{Success: true, Output: map[string]*string{"result": &v}}
			if req.Command == "disconnect" {
				resp.PauseUntil = <-pause
			}
			return resp
		}),
	})
	waitListed(t, srv.Base, a.ClientID(), "agent-1")

	level := "debug"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := srv.Srv.Control(ctx, bus.ControlRequest{AgentID: "agent-1", OrganizationID: servertest.Org,
		Command: "set-log-level", Settings: map[string]*string{"level": &level}})
	if err != nil || !resp.Success || resp.Settings["result"] == nil || *resp.Settings["result"] != "done:debug" {
		t.Fatalf("control answer %+v, %v", resp, err)
	}
	if r := got.Load(); r == nil || r.Command != "set-log-level" {
		t.Fatalf("handler got %+v", r)
	}

	// Told to stay away, the agent answers, leaves and waits.
	pause <- time.Now().Add(time.Second)
	resp, err = srv.Srv.Control(ctx, bus.ControlRequest{AgentID: "agent-1", OrganizationID: servertest.Org,
		Command: "disconnect", Settings: map[string]*string{"level": &level}})
	if err != nil || !resp.Success {
		t.Fatalf("control answer %+v, %v", resp, err)
	}
	servertest.WaitFor(t, "the requested disconnect", func() bool { return firstErr(a, agent.ErrDisconnectRequested) })
	for _, e := range a.Events() {
		if e.State == agent.Disconnected && errors.Is(e.Err, agent.ErrDisconnectRequested) && e.RetryIn < 500*time.Millisecond {
			t.Fatalf("retry in %s despite the pause", e.RetryIn)
		}
	}
	servertest.WaitFor(t, "reconnected", func() bool { return a.Count(agent.Connected) == 2 })
}

func TestNoControlHandler(t *testing.T) {
	srv := servertest.Start(t)
	a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: servertest.AgentToken})
	waitListed(t, srv.Base, a.ClientID(), "agent-1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := srv.Srv.Control(ctx, bus.ControlRequest{AgentID: "agent-1", OrganizationID: servertest.Org, Command: "x"})
	if err != nil || resp.Success || resp.Message == "" {
		t.Fatalf("control answer %+v, %v", resp, err)
	}
}

// silentServer speaks the protocol up to a successful auth and then says
// nothing more, as a server behind a dead network path would.
func silentServer(t *testing.T) (base string, conns *atomic.Int32) {
	t.Helper()
	key := servertest.Key(t)
	conns = &atomic.Int32{}
	var wg sync.WaitGroup
	up := websocket.Upgrader{}
	mux := http.NewServeMux()
	mux.HandleFunc("/certificates", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode([]wire.Certificate{cert(&key.PublicKey)})
	})
	mux.HandleFunc("/agent", func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		conns.Add(1)
		wg.Add(1)
		defer wg.Done()
		defer ws.Close()
		welcome := wire.Envelope{From: "silent", To: "unknown client", Type: wire.TypeWelcome, MessageID: "w"}
		_ = welcome.SetPayload(wire.Welcome{PublicKeyHash: wire.PublicKeyHash(&key.PublicKey), SupportedProtocolVersions: []int{1}})
		data, _ := welcome.Marshal(wire.StyleString)
		_ = ws.WriteMessage(websocket.TextMessage, data)
		_, frame, err := ws.ReadMessage()
		if err != nil {
			return
		}
		auth, err := wire.OpenEnvelope(frame, key)
		if err != nil {
			t.Errorf("silent server: %v", err)
			return
		}
		var req wire.AuthRequest
		_ = auth.DecodePayload(&req)
		agentKey, err := wire.ParsePublicKey(req.PublicKey)
		if err != nil {
			t.Errorf("silent server: %v", err)
			return
		}
		ans := wire.Envelope{From: "silent", To: auth.From, Type: wire.TypeAuth, MessageID: auth.MessageID}
		_ = ans.SetPayload(wire.AuthResult{Accepted: true})
		out, _ := wire.SealEnvelope(&ans, wire.StyleString, agentKey)
		_ = ws.WriteMessage(websocket.TextMessage, out)
		// Read (and drop) the pings without answering, until the agent
		// gives up on us.
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
		wg.Wait()
	})
	return srv.URL, conns
}

func TestIdleTimeoutReconnects(t *testing.T) {
	base, conns := silentServer(t)
	a := servertest.StartAgent(t, agent.Config{
		Server:       base,
		Token:        "any",
		PingInterval: 100 * time.Millisecond,
		IdleTimeout:  400 * time.Millisecond,
	})
	servertest.WaitFor(t, "a drop for silence and a new connection", func() bool {
		return firstErr(a, agent.ErrIdleTimeout) && conns.Load() >= 2
	})
}

func TestProtocolViolationDrops(t *testing.T) {
	// A server that is not a Machine Services server at all.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"hello"}`))
		_, _, _ = ws.ReadMessage()
	}))
	t.Cleanup(srv.Close)
	a := servertest.StartAgent(t, agent.Config{Server: srv.URL, Token: "any"})
	servertest.WaitFor(t, "a protocol error", func() bool { return firstErr(a, agent.ErrProtocol) })
}

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  agent.Config
	}{
		{"no server", agent.Config{Token: "t"}},
		{"bad scheme", agent.Config{Server: "ftp://h:1", Token: "t"}},
		{"no host", agent.Config{Server: "http://", Token: "t"}},
		{"no token", agent.Config{Server: "http://h:1"}},
		{"bad certificates URL", agent.Config{Server: "http://h:1", Token: "t", CertificatesURL: "file:///etc/passwd"}},
		{"idle not above ping", agent.Config{Server: "http://h:1", Token: "t", PingInterval: time.Minute, IdleTimeout: time.Minute}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Key = servertest.AgentKey(t)
			if _, err := agent.New(tc.cfg); !errors.Is(err, agent.ErrInvalidConfig) {
				t.Fatalf("got %v, want ErrInvalidConfig", err)
			}
		})
	}
}

func TestRunTwice(t *testing.T) {
	srv := servertest.Start(t)
	a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: servertest.AgentToken})
	servertest.WaitFor(t, "running", func() bool { return a.Count(agent.Connecting) > 0 })
	if err := a.Run(context.Background()); !errors.Is(err, agent.ErrRunning) {
		t.Fatalf("second Run: %v", err)
	}
}
