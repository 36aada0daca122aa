package wire_test

import (
	"crypto/rand"
	"crypto/rsa"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/machineservice/machineservice/wire"
)

// RSA key generation is slow, especially under -race, so every key a test
// needs is generated once per test binary.
var (
	keysOnce sync.Once
	keysErr  error
	keyA     *rsa.PrivateKey // RSA-2048
	keyB     *rsa.PrivateKey // RSA-2048, a different key
	key1024  *rsa.PrivateKey // too small to be accepted
)

// testKeys returns two distinct RSA-2048 keys.
func testKeys(t testing.TB) (a, b *rsa.PrivateKey) {
	t.Helper()
	keysOnce.Do(func() {
		if keyA, keysErr = rsa.GenerateKey(rand.Reader, 2048); keysErr != nil {
			return
		}
		if keyB, keysErr = rsa.GenerateKey(rand.Reader, 2048); keysErr != nil {
			return
		}
		key1024, keysErr = rsa.GenerateKey(rand.Reader, 1024)
	})
	if keysErr != nil {
		t.Fatalf("generate test keys: %v", keysErr)
	}
	return keyA, keyB
}

// testKey1024 returns an RSA-1024 key, below wire.MinKeyBits.
func testKey1024(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	testKeys(t)
	return key1024
}

// The fuzz key is fixed (stored in testdata) rather than generated: fuzz
// workers are separate processes, and a JWE made in one must decrypt in
// all of them.
var (
	fuzzKeyOnce sync.Once
	fuzzKeyVal  *rsa.PrivateKey
	fuzzKeyErr  error
)

func fuzzKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	fuzzKeyOnce.Do(func() {
		var pemText []byte
		pemText, fuzzKeyErr = os.ReadFile(filepath.Join("testdata", "fuzz_key.pem"))
		if fuzzKeyErr != nil {
			return
		}
		fuzzKeyVal, fuzzKeyErr = wire.ParsePrivateKey(string(pemText))
	})
	if fuzzKeyErr != nil {
		t.Fatalf("load fuzz key: %v", fuzzKeyErr)
	}
	return fuzzKeyVal
}
