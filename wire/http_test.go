package wire_test

import (
	"net/http"
	"reflect"
	"testing"

	"github.com/machineservice/machineservice/wire"
)

func TestEndpoint(t *testing.T) {
	for _, tc := range []struct {
		base, route  string
		wantWS, want string // want is the HTTP base; wantWS "" means an error
	}{
		{"http://relay:8080", wire.RouteAgent, "ws://relay:8080/agent", "http://relay:8080"},
		{"https://relay.example.com/", wire.RoutePortal, "wss://relay.example.com/portal", "https://relay.example.com"},
		{"HTTPS://relay/prefix/", wire.RouteAgent, "wss://relay/prefix/agent", "https://relay/prefix"},
		{"ws://relay:1/agent", wire.RouteAgent, "ws://relay:1/agent", "http://relay:1"},
		{"wss://relay:1/portal/", wire.RoutePortal, "wss://relay:1/portal", "https://relay:1"},
		{"http://relay:1/agent", wire.RoutePortal, "ws://relay:1/agent/portal", "http://relay:1/agent"},
		{"ftp://relay:1", wire.RouteAgent, "", ""},
		{"relay:8080", wire.RouteAgent, "", ""},
		{"http://", wire.RouteAgent, "", ""},
		{"http://relay:1/?x=1", wire.RouteAgent, "", ""},
		{"http://relay:1/#x", wire.RouteAgent, "", ""},
		{"http://[::1", wire.RouteAgent, "", ""},
	} {
		t.Run(tc.base+" "+tc.route, func(t *testing.T) {
			ws, base, err := wire.Endpoint(tc.base, tc.route)
			if tc.wantWS == "" {
				if err == nil {
					t.Fatalf("got %q, %q; want an error", ws, base)
				}
				return
			}
			if err != nil || ws != tc.wantWS || base != tc.want {
				t.Fatalf("got %q, %q, %v; want %q, %q", ws, base, err, tc.wantWS, tc.want)
			}
		})
	}
}

func TestFlattenHeader(t *testing.T) {
	// Expires holds a comma: joined with ", " two cookies could not be
	// told apart again.
	c1 := "session=abc; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly"
	c2 := "theme=dark; Path=/"
	for _, tc := range []struct {
		name string
		in   http.Header
		wire map[string]string
		back http.Header // what UnflattenHeader makes of wire
	}{
		{
			name: "repeated values joined with a comma",
			in:   http.Header{"Accept": {"text/html", "application/json"}, "X-One": {"1"}},
			wire: map[string]string{"Accept": "text/html, application/json", "X-One": "1"},
			back: http.Header{"Accept": {"text/html, application/json"}, "X-One": {"1"}},
		},
		{
			name: "Set-Cookie joined with a newline and split again",
			in:   http.Header{"Set-Cookie": {c1, c2}},
			wire: map[string]string{"Set-Cookie": c1 + "\n" + c2},
			back: http.Header{"Set-Cookie": {c1, c2}},
		},
		{
			name: "Cookie joined as one cookie line",
			in:   http.Header{"Cookie": {"a=1", "b=2"}},
			wire: map[string]string{"Cookie": "a=1; b=2"},
			back: http.Header{"Cookie": {"a=1; b=2"}},
		},
		{
			name: "names canonicalized, hop-by-hop headers and Host dropped",
			in: http.Header{"x-lower": {"v"}, "Connection": {"close"}, "Transfer-Encoding": {"chunked"},
				"Content-Length": {"3"}, "Host": {"h"}, "Keep-Alive": {"timeout=5"}, "Empty": {}},
			wire: map[string]string{"X-Lower": "v"},
			back: http.Header{"X-Lower": {"v"}},
		},
		{
			name: "no headers",
			in:   nil,
			wire: map[string]string{},
			back: http.Header{},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := wire.FlattenHeader(tc.in)
			if got == nil || !reflect.DeepEqual(got, tc.wire) {
				t.Fatalf("FlattenHeader = %q, want %q", got, tc.wire)
			}
			if back := wire.UnflattenHeader(got); !reflect.DeepEqual(back, tc.back) {
				t.Fatalf("UnflattenHeader = %q, want %q", back, tc.back)
			}
		})
	}
}

func TestUnflattenHeader(t *testing.T) {
	got := wire.UnflattenHeader(map[string]string{
		"set-cookie": "a=1\r\n\nb=2\n",  // a sender's stray CR and empty lines
		"Upgrade":    "websocket",       // hop-by-hop, dropped
		"X-Empty":    "",                // kept as it is
		"X-List":     "one, two, three", // one value, as sent
	})
	want := http.Header{"Set-Cookie": {"a=1", "b=2"}, "X-Empty": {""}, "X-List": {"one, two, three"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}
