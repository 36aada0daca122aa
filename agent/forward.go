package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// DefaultForwardTimeout bounds one forwarded request when the Forwarder
// makes its own HTTP client. It is the default of the .NET HTTP client the
// Duplicati agent forwards with.
const DefaultForwardTimeout = 100 * time.Second

// DefaultMaxForwardBody is the largest local response body a Forwarder
// reads. A larger one could not be relayed anyway: the server takes at
// most 1 MiB per message, and base64 plus JWE make a body about 16/9 times
// larger on the wire.
const DefaultMaxForwardBody = 1 << 20

// Forwarder is a Handler that forwards each command to a local HTTP API as
// a real HTTP request and answers with its status, headers and body, as
// the Duplicati agent does with its own web server. Redirects are not
// followed: they go back to the portal as they are. Failures are answered
// with 502 (504 when the local API did not answer in time) and a plain
// text message.
type Forwarder struct {
	base    *url.URL
	prefix  string // base without a trailing slash
	client  *http.Client
	own     *http.Transport // the transport of a client made here, or nil
	maxBody int64
}

var _ Handler = (*Forwarder)(nil)

// NewForwarder forwards to base, an http or https URL such as
// http://127.0.0.1:8200; a path in base prefixes every request path.
// client may be nil for a client of its own with DefaultForwardTimeout
// and no proxy.
func NewForwarder(base string, client *http.Client) (*Forwarder, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, fmt.Errorf("%w: forward URL %q: %v", ErrInvalidConfig, base, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: forward URL %q: want http://host:port or https://host:port", ErrInvalidConfig, base)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, fmt.Errorf("%w: forward URL %q: no query, fragment or user info allowed", ErrInvalidConfig, base)
	}
	f := &Forwarder{base: u, prefix: strings.TrimSuffix(u.String(), "/"), maxBody: DefaultMaxForwardBody}
	if client == nil {
		tr, ok := http.DefaultTransport.(*http.Transport)
		if ok {
			tr = tr.Clone()
		} else {
			tr = &http.Transport{}
		}
		// The target is local: environment proxies do not apply.
		tr.Proxy = nil
		f.own = tr
		client = &http.Client{Transport: tr, Timeout: DefaultForwardTimeout}
	}
	c := *client
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	f.client = &c
	return f, nil
}

// SetMaxBody changes the largest local response body read (default
// DefaultMaxForwardBody).
func (f *Forwarder) SetMaxBody(n int64) { f.maxBody = n }

// Close closes the idle connections of the Forwarder's own client.
func (f *Forwarder) Close() {
	if f.own != nil {
		f.own.CloseIdleConnections()
	}
}

// ServeCommand forwards req to the local API.
func (f *Forwarder) ServeCommand(ctx context.Context, req *Request) *Response {
	target, err := f.target(req.Path)
	if err != nil {
		return textResponse(http.StatusBadRequest, err.Error())
	}
	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	var body io.Reader
	if len(req.Body) > 0 {
		body = bytes.NewReader(req.Body)
	}
	hr, err := http.NewRequestWithContext(ctx, method, target, body)
	if err != nil {
		return textResponse(http.StatusBadRequest, fmt.Sprintf("invalid request: %v", err))
	}
	for k, vs := range req.Header {
		hr.Header[k] = vs
	}
	wire.DropHopHeaders(hr.Header)
	resp, err := f.client.Do(hr)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			return textResponse(http.StatusGatewayTimeout, fmt.Sprintf("local API %s did not answer in time", f.prefix))
		}
		return textResponse(http.StatusBadGateway, fmt.Sprintf("forwarding to the local API failed: %v", err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, f.maxBody+1))
	if err != nil {
		return textResponse(http.StatusBadGateway, fmt.Sprintf("reading the local API's response failed: %v", err))
	}
	if int64(len(data)) > f.maxBody {
		return textResponse(http.StatusBadGateway, fmt.Sprintf("the local API's response body is larger than %d bytes, too large to relay", f.maxBody))
	}
	h := resp.Header.Clone()
	wire.DropHopHeaders(h)
	return &Response{StatusCode: resp.StatusCode, Header: h, Body: data}
}

// target joins the forward URL and a request path. Only a path (and
// query) is accepted, so a command cannot make the agent call another
// host.
func (f *Forwarder) target(path string) (string, error) {
	if path == "" {
		path = "/"
	}
	if !strings.HasPrefix(path, "/") {
		return "", fmt.Errorf("invalid path %q: must start with /", path)
	}
	u, err := url.ParseRequestURI(path)
	if err != nil {
		return "", fmt.Errorf("invalid path %q: %v", path, err)
	}
	if u.Scheme != "" || u.Host != "" {
		return "", fmt.Errorf("invalid path %q: only a path and query are accepted", path)
	}
	target := f.prefix + path
	t, err := url.Parse(target)
	if err != nil || t.Host != f.base.Host {
		return "", fmt.Errorf("invalid path %q", path)
	}
	return target, nil
}

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}
