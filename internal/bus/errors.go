package bus

import "errors"

// Errors returned by the NATS bus.
var (
	// ErrNotConnected means the connection to NATS is down; it is being
	// re-established in the background.
	ErrNotConnected = errors.New("not connected to NATS")
	// ErrNoResponders means nobody listens on the subject of a request.
	ErrNoResponders = errors.New("no responders")
	// ErrTimeout means a request got no reply within its deadline.
	ErrTimeout = errors.New("no reply in time")
	// ErrBadReply means a reply did not decode.
	ErrBadReply = errors.New("malformed reply")
	// ErrTooLarge means a message exceeds the NATS server's max_payload.
	ErrTooLarge = errors.New("message larger than the NATS max_payload")
	// ErrClosed means the bus was closed.
	ErrClosed = errors.New("bus closed")
)
