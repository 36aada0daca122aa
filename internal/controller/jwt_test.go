package controller_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/machineservice/machineservice/internal/controller"
)

var secret = []byte("a shared secret of some length, for HS256")

// rsaKey is generated once: RSA key generation is slow under -race.
var rsaKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

// sign makes a JWT of claims with method and key.
func sign(t *testing.T, method jwt.SigningMethod, key any, claims jwt.Claims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("sign %s: %v", method.Alg(), err)
	}
	return s
}

// pemPublicKey encodes pub as an SPKI PEM block.
func pemPublicKey(t *testing.T, pub crypto.PublicKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func agentClaims(exp time.Time) *controller.Claims {
	return &controller.Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Audience:  jwt.ClaimStrings{controller.AudienceAgent},
			ExpiresAt: jwt.NewNumericDate(exp),
		},
		OrganizationID:    orgA,
		RegisteredAgentID: "reg-a1",
	}
}

func portalClaims(exp time.Time) *controller.Claims {
	return &controller.Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Audience:  jwt.ClaimStrings{controller.AudiencePortal},
			ExpiresAt: jwt.NewNumericDate(exp),
		},
		OrganizationID:   orgA,
		SubOrganizations: []string{orgSub},
		Impersonated:     true,
	}
}

func newSecretJWT(t *testing.T, issuer string, now func() time.Time) *controller.JWT {
	t.Helper()
	j, err := controller.NewJWTSecret(secret, issuer, now)
	if err != nil {
		t.Fatalf("NewJWTSecret: %v", err)
	}
	return j
}

func TestJWTSecretValid(t *testing.T) {
	ctx := context.Background()
	j := newSecretJWT(t, "", func() time.Time { return epoch })
	exp := epoch.Add(time.Hour)

	a, err := j.ValidateAgent(ctx, sign(t, jwt.SigningMethodHS256, secret, agentClaims(exp)))
	if err != nil {
		t.Fatalf("ValidateAgent: %v", err)
	}
	if a.OrganizationID != orgA || a.RegisteredAgentID != "reg-a1" || a.NewToken != "" || !a.Expires.Equal(exp) {
		t.Errorf("ValidateAgent = %+v", a)
	}

	token := sign(t, jwt.SigningMethodHS256, secret, portalClaims(exp))
	p, err := j.ValidatePortal(ctx, token, true)
	if err != nil {
		t.Fatalf("ValidatePortal: %v", err)
	}
	if p.OrganizationID != orgA || !reflect.DeepEqual(p.SubOrganizations, []string{orgSub}) || !p.Impersonated || !p.Expires.Equal(exp) {
		t.Errorf("ValidatePortal(includeSubOrgs) = %+v", p)
	}
	p, err = j.ValidatePortal(ctx, token, false)
	if err != nil {
		t.Fatalf("ValidatePortal: %v", err)
	}
	if p.SubOrganizations != nil {
		t.Errorf("ValidatePortal without includeSubOrgs granted %v", p.SubOrganizations)
	}

	// A token for both audiences serves both.
	both := agentClaims(exp)
	both.Audience = jwt.ClaimStrings{controller.AudiencePortal, controller.AudienceAgent}
	token = sign(t, jwt.SigningMethodHS256, secret, both)
	if _, err := j.ValidateAgent(ctx, token); err != nil {
		t.Errorf("ValidateAgent with two audiences: %v", err)
	}
	if _, err := j.ValidatePortal(ctx, token, false); err != nil {
		t.Errorf("ValidatePortal with two audiences: %v", err)
	}
}

func TestJWTSecretRefused(t *testing.T) {
	if _, err := controller.NewJWTSecret(nil, "", nil); err == nil {
		t.Error("NewJWTSecret with an empty secret: no error")
	}

	exp := epoch.Add(time.Hour)
	mutate := func(f func(c *controller.Claims)) *controller.Claims {
		c := agentClaims(exp)
		f(c)
		return c
	}
	tests := []struct {
		name   string
		issuer string // configured
		token  func(t *testing.T) string
		want   error
	}{
		{"wrong secret", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, []byte("another secret"), agentClaims(exp))
		}, controller.ErrRejected},
		{"portal audience", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.Audience = jwt.ClaimStrings{controller.AudiencePortal} }))
		}, controller.ErrRejected},
		{"no audience", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.Audience = nil }))
		}, controller.ErrRejected},
		{"expired", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, agentClaims(epoch.Add(-time.Minute)))
		}, controller.ErrRejected},
		{"no exp", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.ExpiresAt = nil }))
		}, controller.ErrRejected},
		{"nbf in the future", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.NotBefore = jwt.NewNumericDate(epoch.Add(time.Minute)) }))
		}, controller.ErrRejected},
		{"issuer missing", "https://issuer.example", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, agentClaims(exp))
		}, controller.ErrRejected},
		{"issuer wrong", "https://issuer.example", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.Issuer = "https://other.example" }))
		}, controller.ErrRejected},
		{"alg none", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, agentClaims(exp))
		}, controller.ErrRejected},
		{"HS512", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS512, secret, agentClaims(exp))
		}, controller.ErrRejected},
		{"RS256", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodRS256, rsaKey(), agentClaims(exp))
		}, controller.ErrRejected},
		{"no organizationId", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.OrganizationID = "" }))
		}, controller.ErrRejected},
		{"no registeredAgentId", "", func(t *testing.T) string {
			return sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.RegisteredAgentID = "" }))
		}, controller.ErrAgentNotFound},
		{"tampered", "", func(t *testing.T) string {
			token := sign(t, jwt.SigningMethodHS256, secret, agentClaims(exp))
			other := sign(t, jwt.SigningMethodHS256, secret, mutate(func(c *controller.Claims) { c.OrganizationID = orgB }))
			parts, otherParts := strings.Split(token, "."), strings.Split(other, ".")
			return parts[0] + "." + otherParts[1] + "." + parts[2]
		}, controller.ErrRejected},
		{"not a JWT", "", func(*testing.T) string { return "a.b.c" }, controller.ErrRejected},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := newSecretJWT(t, tt.issuer, func() time.Time { return epoch })
			a, err := j.ValidateAgent(context.Background(), tt.token(t))
			if !errors.Is(err, tt.want) {
				t.Fatalf("ValidateAgent = %+v, %v; want %v", a, err, tt.want)
			}
		})
	}
}

func TestJWTTimeClaims(t *testing.T) {
	ctx := context.Background()
	now := epoch
	j := newSecretJWT(t, "https://issuer.example", func() time.Time { return now })
	c := portalClaims(epoch.Add(time.Hour))
	c.Issuer = "https://issuer.example"
	c.NotBefore = jwt.NewNumericDate(epoch.Add(2 * time.Second)) // within the leeway
	token := sign(t, jwt.SigningMethodHS256, secret, c)
	if _, err := j.ValidatePortal(ctx, token, false); err != nil {
		t.Errorf("nbf 2 s ahead (within the leeway): %v", err)
	}
	now = epoch.Add(time.Hour + 2*time.Second)
	if _, err := j.ValidatePortal(ctx, token, false); err != nil {
		t.Errorf("2 s after exp (within the leeway): %v", err)
	}
	now = epoch.Add(time.Hour + time.Minute)
	if _, err := j.ValidatePortal(ctx, token, false); !errors.Is(err, controller.ErrRejected) {
		t.Errorf("a minute after exp: error %v, want ErrRejected", err)
	}
}

// TestJWTAlgorithmConfusion signs HS256 tokens with the bytes of the
// configured RSA public key, which a verifier that takes the algorithm
// from the token would accept.
func TestJWTAlgorithmConfusion(t *testing.T) {
	pub := &rsaKey().PublicKey
	spki := pemPublicKey(t, pub)
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(pub)})
	for name, pemData := range map[string][]byte{"PUBLIC KEY": spki, "RSA PUBLIC KEY": pkcs1} {
		t.Run(name, func(t *testing.T) {
			j, err := controller.NewJWTPublicKey(pemData, "", func() time.Time { return epoch })
			if err != nil {
				t.Fatalf("NewJWTPublicKey: %v", err)
			}
			ctx := context.Background()
			if _, err := j.ValidateAgent(ctx, sign(t, jwt.SigningMethodRS256, rsaKey(), agentClaims(epoch.Add(time.Hour)))); err != nil {
				t.Fatalf("a genuine RS256 token: %v", err)
			}
			forged := sign(t, jwt.SigningMethodHS256, pemData, agentClaims(epoch.Add(time.Hour)))
			if a, err := j.ValidateAgent(ctx, forged); !errors.Is(err, controller.ErrRejected) {
				t.Errorf("HS256 token signed with the public key's PEM: %+v, %v; want ErrRejected", a, err)
			}
			forged = sign(t, jwt.SigningMethodHS256, pemData, portalClaims(epoch.Add(time.Hour)))
			if p, err := j.ValidatePortal(ctx, forged, true); !errors.Is(err, controller.ErrRejected) {
				t.Errorf("HS256 portal token signed with the public key's PEM: %+v, %v; want ErrRejected", p, err)
			}
		})
	}
}

func TestJWTPublicKeys(t *testing.T) {
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherEC, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, otherEd, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name          string
		pem           []byte
		method        jwt.SigningMethod
		key, otherKey any
		wrongMethod   jwt.SigningMethod
		wrongKey      any
	}{
		{"RS256", pemPublicKey(t, &rsaKey().PublicKey), jwt.SigningMethodRS256, rsaKey(), nil, jwt.SigningMethodPS256, rsaKey()},
		{"RS256 certificate", certificatePEM(t, rsaKey()), jwt.SigningMethodRS256, rsaKey(), nil, jwt.SigningMethodRS512, rsaKey()},
		{"ES256", pemPublicKey(t, &ecKey.PublicKey), jwt.SigningMethodES256, ecKey, otherEC, jwt.SigningMethodHS256, pemPublicKey(t, &ecKey.PublicKey)},
		{"EdDSA", pemPublicKey(t, edPub), jwt.SigningMethodEdDSA, edKey, otherEd, jwt.SigningMethodHS256, pemPublicKey(t, edPub)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "key.pem")
			if err := os.WriteFile(path, tt.pem, 0o600); err != nil {
				t.Fatal(err)
			}
			j, err := controller.LoadJWTPublicKeyFile(path, "iss", func() time.Time { return epoch })
			if err != nil {
				t.Fatalf("LoadJWTPublicKeyFile: %v", err)
			}
			ctx := context.Background()
			ac := agentClaims(epoch.Add(time.Hour))
			ac.Issuer = "iss"
			a, err := j.ValidateAgent(ctx, sign(t, tt.method, tt.key, ac))
			if err != nil {
				t.Fatalf("ValidateAgent: %v", err)
			}
			if a.OrganizationID != orgA || a.RegisteredAgentID != "reg-a1" {
				t.Errorf("ValidateAgent = %+v", a)
			}
			pc := portalClaims(epoch.Add(time.Hour))
			pc.Issuer = "iss"
			if p, err := j.ValidatePortal(ctx, sign(t, tt.method, tt.key, pc), true); err != nil || p.OrganizationID != orgA || !p.Impersonated {
				t.Errorf("ValidatePortal = %+v, %v", p, err)
			}
			if tt.otherKey != nil {
				if _, err := j.ValidateAgent(ctx, sign(t, tt.method, tt.otherKey, ac)); !errors.Is(err, controller.ErrRejected) {
					t.Errorf("token signed with another key: error %v, want ErrRejected", err)
				}
			}
			if _, err := j.ValidateAgent(ctx, sign(t, tt.wrongMethod, tt.wrongKey, ac)); !errors.Is(err, controller.ErrRejected) {
				t.Errorf("token signed with %s: error %v, want ErrRejected", tt.wrongMethod.Alg(), err)
			}
		})
	}
}

func certificatePEM(t *testing.T, key *rsa.PrivateKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "controller"},
		NotBefore:    epoch.Add(-time.Hour),
		NotAfter:     epoch.Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestJWTPublicKeyRefused(t *testing.T) {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		pem  []byte
		want string
	}{
		{"P-384", pemPublicKey(t, &p384.PublicKey), "P-256"},
		{"not PEM", []byte("ssh-rsa AAAA"), "no PEM block"},
		{"private key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey())}), "unexpected PEM type"},
		{"garbage in the block", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte("nonsense")}), "jwt public key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j, err := controller.NewJWTPublicKey(tt.pem, "", nil)
			if err == nil {
				t.Fatalf("NewJWTPublicKey = %v, want an error", j)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
	if _, err := controller.LoadJWTPublicKeyFile(filepath.Join(t.TempDir(), "missing.pem"), "", nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing key file: error %v, want os.ErrNotExist", err)
	}
}

func TestBuiltin(t *testing.T) {
	ctx := context.Background()
	now := func() time.Time { return epoch }
	f := testTokens()
	// A static token shaped like a JWT is answered from the file.
	f.Agents = append(f.Agents, controller.AgentToken{Token: "static.looks.jwt", OrganizationID: orgB, RegisteredAgentID: "reg-static"})
	static, err := controller.NewStatic(f, now)
	if err != nil {
		t.Fatal(err)
	}
	j := newSecretJWT(t, "", now)
	b := &controller.Builtin{Static: static, JWT: j}

	if a, err := b.ValidateAgent(ctx, "agent-a1"); err != nil || a.RegisteredAgentID != "reg-a1" {
		t.Errorf("static agent token: %+v, %v", a, err)
	}
	if a, err := b.ValidateAgent(ctx, "static.looks.jwt"); err != nil || a.RegisteredAgentID != "reg-static" {
		t.Errorf("static token shaped like a JWT: %+v, %v", a, err)
	}
	if p, err := b.ValidatePortal(ctx, "portal-a", true); err != nil || len(p.SubOrganizations) != 1 {
		t.Errorf("static portal token: %+v, %v", p, err)
	}
	agentJWT := sign(t, jwt.SigningMethodHS256, secret, agentClaims(epoch.Add(time.Hour)))
	if a, err := b.ValidateAgent(ctx, agentJWT); err != nil || a.OrganizationID != orgA {
		t.Errorf("agent JWT: %+v, %v", a, err)
	}
	portalJWT := sign(t, jwt.SigningMethodHS256, secret, portalClaims(epoch.Add(time.Hour)))
	if p, err := b.ValidatePortal(ctx, portalJWT, false); err != nil || !p.Impersonated {
		t.Errorf("portal JWT: %+v, %v", p, err)
	}

	noAgentID := agentClaims(epoch.Add(time.Hour))
	noAgentID.RegisteredAgentID = ""
	refused := []struct {
		name string
		b    *controller.Builtin
		call func(b *controller.Builtin) error
		want error
	}{
		{"unknown agent token", b, func(b *controller.Builtin) error { _, err := b.ValidateAgent(ctx, "nope"); return err }, controller.ErrRejected},
		{"unknown portal token", b, func(b *controller.Builtin) error { _, err := b.ValidatePortal(ctx, "nope", false); return err }, controller.ErrRejected},
		{"agent JWT as portal", b, func(b *controller.Builtin) error { _, err := b.ValidatePortal(ctx, agentJWT, false); return err }, controller.ErrRejected},
		{"JWT without agent id", b, func(b *controller.Builtin) error {
			_, err := b.ValidateAgent(ctx, sign(t, jwt.SigningMethodHS256, secret, noAgentID))
			return err
		}, controller.ErrAgentNotFound},
		{"static only, JWT given", &controller.Builtin{Static: static}, func(b *controller.Builtin) error { _, err := b.ValidateAgent(ctx, agentJWT); return err }, controller.ErrRejected},
		{"JWT only, static token given", &controller.Builtin{JWT: j}, func(b *controller.Builtin) error { _, err := b.ValidateAgent(ctx, "agent-a1"); return err }, controller.ErrRejected},
		{"JWT only, static portal token given", &controller.Builtin{JWT: j}, func(b *controller.Builtin) error { _, err := b.ValidatePortal(ctx, "portal-a", false); return err }, controller.ErrRejected},
		{"nothing configured", &controller.Builtin{}, func(b *controller.Builtin) error { _, err := b.ValidatePortal(ctx, portalJWT, false); return err }, controller.ErrRejected},
		{"None", nil, func(*controller.Builtin) error {
			_, err := controller.None{}.ValidateAgent(ctx, "agent-a1")
			return err
		}, controller.ErrRejected},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(tt.b); !errors.Is(err, tt.want) {
				t.Errorf("error %v, want %v", err, tt.want)
			}
		})
	}

	// The error says why: a verifier was configured, the token was not
	// for it.
	_, err = (&controller.Builtin{JWT: j}).ValidateAgent(ctx, "agent-a1")
	if !strings.Contains(err.Error(), "not a JWT") {
		t.Errorf("JWT only, static token given: error %q, want it to say the token is not a JWT", err)
	}
	_, err = (&controller.Builtin{}).ValidateAgent(ctx, "agent-a1")
	if !strings.Contains(err.Error(), "no token source configured") {
		t.Errorf("nothing configured: error %q, want it to say so", err)
	}
}
