package agent

import (
	"context"
	"encoding/json"
	"net/http"
	"time"
)

// Request is a command relayed from a portal: an HTTP request for the
// agent's local API.
type Request struct {
	// Method is the HTTP method, as the portal sent it.
	Method string
	// Path is the request target: path and query, as the portal sent it.
	Path string
	// Header holds the portal's headers. The wire carries one string per
	// name, so repeated headers arrive joined with ", ".
	Header http.Header
	// Body is the decoded body; nil when the portal sent none.
	Body []byte
	// From is the portal's client id; MessageID the command's id.
	From      string
	MessageID string
	// Payload is the command payload as it arrived.
	Payload json.RawMessage
}

// Response is the answer to a Request.
type Response struct {
	StatusCode int
	// Header is sent with one string per name; repeated values are joined
	// with ", ".
	Header http.Header
	Body   []byte
}

// Handler answers commands. ServeCommand may be called concurrently; ctx
// ends when the command's time is up or the connection it came on drops.
// A nil Response is answered with status 500.
type Handler interface {
	ServeCommand(ctx context.Context, req *Request) *Response
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request) *Response

// ServeCommand calls f.
func (f HandlerFunc) ServeCommand(ctx context.Context, req *Request) *Response { return f(ctx, req) }

// ControlRequest is a control message from the server, on behalf of the
// controller: for a Duplicati agent, a settings change or an order to
// disconnect for a while.
type ControlRequest struct {
	Command    string
	Parameters map[string]*string
	MessageID  string
}

// ControlResponse is the answer to a ControlRequest.
type ControlResponse struct {
	Success      bool
	Output       map[string]*string
	ErrorMessage string
	// PauseUntil, when in the future, makes the agent close the
	// connection once the answer is sent and stay away until then, as the
	// Duplicati agent does when the controller tells it to.
	PauseUntil time.Time
}

// ControlHandler answers control requests. HandleControl may be called
// concurrently. A nil ControlResponse is answered as a failure.
type ControlHandler interface {
	HandleControl(ctx context.Context, req *ControlRequest) *ControlResponse
}

// ControlHandlerFunc adapts a function to ControlHandler.
type ControlHandlerFunc func(ctx context.Context, req *ControlRequest) *ControlResponse

// HandleControl calls f.
func (f ControlHandlerFunc) HandleControl(ctx context.Context, req *ControlRequest) *ControlResponse {
	return f(ctx, req)
}

// textResponse is a plain-text answer the agent makes itself.
func textResponse(status int, msg string) *Response {
	h := http.Header{}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	return &Response{StatusCode: status, Header: h, Body: []byte(msg + "\n")}
}

// hopHeaders are the hop-by-hop headers (RFC 9110, 7.6.1) and those that
// describe one hop's framing; they are not carried across the relay.
var hopHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
	"Content-Length", "Host",
}

// flatten writes h as the wire's one string per name.
func flatten(h http.Header) map[string]string {
	if len(h) == 0 {
		return map[string]string{}
	}
	out := make(map[string]string, len(h))
	for k, vs := range h {
		if len(vs) == 0 {
			continue
		}
		out[http.CanonicalHeaderKey(k)] = joinValues(vs)
	}
	for _, k := range hopHeaders {
		delete(out, k)
	}
	return out
}

func joinValues(vs []string) string {
	if len(vs) == 1 {
		return vs[0]
	}
	n := 0
	for _, v := range vs {
		n += len(v) + 2
	}
	b := make([]byte, 0, n)
	for i, v := range vs {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = append(b, v...)
	}
	return string(b)
}

// unflatten reads the wire's headers into an http.Header.
func unflatten(m map[string]string) http.Header {
	h := make(http.Header, len(m))
	for k, v := range m {
		h.Set(k, v)
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
	return h
}
