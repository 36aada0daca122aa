package wsauth_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/wsauth"
	"github.com/machineservice/machineservice/wire"
)

func TestFromClose(t *testing.T) {
	tests := []struct {
		name string
		err  error
		why  wsauth.Refusal
		ok   bool
	}{
		{"controller unavailable", &websocket.CloseError{Code: websocket.CloseTryAgainLater, Text: wire.TextControllerUnavailable}, wsauth.Unavailable, true},
		{"token refused", &websocket.CloseError{Code: websocket.ClosePolicyViolation, Text: wire.TextAuthenticationFailed}, wsauth.Rejected, true},
		{"wrapped", fmt.Errorf("read: %w", &websocket.CloseError{Code: websocket.CloseTryAgainLater}), wsauth.Unavailable, true},
		{"another close", &websocket.CloseError{Code: websocket.ClosePolicyViolation, Text: wire.TextMalformed}, wsauth.Rejected, false},
		{"not a close", errors.New("connection reset"), wsauth.Rejected, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			why, ce, ok := wsauth.FromClose(tt.err)
			if why != tt.why || ok != tt.ok || (ok && ce == nil) {
				t.Fatalf("FromClose = %v, %v, %v; want %v, %v", why, ce, ok, tt.why, tt.ok)
			}
		})
	}
}
