package agent_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/machineservice/machineservice/agent"
)

func TestForwarder(t *testing.T) {
	var seen *http.Request
	var seenBody string
	local := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = r
		b, _ := io.ReadAll(r.Body)
		seenBody = string(b)
		w.Header().Set("X-Path", r.URL.RequestURI())
		w.Header().Set("Connection", "close")
		if r.URL.Path == "/api/moved" {
			http.Redirect(w, r, "/api/elsewhere", http.StatusMovedPermanently)
			return
		}
		_, _ = w.Write([]byte("ok"))
	}))
	t.Cleanup(local.Close)
	fwd, err := agent.NewForwarder(local.URL+"/api/", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fwd.Close)

	for _, tc := range []struct {
		name     string
		req      agent.Request
		status   int
		path     string // X-Path the local API saw
		contains string // in the body of an error
	}{
		{"path and query under the prefix", agent.Request{Method: "GET", Path: "/v1/state?x=1&y=%20"}, 200, "/api/v1/state?x=1&y=%20", ""},
		{"empty method is GET", agent.Request{Path: "/"}, 200, "/api/", ""},
		{"a double slash stays on the local host", agent.Request{Method: "GET", Path: "//evil.example/x"}, 200, "/api//evil.example/x", ""},
		{"redirects are passed back", agent.Request{Method: "GET", Path: "/moved"}, 301, "/api/moved", ""},
		{"absolute URL refused", agent.Request{Method: "GET", Path: "http://evil.example/x"}, 400, "", "must start with /"},
		{"relative path refused", agent.Request{Method: "GET", Path: "x"}, 400, "", "must start with /"},
		{"bad method refused", agent.Request{Method: "G E T", Path: "/"}, 400, "", "invalid request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := fwd.ServeCommand(context.Background(), &tc.req)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, resp.Body, tc.status)
			}
			if tc.path != "" && resp.Header.Get("X-Path") != tc.path {
				t.Fatalf("local API saw %q, want %q", resp.Header.Get("X-Path"), tc.path)
			}
			if resp.Header.Get("Connection") != "" {
				t.Fatalf("hop-by-hop header passed back: %v", resp.Header)
			}
			if !strings.Contains(string(resp.Body), tc.contains) {
				t.Fatalf("body %q lacks %q", resp.Body, tc.contains)
			}
		})
	}

	t.Run("headers and body forwarded, hop-by-hop and Host dropped", func(t *testing.T) {
		h := http.Header{}
		h.Set("Authorization", "Bearer x")
		h.Set("Content-Type", "application/json")
		h.Set("Connection", "upgrade")
		h.Set("Host", "portal.example")
		resp := fwd.ServeCommand(context.Background(), &agent.Request{Method: "PUT", Path: "/x", Header: h, Body: []byte(`{"a":1}`)})
		if resp.StatusCode != 200 || seen.Method != "PUT" || seenBody != `{"a":1}` {
			t.Fatalf("status %d, local API saw %s %q", resp.StatusCode, seen.Method, seenBody)
		}
		if seen.Header.Get("Authorization") != "Bearer x" || seen.Header.Get("Content-Type") != "application/json" ||
			seen.Header.Get("Connection") != "" || seen.Host == "portal.example" {
			t.Fatalf("local API saw headers %v, host %q", seen.Header, seen.Host)
		}
	})

	t.Run("local API down is a 502", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		_ = l.Close()
		down, err := agent.NewForwarder("http://"+addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer down.Close()
		resp := down.ServeCommand(context.Background(), &agent.Request{Method: "GET", Path: "/"})
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(resp.Body), "forwarding to the local API failed") {
			t.Fatalf("got %d %q", resp.StatusCode, resp.Body)
		}
	})

	t.Run("bad forward URLs", func(t *testing.T) {
		for _, u := range []string{"", "127.0.0.1:80", "ftp://h/", "http://", "http://h/?q=1"} {
			if _, err := agent.NewForwarder(u, nil); err == nil {
				t.Errorf("NewForwarder(%q) accepted", u)
			}
		}
	})
}
