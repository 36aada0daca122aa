package wire_test

import (
	"bytes"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/machineservice/machineservice/wire"
)

// protectedHeader decodes the first segment of a compact JWE or JWS.
func protectedHeader(t *testing.T, token string) map[string]any {
	t.Helper()
	first, _, ok := strings.Cut(token, ".")
	if !ok {
		t.Fatalf("token %q has no segments", token)
	}
	raw, err := base64.RawURLEncoding.DecodeString(first)
	if err != nil {
		t.Fatalf("protected header is not base64url: %v", err)
	}
	var h map[string]any
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatalf("protected header is not JSON: %v (%s)", err, raw)
	}
	return h
}

// encryptWith makes a compact JWE with go-jose directly, for the algorithms
// Encrypt does not use.
func encryptWith(t *testing.T, plaintext []byte, alg jose.KeyAlgorithm, enc jose.ContentEncryption, key any) string {
	t.Helper()
	e, err := jose.NewEncrypter(enc, jose.Recipient{Algorithm: alg, Key: key}, nil)
	if err != nil {
		t.Fatalf("NewEncrypter(%s, %s): %v", alg, enc, err)
	}
	obj, err := e.Encrypt(plaintext)
	if err != nil {
		t.Fatal(err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// signWith makes a compact JWS with go-jose directly.
func signWith(t *testing.T, payload []byte, alg jose.SignatureAlgorithm, key any) string {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, nil)
	if err != nil {
		t.Fatalf("NewSigner(%s): %v", alg, err)
	}
	obj, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	c, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

func TestEncryptDecrypt(t *testing.T) {
	key, _ := testKeys(t)
	for _, plaintext := range [][]byte{
		[]byte(`{"from":"a","to":"b","type":"auth","messageId":"m","payload":"{}","errorMessage":null}`),
		[]byte(""),
		bytes.Repeat([]byte{0, 0xff, '.'}, 10000),
	} {
		token, err := wire.Encrypt(plaintext, &key.PublicKey)
		if err != nil {
			t.Fatalf("Encrypt: %v", err)
		}
		if n := strings.Count(token, "."); n != 4 {
			t.Fatalf("Encrypt made %d dots, want a five-part compact JWE: %s", n, token)
		}
		got, err := wire.Decrypt([]byte(token), key)
		if err != nil {
			t.Fatalf("Decrypt: %v", err)
		}
		if !bytes.Equal(got, plaintext) {
			t.Errorf("Decrypt = %q, want %q", got, plaintext)
		}
		again, err := wire.Encrypt(plaintext, &key.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		if again == token {
			t.Error("two encryptions of the same plaintext are identical")
		}
	}
}

func TestEncryptHeader(t *testing.T) {
	key, _ := testKeys(t)
	token, err := wire.Encrypt([]byte("x"), &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	h := protectedHeader(t, token)
	want := map[string]string{
		"alg":       "RSA-OAEP-256",
		"enc":       "A256CBC-HS512",
		"encrypted": "true",
		"version":   "1",
	}
	for k, v := range want {
		if got, ok := h[k].(string); !ok || got != v {
			t.Errorf("protected header %q = %#v, want %q (header %v)", k, h[k], v, h)
		}
	}
	if _, ok := h["zip"]; ok {
		t.Errorf("protected header has zip: %v", h)
	}
}

func TestDecryptRefuses(t *testing.T) {
	key, other := testKeys(t)
	plaintext := []byte(`{"type":"auth"}`)
	good, err := wire.Encrypt(plaintext, &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(good, ".")
	signed, err := wire.Sign(plaintext, key)
	if err != nil {
		t.Fatal(err)
	}
	forOther, err := wire.Encrypt(plaintext, &other.PublicKey)
	if err != nil {
		t.Fatal(err)
	}

	// A JSON-serialized (flattened) JWE with the accepted algorithms.
	enc, err := jose.NewEncrypter(jose.A256CBC_HS512, jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: &key.PublicKey}, nil)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := enc.Encrypt(plaintext)
	if err != nil {
		t.Fatal(err)
	}
	full := obj.FullSerialize()
	if full == "" || full[0] != '{' {
		t.Fatalf("FullSerialize = %q", full)
	}

	// The accepted header with the content of a token made with another
	// algorithm: the header swap must not help.
	headerSwap := parts[0] + "." + strings.Join(strings.Split(encryptWith(t, plaintext, jose.RSA1_5, jose.A256CBC_HS512, &key.PublicKey), ".")[1:], ".")

	flip := func(i int) string {
		p := append([]string(nil), parts...)
		c := byte('A')
		if p[i][0] == 'A' {
			c = 'B'
		}
		p[i] = string(c) + p[i][1:]
		return strings.Join(p, ".")
	}

	tests := []struct {
		name  string
		token string
	}{
		{"RSA1_5 key management", encryptWith(t, plaintext, jose.RSA1_5, jose.A256CBC_HS512, &key.PublicKey)},
		{"RSA-OAEP (SHA-1) key management", encryptWith(t, plaintext, jose.RSA_OAEP, jose.A256CBC_HS512, &key.PublicKey)},
		{"A128GCM content encryption", encryptWith(t, plaintext, jose.RSA_OAEP_256, jose.A128GCM, &key.PublicKey)},
		{"A256GCM content encryption", encryptWith(t, plaintext, jose.RSA_OAEP_256, jose.A256GCM, &key.PublicKey)},
		{"A128CBC-HS256 content encryption", encryptWith(t, plaintext, jose.RSA_OAEP_256, jose.A128CBC_HS256, &key.PublicKey)},
		{"dir with a shared key", encryptWith(t, plaintext, jose.DIRECT, jose.A256CBC_HS512, bytes.Repeat([]byte{7}, 64))},
		{"header swapped onto RSA1_5 content", headerSwap},
		{"wrong key", forOther},
		{"JWS", signed},
		{"JSON-serialized JWE", full},
		{"garbage", "this is not a token"},
		{"empty", ""},
		{"four parts", strings.Join(parts[:4], ".")},
		{"six parts", good + ".AAAA"},
		{"protected header not base64url", "!!!." + strings.Join(parts[1:], ".")},
		{"protected header not JSON", b64("not json") + "." + strings.Join(parts[1:], ".")},
		{"alg none header", b64(`{"alg":"none","enc":"A256CBC-HS512"}`) + "." + strings.Join(parts[1:], ".")},
		{"tampered protected header", b64(`{"alg":"RSA-OAEP-256","enc":"A256CBC-HS512","encrypted":"false","version":"1"}`) + "." + strings.Join(parts[1:], ".")},
		{"tampered encrypted key", flip(1)},
		{"tampered iv", flip(2)},
		{"tampered ciphertext", flip(3)},
		{"tampered tag", flip(4)},
		{"empty tag", strings.Join(parts[:4], ".") + "."},
		{"plain envelope", `{"type":"auth"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.Decrypt([]byte(tt.token), key)
			if !errors.Is(err, wire.ErrNotJWE) {
				t.Fatalf("Decrypt error = %v, want ErrNotJWE (plaintext %q)", err, got)
			}
			if got != nil {
				t.Errorf("Decrypt returned %q with the error", got)
			}
		})
	}
}

func TestSignVerify(t *testing.T) {
	key, other := testKeys(t)
	payload := []byte(`{"type":"welcome","payload":"{}"}`)
	token, err := wire.Sign(payload, key)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if n := strings.Count(token, "."); n != 2 {
		t.Fatalf("Sign made %d dots, want a three-part compact JWS: %s", n, token)
	}
	h := protectedHeader(t, token)
	for k, v := range map[string]string{"alg": "RS256", "encrypted": "false", "version": "1"} {
		if got, ok := h[k].(string); !ok || got != v {
			t.Errorf("protected header %q = %#v, want %q (header %v)", k, h[k], v, h)
		}
	}
	got, err := wire.Verify([]byte(token), &key.PublicKey)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Errorf("Verify = %q, want %q", got, payload)
	}

	parts := strings.Split(token, ".")
	// HS256 keyed with the public key's bytes: the algorithm confusion attack.
	hmacKey := x509.MarshalPKCS1PublicKey(&key.PublicKey)
	encrypted, err := wire.Encrypt(payload, &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		token string
		key   *rsa.PublicKey
	}{
		{"wrong key", token, &other.PublicKey},
		{"alg none", b64(`{"alg":"none"}`) + "." + b64(string(payload)) + ".", &key.PublicKey},
		{"alg none with the RS256 signature", b64(`{"alg":"none"}`) + "." + parts[1] + "." + parts[2], &key.PublicKey},
		{"HS256", signWith(t, payload, jose.HS256, hmacKey), &key.PublicKey},
		{"RS512", signWith(t, payload, jose.RS512, key), &key.PublicKey},
		{"PS256", signWith(t, payload, jose.PS256, key), &key.PublicKey},
		{"tampered payload", parts[0] + "." + b64(`{"type":"welcome","payload":"{\"evil\":1}"}`) + "." + parts[2], &key.PublicKey},
		{"tampered header", b64(`{"alg":"RS256","encrypted":"true","version":"1"}`) + "." + parts[1] + "." + parts[2], &key.PublicKey},
		{"no signature", parts[0] + "." + parts[1] + ".", &key.PublicKey},
		{"JWE", encrypted, &key.PublicKey},
		{"garbage", "garbage", &key.PublicKey},
		{"empty", "", &key.PublicKey},
		{"JSON serialization", `{"payload":"` + parts[1] + `","protected":"` + parts[0] + `","signature":"` + parts[2] + `"}`, &key.PublicKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.Verify([]byte(tt.token), tt.key)
			if !errors.Is(err, wire.ErrNotJWS) {
				t.Fatalf("Verify error = %v, want ErrNotJWS (payload %q)", err, got)
			}
			if got != nil {
				t.Errorf("Verify returned %q with the error", got)
			}
		})
	}
}

func TestSealOpenEnvelope(t *testing.T) {
	key, other := testKeys(t)
	for _, style := range []wire.Style{wire.StyleString, wire.StyleEmbedded} {
		in := wire.Envelope{From: "agent-1", To: "MachineService", Type: wire.TypeAuth, MessageID: "m-1"}
		if err := in.SetPayload(wire.AuthRequest{Token: "tok", PublicKey: wire.EncodePublicKey(&other.PublicKey), ProtocolVersion: 1}); err != nil {
			t.Fatal(err)
		}
		sealed, err := wire.SealEnvelope(&in, style, &key.PublicKey)
		if err != nil {
			t.Fatalf("SealEnvelope: %v", err)
		}
		if bytes.Contains(sealed, []byte("tok")) || bytes.Contains(sealed, []byte("agent-1")) {
			t.Errorf("sealed envelope leaks plaintext: %s", sealed)
		}
		out, err := wire.OpenEnvelope(sealed, key)
		if err != nil {
			t.Fatalf("OpenEnvelope: %v", err)
		}
		if out.From != in.From || out.To != in.To || out.Type != in.Type || out.MessageID != in.MessageID || out.ErrorMessage != in.ErrorMessage {
			t.Errorf("OpenEnvelope = %+v, want %+v", out, in)
		}
		if st, ok := out.PayloadStyle(); !ok || st != style {
			t.Errorf("PayloadStyle() = %v, %v, want %v, true", st, ok, style)
		}
		var a wire.AuthRequest
		if err := out.DecodePayload(&a); err != nil {
			t.Fatal(err)
		}
		if a.Token != "tok" || a.ProtocolVersion != 1 {
			t.Errorf("payload = %+v", a)
		}
		pub, err := wire.ParsePublicKey(a.PublicKey)
		if err != nil {
			t.Fatalf("public key in the payload: %v", err)
		}
		if !pub.Equal(&other.PublicKey) {
			t.Error("public key changed on the way")
		}

		if _, err := wire.OpenEnvelope(sealed, other); !errors.Is(err, wire.ErrNotJWE) {
			t.Errorf("OpenEnvelope with the wrong key: error = %v, want ErrNotJWE", err)
		}
	}

	t.Run("plain envelope is not opened", func(t *testing.T) {
		if _, err := wire.OpenEnvelope([]byte(`{"type":"auth"}`), key); !errors.Is(err, wire.ErrNotJWE) {
			t.Errorf("error = %v, want ErrNotJWE", err)
		}
	})
	t.Run("JWE of something that is not an envelope", func(t *testing.T) {
		token, err := wire.Encrypt([]byte("not an envelope"), &key.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := wire.OpenEnvelope([]byte(token), key); !errors.Is(err, wire.ErrMalformed) {
			t.Errorf("error = %v, want ErrMalformed", err)
		}
	})
	t.Run("seal fails on an invalid payload", func(t *testing.T) {
		e := wire.Envelope{Type: wire.TypeAuth, Payload: json.RawMessage(`{`)}
		if _, err := wire.SealEnvelope(&e, wire.StyleEmbedded, &key.PublicKey); err == nil {
			t.Error("SealEnvelope succeeded")
		}
	})
}
