package server

import "errors"

// Errors returned by the server.
var (
	// ErrNotConnected means no connection of this instance holds the
	// client.
	ErrNotConnected = errors.New("client not connected")
	// ErrClosed means the connection closed before the operation ended.
	ErrClosed = errors.New("connection closed")
	// ErrControlTimeout means an agent did not answer a control request in
	// time.
	ErrControlTimeout = errors.New("control response timed out")
	// ErrControlStale means a control request was too old when it arrived.
	ErrControlStale = errors.New("control request expired")
	// ErrServerClosed is returned by Serve after Shutdown.
	ErrServerClosed = errors.New("server closed")

	errInvalidControlResponse = errors.New("invalid control response payload")
	// ErrNotServing means Serve has not been called yet.
	ErrNotServing = errors.New("server not serving yet")
	// ErrShuttingDown means Shutdown has begun.
	ErrShuttingDown = errors.New("server shutting down")
)
