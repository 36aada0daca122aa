package wire

import (
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"strings"
)

// Bounds on the size of an RSA key a client may present.
const (
	MinKeyBits = 2048
	MaxKeyBits = 4096
)

// ParsePrivateKey reads the server key: a PEM text (PKCS#1 "RSA PRIVATE
// KEY" or PKCS#8 "PRIVATE KEY"), or the base64 of one, as the original's
// ENVIRONMENT__MACHINESERVERPRIVATE holds it.
func ParsePrivateKey(s string) (*rsa.PrivateKey, error) {
	data := []byte(strings.TrimSpace(s))
	if !strings.HasPrefix(string(data), "-----BEGIN") {
		decoded, err := base64.StdEncoding.DecodeString(string(data))
		if err != nil {
			return nil, fmt.Errorf("%w: neither PEM nor base64 of PEM: %v", ErrInvalidKey, err)
		}
		data = decoded
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%w: no PEM block", ErrInvalidKey)
	}
	var key *rsa.PrivateKey
	switch block.Type {
	case "RSA PRIVATE KEY":
		k, err := x509.ParsePKCS1PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalidKey, err)
		}
		key = k
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalidKey, err)
		}
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%w: not an RSA key", ErrInvalidKey)
		}
		key = rk
	default:
		return nil, fmt.Errorf("%w: unexpected PEM type %q", ErrInvalidKey, block.Type)
	}
	if n := key.N.BitLen(); n < MinKeyBits {
		return nil, fmt.Errorf("%w: %d bits, at least %d needed", ErrInvalidKey, n, MinKeyBits)
	}
	return key, nil
}

// EncodePrivateKey writes key as PKCS#1 PEM.
func EncodePrivateKey(key *rsa.PrivateKey) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
}

// ParsePublicKey reads a client's public key: PEM, PKCS#1 ("RSA PUBLIC
// KEY", what the Duplicati agent sends) or SPKI ("PUBLIC KEY"), RSA with
// MinKeyBits to MaxKeyBits bits.
func ParsePublicKey(s string) (*rsa.PublicKey, error) {
	block, _ := pem.Decode([]byte(strings.TrimSpace(s)))
	if block == nil {
		return nil, fmt.Errorf("%w: no PEM block", ErrInvalidKey)
	}
	var key *rsa.PublicKey
	switch block.Type {
	case "RSA PUBLIC KEY":
		k, err := x509.ParsePKCS1PublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalidKey, err)
		}
		key = k
	case "PUBLIC KEY":
		k, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalidKey, err)
		}
		rk, ok := k.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("%w: not an RSA key", ErrInvalidKey)
		}
		key = rk
	default:
		return nil, fmt.Errorf("%w: unexpected PEM type %q", ErrInvalidKey, block.Type)
	}
	if n := key.N.BitLen(); n < MinKeyBits || n > MaxKeyBits {
		return nil, fmt.Errorf("%w: %d bits, %d to %d accepted", ErrInvalidKey, n, MinKeyBits, MaxKeyBits)
	}
	// Parsing checks only that N and E are positive; nothing could be
	// encrypted to an even modulus or exponent.
	if key.N.Bit(0) == 0 || key.E < 3 || key.E%2 == 0 {
		return nil, fmt.Errorf("%w: not a usable RSA public key", ErrInvalidKey)
	}
	return key, nil
}

// EncodePublicKey writes key as PKCS#1 PEM ("RSA PUBLIC KEY").
func EncodePublicKey(key *rsa.PublicKey) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(key)}))
}

// PublicKeyHash is the key's short fingerprint carried in the welcome
// message: the first 16 characters of base64(SHA-256(PKCS#1 DER)).
func PublicKeyHash(key *rsa.PublicKey) string {
	sum := sha256.Sum256(x509.MarshalPKCS1PublicKey(key))
	return base64.StdEncoding.EncodeToString(sum[:])[:16]
}
