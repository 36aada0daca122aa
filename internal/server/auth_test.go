package server_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"slices"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/server"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// TestAgentAuthAccepted checks the answer to a good auth: type auth, the
// request's message id, a JWE to the agent's own key with the protocol's
// algorithms, and a registration the portal can list.
func TestAgentAuthAccepted(t *testing.T) {
	e := start(t)
	a := e.agentT(t, 1)
	req := testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1))
	a.Send(req)
	data := readRaw(t, a)
	jweHeader(t, data)
	if _, err := wire.Decrypt(data, testclient.Key(t, 2)); err == nil {
		t.Fatal("the auth answer decrypts with a key that is not the agent's")
	}
	env, err := wire.OpenEnvelope(data, a.Key)
	if err != nil {
		t.Fatalf("the auth answer does not decrypt with the agent key: %v", err)
	}
	if env.Type != wire.TypeAuth || env.MessageID != req.MessageID || env.From != "test-instance" || env.To != a.ClientID {
		t.Fatalf("auth answer %+v", env)
	}
	var res wire.AuthResult
	if err := env.DecodePayload(&res); err != nil || !res.Accepted || res.WillReplaceToken || res.NewToken != nil {
		t.Fatalf("auth result %s (%v)", env.Payload, err)
	}
	p := e.authedPortalT(t, portalA, false)
	if ids := listIDs(t, p); !slices.Equal(ids, []string{a.ClientID}) {
		t.Fatalf("portal lists %v, want the agent %s", ids, a.ClientID)
	}
	e.waitCounter(t, stats.AuthClientSuccess, 1)
}

func TestAgentAuthKeyFormats(t *testing.T) {
	e := start(t)
	for _, tt := range []struct {
		name string
		pem  func(*rsa.PublicKey) string
	}{
		{"pkcs1", wire.EncodePublicKey},
		{"spki", func(k *rsa.PublicKey) string { return spkiPEM(t, k) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := e.agentT(t, 1)
			p := authRequest(a, agentA1)
			p.PublicKey = tt.pem(&a.Key.PublicKey)
			req := testclient.Message(wire.TypeAuth, "server", p)
			a.Send(req)
			if res := authResult(t, a, wire.TypeAuth, req.MessageID); !res.Accepted {
				t.Fatalf("auth with a %s key refused", tt.name)
			}
			if pong := ping(t, a); pong.To != a.ClientID {
				t.Fatalf("pong to %q", pong.To)
			}
		})
	}
}

// bigKeyPEM is a PKCS#1 PEM of an RSA public key with a bits-bit modulus.
// The modulus need not be a product of primes for the size check, so it
// is built directly instead of generating a slow key.
func bigKeyPEM(bits int) string {
	n := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
	n.Add(n, big.NewInt(0x10001)) // odd, exactly bits bits
	der := x509.MarshalPKCS1PublicKey(&rsa.PublicKey{N: n, E: 65537})
	return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: der}))
}

func TestAgentAuthBadKeys(t *testing.T) {
	e := start(t)
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, key string
	}{
		{"1024 bits pkcs1", wire.EncodePublicKey(&small.PublicKey)},
		{"1024 bits spki", spkiPEM(t, &small.PublicKey)},
		{"8192 bits", bigKeyPEM(8192)},
		{"4097 bits", bigKeyPEM(4097)},
		{"not pem", "MIIBCgKCAQEA"},
		{"missing", ""},
		{"private key pem", string(wire.EncodePrivateKey(testclient.Key(t, 1)))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := e.agentT(t, 1)
			p := authRequest(a, agentA1)
			p.PublicKey = tt.key
			a.Send(testclient.Message(wire.TypeAuth, "server", p))
			a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidPublicKey)
		})
	}
	// The limits themselves are accepted.
	t.Run("4096 bits", func(t *testing.T) {
		a := e.agentT(t, 1)
		p := authRequest(a, agentA1)
		p.PublicKey = bigKeyPEM(4096)
		req := testclient.Message(wire.TypeAuth, "server", p)
		a.Send(req)
		// The answer is encrypted to a key nobody holds: check only that
		// it is an answer and not a close.
		jweHeader(t, readRaw(t, a))
	})
	e.waitCounter(t, stats.AuthClientSuccess, 1) // only the 4096-bit agent
}

func TestAgentAuthRenewal(t *testing.T) {
	e := start(t)
	a := e.agentT(t, 1)
	res := a.AuthAgent(agentRenew)
	if !res.Accepted || !res.WillReplaceToken || res.NewToken == nil || *res.NewToken != "renewed-token" {
		t.Fatalf("auth result %+v", res)
	}
}

// TestAgentAuthPayloadStyles sends the auth payload both as the Duplicati
// agent does (a JSON string), and embedded as in the specification, with
// both token names, and expects each answer in the style of its request.
func TestAgentAuthPayloadStyles(t *testing.T) {
	e := start(t)
	for _, style := range []wire.Style{wire.StyleString, wire.StyleEmbedded} {
		for _, name := range []string{"token", "jwToken"} {
			t.Run(styleName(style)+"/"+name, func(t *testing.T) {
				a := e.agentT(t, 1)
				a.Style = style
				payload := map[string]any{
					name:              agentA1,
					"publicKey":       wire.EncodePublicKey(&a.Key.PublicKey),
					"clientVersion":   "2.1.0.0",
					"protocolVersion": 1,
				}
				req := testclient.Message(wire.TypeAuth, "server", payload)
				a.Send(req)
				env := a.Expect(wire.TypeAuth)
				if got, ok := env.PayloadStyle(); !ok || got != style {
					t.Fatalf("answer payload %s, want style %s", env.Payload, styleName(style))
				}
				var res wire.AuthResult
				if err := env.DecodePayload(&res); err != nil || !res.Accepted {
					t.Fatalf("auth result %s: %v", env.Payload, err)
				}
				if pong := ping(t, a); pong.Payload != nil {
					if got, _ := pong.PayloadStyle(); got != style {
						t.Fatalf("pong payload style changed: %s", pong.Payload)
					}
				}
			})
		}
	}
}

func styleName(s wire.Style) string {
	if s == wire.StyleEmbedded {
		return "embedded"
	}
	return "string"
}

func TestAgentAuthRejected(t *testing.T) {
	e := start(t)
	a := e.agentT(t, 1)
	req := testclient.Message(wire.TypeAuth, "server", authRequest(a, "no-such-token"))
	a.Send(req)
	data := readRaw(t, a)
	jweHeader(t, data)
	env, err := wire.OpenEnvelope(data, a.Key)
	if err != nil {
		t.Fatalf("the refusal does not decrypt with the agent key: %v", err)
	}
	var res wire.AuthResult
	if err := env.DecodePayload(&res); err != nil || env.Type != wire.TypeAuth || env.MessageID != req.MessageID || res.Accepted {
		t.Fatalf("refusal %+v (%v)", env, err)
	}
	a.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationFailed)
	if got := e.stats.Get(stats.AuthClientFailure); got != 1 {
		t.Fatalf("AuthClientFailure = %d", got)
	}
	p := e.authedPortalT(t, portalA, true)
	if ids := listIDs(t, p); len(ids) != 0 {
		t.Fatalf("a refused agent is listed: %v", ids)
	}
}

// TestAgentAuthErrors covers every way an auth message can be wrong.
func TestAgentAuthErrors(t *testing.T) {
	e := start(t)
	key := wire.EncodePublicKey(&testclient.Key(t, 1).PublicKey)
	tests := []struct {
		name    string
		payload json.RawMessage // nil: none
		text    string
	}{
		{"no payload", nil, wire.TextAuthWithoutPayload},
		{"empty string payload", json.RawMessage(`""`), wire.TextAuthWithoutPayload},
		{"string not json", json.RawMessage(`"not json"`), wire.TextInvalidAuthPayload},
		{"string truncated json", json.RawMessage(`"{\"token\":"`), wire.TextInvalidAuthPayload},
		{"embedded array", json.RawMessage(`[1,2]`), wire.TextInvalidAuthPayload},
		{"embedded number", json.RawMessage(`42`), wire.TextInvalidAuthPayload},
		{"token of wrong type", testclient.RawJSON(map[string]any{"token": 5, "publicKey": key, "protocolVersion": 1}), wire.TextInvalidAuthPayload},
		{"no token", testclient.RawJSON(map[string]any{"publicKey": key, "clientVersion": "2", "protocolVersion": 1}), wire.TextAuthWithoutToken},
		{"empty token", testclient.RawJSON(map[string]any{"token": "", "publicKey": key, "protocolVersion": 1}), wire.TextAuthWithoutToken},
		{"protocol version 2", testclient.RawJSON(map[string]any{"token": agentA1, "publicKey": key, "protocolVersion": 2}), wire.TextInvalidProtocolVersion},
		{"protocol version 0", testclient.RawJSON(map[string]any{"token": agentA1, "publicKey": key}), wire.TextInvalidProtocolVersion},
	}
	for _, tt := range tests {
		for _, style := range []wire.Style{wire.StyleString, wire.StyleEmbedded} {
			t.Run(tt.name+"/"+styleName(style), func(t *testing.T) {
				a := e.agentT(t, 1)
				a.Style = style
				a.Send(&wire.Envelope{Type: wire.TypeAuth, To: "server", Payload: tt.payload})
				a.ExpectClose(websocket.ClosePolicyViolation, tt.text)
			})
		}
	}
	if got := e.stats.Get(stats.AuthClientSuccess); got != 0 {
		t.Fatalf("AuthClientSuccess = %d", got)
	}
}

// TestWrongWrapping sends what the other role would send.
func TestWrongWrapping(t *testing.T) {
	e := start(t)
	t.Run("plain frame on agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		msg := testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1))
		msg.From = a.ClientID
		data, err := msg.Marshal(wire.StyleString)
		if err != nil {
			t.Fatal(err)
		}
		a.SendRaw(data)
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	t.Run("jwe for another key on agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		a.ServerKey = &testclient.Key(t, 2).PublicKey
		a.Send(testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1)))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	for _, alg := range []struct {
		name string
		key  jose.KeyAlgorithm
		enc  jose.ContentEncryption
	}{
		{"RSA1_5", jose.RSA1_5, jose.A256CBC_HS512},
		{"RSA-OAEP", jose.RSA_OAEP, jose.A256CBC_HS512},
		{"A128GCM", jose.RSA_OAEP_256, jose.A128GCM},
		{"A128CBC-HS256", jose.RSA_OAEP_256, jose.A128CBC_HS256},
	} {
		t.Run("jwe with "+alg.name+" on agent", func(t *testing.T) {
			a := e.agentT(t, 1)
			msg := testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1))
			msg.From = a.ClientID
			plain, err := msg.Marshal(wire.StyleString)
			if err != nil {
				t.Fatal(err)
			}
			enc, err := jose.NewEncrypter(alg.enc, jose.Recipient{Algorithm: alg.key, Key: a.ServerKey}, nil)
			if err != nil {
				t.Fatal(err)
			}
			obj, err := enc.Encrypt(plain)
			if err != nil {
				t.Fatal(err)
			}
			compact, err := obj.CompactSerialize()
			if err != nil {
				t.Fatal(err)
			}
			a.SendRaw([]byte(compact))
			a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
		})
	}
	t.Run("jws on agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		msg := testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1))
		plain, err := msg.Marshal(wire.StyleString)
		if err != nil {
			t.Fatal(err)
		}
		signed, err := wire.Sign(plain, a.Key)
		if err != nil {
			t.Fatal(err)
		}
		a.SendRaw([]byte(signed))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	t.Run("garbage on agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		a.SendRaw([]byte("a.b.c.d.e"))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	t.Run("jwe on portal", func(t *testing.T) {
		p := e.portalT(t)
		data, err := wire.SealEnvelope(testclient.Message(wire.TypeAuthPortal, "server", map[string]any{"token": portalA}), wire.StyleString, &testclient.Key(t, serverKeyIndex).PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		p.SendRaw(data)
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextMalformed)
	})
	t.Run("not json on portal", func(t *testing.T) {
		p := e.portalT(t)
		p.SendRaw([]byte(`{"type":"authportal",`))
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextMalformed)
	})
	t.Run("no type on portal", func(t *testing.T) {
		p := e.portalT(t)
		p.SendRaw([]byte(`{"from":"x","payload":null}`))
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextMalformed)
	})
	t.Run("authportal on agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		a.Send(testclient.Message(wire.TypeAuthPortal, "server", wire.AuthRequest{Token: portalA, ProtocolVersion: 1}))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	t.Run("auth on portal", func(t *testing.T) {
		p := e.portalT(t)
		p.Send(testclient.Message(wire.TypeAuth, "server", wire.AuthRequest{Token: agentA1, PublicKey: wire.EncodePublicKey(&testclient.Key(t, 1).PublicKey), ProtocolVersion: 1}))
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	t.Run("authportal on authenticated agent", func(t *testing.T) {
		a := e.authedAgentT(t, 1, agentA1)
		a.Send(testclient.Message(wire.TypeAuthPortal, "server", wire.AuthRequest{Token: portalA, ProtocolVersion: 1}))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
	t.Run("plain frame on authenticated agent", func(t *testing.T) {
		a := e.authedAgentT(t, 1, agentA1)
		a.SendRaw([]byte(`{"type":"ping","from":"` + a.ClientID + `"}`))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForAuth)
	})
}

func TestBeforeAuthentication(t *testing.T) {
	e := start(t)
	target := e.authedAgentT(t, 1, agentA1)
	tests := []struct {
		name string
		role string
		typ  string
		text string
	}{
		{"list on portal", "/portal", wire.TypeList, wire.TextNotAuthenticated},
		{"command on portal", "/portal", wire.TypeCommand, wire.TextNotAuthenticated},
		{"control on portal", "/portal", wire.TypeControl, wire.TextNotAuthenticated},
		{"command on agent", "/agent", wire.TypeCommand, wire.TextNotAuthenticated},
		{"control on agent", "/agent", wire.TypeControl, wire.TextNotAuthenticated},
		{"list on agent", "/agent", wire.TypeList, wire.TextInvalidStateForList},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c *testclient.Conn
			if tt.role == "/agent" {
				c = e.agentT(t, 2)
			} else {
				c = e.portalT(t)
			}
			c.Send(testclient.Message(tt.typ, target.ClientID, map[string]string{"method": "GET"}))
			c.ExpectClose(websocket.ClosePolicyViolation, tt.text)
		})
	}
	// Nothing reached the agent.
	p := e.authedPortalT(t, portalA, false)
	p.Send(command(target.ClientID, map[string]string{"n": "after"}))
	if got := target.Expect(wire.TypeCommand); string(got.Payload) != `"{\"n\":\"after\"}"` {
		t.Fatalf("agent got %s, want only the authenticated portal's command", got.Payload)
	}
}

func TestListFromAgent(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	a.Send(testclient.Message(wire.TypeList, "server", nil))
	a.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidStateForList)
}

// TestPingBeforeAuth checks that an unauthenticated ping gets no pong and
// does not disturb the authentication that follows.
func TestPingBeforeAuth(t *testing.T) {
	e := start(t)
	// Each agent frame costs an RSA decryption, so an agent may send
	// nothing but its auth message before it is authenticated.
	t.Run("agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		a.Send(testclient.Message(wire.TypePing, "server", nil))
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextNotAuthenticated)
	})
	t.Run("portal", func(t *testing.T) {
		p := e.portalT(t)
		p.Send(testclient.Message(wire.TypePing, "server", nil))
		if res := p.AuthPortal(portalA, false); !res.Accepted {
			t.Fatal("auth after ping refused")
		}
		ping(t, p)
	})
	e.waitCounter(t, stats.PingCommandSuccess, 1) // only the authenticated ping
}

// TestReauthentication authenticates an authenticated connection again:
// with the same token (a refresh) and with another agent's token, which
// moves the registration.
func TestReauthentication(t *testing.T) {
	e := start(t)
	p := e.authedPortalT(t, portalA, false)
	a := e.authedAgentT(t, 1, agentA1)
	p.Expect(wire.TypeList) // pushed when the agent connected

	if res := e.authAgentT(t, a, agentRenew); !res.Accepted || !res.WillReplaceToken {
		t.Fatalf("re-auth result %+v", res)
	}
	ping(t, a)
	l := list(t, p)
	if len(l) != 1 || l[0].ClientID != a.ClientID || l[0].MachineRegistrationID != "reg-renew" {
		t.Fatalf("list after re-auth %+v", l)
	}
	if res := e.authAgentT(t, a, agentA1); !res.Accepted || res.WillReplaceToken {
		t.Fatalf("second re-auth result %+v", res)
	}
	// The portal can still reach it.
	cmd := command(a.ClientID, map[string]string{"x": "y"})
	p.Send(cmd)
	if got := a.Expect(wire.TypeCommand); got.MessageID != cmd.MessageID {
		t.Fatalf("agent got %+v", got)
	}
	t.Run("portal", func(t *testing.T) {
		p2 := e.authedPortalT(t, portalB, false)
		if res := p2.AuthPortal(portalA, false); !res.Accepted {
			t.Fatal("portal re-auth refused")
		}
		if ids := listIDs(t, p2); !slices.Equal(ids, []string{a.ClientID}) {
			t.Fatalf("portal re-authenticated into A lists %v", ids)
		}
	})
}

func TestPortalAuth(t *testing.T) {
	e := start(t)
	t.Run("accepted", func(t *testing.T) {
		p := e.portalT(t)
		req := testclient.Message(wire.TypeAuthPortal, "MachineService", wire.AuthRequest{Token: portalA, ClientVersion: "x", ProtocolVersion: 1})
		p.Send(req)
		data := readRaw(t, p)
		var env map[string]json.RawMessage
		if err := json.Unmarshal(data, &env); err != nil {
			t.Fatalf("answer is not plain JSON: %.100s", data)
		}
		var inner string
		if err := json.Unmarshal(env["payload"], &inner); err != nil {
			t.Fatalf("payload %s is not a string", env["payload"])
		}
		var res map[string]any
		if err := json.Unmarshal([]byte(inner), &res); err != nil {
			t.Fatal(err)
		}
		if res["accepted"] != true || res["willReplaceToken"] != false || res["newToken"] != nil {
			t.Fatalf("authportal result %v", res)
		}
		if string(env["type"]) != `"authportal"` || string(env["messageId"]) != `"`+req.MessageID+`"` {
			t.Fatalf("authportal answer %s", data)
		}
	})
	t.Run("jwToken embedded", func(t *testing.T) {
		p := e.portalT(t)
		p.Style = wire.StyleEmbedded
		req := testclient.Message(wire.TypeAuthPortal, "MachineService", map[string]any{"jwToken": portalA, "clientVersion": "", "protocolVersion": 1})
		p.Send(req)
		env := p.Expect(wire.TypeAuthPortal)
		if st, ok := env.PayloadStyle(); !ok || st != wire.StyleEmbedded {
			t.Fatalf("answer payload %s, want embedded", env.Payload)
		}
		var res wire.AuthResult
		if err := env.DecodePayload(&res); err != nil || !res.Accepted {
			t.Fatalf("result %s", env.Payload)
		}
	})
	t.Run("rejected", func(t *testing.T) {
		p := e.portalT(t)
		req := testclient.Message(wire.TypeAuthPortal, "MachineService", wire.AuthRequest{Token: "wrong", ProtocolVersion: 1})
		p.Send(req)
		if res := authResult(t, p, wire.TypeAuthPortal, req.MessageID); res.Accepted {
			t.Fatal("bad token accepted")
		}
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationFailed)
	})
	t.Run("agent token", func(t *testing.T) {
		p := e.portalT(t)
		if res := p.AuthPortal(agentA1, false); res.Accepted {
			t.Fatal("agent token accepted on the portal route")
		}
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationFailed)
	})
	t.Run("no token", func(t *testing.T) {
		p := e.portalT(t)
		p.Send(testclient.Message(wire.TypeAuthPortal, "MachineService", map[string]any{"clientVersion": "x"}))
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthWithoutToken)
	})
	t.Run("no payload", func(t *testing.T) {
		p := e.portalT(t)
		p.Send(testclient.Message(wire.TypeAuthPortal, "MachineService", nil))
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthWithoutPayload)
	})
	t.Run("bad payload", func(t *testing.T) {
		p := e.portalT(t)
		p.Send(&wire.Envelope{Type: wire.TypeAuthPortal, Payload: json.RawMessage(`"{{"`)})
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextInvalidAuthPayload)
	})
	e.waitCounter(t, stats.AuthPortalSuccess, 2)
	e.waitCounter(t, stats.AuthPortalFailure, 2)
}

func TestPortalSubOrganizations(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	sub := e.authedAgentT(t, 2, agentSub1)
	b := e.authedAgentT(t, 3, agentB1)

	own := e.authedPortalT(t, portalA, false)
	if ids := listIDs(t, own); !slices.Equal(ids, []string{a.ClientID}) {
		t.Fatalf("portal A without sub-organizations lists %v", ids)
	}
	all := e.authedPortalT(t, portalA, true)
	want := []string{a.ClientID, sub.ClientID}
	if ids := listIDs(t, all); len(ids) != 2 || !slices.Contains(ids, want[0]) || !slices.Contains(ids, want[1]) {
		t.Fatalf("portal A with sub-organizations lists %v, want %v", ids, want)
	}
	// A portal of B sees only B, even when it asks for sub-organizations.
	pb := e.authedPortalT(t, portalB, true)
	if ids := listIDs(t, pb); !slices.Equal(ids, []string{b.ClientID}) {
		t.Fatalf("portal B lists %v", ids)
	}
	// The portal that asked may command the sub-organization's agent, and
	// the agent may answer; the one that did not ask may not.
	cmd := command(sub.ClientID, map[string]string{"k": "v"})
	all.Send(cmd)
	if got := sub.Expect(wire.TypeCommand); got.MessageID != cmd.MessageID || got.From != all.ClientID {
		t.Fatalf("sub agent got %+v", got)
	}
	answer := command(all.ClientID, map[string]int{"statusCode": 200})
	answer.MessageID = cmd.MessageID
	sub.Send(answer)
	if got := all.Expect(wire.TypeCommand); got.MessageID != cmd.MessageID || got.From != sub.ClientID {
		t.Fatalf("portal got %+v", got)
	}
	own.Send(command(sub.ClientID, nil))
	own.ExpectClose(websocket.ClosePolicyViolation, wire.TextAccessDenied)
}

// TestPortalPipelining sends list right behind authportal, without waiting.
func TestPortalPipelining(t *testing.T) {
	e := start(t)
	a := e.authedAgentT(t, 1, agentA1)
	p := e.portalT(t)
	auth := testclient.Message(wire.TypeAuthPortal, "MachineService", wire.AuthRequest{Token: portalA, ProtocolVersion: 1})
	list := testclient.Message(wire.TypeList, "MachineService", nil)
	ping := testclient.Message(wire.TypePing, "MachineService", nil)
	p.Send(auth)
	p.Send(list)
	p.Send(ping)
	if res := authResult(t, p, wire.TypeAuthPortal, auth.MessageID); !res.Accepted {
		t.Fatal("refused")
	}
	env := p.Expect(wire.TypeList)
	if env.MessageID != list.MessageID {
		t.Fatalf("list answer id %q, want %q", env.MessageID, list.MessageID)
	}
	if got := testclient.DecodeList(t, env); len(got) != 1 || got[0].ClientID != a.ClientID {
		t.Fatalf("list %+v", got)
	}
	p.Expect(wire.TypePong)
}

// TestPendingAgentAuth holds the controller's answer and sends frames
// meanwhile: up to three are discarded unread (one is not even a JWE, so
// reading it would close the connection), a fourth closes it.
func TestPendingAgentAuth(t *testing.T) {
	gated := func(t *testing.T) (*env, *gate) {
		var g *gate
		e := start(t, withController(func(inner controller.Controller) controller.Controller {
			g = newGate(inner)
			return g
		}))
		t.Cleanup(g.open)
		return e, g
	}
	t.Run("three discarded", func(t *testing.T) {
		e, g := gated(t)
		a := e.agentT(t, 1)
		req := testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1))
		a.Send(req)
		g.waitEntered(t)
		before := e.stats.Get(stats.MessagesIgnored)
		a.SendRaw([]byte("not a jwe"))
		a.Send(testclient.Message(wire.TypePing, "server", nil))
		a.Send(testclient.Message(wire.TypeAuth, "server", authRequest(a, agentB1)))
		waitFor(t, "three frames discarded", func() bool { return e.stats.Get(stats.MessagesIgnored) == before+3 })
		g.open()
		if res := authResult(t, a, wire.TypeAuth, req.MessageID); !res.Accepted {
			t.Fatal("auth refused")
		}
		// The discarded ping got no pong and the discarded auth did not
		// run: the next message answers this ping, and the agent is in A.
		ping(t, a)
		p := e.authedPortalT(t, portalA, false)
		if ids := listIDs(t, p); !slices.Equal(ids, []string{a.ClientID}) {
			t.Fatalf("portal A lists %v", ids)
		}
		select {
		case tok := <-g.entered:
			t.Fatalf("a discarded auth reached the controller with %q", tok)
		default:
		}
	})
	t.Run("four close", func(t *testing.T) {
		e, g := gated(t)
		a := e.agentT(t, 1)
		a.Send(testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1)))
		g.waitEntered(t)
		for range 4 {
			a.Send(testclient.Message(wire.TypePing, "server", nil))
		}
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextTooManyWhileAuthPending)
		g.open()
		p := e.authedPortalT(t, portalA, false)
		// The validation still finishes; the closed agent must not stay
		// listed or reachable.
		waitFor(t, "the auth goroutine to finish", func() bool { return e.closes("too_many_while_auth_pending") == 1 })
		if ids := listIDs(t, p); len(ids) != 0 {
			t.Fatalf("a closed agent is listed: %v", ids)
		}
		cmd := command(a.ClientID, nil)
		p.Send(cmd)
		if got := p.Expect(wire.TypeCommand); got.ErrorMessage != wire.TextDestinationNotAvailable {
			t.Fatalf("command to the closed agent answered %+v", got)
		}
	})
}

// TestControllerTimeout lets the controller not answer: the auth fails
// after the controller timeout, and is counted as a timeout.
func TestControllerTimeout(t *testing.T) {
	var g *gate
	e := start(t,
		withConfig(func(c *config.Config) { c.ControllerTimeout = 200 * time.Millisecond }),
		withController(func(inner controller.Controller) controller.Controller {
			g = newGate(inner)
			g.portals = true
			return g
		}))
	t.Run("agent", func(t *testing.T) {
		a := e.agentT(t, 1)
		if res := a.AuthAgent(agentA1); res.Accepted {
			t.Fatal("accepted without the controller")
		}
		a.ExpectClose(websocket.CloseTryAgainLater, wire.TextControllerUnavailable)
	})
	t.Run("portal", func(t *testing.T) {
		p := e.portalT(t)
		if res := p.AuthPortal(portalA, false); res.Accepted {
			t.Fatal("accepted without the controller")
		}
		p.ExpectClose(websocket.CloseTryAgainLater, wire.TextControllerUnavailable)
	})
	if a, p := e.stats.Get(stats.AuthClientTimeoutFailure), e.stats.Get(stats.AuthPortalTimeoutFailure); a != 1 || p != 1 {
		t.Fatalf("AuthClientTimeoutFailure = %d, AuthPortalTimeoutFailure = %d", a, p)
	}
}

// TestAuthAnswerFirst checks that the auth answer is the first message a
// client gets after the welcome, even when the server has something for it
// the moment it can be found: a control request for the agent, a list
// pushed to the portal because an agent of its organization connected.
// A registry that holds the registration keeps the connection in the
// window between being found and being registered.
func TestAuthAnswerFirst(t *testing.T) {
	slow := &slowRegistry{}
	e := start(t, func(_ *config.Config, d *server.Deps) {
		slow.Registry = d.Registry
		d.Registry = slow
	})
	t.Run("agent and control", func(t *testing.T) {
		a := e.agentT(t, 1)
		release := slow.holdNext(t)
		req := testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1))
		a.Send(req)
		slow.waitEntered(t)
		release()
		// Control requests from the moment the connection can be found:
		// the first one that reaches it must still come after the answer.
		var ch <-chan controlResult
		for deadline := time.Now().Add(10 * time.Second); ch == nil; {
			if time.Now().After(deadline) {
				t.Fatal("no control request reached the agent")
			}
			try := e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "x"})
			// Each try either fails at once (not connected yet) or is
			// sent, and then waits for the agent's answer.
			for ch == nil {
				if e.stats.Get(stats.ControlRelayInitiated) == 1 {
					ch = try
					break
				}
				select {
				case r := <-try:
					if !errors.Is(r.err, server.ErrNotConnected) {
						t.Fatalf("control: %v", r.err)
					}
				case <-time.After(time.Millisecond):
					continue
				}
				break
			}
		}
		if env := a.Expect(wire.TypeAuth); env.MessageID != req.MessageID {
			t.Fatalf("first message %+v", env)
		}
		got := a.Expect(wire.TypeControl)
		answer := testclient.Message(wire.TypeControl, got.From, wire.ControlResponse{Success: true})
		answer.MessageID = got.MessageID
		a.Send(answer)
		<-ch
	})
	t.Run("portal and list push", func(t *testing.T) {
		p := e.portalT(t)
		release := slow.holdNext(t)
		req := testclient.Message(wire.TypeAuthPortal, "MachineService", wire.AuthRequest{Token: portalA, ProtocolVersion: 1})
		p.Send(req)
		slow.waitEntered(t)
		release()
		// An agent arriving right away is pushed to the portal, after the
		// portal's own answer.
		e.authedAgentT(t, 2, agentA2)
		env, err := p.Read()
		if err != nil || env.Type != wire.TypeAuthPortal || env.MessageID != req.MessageID {
			t.Fatalf("first message %+v, %v", env, err)
		}
	})
}

// TestCloseDuringAuth closes an agent while its authentication is still
// being completed (the registry holds the registration): the agent must
// not stay listed or reachable, and its Disconnected activity must follow
// its Connected one.
func TestCloseDuringAuth(t *testing.T) {
	slow := &slowRegistry{}
	e := start(t, func(_ *config.Config, d *server.Deps) {
		slow.Registry = d.Registry
		d.Registry = slow
	})
	p := e.authedPortalT(t, portalA, false)
	a := e.agentT(t, 1)
	release := slow.holdNext(t)
	a.Send(testclient.Message(wire.TypeAuth, "server", authRequest(a, agentA1)))
	slow.waitEntered(t)
	_ = a.WS.Close()
	// Give the server time to see the close and tear the connection down.
	// It may count the close only once the registration is released, so
	// this waits for the count, but not for long.
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if e.closes("client_closed")+e.closes("connection_lost") == 1 {
			break
		}
	}
	release()
	waitFor(t, "the Disconnected activity", func() bool {
		acts := e.activities()
		return len(acts) > 0 && acts[len(acts)-1].ActivityType == bus.ActivityDisconnected
	})
	if ids := listIDs(t, p); len(ids) != 0 {
		t.Fatalf("a closed agent is listed: %v", ids)
	}
	r := waitControl(t, e.control(bus.ControlRequest{AgentID: "reg-a1", OrganizationID: orgA, Command: "x"}))
	if !errors.Is(r.err, server.ErrNotConnected) {
		t.Fatalf("Control to the closed agent: %+v, %v", r.resp, r.err)
	}
	if acts := e.activities(); acts[len(acts)-1].ActivityType != bus.ActivityDisconnected {
		t.Fatalf("activities %+v, want Disconnected last", acts)
	}
}

// generousController hands out the sub-organizations whether or not they
// were asked for, as a controller reached over the bus may.
type generousController struct{ controller.Controller }

func (g generousController) ValidatePortal(ctx context.Context, token string, _ bool) (controller.Portal, error) {
	return g.Controller.ValidatePortal(ctx, token, true)
}

// TestSubOrganizationsOnlyWhenAsked checks that the server, not only the
// controller, keeps a portal that did not ask to its own organization.
func TestSubOrganizationsOnlyWhenAsked(t *testing.T) {
	e := start(t, withController(func(inner controller.Controller) controller.Controller {
		return generousController{inner}
	}))
	a := e.authedAgentT(t, 1, agentA1)
	sub := e.authedAgentT(t, 2, agentSub1)
	own := e.authedPortalT(t, portalA, false)
	if ids := listIDs(t, own); !slices.Equal(ids, []string{a.ClientID}) {
		t.Fatalf("portal that did not ask lists %v", ids)
	}
	all := e.authedPortalT(t, portalA, true)
	if ids := listIDs(t, all); len(ids) != 2 || !slices.Contains(ids, sub.ClientID) {
		t.Fatalf("portal that asked lists %v", ids)
	}
}
