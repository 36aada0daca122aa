package protect

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Rule is one blacklist entry as stored: a single address or a CIDR
// prefix, IPv4 or IPv6.
type Rule struct {
	CIDR        string `json:"cidr"`
	Description string `json:"description"`
}

// Rules is a parsed blacklist. The zero value blocks nothing.
type Rules struct {
	prefixes []netip.Prefix
	desc     []string
}

// ParseRules reads a JSON list of rules. Entries that do not parse are
// left out and returned in invalid; the list itself not parsing is an
// error.
func ParseRules(data []byte) (rules *Rules, invalid []string, err error) {
	var list []Rule
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&list); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadRules, err)
	}
	if list == nil {
		return nil, nil, fmt.Errorf("%w: not a list", ErrBadRules)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("%w: data after the list", ErrBadRules)
	}
	rules = &Rules{}
	for _, r := range list {
		p, ok := parseRule(r.CIDR)
		if !ok {
			invalid = append(invalid, r.CIDR)
			continue
		}
		rules.prefixes = append(rules.prefixes, p)
		rules.desc = append(rules.desc, r.Description)
	}
	return rules, invalid, nil
}

func parseRule(s string) (netip.Prefix, bool) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, false
		}
		if p.Addr().Is4In6() {
			// ::ffff:10.0.0.0/104 is 10.0.0.0/8 written as IPv6.
			if p.Bits() < 96 {
				return netip.Prefix{}, false
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), true
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, false
	}
	a = a.Unmap().WithZone("")
	return netip.PrefixFrom(a, a.BitLen()), true
}

// Len returns the number of rules.
func (r *Rules) Len() int {
	if r == nil {
		return 0
	}
	return len(r.prefixes)
}

// Match reports whether addr is blocked, and the matching rule's
// description.
func (r *Rules) Match(addr netip.Addr) (string, bool) {
	if r == nil || !addr.IsValid() {
		return "", false
	}
	addr = addr.Unmap().WithZone("")
	for i, p := range r.prefixes {
		if p.Contains(addr) {
			return r.desc[i], true
		}
	}
	return "", false
}

// Source is where the blacklist is read from.
type Source interface {
	// Read returns the stored rules.
	Read(ctx context.Context) ([]byte, error)
	// String names the source for logs.
	String() string
}

// maxRulesSize bounds a blacklist read.
const maxRulesSize = 16 << 20

// NewSource returns the source for the IPBLACKLIST__STORAGE and
// IPBLACKLIST__ENTRY settings: a file in a directory (file://DIR or a
// plain path) or an object under an http(s) base URL, read with client
// (nil: a client with a 30 s timeout).
func NewSource(storage, entry string, client *http.Client) (Source, error) {
	if entry == "" {
		return nil, fmt.Errorf("%w: no entry name", ErrBadSource)
	}
	switch {
	case strings.HasPrefix(storage, "http://"), strings.HasPrefix(storage, "https://"):
		u, err := url.Parse(storage)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("%w: %q is not a URL", ErrBadSource, storage)
		}
		if client == nil {
			client = &http.Client{Timeout: 30 * time.Second}
		}
		return &httpSource{url: u.JoinPath(entry).String(), client: client}, nil
	case strings.HasPrefix(storage, "file://"):
		return fileSource(filepath.Join(strings.TrimPrefix(storage, "file://"), entry)), nil
	case strings.Contains(storage, "://"):
		return nil, fmt.Errorf("%w: unsupported storage %q: use file://DIR, a directory path or an http(s):// URL", ErrBadSource, storage)
	case storage == "":
		return nil, fmt.Errorf("%w: no storage", ErrBadSource)
	}
	return fileSource(filepath.Join(storage, entry)), nil
}

type fileSource string

func (f fileSource) String() string { return string(f) }

func (f fileSource) Read(context.Context) ([]byte, error) {
	fh, err := os.Open(string(f))
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, maxRulesSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxRulesSize {
		return nil, fmt.Errorf("%s: larger than %d bytes", f, maxRulesSize)
	}
	return data, nil
}

type httpSource struct {
	url    string
	client *http.Client
}

func (h *httpSource) String() string { return h.url }

func (h *httpSource) Read(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", h.url, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxRulesSize+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", h.url, err)
	}
	if len(data) > maxRulesSize {
		return nil, fmt.Errorf("GET %s: larger than %d bytes", h.url, maxRulesSize)
	}
	return data, nil
}

// Blacklist holds the rules read from a Source and reloads them. It is
// safe for concurrent use; lookups never wait for a reload.
type Blacklist struct {
	src   Source
	every time.Duration
	log   *slog.Logger

	rules atomic.Pointer[Rules]

	mu       sync.Mutex
	loads    int
	lastErr  error
	loadedAt time.Time
}

// NewBlacklist returns a blacklist that reads src every interval. It has
// no rules until Load.
func NewBlacklist(src Source, every time.Duration, log *slog.Logger) *Blacklist {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Blacklist{src: src, every: every, log: log}
}

// readTimeout bounds one read of the source.
const readTimeout = 30 * time.Second

// Load reads the rules now. On failure the rules in force stay.
func (b *Blacklist) Load(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	data, err := b.src.Read(ctx)
	var rules *Rules
	var invalid []string
	if err == nil {
		rules, invalid, err = ParseRules(data)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		b.lastErr = fmt.Errorf("load IP blacklist from %s: %w", b.src, err)
		return b.lastErr
	}
	if len(invalid) > 0 {
		b.log.Warn("IP blacklist entries skipped: not an address or CIDR prefix", "source", b.src.String(), "entries", invalid)
	}
	prev := b.rules.Swap(rules)
	b.loads++
	b.lastErr = nil
	b.loadedAt = time.Now()
	lvl := slog.LevelDebug
	if prev.Len() != rules.Len() || b.loads == 1 {
		lvl = slog.LevelInfo
	}
	b.log.Log(ctx, lvl, "IP blacklist loaded", "source", b.src.String(), "rules", rules.Len())
	return nil
}

// Run reloads the rules every interval until ctx ends. A failed reload is
// logged and the last good rules stay in force.
func (b *Blacklist) Run(ctx context.Context) {
	t := time.NewTicker(b.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := b.Load(ctx); err != nil && ctx.Err() == nil {
				b.log.Warn("reloading the IP blacklist failed; the last good rules stay in force", "rules", b.rules.Load().Len(), "err", err)
			}
		}
	}
}

// Match reports whether addr is blocked, and why.
func (b *Blacklist) Match(addr netip.Addr) (string, bool) {
	return b.rules.Load().Match(addr)
}

// Status tells how many rules are in force, how many loads succeeded,
// and the error of the last load, if it failed.
func (b *Blacklist) Status() (rules, loads int, lastErr error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.rules.Load().Len(), b.loads, b.lastErr
}
