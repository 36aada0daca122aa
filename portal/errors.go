package portal

import (
	"errors"
	"fmt"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// Errors returned by a Client.
var (
	// ErrInvalidConfig means a Config setting is missing or wrong; the
	// error names the setting.
	ErrInvalidConfig = errors.New("portal: invalid configuration")
	// ErrAuthRejected means the server refused the token.
	ErrAuthRejected = errors.New("portal: authentication refused by the server")
	// ErrAuthUnavailable means the server could not check the token
	// because its authentication service (the controller) did not
	// answer; it closed with 1013, "Authentication service unavailable".
	// The token may be good: try again later.
	ErrAuthUnavailable = errors.New("portal: authentication service unavailable")
	// ErrProtocol means the server sent something the client does not
	// expect.
	ErrProtocol = errors.New("portal: protocol violation")
	// ErrClosed means the connection is closed; the error wrapping it
	// says why.
	ErrClosed = errors.New("portal: connection closed")
	// ErrIdleTimeout means nothing arrived from the server within
	// Config.IdleTimeout, so the connection was taken for dead and
	// closed. An error wrapping it wraps ErrClosed too.
	ErrIdleTimeout = errors.New("portal: nothing received within the idle timeout")
	// ErrDestinationNotAvailable means the agent a request was sent to is
	// not connected (the server's "Destination not available for
	// relay"). Requests fail with an *UnavailableError, which matches it
	// with errors.Is.
	ErrDestinationNotAvailable = errors.New("portal: destination not available for relay")
	// ErrTimeout means no answer came within the request timeout. The
	// error wrapping it also reports Timeout() == true, so http.Client
	// callers see a *url.Error whose Timeout() is true.
	ErrTimeout = errors.New("portal: request timed out")
	// ErrRequestTooLarge means a request would exceed the server's
	// message size limit; it is not sent.
	ErrRequestTooLarge = errors.New("portal: request too large for the relay")
	// ErrRelay means the server answered a request with an error message
	// other than "Destination not available for relay".
	ErrRelay = errors.New("portal: relay failed")
	// ErrInvalidResponse means the agent's answer is not a command
	// response.
	ErrInvalidResponse = errors.New("portal: invalid response from the agent")
)

// UnavailableError reports that the server could not relay a request to
// an agent because the agent is not connected.
type UnavailableError struct {
	// AgentID is the client id the request was addressed to.
	AgentID string
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("portal: agent %s: %s", e.AgentID, wire.TextDestinationNotAvailable)
}

// Is makes errors.Is(err, ErrDestinationNotAvailable) true.
func (e *UnavailableError) Is(target error) bool { return target == ErrDestinationNotAvailable }

// timeoutError is ErrTimeout with the details and the Timeout method that
// net/http and net callers look for.
type timeoutError struct {
	agent string
	after time.Duration
}

func (e *timeoutError) Error() string {
	return fmt.Sprintf("portal: agent %s: no answer within %s: request timed out", e.agent, e.after)
}

func (e *timeoutError) Unwrap() error { return ErrTimeout }

// Timeout reports true.
func (e *timeoutError) Timeout() bool { return true }

// idleError is ErrClosed because of ErrIdleTimeout.
type idleError struct{ after time.Duration }

func (e *idleError) Error() string {
	return fmt.Sprintf("portal: connection closed: nothing received within %s, the connection is taken for dead", e.after)
}

func (e *idleError) Unwrap() []error { return []error{ErrClosed, ErrIdleTimeout} }
