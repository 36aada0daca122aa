package portal

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/machineservice/machineservice/wire"
)

// Transport returns an http.RoundTripper that sends each request to an
// agent through the relay. agentID is the agent's client id (the clientId
// of its list entry); when it is empty, the host of each request's URL is
// taken as the client id instead, so one http.Client can reach every agent
// with URLs like http://<clientId>/path.
//
// The request's method, path and query, headers and body travel in the
// command; the scheme and host do not. The agent's status, headers and
// body make the *http.Response. The wire carries one string per header
// name (see wire.FlattenHeader): repeated values are joined with ", ",
// Cookie values with "; ", and Set-Cookie values with "\n", which is split
// again here, so that each cookie of the agent's answer arrives whole in
// Header["Set-Cookie"]. Hop-by-hop headers and Host are left out. Each round trip is bounded by the request's context
// and by Config.RequestTimeout. Errors: *UnavailableError when the agent
// is not connected, one wrapping ErrTimeout on timeout, ErrRequestTooLarge,
// ErrRelay, ErrInvalidResponse, or one wrapping ErrClosed when the
// connection has ended.
func (c *Client) Transport(agentID string) http.RoundTripper {
	return &transport{c: c, agent: agentID}
}

type transport struct {
	c     *Client
	agent string
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	c := t.c
	agent := t.agent
	if agent == "" && req.URL != nil {
		agent = req.URL.Hostname()
	}
	body, err := readBody(req, c.cfg.MaxMessageSize)
	if err != nil {
		return nil, err
	}
	if agent == "" {
		return nil, fmt.Errorf("%w: no agent: the request URL has no host", ErrInvalidConfig)
	}
	path := "/"
	if req.URL != nil {
		path = req.URL.RequestURI()
	}
	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	cmd := wire.CommandRequest{Method: method, Path: path, Headers: wire.FlattenHeader(req.Header)}
	if body != nil {
		b := base64.StdEncoding.EncodeToString(body)
		cmd.Body = &b
	}
	env := &wire.Envelope{To: agent, Type: wire.TypeCommand}
	if err := env.SetPayload(cmd); err != nil {
		return nil, err
	}
	ans, err := c.exchange(req.Context(), env, agent)
	if err != nil {
		return nil, err
	}
	switch {
	case ans.ErrorMessage == wire.TextDestinationNotAvailable:
		return nil, &UnavailableError{AgentID: agent}
	case ans.ErrorMessage != "":
		return nil, fmt.Errorf("%w: agent %s: %s", ErrRelay, agent, ans.ErrorMessage)
	case ans.Type != wire.TypeCommand:
		return nil, fmt.Errorf("%w: agent %s answered with %q", ErrInvalidResponse, agent, ans.Type)
	}
	var r wire.CommandResponse
	if err := ans.DecodePayload(&r); err != nil {
		return nil, fmt.Errorf("%w: agent %s: %v", ErrInvalidResponse, agent, err)
	}
	if r.StatusCode < 100 || r.StatusCode > 999 {
		return nil, fmt.Errorf("%w: agent %s: status code %d", ErrInvalidResponse, agent, r.StatusCode)
	}
	var data []byte
	if r.Body != nil && *r.Body != "" {
		data, err = base64.StdEncoding.DecodeString(*r.Body)
		if err != nil {
			// The Duplicati agent sends an error's message as it is, not
			// in base64: pass such a body on as text.
			data = []byte(*r.Body)
		}
	}
	text := http.StatusText(r.StatusCode)
	if text == "" {
		text = "status code " + strconv.Itoa(r.StatusCode)
	}
	return &http.Response{
		Status:        strconv.Itoa(r.StatusCode) + " " + text,
		StatusCode:    r.StatusCode,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        wire.UnflattenHeader(r.Headers),
		Body:          io.NopCloser(bytes.NewReader(data)),
		ContentLength: int64(len(data)),
		Request:       req,
	}, nil
}

// readBody reads and closes the request body, as a RoundTripper must,
// up to limit bytes.
func readBody(req *http.Request, limit int) ([]byte, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return nil, nil
	}
	defer req.Body.Close()
	data, err := io.ReadAll(io.LimitReader(req.Body, int64(limit)+1))
	if err != nil {
		return nil, fmt.Errorf("portal: read request body: %w", err)
	}
	if len(data) > limit {
		return nil, fmt.Errorf("%w: the body alone is over %d bytes", ErrRequestTooLarge, limit)
	}
	return data, nil
}
