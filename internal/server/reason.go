package server

import (
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/wire"
)

// closeReason is why a connection closed. Every close carries one; it is
// logged and counted under its name.
type closeReason uint8

const (
	reasonNone closeReason = iota
	reasonClientClosed
	reasonConnectionLost
	reasonIdleTimeout
	reasonAuthTimeout
	reasonPreAuthBudget
	reasonMessageTooLarge
	reasonMalformed
	reasonNotEncrypted
	reasonAuthNoPayload
	reasonAuthBadPayload
	reasonAuthNoToken
	reasonBadProtocolVersion
	reasonBadPublicKey
	reasonWrongStateForAuth
	reasonWrongStateForList
	reasonNotAuthenticated
	reasonAuthRejected
	reasonControllerUnavailable
	reasonTooManyWhilePending
	reasonAccessDenied
	reasonTokenExpired
	reasonBadControlResponse
	reasonSlowConsumer
	reasonWriteFailed
	reasonReplaced
	reasonShuttingDown
	numReasons
)

type reasonInfo struct {
	name string
	code int    // close code sent; 0 sends no close frame
	text string // close reason text
}

var reasons = [numReasons]reasonInfo{
	reasonNone:                  {"none", 0, ""},
	reasonClientClosed:          {"client_closed", 0, ""},
	reasonConnectionLost:        {"connection_lost", 0, ""},
	reasonIdleTimeout:           {"idle_timeout", websocket.CloseGoingAway, wire.TextIdleTimeout},
	reasonAuthTimeout:           {"auth_timeout", websocket.ClosePolicyViolation, wire.TextAuthenticationTimeout},
	reasonPreAuthBudget:         {"pre_auth_budget", websocket.ClosePolicyViolation, wire.TextTooMuchDataBeforeAuth},
	reasonMessageTooLarge:       {"message_too_large", websocket.CloseMessageTooBig, wire.TextMessageTooLarge},
	reasonMalformed:             {"malformed", websocket.ClosePolicyViolation, wire.TextMalformed},
	reasonNotEncrypted:          {"not_encrypted", websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth},
	reasonAuthNoPayload:         {"auth_no_payload", websocket.ClosePolicyViolation, wire.TextAuthWithoutPayload},
	reasonAuthBadPayload:        {"auth_bad_payload", websocket.ClosePolicyViolation, wire.TextInvalidAuthPayload},
	reasonAuthNoToken:           {"auth_no_token", websocket.ClosePolicyViolation, wire.TextAuthWithoutToken},
	reasonBadProtocolVersion:    {"bad_protocol_version", websocket.ClosePolicyViolation, wire.TextInvalidProtocolVersion},
	reasonBadPublicKey:          {"bad_public_key", websocket.ClosePolicyViolation, wire.TextInvalidPublicKey},
	reasonWrongStateForAuth:     {"wrong_state_for_auth", websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth},
	reasonWrongStateForList:     {"wrong_state_for_list", websocket.ClosePolicyViolation, wire.TextInvalidStateForList},
	reasonNotAuthenticated:      {"not_authenticated", websocket.ClosePolicyViolation, wire.TextNotAuthenticated},
	reasonAuthRejected:          {"auth_rejected", websocket.ClosePolicyViolation, wire.TextAuthenticationFailed},
	reasonControllerUnavailable: {"controller_unavailable", websocket.CloseTryAgainLater, wire.TextControllerUnavailable},
	reasonTooManyWhilePending:   {"too_many_while_auth_pending", websocket.ClosePolicyViolation, wire.TextTooManyWhileAuthPending},
	reasonAccessDenied:          {"access_denied", websocket.ClosePolicyViolation, wire.TextAccessDenied},
	reasonTokenExpired:          {"token_expired", websocket.ClosePolicyViolation, wire.TextTokenExpired},
	reasonBadControlResponse:    {"bad_control_response", websocket.ClosePolicyViolation, wire.TextInvalidControlResponse},
	reasonSlowConsumer:          {"slow_consumer", websocket.ClosePolicyViolation, wire.TextSlowConsumer},
	reasonWriteFailed:           {"write_failed", 0, ""},
	reasonReplaced:              {"replaced", websocket.CloseNormalClosure, wire.TextReplaced},
	reasonShuttingDown:          {"shutting_down", websocket.CloseGoingAway, wire.TextShuttingDown},
}

func (r closeReason) String() string { return reasons[r].name }

// ReasonNames lists the names close reasons are counted under.
func ReasonNames() []string {
	out := make([]string, 0, numReasons-1)
	for r := reasonNone + 1; r < numReasons; r++ {
		out = append(out, reasons[r].name)
	}
	return out
}
