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
	// name, so repeated headers arrive joined with ", " (Cookie ones with
	// "; "); see wire.FlattenHeader.
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
	// Header is sent with one string per name: repeated values are joined
	// with ", ", except Set-Cookie ones, which are joined with "\n" so
	// that the portal gets each cookie back whole (see
	// wire.FlattenHeader). Hop-by-hop headers are not sent.
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
