package portal_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/portal"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// localAPI is the HTTP API the test agents forward to.
func localAPI(t *testing.T) *httptest.Server {
	t.Helper()
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Reply", "yes")
		w.Header().Set("X-Echo", r.Header.Get("X-Request"))
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "hello %s", r.URL.Query().Get("n"))
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", r.Header.Get("Content-Type"))
		w.Header().Set("X-Method", r.Method)
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write(body)
	})
	mux.HandleFunc("GET /big", func(w http.ResponseWriter, r *http.Request) {
		var n int
		fmt.Sscan(r.URL.Query().Get("n"), &n)
		_, _ = w.Write(pattern(n))
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("GET /cookies", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Set-Cookie", sessionCookie)
		w.Header().Add("Set-Cookie", themeCookie)
		var seen []string
		for _, c := range r.Cookies() {
			seen = append(seen, c.Name+"="+c.Value)
		}
		fmt.Fprint(w, strings.Join(seen, " "))
	})
	mux.HandleFunc("GET /redirect", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/hello?n=redirected", http.StatusFound)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		close(release)
		srv.Close()
	})
	return srv
}

// The cookies the local API sets. The Expires of the first holds a comma,
// so the two cannot travel joined with ", ".
const (
	sessionCookie = "session=abc123; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly"
	themeCookie   = "theme=dark; Path=/"
)

// pattern is n bytes that are not all alike, so a shifted or cut body
// shows.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

// setup runs a server, an agent forwarding to a local API, and a portal
// that sees the agent.
func setup(t *testing.T, pcfg portal.Config) (*servertest.Server, *servertest.Agent, *portal.Client) {
	t.Helper()
	srv := servertest.Start(t)
	api := localAPI(t)
	fwd, err := agent.NewForwarder(api.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fwd.Close)
	a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: servertest.AgentToken, Handler: fwd})
	pc := dial(t, srv, pcfg)
	waitListed(t, pc, a.ClientID())
	return srv, a, pc
}

func dial(t *testing.T, srv *servertest.Server, cfg portal.Config) *portal.Client {
	t.Helper()
	cfg.Server = srv.Base
	if cfg.Token == "" {
		cfg.Token = servertest.PortalToken
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pc, err := portal.Dial(ctx, cfg)
	if err != nil {
		t.Fatalf("portal.Dial: %v", err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	return pc
}

func waitListed(t *testing.T, pc *portal.Client, clientID string) {
	t.Helper()
	servertest.WaitFor(t, "agent "+clientID+" listed", func() bool {
		list, err := pc.List(context.Background())
		if err != nil {
			t.Fatalf("list: %v", err)
		}
		return slices.ContainsFunc(list, func(a portal.Agent) bool { return a.ClientID == clientID })
	})
}

func do(t *testing.T, hc *http.Client, method, url string, body io.Reader, h http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, data
}

// Sizes for the large-body tests. The server takes at most 1 MiB
// (1048576 bytes) per message. A request travels from the portal as plain
// JSON: base64 makes the body 4/3 larger. An answer travels from the agent
// as a JWE whose plaintext holds the base64 body, and the JWE is base64url
// again: 16/9 of the body plus about 1.2 KB of key, IV, tag, headers and
// envelope. So a 560 KiB answer is about 1020.6 KB encrypted and fits;
// 600 KiB would be about 1093 KB and does not.
const (
	largeBody    = 560 << 10
	tooLargeBody = 600 << 10
)

func TestRelay(t *testing.T) {
	_, a, pc := setup(t, portal.Config{})
	hc := &http.Client{Transport: pc.Transport(a.ClientID())}

	t.Run("GET with headers both ways", func(t *testing.T) {
		resp, body := do(t, hc, "GET", "http://agent/hello?n=1", nil, http.Header{"X-Request": {"from portal"}})
		if resp.StatusCode != 200 || string(body) != "hello 1" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		if resp.Header.Get("X-Reply") != "yes" || resp.Header.Get("X-Echo") != "from portal" || resp.Header.Get("Content-Type") != "text/plain" {
			t.Fatalf("headers %v", resp.Header)
		}
		if resp.ContentLength != int64(len(body)) {
			t.Fatalf("content length %d for %d bytes", resp.ContentLength, len(body))
		}
	})
	t.Run("POST with a body", func(t *testing.T) {
		resp, body := do(t, hc, "POST", "http://agent/echo", strings.NewReader(`{"a":1}`), http.Header{"Content-Type": {"application/json"}})
		if resp.StatusCode != http.StatusCreated || string(body) != `{"a":1}` || resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("X-Method") != "POST" {
			t.Fatalf("got %d %q %v", resp.StatusCode, body, resp.Header)
		}
	})
	t.Run("404 from the local API", func(t *testing.T) {
		resp, _ := do(t, hc, "GET", "http://agent/missing", nil, nil)
		if resp.StatusCode != http.StatusNotFound || resp.Status != "404 Not Found" {
			t.Fatalf("got %q", resp.Status)
		}
	})
	t.Run("redirect followed by the HTTP client", func(t *testing.T) {
		resp, body := do(t, hc, "GET", "http://agent/redirect", nil, nil)
		if resp.StatusCode != 200 || string(body) != "hello redirected" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
	})
	t.Run("large bodies both ways", func(t *testing.T) {
		resp, body := do(t, hc, "POST", "http://agent/echo", bytes.NewReader(pattern(largeBody)), nil)
		if resp.StatusCode != http.StatusCreated || !bytes.Equal(body, pattern(largeBody)) {
			t.Fatalf("echo: got %d, %d bytes", resp.StatusCode, len(body))
		}
		resp, body = do(t, hc, "GET", fmt.Sprintf("http://agent/big?n=%d", largeBody), nil, nil)
		if resp.StatusCode != 200 || !bytes.Equal(body, pattern(largeBody)) {
			t.Fatalf("big: got %d, %d bytes", resp.StatusCode, len(body))
		}
	})
	t.Run("answer too large for the relay", func(t *testing.T) {
		resp, body := do(t, hc, "GET", fmt.Sprintf("http://agent/big?n=%d", tooLargeBody), nil, nil)
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "too large to relay") {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		// The agent is still connected and answering.
		if resp, _ := do(t, hc, "GET", "http://agent/hello", nil, nil); resp.StatusCode != 200 {
			t.Fatalf("after the large answer: %d", resp.StatusCode)
		}
	})
	t.Run("request too large for the relay", func(t *testing.T) {
		_, err := hc.Post("http://agent/echo", "application/octet-stream", bytes.NewReader(pattern(800<<10)))
		if !errors.Is(err, portal.ErrRequestTooLarge) {
			t.Fatalf("got %v, want ErrRequestTooLarge", err)
		}
		if resp, _ := do(t, hc, "GET", "http://agent/hello", nil, nil); resp.StatusCode != 200 {
			t.Fatalf("after the large request: %d", resp.StatusCode)
		}
	})
	t.Run("concurrent requests", func(t *testing.T) {
		const n = 40
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Go(func() {
				resp, err := hc.Get(fmt.Sprintf("http://agent/hello?n=%d", i))
				if err != nil {
					errs <- err
					return
				}
				defer resp.Body.Close()
				body, _ := io.ReadAll(resp.Body)
				if want := fmt.Sprintf("hello %d", i); string(body) != want {
					errs <- fmt.Errorf("request %d got %q (status %d)", i, body, resp.StatusCode)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

func TestHostPicksTheAgent(t *testing.T) {
	_, a, pc := setup(t, portal.Config{})
	hc := &http.Client{Transport: pc.Transport("")}
	resp, body := do(t, hc, "GET", "http://"+a.ClientID()+"/hello?n=h", nil, nil)
	if resp.StatusCode != 200 || string(body) != "hello h" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
}

// TestCookies sends two Cookie headers to the agent's local API and gets
// two Set-Cookie headers back, each whole.
func TestCookies(t *testing.T) {
	_, a, pc := setup(t, portal.Config{})
	hc := &http.Client{Transport: pc.Transport(a.ClientID())}
	resp, body := do(t, hc, "GET", "http://agent/cookies", nil, http.Header{"Cookie": {"a=1", "b=2"}})
	if resp.StatusCode != 200 || string(body) != "a=1 b=2" {
		t.Fatalf("got %d %q, want the local API to have seen both request cookies", resp.StatusCode, body)
	}
	if got, want := resp.Header.Values("Set-Cookie"), []string{sessionCookie, themeCookie}; !slices.Equal(got, want) {
		t.Fatalf("Set-Cookie %q, want %q", got, want)
	}
	cookies := resp.Cookies()
	if len(cookies) != 2 || cookies[0].Name != "session" || cookies[0].Value != "abc123" || cookies[0].Expires.Year() != 2037 ||
		!cookies[0].HttpOnly || cookies[1].Name != "theme" || cookies[1].Value != "dark" {
		t.Fatalf("cookies %v", cookies)
	}
}

func TestUnavailableDestination(t *testing.T) {
	srv := servertest.Start(t)
	pc := dial(t, srv, portal.Config{})
	hc := &http.Client{Transport: pc.Transport("")}
	_, err := hc.Get("http://no-such-agent/hello")
	if !errors.Is(err, portal.ErrDestinationNotAvailable) {
		t.Fatalf("got %v, want ErrDestinationNotAvailable", err)
	}
	var ue *portal.UnavailableError
	if !errors.As(err, &ue) || ue.AgentID != "no-such-agent" {
		t.Fatalf("got %#v, want *UnavailableError for no-such-agent", err)
	}
}

func TestRequestTimeout(t *testing.T) {
	_, a, pc := setup(t, portal.Config{RequestTimeout: 300 * time.Millisecond})
	hc := &http.Client{Transport: pc.Transport(a.ClientID())}
	_, err := hc.Get("http://agent/slow")
	if !errors.Is(err, portal.ErrTimeout) {
		t.Fatalf("got %v, want ErrTimeout", err)
	}
	var ue *url.Error
	if !errors.As(err, &ue) || !ue.Timeout() {
		t.Fatalf("got %#v, want a *url.Error with Timeout() true", err)
	}
	// The connection outlives the timeout.
	if resp, _ := do(t, hc, "GET", "http://agent/hello", nil, nil); resp.StatusCode != 200 {
		t.Fatalf("after the timeout: %d", resp.StatusCode)
	}
}

func TestRequestContext(t *testing.T) {
	_, a, pc := setup(t, portal.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://agent/slow", nil)
	_, err := (&http.Client{Transport: pc.Transport(a.ClientID())}).Do(req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
}

func TestAuthRejected(t *testing.T) {
	srv := servertest.Start(t)
	_, err := portal.Dial(context.Background(), portal.Config{Server: srv.Base, Token: "wrong"})
	if !errors.Is(err, portal.ErrAuthRejected) {
		t.Fatalf("got %v, want ErrAuthRejected", err)
	}
}

func TestDialErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  portal.Config
		want error
	}{
		{"no server", portal.Config{Token: "x"}, portal.ErrInvalidConfig},
		{"bad scheme", portal.Config{Server: "ftp://127.0.0.1:1", Token: "x"}, portal.ErrInvalidConfig},
		{"no token", portal.Config{Server: "http://127.0.0.1:1"}, portal.ErrInvalidConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := portal.Dial(context.Background(), tc.cfg); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	t.Run("nothing listening", func(t *testing.T) {
		srv := servertest.Start(t)
		if err := srv.Stop(); err != nil {
			t.Fatal(err)
		}
		_, err := portal.Dial(context.Background(), portal.Config{Server: srv.Base, Token: "x"})
		if err == nil || errors.Is(err, portal.ErrAuthRejected) {
			t.Fatalf("got %v, want a dial error", err)
		}
	})
}

func TestUpdates(t *testing.T) {
	srv := servertest.Start(t)
	pc := dial(t, srv, portal.Config{})
	a := servertest.StartAgent(t, agent.Config{Server: srv.Base, Token: servertest.AgentToken2})
	next := func(want bool) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case list, ok := <-pc.Updates():
				if !ok {
					t.Fatalf("updates closed: %v", pc.Err())
				}
				listed := slices.ContainsFunc(list, func(x portal.Agent) bool {
					return x.ClientID == a.ClientID() && x.MachineRegistrationID == "agent-2"
				})
				if listed == want {
					return
				}
			case <-timeout:
				t.Fatalf("no pushed list with the agent listed=%v", want)
			}
		}
	}
	next(true)
	a.Stop()
	next(false)

	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case _, ok := <-pc.Updates():
		for ok {
			_, ok = <-pc.Updates()
		}
	case <-time.After(10 * time.Second):
		t.Fatal("updates not closed after the server stopped")
	}
	if !errors.Is(pc.Err(), portal.ErrClosed) {
		t.Fatalf("Err() = %v, want ErrClosed", pc.Err())
	}
	if _, err := pc.List(context.Background()); !errors.Is(err, portal.ErrClosed) {
		t.Fatalf("list after close: %v", err)
	}
}
