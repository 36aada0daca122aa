// Package natstest gives tests a NATS server: the one named by
// MACHINESERVICE_TEST_NATS, or one embedded in the test binary on
// 127.0.0.1, and a subject prefix of their own so that tests sharing a
// server do not hear each other.
package natstest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
)

// Env names the URL of the NATS server the tests use instead of an
// embedded one.
const Env = "MACHINESERVICE_TEST_NATS"

// URL returns the server Env names, or else the URL of an embedded
// server that lives as long as the test.
func URL(t testing.TB) string {
	t.Helper()
	if u := os.Getenv(Env); u != "" {
		return u
	}
	return Start(t, -1).ClientURL()
}

// Start runs an embedded server on 127.0.0.1:port (-1: any free port)
// until Shutdown or the end of the test.
func Start(t testing.TB, port int) *natsserver.Server {
	t.Helper()
	ns, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatalf("nats server: %v", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server did not start")
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return ns
}

// Prefix returns a subject prefix of base and a random token.
func Prefix(t testing.TB, base string) string {
	t.Helper()
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return base + "." + hex.EncodeToString(b)
}
