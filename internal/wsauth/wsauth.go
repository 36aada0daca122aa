// Package wsauth holds what the agent and portal clients share about a
// refused authentication: after accepted:false the server closes the
// connection, and the close frame tells a refused token from a controller
// that could not be asked.
package wsauth

import (
	"errors"
	"fmt"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/wire"
)

// Refusal is why the server refused an authentication.
type Refusal int

const (
	// Rejected: the token was refused, or the server said nothing more.
	Rejected Refusal = iota
	// Unavailable: the server could not ask its controller (close 1013);
	// the token was not checked.
	Unavailable
)

// Wait bounds the wait for the close frame after accepted:false.
const Wait = 2 * time.Second

// ReadRefusal reads the close frame that follows accepted:false, for Wait
// at most, and says why the server refused. The close frame is returned
// when it told.
func ReadRefusal(ws *websocket.Conn) (Refusal, *websocket.CloseError) {
	_ = ws.SetReadDeadline(time.Now().Add(Wait)) // an error shows on the read
	for {
		_, _, err := ws.ReadMessage()
		if err == nil {
			continue // what comes before the close frame changes nothing
		}
		if why, ce, ok := FromClose(err); ok {
			return why, ce
		}
		return Rejected, nil
	}
}

// FromClose tells why the server closed a connection during its
// authentication; ok is false when err is not a close frame that answers
// it.
func FromClose(err error) (why Refusal, ce *websocket.CloseError, ok bool) {
	if !errors.As(err, &ce) {
		return Rejected, nil, false
	}
	switch {
	case ce.Code == websocket.CloseTryAgainLater:
		return Unavailable, ce, true
	case ce.Text == wire.TextAuthenticationFailed:
		return Rejected, ce, true
	}
	return Rejected, nil, false
}

// Errors are a client package's own errors for the two refusals.
type Errors struct {
	Rejected    error
	Unavailable error
}

// Read reads the close frame that follows accepted:false (see
// ReadRefusal) and returns the matching error.
func (e Errors) Read(ws *websocket.Conn) error {
	return e.of(ReadRefusal(ws))
}

// FromClose explains a close frame that ends an authentication with the
// matching error, or gives nil for any other error.
func (e Errors) FromClose(err error) error {
	why, ce, ok := FromClose(err)
	if !ok {
		return nil
	}
	return e.of(why, ce)
}

func (e Errors) of(why Refusal, ce *websocket.CloseError) error {
	base := e.Rejected
	if why == Unavailable {
		base = e.Unavailable
	}
	if ce == nil {
		return base
	}
	return fmt.Errorf("%w: %d %s", base, ce.Code, ce.Text)
}
