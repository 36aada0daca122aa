package protect_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/machineservice/machineservice/internal/protect"
)

func writeRules(t *testing.T, path, data string) {
	t.Helper()
	// Write beside and rename, so a reload never reads half a file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestRulesMatch(t *testing.T) {
	rules, invalid, err := protect.ParseRules([]byte(`[
		{"cidr": "127.0.0.2", "description": "one address"},
		{"cidr": "10.0.0.0/8"},
		{"cidr": "2001:db8::/32", "description": "documentation"},
		{"cidr": "::ffff:192.0.2.0/120"},
		{"cidr": "fe80::1"},
		{"cidr": "not an address"},
		{"cidr": "10.0.0.0/33"},
		{"cidr": ""}
	]`))
	if err != nil {
		t.Fatal(err)
	}
	if len(invalid) != 3 || rules.Len() != 5 {
		t.Fatalf("rules %d, invalid %q", rules.Len(), invalid)
	}
	tests := []struct {
		addr    string
		blocked bool
		why     string
	}{
		{"127.0.0.2", true, "one address"},
		{"127.0.0.1", false, ""},
		{"10.200.3.4", true, ""},
		{"11.0.0.1", false, ""},
		{"2001:db8:1234::5", true, "documentation"},
		{"2001:db9::1", false, ""},
		{"::ffff:127.0.0.2", true, "one address"},
		{"192.0.2.77", true, ""},
		{"fe80::1", true, ""},
		{"fe80::2", false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			why, blocked := rules.Match(netip.MustParseAddr(tt.addr))
			if blocked != tt.blocked || why != tt.why {
				t.Fatalf("Match(%s) = %q, %v; want %q, %v", tt.addr, why, blocked, tt.why, tt.blocked)
			}
		})
	}
	for _, bad := range []string{``, `null`, `{"cidr":"1.2.3.4"}`, `[{"cidr":"1.2.3.4"}] []`, `[`} {
		if _, _, err := protect.ParseRules([]byte(bad)); !errors.Is(err, protect.ErrBadRules) {
			t.Errorf("ParseRules(%q) error = %v, want ErrBadRules", bad, err)
		}
	}
}

// TestBlacklistRefusesOnEveryRoute checks a listed address gets 403 on
// HTTP routes and upgrades while another address is served, for both
// file storage forms.
func TestBlacklistRefusesOnEveryRoute(t *testing.T) {
	dir := t.TempDir()
	writeRules(t, filepath.Join(dir, "blocked.json"), `[{"cidr":"127.0.0.2","description":"test"},{"cidr":"2001:db8::/32"}]`)
	for name, storage := range map[string]string{"file URL": "file://" + dir, "plain path": dir} {
		t.Run(name, func(t *testing.T) {
			e := start(t, map[string]string{"IPBLACKLIST__STORAGE": storage, "IPBLACKLIST__ENTRY": "blocked.json"})
			for _, path := range []string{"/health", "/certificates", "/", "/agent", "/nowhere"} {
				if code, body, _ := e.get("127.0.0.2", path, nil); code != http.StatusForbidden || body != protect.TextBlocked {
					t.Errorf("GET %s from 127.0.0.2: %d %q, want 403", path, code, body)
				}
			}
			if _, code, _ := e.dial("127.0.0.2", "/agent", nil); code != http.StatusForbidden {
				t.Errorf("upgrade from 127.0.0.2: %d, want 403", code)
			}
			if code, _, _ := e.get("127.0.0.1", "/health", nil); code != http.StatusOK {
				t.Errorf("GET /health from 127.0.0.1: %d", code)
			}
			if _, code, _ := e.dial("127.0.0.1", "/portal", nil); code != http.StatusSwitchingProtocols {
				t.Errorf("upgrade from 127.0.0.1: %d", code)
			}
			if got := e.guard.Rejected()["blacklist"]; got != 6 {
				t.Errorf("blacklist refusals counted %d, want 6", got)
			}
		})
	}
}

// TestBlacklistReload rewrites the rules and polls until the server
// follows; a broken file keeps the last good rules.
func TestBlacklistReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "rules.json")
	writeRules(t, path, `[]`)
	e := start(t, map[string]string{
		"IPBLACKLIST__STORAGE":                     dir,
		"IPBLACKLIST__ENTRY":                       "rules.json",
		"IPBLACKLIST__IPRULESCACHELIFETIMESECONDS": "0.05",
	})
	status := func(ip string) int {
		code, _, _ := e.get(ip, "/health", nil)
		return code
	}
	if got := status("127.0.0.2"); got != http.StatusOK {
		t.Fatalf("before: %d", got)
	}

	writeRules(t, path, `[{"cidr":"127.0.0.0/30"}]`)
	waitFor(t, "the new rule to block 127.0.0.2", func() bool { return status("127.0.0.2") == http.StatusForbidden })
	if got := status("127.0.0.5"); got != http.StatusOK {
		t.Fatalf("127.0.0.5 outside the rule: %d", got)
	}

	_, loads, _ := e.guard.Blacklist().Status()
	writeRules(t, path, `[{"cidr":`)
	waitFor(t, "a failed reload", func() bool {
		_, _, err := e.guard.Blacklist().Status()
		return err != nil
	})
	if n, after, _ := e.guard.Blacklist().Status(); n != 1 || after != loads {
		t.Fatalf("after a failed reload: %d rules, %d loads (before %d)", n, after, loads)
	}
	if got := status("127.0.0.2"); got != http.StatusForbidden {
		t.Fatalf("the last good rules no longer apply: %d", got)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a failed reload of a missing file", func() bool {
		_, _, err := e.guard.Blacklist().Status()
		return errors.Is(err, os.ErrNotExist)
	})
	if got := status("127.0.0.2"); got != http.StatusForbidden {
		t.Fatalf("the last good rules no longer apply: %d", got)
	}

	writeRules(t, path, `[{"cidr":"127.0.0.5"}]`)
	waitFor(t, "127.0.0.2 to be let in again", func() bool { return status("127.0.0.2") == http.StatusOK })
	if got := status("127.0.0.5"); got != http.StatusForbidden {
		t.Fatalf("127.0.0.5: %d", got)
	}
}

// TestBlacklistOverHTTP reads the rules from an http:// base URL, as an
// object store serves them, and keeps them when the store fails.
func TestBlacklistOverHTTP(t *testing.T) {
	var mu sync.Mutex
	body, code := `[{"cidr":"127.0.0.2"}]`, http.StatusOK
	var paths []string
	store := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		paths = append(paths, r.URL.Path)
		w.WriteHeader(code)
		_, _ = w.Write([]byte(body))
	}))
	defer store.Close()
	e := start(t, map[string]string{
		"IPBLACKLIST__STORAGE":                     store.URL + "/lists/",
		"IPBLACKLIST__ENTRY":                       "ip-blacklist.json",
		"IPBLACKLIST__IPRULESCACHELIFETIMESECONDS": "0.05",
	})
	if code, _, _ := e.get("127.0.0.2", "/health", nil); code != http.StatusForbidden {
		t.Fatalf("127.0.0.2: %d", code)
	}
	if code, _, _ := e.get("127.0.0.1", "/health", nil); code != http.StatusOK {
		t.Fatalf("127.0.0.1: %d", code)
	}
	mu.Lock()
	if len(paths) == 0 || paths[0] != "/lists/ip-blacklist.json" {
		t.Errorf("store asked for %q", paths)
	}
	code = http.StatusInternalServerError
	mu.Unlock()
	waitFor(t, "a failed reload", func() bool {
		_, _, err := e.guard.Blacklist().Status()
		return err != nil
	})
	if code, _, _ := e.get("127.0.0.2", "/health", nil); code != http.StatusForbidden {
		t.Fatalf("the last good rules no longer apply: %d", code)
	}
}

// TestBlacklistUnreadableAtStart checks the server does not start with
// rules it cannot read.
func TestBlacklistUnreadableAtStart(t *testing.T) {
	dir := t.TempDir()
	writeRules(t, filepath.Join(dir, "broken.json"), `{"cidr":"1.2.3.4"}`)
	tests := []struct {
		name, storage, entry string
		want                 error
	}{
		{"missing file", dir, "missing.json", os.ErrNotExist},
		{"not a list", dir, "broken.json", protect.ErrBadRules},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, err := protect.NewSource(tt.storage, tt.entry, nil)
			if err != nil {
				t.Fatal(err)
			}
			err = protect.NewBlacklist(src, 0, nil).Load(context.Background())
			if !errors.Is(err, tt.want) {
				t.Fatalf("Load: %v, want %v", err, tt.want)
			}
		})
	}
	if _, err := protect.NewSource("s3://bucket", "x.json", nil); !errors.Is(err, protect.ErrBadSource) {
		t.Fatalf("s3 storage: %v", err)
	}
}
