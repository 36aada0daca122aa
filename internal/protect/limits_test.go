package protect

import (
	"net/netip"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/testclock"
)

func TestRateKeyGroupsIPv6By64(t *testing.T) {
	tests := []struct {
		a, b string
		same bool
	}{
		{"192.0.2.1", "192.0.2.1", true},
		{"192.0.2.1", "192.0.2.2", false},
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", true},
		{"2001:db8:1:2::1", "2001:db8:1:3::1", false},
	}
	for _, tt := range tests {
		t.Run(tt.a+" "+tt.b, func(t *testing.T) {
			ka, kb := rateKey(netip.MustParseAddr(tt.a)), rateKey(netip.MustParseAddr(tt.b))
			if (ka == kb) != tt.same {
				t.Fatalf("keys %s and %s", ka, kb)
			}
		})
	}
}

func TestLimitersShareA64AndForgetIdleOnes(t *testing.T) {
	clk := testclock.New(time.Unix(1_000_000, 0))
	l := newLimiters(2, clk.Now)
	a, b := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
	if !l.allow(a) || !l.allow(b) {
		t.Fatal("the first two requests of the /64 were refused")
	}
	if l.allow(a) || l.allow(b) {
		t.Fatal("a third request of the /64 was allowed")
	}
	if !l.allow(netip.MustParseAddr("2001:db8:0:1::1")) {
		t.Fatal("another /64 was limited")
	}
	clk.Advance(500 * time.Millisecond)
	if !l.allow(a) || l.allow(a) {
		t.Fatal("half a second should give back one token")
	}
	clk.Advance(limiterSweepEvery)
	l.allow(netip.MustParseAddr("192.0.2.9")) // sweeps
	l.mu.Lock()
	n := len(l.buckets)
	l.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d buckets after the sweep, want only the new one", n)
	}
}

func TestConnCounterRelease(t *testing.T) {
	c := &connCounter{max: 2, maxPerAddr: 1, perAddr: map[netip.Addr]int{}}
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	ra, refused := c.acquire(a)
	if refused != "" {
		t.Fatal(refused)
	}
	if _, refused := c.acquire(a); refused != ruleMaxConnectionsPerIP {
		t.Fatalf("second from a: %q", refused)
	}
	if _, refused := c.acquire(b); refused != "" {
		t.Fatal(refused)
	}
	if _, refused := c.acquire(netip.MustParseAddr("192.0.2.3")); refused != ruleMaxConnections {
		t.Fatalf("third in total: %q", refused)
	}
	ra()
	ra() // a second release changes nothing
	if total, fromA := c.open(a); total != 1 || fromA != 0 {
		t.Fatalf("after release: total %d, from a %d", total, fromA)
	}
}

func TestConnCounterGroupsIPv6By64(t *testing.T) {
	c := &connCounter{maxPerAddr: 1, perAddr: map[netip.Addr]int{}}
	a, b := netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("2001:db8:1:2:ffff::9")
	ra, refused := c.acquire(a)
	if refused != "" {
		t.Fatal(refused)
	}
	if _, refused := c.acquire(b); refused != ruleMaxConnectionsPerIP {
		t.Fatalf("a second address of the /64: %q, want %q", refused, ruleMaxConnectionsPerIP)
	}
	if _, fromB := c.open(b); fromB != 1 {
		t.Fatalf("open from b's /64 = %d, want 1", fromB)
	}
	if _, refused := c.acquire(netip.MustParseAddr("2001:db8:1:3::1")); refused != "" {
		t.Fatalf("another /64: %q", refused)
	}
	if _, refused := c.acquire(netip.MustParseAddr("192.0.2.1")); refused != "" {
		t.Fatalf("an IPv4 address: %q", refused)
	}
	if _, refused := c.acquire(netip.MustParseAddr("192.0.2.2")); refused != "" {
		t.Fatalf("the next IPv4 address: %q", refused)
	}
	ra()
	if _, refused := c.acquire(b); refused != "" {
		t.Fatalf("b after a left: %q", refused)
	}
}
