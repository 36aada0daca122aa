package natstest_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/internal/natstest"
)

// TestStart: the embedded server answers a request on loopback.
func TestStart(t *testing.T) {
	ns := natstest.Start(t, -1)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sub, err := nc.Subscribe("echo", func(m *nats.Msg) { _ = m.Respond(m.Data) })
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	msg, err := nc.Request("echo", []byte("hello"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if string(msg.Data) != "hello" {
		t.Fatalf("answer %q, want %q", msg.Data, "hello")
	}
}

func TestPrefix(t *testing.T) {
	a, b := natstest.Prefix(t, "mstest"), natstest.Prefix(t, "mstest")
	if a == b || !strings.HasPrefix(a, "mstest.") || len(a) != len("mstest.")+16 {
		t.Fatalf("prefixes %q and %q, want two different mstest.<16 hex digits>", a, b)
	}
}
