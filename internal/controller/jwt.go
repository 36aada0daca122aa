package controller

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Audiences a token must carry in aud.
const (
	AudienceAgent  = "agent"
	AudiencePortal = "portal"
)

// Claims are the claims the built-in controller reads from a JWT.
type Claims struct {
	jwt.RegisteredClaims
	OrganizationID    string   `json:"organizationId"`
	RegisteredAgentID string   `json:"registeredAgentId,omitempty"`
	SubOrganizations  []string `json:"subOrganizations,omitempty"`
	Impersonated      bool     `json:"impersonated,omitempty"`
}

// JWT validates tokens that are JWTs signed with a configured key.
type JWT struct {
	key    any
	method string
	issuer string
	now    func() time.Time
}

var _ Controller = (*JWT)(nil)

// NewJWTSecret verifies HS256 tokens with secret.
func NewJWTSecret(secret []byte, issuer string, now func() time.Time) (*JWT, error) {
	if len(secret) == 0 {
		return nil, errors.New("jwt secret is empty")
	}
	return newJWT(secret, jwt.SigningMethodHS256.Alg(), issuer, now), nil
}

// NewJWTPublicKey verifies tokens with a PEM public key: RSA (RS256),
// ECDSA P-256 (ES256) or Ed25519 (EdDSA).
func NewJWTPublicKey(pemData []byte, issuer string, now func() time.Time) (*JWT, error) {
	block, _ := pem.Decode(pemData)
	if block == nil {
		return nil, errors.New("jwt public key: no PEM block")
	}
	var pub crypto.PublicKey
	var err error
	switch block.Type {
	case "PUBLIC KEY":
		pub, err = x509.ParsePKIXPublicKey(block.Bytes)
	case "RSA PUBLIC KEY":
		pub, err = x509.ParsePKCS1PublicKey(block.Bytes)
	case "CERTIFICATE":
		var cert *x509.Certificate
		cert, err = x509.ParseCertificate(block.Bytes)
		if err == nil {
			pub = cert.PublicKey
		}
	default:
		return nil, fmt.Errorf("jwt public key: unexpected PEM type %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("jwt public key: %w", err)
	}
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return newJWT(k, jwt.SigningMethodRS256.Alg(), issuer, now), nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return nil, errors.New("jwt public key: only the P-256 curve (ES256) is supported")
		}
		return newJWT(k, jwt.SigningMethodES256.Alg(), issuer, now), nil
	case ed25519.PublicKey:
		return newJWT(k, jwt.SigningMethodEdDSA.Alg(), issuer, now), nil
	}
	return nil, fmt.Errorf("jwt public key: unsupported key type %T", pub)
}

// LoadJWTPublicKeyFile reads a PEM public key file for NewJWTPublicKey.
func LoadJWTPublicKeyFile(path, issuer string, now func() time.Time) (*JWT, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read jwt public key: %w", err)
	}
	return NewJWTPublicKey(data, issuer, now)
}

func newJWT(key any, method, issuer string, now func() time.Time) *JWT {
	if now == nil {
		now = time.Now
	}
	return &JWT{key: key, method: method, issuer: issuer, now: now}
}

// LooksLikeJWT reports whether token has the three dot-separated parts of
// a compact JWS.
func LooksLikeJWT(token string) bool { return strings.Count(token, ".") == 2 }

func (j *JWT) parse(token, audience string) (*Claims, error) {
	opts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{j.method}),
		jwt.WithAudience(audience),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(j.now),
		jwt.WithLeeway(5 * time.Second),
	}
	if j.issuer != "" {
		opts = append(opts, jwt.WithIssuer(j.issuer))
	}
	claims := &Claims{}
	_, err := jwt.ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return j.key, nil }, opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrRejected, err)
	}
	if claims.OrganizationID == "" {
		return nil, fmt.Errorf("%w: no organizationId claim", ErrRejected)
	}
	return claims, nil
}

// ValidateAgent verifies an agent JWT (aud "agent", registeredAgentId
// required).
func (j *JWT) ValidateAgent(_ context.Context, token string) (Agent, error) {
	c, err := j.parse(token, AudienceAgent)
	if err != nil {
		return Agent{}, err
	}
	if c.RegisteredAgentID == "" {
		return Agent{}, fmt.Errorf("%w: no registeredAgentId claim", ErrAgentNotFound)
	}
	return Agent{OrganizationID: c.OrganizationID, RegisteredAgentID: c.RegisteredAgentID, Expires: c.ExpiresAt.Time}, nil
}

// ValidatePortal verifies a portal JWT (aud "portal").
func (j *JWT) ValidatePortal(_ context.Context, token string, includeSubOrgs bool) (Portal, error) {
	c, err := j.parse(token, AudiencePortal)
	if err != nil {
		return Portal{}, err
	}
	p := Portal{OrganizationID: c.OrganizationID, Impersonated: c.Impersonated, Expires: c.ExpiresAt.Time}
	if includeSubOrgs {
		p.SubOrganizations = c.SubOrganizations
	}
	return p, nil
}

// Builtin is the built-in controller: static tokens first, then JWT
// verification for tokens that look like JWTs. Either part may be nil.
type Builtin struct {
	Static *Static
	JWT    *JWT
}

var _ Controller = (*Builtin)(nil)

// ValidateAgent tries the static tokens, then the JWT verifier.
func (b *Builtin) ValidateAgent(ctx context.Context, token string) (Agent, error) {
	err := b.unmatched()
	if b.Static != nil {
		var a Agent
		if a, err = b.Static.ValidateAgent(ctx, token); err == nil {
			return a, nil
		}
	}
	if b.JWT != nil && LooksLikeJWT(token) {
		return b.JWT.ValidateAgent(ctx, token)
	}
	return Agent{}, err
}

// ValidatePortal tries the static tokens, then the JWT verifier.
func (b *Builtin) ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (Portal, error) {
	err := b.unmatched()
	if b.Static != nil {
		var p Portal
		if p, err = b.Static.ValidatePortal(ctx, token, includeSubOrgs); err == nil {
			return p, nil
		}
	}
	if b.JWT != nil && LooksLikeJWT(token) {
		return b.JWT.ValidatePortal(ctx, token, includeSubOrgs)
	}
	return Portal{}, err
}

// unmatched is the error for a token that no configured source checked.
func (b *Builtin) unmatched() error {
	if b.JWT != nil {
		return fmt.Errorf("%w: not a JWT", ErrRejected)
	}
	return fmt.Errorf("%w: no token source configured", ErrRejected)
}
