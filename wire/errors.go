package wire

import "errors"

// Texts the server sends as close reasons and in errorMessage. They are the
// original server's, so existing clients recognise them.
const (
	TextMalformed               = "Malformed message"
	TextDestinationNotAvailable = "Destination not available for relay"
	TextTokenExpired            = "Token expired"
	TextAuthWithoutPayload      = "Auth message without payload"
	TextInvalidStateForAuth     = "Invalid connection state for authentication"
	TextAuthWithoutToken        = "Auth message without token" //nolint:gosec // an error text, not a credential
	TextInvalidStateForList     = "Invalid connection state for list"
	TextInvalidProtocolVersion  = "Invalid protocol version"
	TextInvalidAuthPayload      = "Invalid payload for authentication"
	TextTooMuchDataBeforeAuth   = "Too much data sent on websocket before authentication, will close connection"
	TextNotAuthenticated        = "Not authenticated"
	TextInvalidControlResponse  = "Invalid control response payload"
	TextAccessDenied            = "Access denied"
	TextAuthenticationFailed    = "Authentication failed"
	TextAuthenticationTimeout   = "Authentication timeout"
	TextTooManyWhileAuthPending = "Too many messages while authentication is pending"
	TextMessageTooLarge         = "Message too large"
	TextIdleTimeout             = "No data received within the idle timeout"
	TextSlowConsumer            = "Client is not reading fast enough"
	TextReplaced                = "Replaced by a newer connection with the same client id"
	TextShuttingDown            = "Server shutting down"
	TextInvalidPublicKey        = "Invalid public key"
	TextControllerUnavailable   = "Authentication service unavailable"
	TextDestinationNotConnected = "Client was not connected"
	TextControlTimeout          = "Timed out waiting for the control response"
	TextControlRequestExpired   = "Control request expired"
	TextRegistryUnavailable     = "Client list unavailable"
	TextNotAnAgent              = "Client is not an authenticated agent"
)

// Errors returned by this package.
var (
	// ErrMalformed means the data is not a valid envelope.
	ErrMalformed = errors.New("malformed envelope")
	// ErrNoPayload means the envelope has no payload.
	ErrNoPayload = errors.New("no payload")
	// ErrInvalidPayload means the payload does not decode into the
	// expected shape.
	ErrInvalidPayload = errors.New("invalid payload")
	// ErrNotJWE means the data is not a compact JWE with the accepted
	// algorithms, or it does not decrypt with the key.
	ErrNotJWE = errors.New("not a valid JWE for this key")
	// ErrNotJWS means the data is not a compact RS256 JWS, or its
	// signature does not verify with the key.
	ErrNotJWS = errors.New("not a valid JWS for this key")
	// ErrInvalidKey means a key could not be parsed or is not an
	// acceptable RSA key.
	ErrInvalidKey = errors.New("invalid key")
)
