package protect

import (
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// ClientAddr returns the address of the client behind r: the socket peer,
// unless the peer is one of the trusted proxies; only then is
// X-Forwarded-For read, and the client is its rightmost address that is
// not a trusted proxy. Addresses further left were written by the client
// or by proxies we know nothing of, so a client can never choose its own
// address. A header that does not parse leaves the peer as the client.
func ClientAddr(r *http.Request, trusted []netip.Prefix) netip.Addr {
	peer := peerAddr(r.RemoteAddr)
	if !peer.IsValid() || !contains(trusted, peer) {
		return peer
	}
	hops := forwardedFor(r.Header)
	client := peer
	for i := len(hops) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(hops[i])
		if err != nil {
			return peer
		}
		client = a.Unmap().WithZone("")
		if !contains(trusted, client) {
			return client
		}
	}
	// Every hop is a trusted proxy: the leftmost is as close to the client
	// as we can get.
	return client
}

func peerAddr(remote string) netip.Addr {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	return a.Unmap().WithZone("")
}

// forwardedFor lists the X-Forwarded-For hops of every such header, in
// order. Bracketed IPv6 and ports that some proxies add are removed.
func forwardedFor(h http.Header) []string {
	var hops []string
	for _, v := range h.Values("X-Forwarded-For") {
		for _, hop := range strings.Split(v, ",") {
			hop = strings.TrimSpace(hop)
			if hop == "" {
				continue
			}
			if host, _, err := net.SplitHostPort(hop); err == nil {
				hop = host
			}
			hops = append(hops, strings.Trim(hop, "[]"))
		}
	}
	return hops
}

func contains(prefixes []netip.Prefix, a netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
