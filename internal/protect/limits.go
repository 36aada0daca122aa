package protect

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// rateKey groups client addresses for the rate limit and the per-address
// connection cap: an IPv4 address on its own, IPv6 by /64, the smallest
// network one subscriber is given and can pick addresses from at will.
func rateKey(a netip.Addr) netip.Prefix {
	if !a.IsValid() {
		return netip.Prefix{}
	}
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64) // cannot fail for a valid IPv6 address
	return p
}

// limiterSweepEvery is how often idle limiters are dropped.
const limiterSweepEvery = time.Minute

// limiters is a token bucket per client address group.
type limiters struct {
	perSecond rate.Limit
	burst     int
	idle      time.Duration // a bucket unused this long is full again
	now       func() time.Time

	mu        sync.Mutex
	buckets   map[netip.Prefix]*bucket
	lastSweep time.Time
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

func newLimiters(perSecond int, now func() time.Time) *limiters {
	return &limiters{
		perSecond: rate.Limit(perSecond),
		burst:     perSecond,
		// A bucket refills completely in burst/rate = 1 s, so dropping
		// one idle for longer loses nothing.
		idle:      limiterSweepEvery,
		now:       now,
		buckets:   map[netip.Prefix]*bucket{},
		lastSweep: now(),
	}
}

// allow takes a token for a's group and reports whether there was one.
func (l *limiters) allow(a netip.Addr) bool {
	now := l.now()
	k := rateKey(a)
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) >= limiterSweepEvery {
		for key, b := range l.buckets {
			if now.Sub(b.last) >= l.idle {
				delete(l.buckets, key)
			}
		}
		l.lastSweep = now
	}
	b := l.buckets[k]
	if b == nil {
		b = &bucket{lim: rate.NewLimiter(l.perSecond, l.burst)}
		l.buckets[k] = b
	}
	b.last = now
	return b.lim.AllowN(now, 1)
}

// connCounter counts the open WebSocket connections, in total and per
// client address group (rateKey), against their caps (0: none).
type connCounter struct {
	max, maxPerAddr int

	mu      sync.Mutex
	total   int
	perAddr map[netip.Addr]int // by connKey
}

// connKey is the key of a's group in connCounter.perAddr: the first
// address of its rateKey prefix.
func connKey(a netip.Addr) netip.Addr { return rateKey(a).Addr() }

// acquire takes a place for a connection from a. It returns the rule that
// refused it, or a release function that gives the place back; release
// may be called more than once.
func (c *connCounter) acquire(a netip.Addr) (release func(), refused string) {
	k := connKey(a)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.max > 0 && c.total >= c.max {
		return nil, ruleMaxConnections
	}
	if c.maxPerAddr > 0 && c.perAddr[k] >= c.maxPerAddr {
		return nil, ruleMaxConnectionsPerIP
	}
	c.total++
	c.perAddr[k]++
	return sync.OnceFunc(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.total--
		if c.perAddr[k]--; c.perAddr[k] <= 0 {
			delete(c.perAddr, k)
		}
	}), ""
}

// open returns the connections counted, in total and from a's group.
func (c *connCounter) open(a netip.Addr) (total, fromAddr int) {
	k := connKey(a)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total, c.perAddr[k]
}
