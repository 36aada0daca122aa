package wire_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"

	"github.com/machineservice/machineservice/wire"
)

func pemText(typ string, der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
}

func mustPKCS8(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func mustPKIX(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// wrap76 wraps s at 76 characters, as base64(1) does.
func wrap76(s string) string {
	var b strings.Builder
	for len(s) > 76 {
		b.WriteString(s[:76])
		b.WriteByte('\n')
		s = s[76:]
	}
	b.WriteString(s)
	b.WriteByte('\n')
	return b.String()
}

// bigPublicKey builds a public key with an odd modulus of exactly bits
// bits (2^(bits-1)+1) without generating one, which is slow for big sizes.
func bigPublicKey(bits int) *rsa.PublicKey {
	n := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
	n.Add(n, big.NewInt(1))
	return &rsa.PublicKey{N: n, E: 65537}
}

func TestParsePrivateKey(t *testing.T) {
	key, _ := testKeys(t)
	pkcs1 := pemText("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
	pkcs8 := pemText("PRIVATE KEY", mustPKCS8(t, key))
	std := base64.StdEncoding.EncodeToString

	accept := []struct {
		name string
		in   string
	}{
		{"PKCS#1 PEM", pkcs1},
		{"PKCS#8 PEM", pkcs8},
		{"base64 of PKCS#1 PEM", std([]byte(pkcs1))},
		{"base64 of PKCS#8 PEM", std([]byte(pkcs8))},
		{"base64 of PKCS#1 PEM wrapped at 76", wrap76(std([]byte(pkcs1)))},
		{"base64 of PKCS#8 PEM with CRLF and spaces around", " \r\n" + std([]byte(pkcs8)) + "\r\n "},
		{"PEM with surrounding whitespace", "\n\n  " + pkcs1 + "\n\n"},
		{"EncodePrivateKey output", string(wire.EncodePrivateKey(key))},
	}
	for _, tt := range accept {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.ParsePrivateKey(tt.in)
			if err != nil {
				t.Fatalf("ParsePrivateKey: %v", err)
			}
			if !got.Equal(key) {
				t.Error("parsed a different key")
			}
		})
	}

	small := testKey1024(t)
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecDER, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	refuse := []struct {
		name string
		in   string
	}{
		{"empty", ""},
		{"whitespace", " \n "},
		{"garbage", "not a key at all"},
		{"base64 of garbage", std([]byte("not a PEM block"))},
		{"broken PEM", "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n"},
		{"PKCS#1 PEM with bad DER", pemText("RSA PRIVATE KEY", []byte{0x30, 0x03, 0x02, 0x01})},
		{"PKCS#8 PEM with bad DER", pemText("PRIVATE KEY", []byte("junk"))},
		{"PKCS#8 DER in an RSA PRIVATE KEY block", pemText("RSA PRIVATE KEY", mustPKCS8(t, key))},
		{"PKCS#1 DER in a PRIVATE KEY block", pemText("PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))},
		{"EC PRIVATE KEY", pemText("EC PRIVATE KEY", ecDER)},
		{"EC key in PKCS#8", pemText("PRIVATE KEY", mustPKCS8(t, ec))},
		{"base64 of EC key in PKCS#8", std([]byte(pemText("PRIVATE KEY", mustPKCS8(t, ec))))},
		{"Ed25519 key in PKCS#8", pemText("PRIVATE KEY", mustPKCS8(t, ed))},
		{"public key", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&key.PublicKey))},
		{"certificate type", pemText("CERTIFICATE", x509.MarshalPKCS1PrivateKey(key))},
		{"1024-bit PKCS#1", pemText("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(small))},
		{"1024-bit PKCS#8", pemText("PRIVATE KEY", mustPKCS8(t, small))},
		{"base64 of 1024-bit PKCS#1", std([]byte(pemText("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(small))))},
	}
	for _, tt := range refuse {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.ParsePrivateKey(tt.in)
			if !errors.Is(err, wire.ErrInvalidKey) {
				t.Fatalf("ParsePrivateKey error = %v, want ErrInvalidKey", err)
			}
			if got != nil {
				t.Error("returned a key with the error")
			}
		})
	}
}

func TestParsePublicKey(t *testing.T) {
	key, _ := testKeys(t)
	pub := &key.PublicKey
	pkcs1 := pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(pub))
	spki := pemText("PUBLIC KEY", mustPKIX(t, pub))

	accept := []struct {
		name string
		in   string
		want *rsa.PublicKey
	}{
		{"PKCS#1", pkcs1, pub},
		{"SPKI", spki, pub},
		{"EncodePublicKey output", wire.EncodePublicKey(pub), pub},
		{"surrounding whitespace", "\r\n  " + pkcs1 + "  \r\n", pub},
		{"CRLF line ends", strings.ReplaceAll(pkcs1, "\n", "\r\n"), pub},
		{"2048 bits exactly (constructed)", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(bigPublicKey(2048))), bigPublicKey(2048)},
		{"4096 bits exactly (constructed)", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(bigPublicKey(4096))), bigPublicKey(4096)},
		{"4096 bits SPKI (constructed)", pemText("PUBLIC KEY", mustPKIX(t, bigPublicKey(4096))), bigPublicKey(4096)},
	}
	for _, tt := range accept {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.ParsePublicKey(tt.in)
			if err != nil {
				t.Fatalf("ParsePublicKey: %v", err)
			}
			if !got.Equal(tt.want) {
				t.Error("parsed a different key")
			}
		})
	}

	small := &testKey1024(t).PublicKey
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	huge := bigPublicKey(8192)
	refuse := []struct {
		name string
		in   string
	}{
		{"empty", ""},
		{"garbage", "garbage"},
		{"base64 of PEM", base64.StdEncoding.EncodeToString([]byte(pkcs1))},
		{"1024-bit PKCS#1", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(small))},
		{"1024-bit SPKI", pemText("PUBLIC KEY", mustPKIX(t, small))},
		{"2047 bits (constructed)", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(bigPublicKey(2047)))},
		{"4097 bits (constructed)", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(bigPublicKey(4097)))},
		{"8192-bit PKCS#1 (constructed)", pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(huge))},
		{"8192-bit SPKI (constructed)", pemText("PUBLIC KEY", mustPKIX(t, huge))},
		{"EC SPKI", pemText("PUBLIC KEY", mustPKIX(t, &ec.PublicKey))},
		{"Ed25519 SPKI", pemText("PUBLIC KEY", mustPKIX(t, edPub))},
		{"SPKI DER in an RSA PUBLIC KEY block", pemText("RSA PUBLIC KEY", mustPKIX(t, pub))},
		{"PKCS#1 DER in a PUBLIC KEY block", pemText("PUBLIC KEY", x509.MarshalPKCS1PublicKey(pub))},
		{"bad DER", pemText("RSA PUBLIC KEY", []byte("junk"))},
		{"wrong PEM type: CERTIFICATE", pemText("CERTIFICATE", x509.MarshalPKCS1PublicKey(pub))},
		{"wrong PEM type: RSA PRIVATE KEY", pemText("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))},
		{"wrong PEM type: lower case", pemText("rsa public key", x509.MarshalPKCS1PublicKey(pub))},
		{"truncated PEM", pkcs1[:len(pkcs1)/2]},
	}
	for _, tt := range refuse {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.ParsePublicKey(tt.in)
			if !errors.Is(err, wire.ErrInvalidKey) {
				t.Fatalf("ParsePublicKey error = %v, want ErrInvalidKey", err)
			}
			if got != nil {
				t.Error("returned a key with the error")
			}
		})
	}
}

func TestEncodeKeys(t *testing.T) {
	key, _ := testKeys(t)
	priv := wire.EncodePrivateKey(key)
	if block, rest := pem.Decode(priv); block == nil || block.Type != "RSA PRIVATE KEY" || len(rest) != 0 {
		t.Errorf("EncodePrivateKey = %q", priv)
	}
	pub := wire.EncodePublicKey(&key.PublicKey)
	block, rest := pem.Decode([]byte(pub))
	if block == nil || block.Type != "RSA PUBLIC KEY" || len(rest) != 0 {
		t.Fatalf("EncodePublicKey = %q", pub)
	}
	parsed, err := x509.ParsePKCS1PublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !parsed.Equal(&key.PublicKey) {
		t.Error("EncodePublicKey wrote a different key")
	}
}

func TestPublicKeyHash(t *testing.T) {
	key, other := testKeys(t)
	independent := func(pub *rsa.PublicKey) string {
		sum := sha256.Sum256(x509.MarshalPKCS1PublicKey(pub))
		return base64.StdEncoding.EncodeToString(sum[:])[:16]
	}
	for _, k := range []*rsa.PrivateKey{key, other, testKey1024(t)} {
		got := wire.PublicKeyHash(&k.PublicKey)
		if want := independent(&k.PublicKey); got != want {
			t.Errorf("PublicKeyHash = %q, want %q", got, want)
		}
		if len(got) != 16 {
			t.Errorf("len(PublicKeyHash) = %d, want 16", len(got))
		}
		if again := wire.PublicKeyHash(&k.PublicKey); again != got {
			t.Errorf("PublicKeyHash is not stable: %q then %q", got, again)
		}
	}

	// The same key read from either PEM form hashes the same.
	fromPKCS1, err := wire.ParsePublicKey(pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&key.PublicKey)))
	if err != nil {
		t.Fatal(err)
	}
	fromSPKI, err := wire.ParsePublicKey(pemText("PUBLIC KEY", mustPKIX(t, &key.PublicKey)))
	if err != nil {
		t.Fatal(err)
	}
	h := wire.PublicKeyHash(&key.PublicKey)
	if wire.PublicKeyHash(fromPKCS1) != h || wire.PublicKeyHash(fromSPKI) != h {
		t.Errorf("hash depends on the PEM form: %q, %q, %q", h, wire.PublicKeyHash(fromPKCS1), wire.PublicKeyHash(fromSPKI))
	}
	if wire.PublicKeyHash(&other.PublicKey) == h {
		t.Error("two keys have the same hash")
	}

	// Pinned vectors, so a change of the algorithm (DER form, encoding,
	// length) is caught. The fuzz key's value was checked with
	//   openssl rsa -in testdata/fuzz_key.pem -RSAPublicKey_out -outform DER |
	//   openssl dgst -sha256 -binary | base64 | cut -c1-16
	for _, tt := range []struct {
		name string
		key  *rsa.PublicKey
		want string
	}{
		{"constructed N = 2^2047+1, E = 65537", bigPublicKey(2048), "whpie7OaQ/754kif"},
		{"testdata/fuzz_key.pem", &fuzzKey(t).PublicKey, "okqnQsoRFInBeBXQ"},
	} {
		if got := wire.PublicKeyHash(tt.key); got != tt.want {
			t.Errorf("PublicKeyHash(%s) = %q, want %q", tt.name, got, tt.want)
		}
		if got := independent(tt.key); got != tt.want {
			t.Errorf("independent hash of %s = %q, want %q", tt.name, got, tt.want)
		}
	}
}

// TestParsePublicKeyRefusesUnusableKeys: a key ParsePublicKey accepts must
// be one Encrypt can use, or a client passes the auth check and every
// message to it then fails. x509.ParsePKCS1PublicKey only checks that N and
// E are positive; crypto/rsa refuses an even modulus and an exponent that
// is below 3 or even.
func TestParsePublicKeyRefusesUnusableKeys(t *testing.T) {
	even := bigPublicKey(2048)
	even.N.Sub(even.N, big.NewInt(1)) // 2^2047: still 2048 bits
	tests := []struct {
		name string
		key  *rsa.PublicKey
	}{
		{"even modulus", even},
		{"exponent 1", &rsa.PublicKey{N: bigPublicKey(2048).N, E: 1}},
		{"even exponent", &rsa.PublicKey{N: bigPublicKey(2048).N, E: 65536}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := wire.Encrypt([]byte("x"), tt.key); err == nil {
				t.Fatal("Encrypt accepts this key: the test case is wrong")
			}
			if _, err := wire.ParsePublicKey(pemText("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(tt.key))); !errors.Is(err, wire.ErrInvalidKey) {
				t.Errorf("ParsePublicKey error = %v, want ErrInvalidKey", err)
			}
		})
	}
}
