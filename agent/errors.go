package agent

import "errors"

// Errors reported by an Agent, in the Err of a Disconnected event or
// returned by New and Run.
var (
	// ErrInvalidConfig means a Config setting is missing or wrong; the
	// error names the setting.
	ErrInvalidConfig = errors.New("agent: invalid configuration")
	// ErrRunning means Run was called while another Run of the same
	// Agent is still going.
	ErrRunning = errors.New("agent: already running")
	// ErrUnknownServerKey means the welcome names a server key that is not
	// among the known certificates, even after fetching them again.
	ErrUnknownServerKey = errors.New("agent: server key not among the known certificates")
	// ErrCertificates means the certificate list could not be fetched or
	// holds no usable key.
	ErrCertificates = errors.New("agent: fetching server certificates failed")
	// ErrAuthRejected means the server refused the token.
	ErrAuthRejected = errors.New("agent: authentication refused by the server")
	// ErrAuthUnavailable means the server could not check the token
	// because its authentication service (the controller) did not
	// answer; it closed with 1013, "Authentication service unavailable".
	// The token may well be good: the agent retries with its usual
	// backoff.
	ErrAuthUnavailable = errors.New("agent: authentication service unavailable")
	// ErrProtocol means the server sent something the agent does not
	// expect at that point; the agent drops the connection and retries,
	// as the Duplicati agent does.
	ErrProtocol = errors.New("agent: protocol violation")
	// ErrServerWarning means the server sent a warning (for example
	// "Token expired") before closing the connection.
	ErrServerWarning = errors.New("agent: server warning")
	// ErrIdleTimeout means nothing arrived from the server within the
	// idle timeout.
	ErrIdleTimeout = errors.New("agent: nothing received within the idle timeout")
	// ErrDisconnectRequested means a control handler asked the agent to
	// stay away for a while.
	ErrDisconnectRequested = errors.New("agent: disconnect requested by a control message")
)
