package wire

import (
	"crypto/rsa"
	"fmt"

	"github.com/go-jose/go-jose/v4"
)

// Only these algorithms are accepted: no "none", no RSA1_5, no "dir".
var (
	keyAlgorithms     = []jose.KeyAlgorithm{jose.RSA_OAEP_256}
	contentAlgorithms = []jose.ContentEncryption{jose.A256CBC_HS512}
	signatureAlgs     = []jose.SignatureAlgorithm{jose.RS256}
)

// Encrypt wraps plaintext (an envelope's JSON) in a compact JWE for key:
// RSA-OAEP-256 key management, A256CBC-HS512 content encryption, and the
// protected header extras encrypted="true", version="1".
func Encrypt(plaintext []byte, key *rsa.PublicKey) (string, error) {
	opts := (&jose.EncrypterOptions{}).
		WithHeader("encrypted", "true").
		WithHeader("version", "1")
	enc, err := jose.NewEncrypter(jose.A256CBC_HS512, jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: key}, opts)
	if err != nil {
		return "", fmt.Errorf("jwe encrypter: %w", err)
	}
	obj, err := enc.Encrypt(plaintext)
	if err != nil {
		return "", fmt.Errorf("jwe encrypt: %w", err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		return "", fmt.Errorf("jwe serialize: %w", err)
	}
	return s, nil
}

// Decrypt opens a compact JWE made by Encrypt with the matching private key.
func Decrypt(token []byte, key *rsa.PrivateKey) ([]byte, error) {
	obj, err := jose.ParseEncryptedCompact(string(token), keyAlgorithms, contentAlgorithms)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotJWE, err)
	}
	plain, err := obj.Decrypt(key)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotJWE, err)
	}
	return plain, nil
}

// Sign wraps payload in a compact RS256 JWS with the protected header
// extras encrypted="false", version="1".
func Sign(payload []byte, key *rsa.PrivateKey) (string, error) {
	opts := (&jose.SignerOptions{}).
		WithHeader("encrypted", "false").
		WithHeader("version", "1")
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, opts)
	if err != nil {
		return "", fmt.Errorf("jws signer: %w", err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("jws sign: %w", err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		return "", fmt.Errorf("jws serialize: %w", err)
	}
	return s, nil
}

// Verify checks a compact RS256 JWS against key and returns its payload.
func Verify(token []byte, key *rsa.PublicKey) ([]byte, error) {
	obj, err := jose.ParseSignedCompact(string(token), signatureAlgs)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotJWS, err)
	}
	payload, err := obj.Verify(key)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotJWS, err)
	}
	return payload, nil
}

// SealEnvelope marshals e in style s and encrypts it for key.
func SealEnvelope(e *Envelope, s Style, key *rsa.PublicKey) ([]byte, error) {
	plain, err := e.Marshal(s)
	if err != nil {
		return nil, err
	}
	token, err := Encrypt(plain, key)
	if err != nil {
		return nil, err
	}
	return []byte(token), nil
}

// OpenEnvelope decrypts a JWE with key and decodes the envelope inside.
func OpenEnvelope(data []byte, key *rsa.PrivateKey) (Envelope, error) {
	plain, err := Decrypt(data, key)
	if err != nil {
		return Envelope{}, err
	}
	return DecodeEnvelope(plain)
}
