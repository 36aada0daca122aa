package config

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"strings"

	"github.com/machineservice/machineservice/internal/logging"
)

// LogLevel returns the configured log level: SERILOG__MINIMUMLEVEL__DEFAULT
// when set, else LOGGING__LOGLEVEL__DEFAULT. Validate has checked both.
func (c *Config) LogLevel() slog.Level {
	name := c.LoggingLevel
	if strings.TrimSpace(c.SerilogLevel) != "" {
		name = c.SerilogLevel
	}
	l, err := logging.ParseLevel(name)
	if err != nil {
		return slog.LevelInfo
	}
	return l
}

// validateOps checks the operations and protection settings.
func (c *Config) validateOps() []error {
	var errs []error
	bad := func(env, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", env, fmt.Sprintf(format, args...)))
	}
	if c.MetricsListen != Off {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			bad("METRICS__LISTEN", "want host:port or off, got %q", c.MetricsListen)
		}
	}
	if c.ControlSocket == "" {
		bad("ENVIRONMENT__CONTROLSOCKET", "must not be empty (use off to disable)")
	}
	if strings.TrimSpace(c.SerilogLevel) != "" {
		if _, err := logging.ParseLevel(c.SerilogLevel); err != nil {
			bad("SERILOG__MINIMUMLEVEL__DEFAULT", "%v", err)
		}
	} else if _, err := logging.ParseLevel(c.LoggingLevel); err != nil {
		bad("LOGGING__LOGLEVEL__DEFAULT", "%v", err)
	}
	switch {
	case c.BlacklistStorage != "" && c.BlacklistEntry == "":
		bad("IPBLACKLIST__ENTRY", "required with IPBLACKLIST__STORAGE")
	case c.BlacklistStorage == "" && c.BlacklistEntry != "":
		bad("IPBLACKLIST__STORAGE", "required with IPBLACKLIST__ENTRY")
	case c.BlacklistStorage != "":
		if err := checkStorage(c.BlacklistStorage); err != nil {
			bad("IPBLACKLIST__STORAGE", "%v", err)
		}
	}
	if c.BlacklistLifetime <= 0 {
		bad("IPBLACKLIST__IPRULESCACHELIFETIMESECONDS", "must be greater than 0")
	}
	if c.RateLimitEnabled && c.MaxRequestsPerSecond <= 0 {
		bad("SECURITY__MAXREQUESTSPERSECONDPERIP", "must be greater than 0 when SECURITY__RATELIMITENABLED is true, got %d", c.MaxRequestsPerSecond)
	}
	if c.MaxConnectionsPerIP < 0 {
		bad("SECURITY__MAXCONNECTIONSPERIP", "must not be negative (0: no limit)")
	}
	if c.MaxConnections < 0 {
		bad("SECURITY__MAXCONNECTIONS", "must not be negative (0: no limit)")
	}
	for _, o := range c.AllowedOrigins {
		if o == "*" {
			continue
		}
		u, err := url.Parse(o)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			bad("CORS__ALLOWEDORIGINS", "%q is not an origin: want scheme://host[:port], or *", o)
		}
	}
	return errs
}

// checkStorage accepts the blacklist storage forms: file://DIR, a plain
// directory path, or an http(s) URL.
func checkStorage(s string) error {
	if !strings.Contains(s, "://") {
		return nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not a URL: %v", err)
	}
	switch u.Scheme {
	case "file":
		return nil
	case "http", "https":
		if u.Host == "" {
			return fmt.Errorf("%q has no host", s)
		}
		return nil
	}
	return fmt.Errorf("unsupported storage %q: use file://DIR, a directory path or an http(s):// URL", u.Scheme)
}

// parsePrefixes reads CIDR prefixes and single addresses separated by
// semicolons, commas or white space.
func parsePrefixes(v string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.FieldsFunc(v, func(r rune) bool { return r == ';' || r == ',' || r == ' ' || r == '\t' || r == '\n' }) {
		if strings.Contains(f, "/") {
			p, err := netip.ParsePrefix(f)
			if err != nil {
				return nil, fmt.Errorf("%q is not a CIDR prefix", f)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not an address or CIDR prefix", f)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// splitList splits v at sep and drops empty items.
func splitList(v, sep string) []string {
	var out []string
	for _, f := range strings.Split(v, sep) {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
