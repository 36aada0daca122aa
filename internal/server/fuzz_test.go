package server_test

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// closeTexts are the reasons a server may give for closing an agent that
// sent something odd.
var closeTexts = []string{
	wire.TextMalformed, wire.TextInvalidStateForAuth, wire.TextAuthWithoutPayload,
	wire.TextAuthWithoutToken, wire.TextInvalidStateForList, wire.TextInvalidProtocolVersion,
	wire.TextInvalidAuthPayload, wire.TextTooMuchDataBeforeAuth, wire.TextNotAuthenticated,
	wire.TextInvalidControlResponse, wire.TextAccessDenied, wire.TextAuthenticationFailed,
	wire.TextTooManyWhileAuthPending, wire.TextMessageTooLarge, wire.TextInvalidPublicKey,
}

// FuzzAgentFrame sends one envelope, encrypted to the server key as an
// agent would, on a fresh connection, then four list requests (which
// every agent state answers with a close). Whatever the envelope, the
// server must only send wrapped frames and end with a policy close and
// one of its texts; a panic anywhere in the server ends the fuzzing.
func FuzzAgentFrame(f *testing.F) {
	key := wire.EncodePublicKey(&testclient.Key(f, 1).PublicKey)
	seed := func(env *wire.Envelope, style wire.Style) {
		data, err := env.Marshal(style)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	auth := testclient.Message(wire.TypeAuth, "server", wire.AuthRequest{Token: agentA1, PublicKey: key, ClientVersion: "2.1.0.0", ProtocolVersion: 1})
	auth.From, auth.MessageID = "c1", "m1"
	seed(auth, wire.StyleString)
	seed(auth, wire.StyleEmbedded)
	for _, p := range []map[string]any{
		{"jwToken": agentRenew, "publicKey": key, "protocolVersion": 1},
		{"token": "unknown", "publicKey": key, "protocolVersion": 1},
		{"token": agentA1, "publicKey": "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n", "protocolVersion": 1},
		{"token": agentA1, "publicKey": key, "protocolVersion": 2},
		{"publicKey": key},
	} {
		seed(testclient.Message(wire.TypeAuth, "server", p), wire.StyleString)
	}
	for _, typ := range []string{wire.TypeList, wire.TypeCommand, wire.TypeControl, wire.TypePing, wire.TypeAuthPortal, "unknown"} {
		seed(testclient.Message(typ, "someone", map[string]string{"method": "GET"}), wire.StyleEmbedded)
	}
	for _, s := range []string{``, `{`, `null`, `[]`, `{"type":null}`, `{"TYPE":"AUTH","PAYLOAD":"\"{}\""}`, `{"type":"auth","payload":"` + strings.Repeat("x", 200) + `"}`} {
		f.Add([]byte(s))
	}

	f.Fuzz(func(t *testing.T, plain []byte) {
		e := start(t)
		a := e.agentT(t, 1)
		frame, err := wire.Encrypt(plain, a.ServerKey)
		if err != nil {
			t.Fatal(err)
		}
		probe := a.Encode(testclient.Message(wire.TypeList, "server", nil))
		// Writes fail once the server has closed; the reads below say why.
		_ = a.WS.WriteMessage(websocket.TextMessage, []byte(frame))
		for range 4 {
			_ = a.WS.WriteMessage(websocket.TextMessage, probe)
		}
		_ = a.WS.SetReadDeadline(time.Now().Add(testclient.Timeout))
		for {
			_, data, err := a.WS.ReadMessage()
			if err != nil {
				var ce *websocket.CloseError
				if !errors.As(err, &ce) {
					t.Fatalf("connection ended without a close frame: %v", err)
				}
				if (ce.Code != websocket.ClosePolicyViolation && ce.Code != websocket.CloseMessageTooBig) || !slices.Contains(closeTexts, ce.Text) {
					t.Fatalf("closed with %d %q", ce.Code, ce.Text)
				}
				return
			}
			if n := strings.Count(string(data), "."); n != 4 && n != 2 {
				t.Fatalf("the server sent an agent an unwrapped frame: %.200s", data)
			}
		}
	})
}
