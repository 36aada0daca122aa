package wire

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
)

// Routes of the server's WebSocket endpoints; the route fixes a
// connection's role.
const (
	RouteAgent  = "/agent"
	RoutePortal = "/portal"
)

// errBaseURL is the complaint about a base URL of the wrong shape.
var errBaseURL = errors.New("want http://host:port or https://host:port")

// Endpoint derives, from a server's base URL, the WebSocket URL a client
// dials for route (RouteAgent or RoutePortal) and the HTTP base the
// server's other paths (/certificates) hang off, without a trailing
// slash. base is http://host:port or https://host:port, optionally with a
// path prefix; ws:// and wss:// are taken for http:// and https://, and a
// base that already ends in route is taken without it. The error says
// what is wrong with base.
func Endpoint(base, route string) (wsURL, httpBase string, err error) {
	u, err := url.Parse(base)
	if err != nil {
		return "", "", err
	}
	var wsScheme, httpScheme string
	switch strings.ToLower(u.Scheme) {
	case "http", "ws":
		wsScheme, httpScheme = "ws", "http"
	case "https", "wss":
		wsScheme, httpScheme = "wss", "https"
	default:
		return "", "", errBaseURL
	}
	if u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return "", "", errBaseURL
	}
	path := strings.TrimSuffix(strings.TrimSuffix(u.Path, "/"), route)
	h := url.URL{Scheme: httpScheme, Host: u.Host, Path: path}
	ws := url.URL{Scheme: wsScheme, Host: u.Host, Path: path + route}
	return ws.String(), h.String(), nil
}

// hopHeaders are the hop-by-hop headers (RFC 9110, 7.6.1) and those that
// describe one hop's framing or target; they are not carried across the
// relay.
var hopHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
	"Content-Length", "Host",
}

// DropHopHeaders deletes from h the headers that belong to one hop
// (Connection, Transfer-Encoding, Content-Length, Host, ...) and so are
// not carried across the relay.
func DropHopHeaders(h http.Header) {
	for _, k := range hopHeaders {
		h.Del(k)
	}
}

// How repeated header values share the wire's one string per name. Most
// are joined with ", ", which HTTP takes as the same list (RFC 9110,
// 5.3). Set-Cookie may not be joined so (RFC 6265, 3: its values hold
// commas, in Expires for one): its values are joined with a newline,
// which no header value can contain, and split on it again. Cookie
// values are joined with "; ", as a client sends them in one line
// (RFC 6265, 5.4).
const (
	setCookieSep = "\n"
	cookieSep    = "; "
	listSep      = ", "
)

// FlattenHeader writes h as the wire's one string per name
// (CommandRequest.Headers, CommandResponse.Headers): repeated values are
// joined with ", ", Set-Cookie values with "\n", Cookie values with "; ".
// Names are canonicalized; the headers DropHopHeaders deletes are left
// out. The map is never nil.
func FlattenHeader(h http.Header) map[string]string {
	out := make(map[string]string, len(h))
	for k, vs := range h {
		if len(vs) == 0 {
			continue
		}
		k = http.CanonicalHeaderKey(k)
		sep := listSep
		switch k {
		case "Set-Cookie":
			sep = setCookieSep
		case "Cookie":
			sep = cookieSep
		}
		v := strings.Join(vs, sep)
		if prev, ok := out[k]; ok {
			v = prev + sep + v // the same name spelt twice in h
		}
		out[k] = v
	}
	for _, k := range hopHeaders {
		delete(out, k)
	}
	return out
}

// UnflattenHeader reads the wire's headers into an http.Header: a
// Set-Cookie string is split on "\n" into its cookies, every other name
// keeps its one value. The headers DropHopHeaders deletes are left out.
func UnflattenHeader(m map[string]string) http.Header {
	h := make(http.Header, len(m))
	for k, v := range m {
		k = http.CanonicalHeaderKey(k)
		if k != "Set-Cookie" {
			h[k] = append(h[k], v)
			continue
		}
		for c := range strings.SplitSeq(v, setCookieSep) {
			if c = strings.TrimSpace(c); c != "" {
				h[k] = append(h[k], c)
			}
		}
	}
	DropHopHeaders(h)
	return h
}
