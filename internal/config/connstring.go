package config

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrConnString means a database connection string cannot be read.
var ErrConnString = errors.New("invalid connection string")

// PostgresConnString turns a connection string in any of the accepted
// forms into one pgx reads: a postgres:// URL and libpq key=value pairs
// pass through unchanged; the Npgsql form the original server used
// (Host=...;Port=...;Database=...;Username=...;Password=...) is
// converted to key=value pairs. The result is checked with pgx's parser.
// The empty string stays empty.
func PostgresConnString(s string) (string, error) {
	t := strings.TrimSpace(s)
	switch {
	case t == "":
		return "", nil
	case strings.HasPrefix(t, "postgres://"), strings.HasPrefix(t, "postgresql://"), isLibpq(t):
	default:
		var err error
		if t, err = npgsqlToLibpq(t); err != nil {
			return "", err
		}
	}
	if _, err := pgconn.ParseConfig(t); err != nil {
		// pgx's message redacts the password.
		return "", fmt.Errorf("%w: %v", ErrConnString, err)
	}
	return t, nil
}

// isLibpq tells libpq key=value pairs from the Npgsql form: libpq
// separates pairs with spaces and its keys are lower-case words, while
// Npgsql separates them with semicolons and writes keys like "Host".
func isLibpq(s string) bool {
	inQuote := false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\' && inQuote:
			i++
		case c == '\'':
			inQuote = !inQuote
		case c == ';' && !inQuote:
			return false
		}
	}
	pairs, err := splitLibpqKeys(s)
	if err != nil {
		return false
	}
	for _, k := range pairs {
		for _, r := range k {
			if (r < 'a' || r > 'z') && r != '_' {
				return false
			}
		}
	}
	return len(pairs) > 0
}

// splitLibpqKeys returns the keys of libpq key=value pairs.
func splitLibpqKeys(s string) ([]string, error) {
	var keys []string
	s = strings.TrimSpace(s)
	for s != "" {
		eq := strings.IndexByte(s, '=')
		if eq <= 0 {
			return nil, errors.New("no key=value")
		}
		keys = append(keys, strings.TrimSpace(s[:eq]))
		s = strings.TrimLeft(s[eq+1:], " \t\r\n")
		if strings.HasPrefix(s, "'") {
			i := 1
			for ; i < len(s) && s[i] != '\''; i++ {
				if s[i] == '\\' {
					i++
				}
			}
			if i >= len(s) {
				return nil, errors.New("unterminated quote")
			}
			s = s[i+1:]
		} else {
			i := 0
			for ; i < len(s) && s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n'; i++ {
				if s[i] == '\\' {
					i++
				}
			}
			if i > len(s) {
				i = len(s)
			}
			s = s[i:]
		}
		s = strings.TrimLeft(s, " \t\r\n")
	}
	return keys, nil
}

// npgsqlKeys maps Npgsql keywords (lower-case, spaces removed) and their
// common aliases to libpq keywords. An empty value marks a keyword that
// has no meaning here and is accepted without effect.
var npgsqlKeys = map[string]string{
	"host":                    "host",
	"server":                  "host",
	"port":                    "port",
	"database":                "dbname",
	"db":                      "dbname",
	"initialcatalog":          "dbname",
	"username":                "user",
	"user":                    "user",
	"userid":                  "user",
	"uid":                     "user",
	"password":                "password",
	"pwd":                     "password",
	"psw":                     "password",
	"passfile":                "passfile",
	"sslmode":                 "sslmode",
	"sslcertificate":          "sslcert",
	"sslkey":                  "sslkey",
	"sslpassword":             "sslpassword",
	"rootcertificate":         "sslrootcert",
	"timeout":                 "connect_timeout",
	"connecttimeout":          "connect_timeout",
	"commandtimeout":          "statement_timeout",
	"searchpath":              "search_path",
	"applicationname":         "application_name",
	"options":                 "options",
	"targetsessionattributes": "target_session_attrs",
	"kerberosservicename":     "krbsrvname",
	"maxpoolsize":             "pool_max_conns",
	"maximumpoolsize":         "pool_max_conns",
	"minpoolsize":             "pool_min_conns",
	"minimumpoolsize":         "pool_min_conns",
	"connectionidlelifetime":  "pool_max_conn_idle_time",
	"connectionlifetime":      "pool_max_conn_lifetime",
	// Accepted without effect: pgx pools connections itself, does not
	// verify the server certificate under SslMode=Require either, and has
	// no equivalent of the others.
	"pooling":                "",
	"trustservercertificate": "",
	"includeerrordetail":     "",
	"enlist":                 "",
	"persistsecurityinfo":    "",
}

// libpqOrder is the order the converted pairs are written in, so the
// result is stable.
var libpqOrder = []string{
	"host", "port", "dbname", "user", "password", "passfile",
	"sslmode", "sslcert", "sslkey", "sslpassword", "sslrootcert",
	"connect_timeout", "statement_timeout", "search_path", "application_name",
	"options", "target_session_attrs", "krbsrvname",
	"pool_max_conns", "pool_min_conns", "pool_max_conn_idle_time", "pool_max_conn_lifetime",
}

// npgsqlToLibpq converts an Npgsql connection string.
func npgsqlToLibpq(s string) (string, error) {
	pairs, err := parseNpgsql(s)
	if err != nil {
		return "", err
	}
	out := map[string]string{}
	for _, p := range pairs {
		norm := strings.ToLower(strings.Join(strings.Fields(p.key), ""))
		target, ok := npgsqlKeys[norm]
		if !ok {
			return "", fmt.Errorf("%w: unsupported key %q", ErrConnString, p.key)
		}
		if target == "" {
			continue
		}
		v, err := npgsqlValue(target, p.key, p.value)
		if err != nil {
			return "", err
		}
		out[target] = v
	}
	if h, ok := out["host"]; ok {
		hosts, ports, err := splitHosts(h, out["port"])
		if err != nil {
			return "", err
		}
		out["host"] = hosts
		if ports != "" {
			out["port"] = ports
		}
	}
	var b strings.Builder
	for _, k := range libpqOrder {
		v, ok := out[k]
		if !ok {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(quoteLibpq(v))
	}
	if b.Len() == 0 {
		return "", fmt.Errorf("%w: no key=value pairs", ErrConnString)
	}
	return b.String(), nil
}

// npgsqlValue converts the value of one key where the forms differ.
func npgsqlValue(target, key, v string) (string, error) {
	seconds := func() (int, error) {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%w: %s must be a whole number of seconds", ErrConnString, key)
		}
		return n, nil
	}
	switch target {
	case "sslmode":
		switch m := strings.ToLower(strings.ReplaceAll(v, "-", "")); m {
		case "disable", "allow", "prefer", "require":
			return m, nil
		case "verifyca":
			return "verify-ca", nil
		case "verifyfull":
			return "verify-full", nil
		}
		return "", fmt.Errorf("%w: %s %q: use Disable, Allow, Prefer, Require, VerifyCA or VerifyFull", ErrConnString, key, v)
	case "connect_timeout":
		n, err := seconds()
		return strconv.Itoa(n), err
	case "statement_timeout":
		n, err := seconds()
		return strconv.Itoa(n * 1000), err
	case "pool_max_conn_idle_time", "pool_max_conn_lifetime":
		n, err := seconds()
		return strconv.Itoa(n) + "s", err
	case "pool_max_conns", "pool_min_conns":
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 0 {
			return "", fmt.Errorf("%w: %s must be a whole number", ErrConnString, key)
		}
		return strconv.Itoa(n), nil
	case "target_session_attrs":
		return strings.ToLower(v), nil
	}
	return v, nil
}

// splitHosts turns Npgsql's host list ("a:5433,b") into libpq's host and
// port lists ("a,b" and "5433,5432"); ports is empty when no host names
// its own port.
func splitHosts(hosts, port string) (string, string, error) {
	if port == "" {
		port = "5432"
	}
	var hs, ps []string
	own := false
	for _, h := range strings.Split(hosts, ",") {
		h = strings.TrimSpace(h)
		p := port
		switch {
		case strings.HasPrefix(h, "["): // [::1]:5432
			end := strings.IndexByte(h, ']')
			if end < 0 {
				return "", "", fmt.Errorf("%w: host %q: unterminated [", ErrConnString, h)
			}
			if rest := h[end+1:]; strings.HasPrefix(rest, ":") {
				p, own = rest[1:], true
			}
			h = h[1:end]
		case strings.Count(h, ":") == 1:
			i := strings.IndexByte(h, ':')
			h, p, own = h[:i], h[i+1:], true
		}
		if h == "" {
			return "", "", fmt.Errorf("%w: empty host name", ErrConnString)
		}
		if _, err := strconv.ParseUint(p, 10, 16); err != nil {
			return "", "", fmt.Errorf("%w: port %q is not a port number", ErrConnString, p)
		}
		hs = append(hs, h)
		ps = append(ps, p)
	}
	if !own {
		return strings.Join(hs, ","), "", nil
	}
	return strings.Join(hs, ","), strings.Join(ps, ","), nil
}

type npgsqlPair struct{ key, value string }

// parseNpgsql reads an ADO.NET connection string: key=value pairs
// separated by semicolons; keys are case-insensitive and "==" in a key is
// a literal "="; a value may be quoted with " or ', the quote doubled
// inside it, and then may hold semicolons; unquoted values are trimmed.
func parseNpgsql(s string) ([]npgsqlPair, error) {
	var pairs []npgsqlPair
	i := 0
	for i < len(s) {
		// key
		var key strings.Builder
		for {
			if i >= len(s) {
				if strings.TrimSpace(key.String()) != "" {
					return nil, fmt.Errorf("%w: %q has no value", ErrConnString, strings.TrimSpace(key.String()))
				}
				return pairs, nil
			}
			c := s[i]
			if c == ';' && strings.TrimSpace(key.String()) == "" {
				i++ // empty pair
				continue
			}
			if c == '=' {
				if i+1 < len(s) && s[i+1] == '=' {
					key.WriteByte('=')
					i += 2
					continue
				}
				i++
				break
			}
			if c == ';' {
				return nil, fmt.Errorf("%w: %q has no value", ErrConnString, strings.TrimSpace(key.String()))
			}
			key.WriteByte(c)
			i++
		}
		k := strings.TrimSpace(key.String())
		if k == "" {
			return nil, fmt.Errorf("%w: a value without a key", ErrConnString)
		}
		// value
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		var val string
		if i < len(s) && (s[i] == '"' || s[i] == '\'') {
			q := s[i]
			i++
			var b strings.Builder
			closed := false
			for i < len(s) {
				if s[i] == q {
					if i+1 < len(s) && s[i+1] == q {
						b.WriteByte(q)
						i += 2
						continue
					}
					i++
					closed = true
					break
				}
				b.WriteByte(s[i])
				i++
			}
			if !closed {
				return nil, fmt.Errorf("%w: the value of %q has no closing quote", ErrConnString, k)
			}
			for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
				i++
			}
			if i < len(s) && s[i] != ';' {
				return nil, fmt.Errorf("%w: text after the quoted value of %q", ErrConnString, k)
			}
			val = b.String()
		} else {
			end := strings.IndexByte(s[i:], ';')
			if end < 0 {
				end = len(s) - i
			}
			val = strings.TrimSpace(s[i : i+end])
			i += end
		}
		if i < len(s) && s[i] == ';' {
			i++
		}
		pairs = append(pairs, npgsqlPair{key: k, value: val})
	}
	return pairs, nil
}

// quoteLibpq quotes a value for libpq key=value pairs.
func quoteLibpq(v string) string {
	r := strings.NewReplacer(`\`, `\\`, `'`, `\'`)
	return "'" + r.Replace(v) + "'"
}
