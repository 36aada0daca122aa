package wire_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/machineservice/machineservice/wire"
)

// envelopeSeeds are real messages of each kind, in the forms the clients
// send them, plus some that are not envelopes.
var envelopeSeeds = []string{
	// The server's welcome, string style.
	`{"from":"MachineService","to":"","type":"welcome","messageId":"0b9c6a1e-4d7e-4d5b-9a8e-2f1d3c4b5a69","payload":"{\"publicKeyHash\":\"Zm9vYmFyYmF6cXV4\",\"machineName\":\"relay-eu-1\",\"serverVersion\":\"1.0.0\",\"nonce\":null,\"supportedProtocolVersions\":[1]}","errorMessage":null}`,
	// An agent's auth as the Duplicati agent sends it: string payload.
	`{"from":"agent-1","to":"MachineService","type":"auth","messageId":"5d0c7a3e-1b2f-4c6d-8e9f-0a1b2c3d4e5f","payload":"{\"token\":\"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2ln\",\"publicKey\":\"-----BEGIN RSA PUBLIC KEY-----\\nMIIBCgKCAQEAwhatever\\n-----END RSA PUBLIC KEY-----\\n\",\"clientVersion\":\"2.1.0.5\",\"protocolVersion\":1,\"metadata\":{\"os\":\"linux\",\"machineName\":null}}","errorMessage":null}`,
	// The same with PascalCase keys.
	`{"From":"agent-1","To":"MachineService","Type":"Auth","MessageId":"5d0c7a3e","Payload":"{\"Token\":\"t\",\"ProtocolVersion\":1}","ErrorMessage":null}`,
	// The specification's authportal: embedded payload.
	`{"from":"Console","to":"MachineService","type":"authportal","messageId":"428411b1-e8a0-4e5b-91b2-52cdd3b10fc3","payload":{"jwToken":"Access token","clientVersion":"","protocolVersion":1}}`,
	// A portal's list request and the server's answer.
	`{"from":"Console","to":"MachineService","type":"list","messageId":"a1","payload":null}`,
	`{"from":"MachineService","to":"Console","type":"list","messageId":"a1","payload":[{"clientId":"agent-1","clientVersion":"2.1.0.5","organizationId":"org-1","machineRegistrationId":"reg-1","machineServerUri":"wss://relay.example/agent","type":1,"lastUpdated":"2024-03-14T15:09:26Z","gatewayId":"gw-1","lastUpdatedOn":"2024-03-14T15:09:26Z"}],"errorMessage":null}`,
	// A command with an opaque, end-to-end encrypted payload, and one with
	// a Duplicati CommandRequest.
	`{"from":"Console","to":"agent-1","type":"command","messageId":"c1","payload":"` + compactJWE + `","errorMessage":null}`,
	`{"from":"Console","to":"agent-1","type":"command","messageId":"c2","payload":"{\"method\":\"GET\",\"path\":\"/api/v1/backups\",\"body\":null,\"headers\":{\"Accept\":\"application/json\"}}"}`,
	`{"from":"MachineService","to":"Console","type":"command","messageId":"c1","payload":null,"errorMessage":"Destination not available for relay"}`,
	// Control, ping, warning.
	`{"from":"MachineService","to":"agent-1","type":"control","messageId":"k1","payload":{"command":"restart","parameters":{"delay":"5"}}}`,
	`{"from":"agent-1","to":"MachineService","type":"control","messageId":"k1","payload":"{\"success\":true,\"output\":{},\"errorMessage\":null}"}`,
	`{"type":"ping"}`,
	`{"type":"warning","errorMessage":"Token expired"}`,
	// Edge cases of the payload.
	`{"type":"command","payload":""}`,
	`{"type":"command","payload":" [1, 2] "}`,
	`{"type":"command","payload":"42"}`,
	`{"type":"command","payload":42}`,
	`{"type":"command","payload":"\u003c\u2028\ud800"}`,
	// Not envelopes.
	``,
	`{`,
	`null`,
	`[]`,
	`{"type":1}`,
	`{"type":"ping"} {"type":"pong"}`,
	compactJWE,
	"\x00\xff\xfe garbage \x80",
}

var styles = []wire.Style{wire.StyleString, wire.StyleEmbedded}

// payloadResult is what DecodePayload into an any gives.
type payloadResult struct {
	value any
	err   error // nil, ErrNoPayload or ErrInvalidPayload
}

func decodeAny(t *testing.T, e *wire.Envelope) payloadResult {
	t.Helper()
	var v any
	err := e.DecodePayload(&v)
	switch {
	case err == nil:
		return payloadResult{value: v}
	case errors.Is(err, wire.ErrNoPayload):
		return payloadResult{err: wire.ErrNoPayload}
	case errors.Is(err, wire.ErrInvalidPayload):
		return payloadResult{err: wire.ErrInvalidPayload}
	}
	t.Fatalf("DecodePayload(%s) error %v is neither ErrNoPayload nor ErrInvalidPayload", e.Payload, err)
	return payloadResult{}
}

// restyle marshals e in style s and decodes the result.
func restyle(t *testing.T, e wire.Envelope, s wire.Style) (wire.Envelope, []byte) {
	t.Helper()
	out, err := e.Marshal(s)
	if err != nil {
		t.Fatalf("Marshal(%v) of a decoded envelope %+v: %v", s, e, err)
	}
	if !json.Valid(out) {
		t.Fatalf("Marshal(%v) wrote invalid JSON: %q", s, out)
	}
	back, err := wire.DecodeEnvelope(out)
	if err != nil {
		t.Fatalf("DecodeEnvelope(Marshal(%v)) = %v for %q", s, err, out)
	}
	if back.From != e.From || back.To != e.To || back.Type != e.Type ||
		back.MessageID != e.MessageID || back.ErrorMessage != e.ErrorMessage {
		t.Fatalf("Marshal(%v) then DecodeEnvelope = %+v, want %+v", s, back, e)
	}
	return back, out
}

func FuzzDecodeEnvelope(f *testing.F) {
	for _, s := range envelopeSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		env, err := wire.DecodeEnvelope(data)
		if err != nil {
			if !errors.Is(err, wire.ErrMalformed) {
				t.Fatalf("DecodeEnvelope error %v is not ErrMalformed", err)
			}
			return
		}
		if !json.Valid(data) {
			t.Fatalf("DecodeEnvelope accepted invalid JSON %q as %+v", data, env)
		}
		if env.Type == "" || env.Type != strings.ToLower(env.Type) {
			t.Fatalf("decoded type %q is empty or not lower case", env.Type)
		}
		if p := env.Payload; p != nil && (len(p) == 0 || string(p) == "null" || len(bytes.TrimSpace(p)) != len(p)) {
			t.Fatalf("decoded payload %q is empty, null or untrimmed", p)
		}

		orig := decodeAny(t, &env)
		for _, s := range styles {
			back, out := restyle(t, env, s)
			if back.HasPayload() != env.HasPayload() {
				t.Fatalf("Marshal(%v) changed HasPayload from %v: %q", s, env.HasPayload(), out)
			}
			if st, ok := back.PayloadStyle(); ok && s == wire.StyleString && st != wire.StyleString {
				t.Fatalf("Marshal(StyleString) wrote a non-string payload: %q", out)
			}
			// Marshalling is stable: a second pass changes nothing.
			again, err := back.Marshal(s)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, out) {
				t.Fatalf("Marshal(%v) is not stable:\n%q\n%q", s, out, again)
			}
			// The payload means the same in either style.
			got := decodeAny(t, &back)
			if !reflect.DeepEqual(got, orig) {
				t.Fatalf("payload %q in style %v decodes to %#v, the original to %#v", back.Payload, s, got, orig)
			}
		}

		// string -> embedded -> string keeps a JSON payload's meaning.
		s1, _ := restyle(t, env, wire.StyleString)
		e1, _ := restyle(t, s1, wire.StyleEmbedded)
		s2, out := restyle(t, e1, wire.StyleString)
		if r1 := decodeAny(t, &s1); r1.err == nil {
			if r2 := decodeAny(t, &s2); !reflect.DeepEqual(r1, r2) {
				t.Fatalf("string -> embedded -> string changed the payload from %#v to %#v (%q)", r1, r2, out)
			}
		}
	})
}

// fuzzPlaintexts are the plaintexts the FuzzDecrypt seeds were encrypted
// from. Decrypt may only ever return one of them: anything else would be a
// forgery. Only add to this list: corpora saved by earlier runs hold
// encryptions of these.
var fuzzPlaintexts = []string{
	`{"from":"agent-1","to":"MachineService","type":"auth","messageId":"5d0c7a3e-1b2f-4c6d-8e9f-0a1b2c3d4e5f","payload":"{\"token\":\"t\",\"protocolVersion\":1}","errorMessage":null}`,
	`{"from":"agent-1","to":"Console","type":"command","messageId":"c1","payload":"` + compactJWE + `","errorMessage":null}`,
	`x`,
}

func isFuzzPlaintext(p []byte) bool {
	for _, s := range fuzzPlaintexts {
		if string(p) == s {
			return true
		}
	}
	return false
}

// jweMutations are variations of a compact JWE that must not decrypt.
func jweMutations(tok string) []string {
	parts := strings.Split(tok, ".")
	join := func(p ...string) string { return strings.Join(p, ".") }
	// flip changes the first character of segment i, which changes the
	// decoded bytes (the first character carries six whole bits).
	flip := func(i int) string {
		p := append([]string(nil), parts...)
		c := "A"
		if strings.HasPrefix(p[i], "A") {
			c = "B"
		}
		p[i] = c + p[i][1:]
		return join(p...)
	}
	return []string{
		flip(0), flip(1), flip(2), flip(3), flip(4),
		join(parts[0], parts[1], parts[4], parts[3], parts[2]), // iv and tag swapped
		join(parts[:4]...),
		join(append(append([]string(nil), parts...), "AAAA")...),
		join(parts[0], parts[1], parts[2], parts[3], ""),
		join(parts[0], "", parts[2], parts[3], parts[4]),
		tok[:len(tok)/2],
		tok + "=",
		join(parts[0], parts[1], parts[2], "+"+parts[3], parts[4]), // standard base64 alphabet
		b64(`{"alg":"RSA1_5","enc":"A256CBC-HS512"}`) + "." + join(parts[1:]...),
		b64(`{"alg":"none","enc":"A256CBC-HS512"}`) + "." + join(parts[1:]...),
		b64(`{"alg":"RSA-OAEP-256","enc":"A256CBC-HS512","zip":"DEF"}`) + "." + join(parts[1:]...),
	}
}

func FuzzDecrypt(f *testing.F) {
	key := fuzzKey(f)
	var valid, invalid []string
	for _, p := range fuzzPlaintexts {
		tok, err := wire.Encrypt([]byte(p), &key.PublicKey)
		if err != nil {
			f.Fatal(err)
		}
		valid = append(valid, tok)
		invalid = append(invalid, jweMutations(tok)...)
	}
	// Made for another key: the constructed modulus 2^2047+1 encrypts fine
	// and nobody can decrypt it.
	other, err := wire.Encrypt([]byte(fuzzPlaintexts[0]), bigPublicKey(2048))
	if err != nil {
		f.Fatal(err)
	}
	signed, err := wire.Sign([]byte(fuzzPlaintexts[0]), key)
	if err != nil {
		f.Fatal(err)
	}
	e, err := jose.NewEncrypter(jose.A256CBC_HS512, jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: &key.PublicKey}, nil)
	if err != nil {
		f.Fatal(err)
	}
	obj, err := e.Encrypt([]byte(fuzzPlaintexts[0]))
	if err != nil {
		f.Fatal(err)
	}
	invalid = append(invalid, other, signed, obj.FullSerialize(), "", "....", "garbage", fuzzPlaintexts[0], compactJWE)

	for _, tok := range valid {
		got, err := wire.Decrypt([]byte(tok), key)
		if err != nil || !isFuzzPlaintext(got) {
			f.Fatalf("Decrypt of a seed made by Encrypt = %q, %v", got, err)
		}
		f.Add([]byte(tok))
	}
	for _, tok := range invalid {
		if got, err := wire.Decrypt([]byte(tok), key); !errors.Is(err, wire.ErrNotJWE) {
			f.Fatalf("Decrypt of the seed %q not made by Encrypt = %q, %v; want ErrNotJWE", tok, got, err)
		}
		f.Add([]byte(tok))
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := wire.Decrypt(data, key)
		if err != nil {
			if !errors.Is(err, wire.ErrNotJWE) {
				t.Fatalf("Decrypt error %v is not ErrNotJWE", err)
			}
			if got != nil {
				t.Fatalf("Decrypt returned %q with the error %v", got, err)
			}
			return
		}
		if got == nil || !isFuzzPlaintext(got) {
			t.Fatalf("Decrypt accepted %q and returned %q, which no seed was made of", data, got)
		}
	})
}
