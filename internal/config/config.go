// Package config reads the server's settings from the environment (the
// original server's variable names) and from command-line flags, validates
// them in one place, and documents every setting.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
)

// Config is every setting of the server.
type Config struct {
	// Dev selects development mode: a generated key kept in DevKeyFile,
	// and production settings that are missing are not errors.
	Dev    bool
	IsProd bool

	Listen string

	PrivateKey string    // PEM, or base64 of PEM
	KeyExpires time.Time // zero when unset
	DevKeyFile string

	MachineName string
	InstanceID  string
	RedirectURL string

	MaxMessageSize     int
	MaxBytesBeforeAuth int
	ReceiveBufferSize  int
	SendQueueLength    int

	AuthTimeout          time.Duration
	PingInterval         time.Duration
	WriteTimeout         time.Duration
	ShutdownTimeout      time.Duration
	ControllerTimeout    time.Duration
	ControlTimeout       time.Duration
	StatusReportInterval time.Duration
	StatisticsInterval   time.Duration

	DisablePingMessages bool

	// PostgreSQL: the registry, client history and statistics that several
	// instances share. Without a connection string everything stays in
	// memory (development only, unless InMemoryClientList and
	// DisableDatabaseStatistics say so).
	DatabaseConnectionString      string // as given; see PostgresConnString
	DatabaseAdminConnectionString string // for migrations; empty: the normal one
	DatabaseTimeout               time.Duration
	PublicURL                     string // this instance's URL, listed as machineServerUri
	ClientTimeout                 time.Duration
	HeartbeatInterval             time.Duration
	InstanceTimeout               time.Duration
	InMemoryClientList            bool
	DisableDatabaseStatistics     bool
	DisableDatabaseClientHistory  bool
	StatisticsRetentionDays       int
	VerifySchema                  bool

	TokensFile       string
	JWTSecret        string
	JWTPublicKeyFile string
	JWTIssuer        string

	// Operations and protection: metrics and readiness, the control
	// socket, logging, and the rules the HTTP front applies to every
	// request.
	MetricsListen        string // "off": no metrics listener
	ControlSocket        string // "off": no control socket
	SerilogLevel         string // SERILOG__MINIMUMLEVEL__DEFAULT, as given
	LoggingLevel         string // LOGGING__LOGLEVEL__DEFAULT, as given
	BlacklistStorage     string
	BlacklistEntry       string
	BlacklistLifetime    time.Duration
	TrustedProxies       []netip.Prefix
	RateLimitEnabled     bool
	MaxRequestsPerSecond int
	MaxConnectionsPerIP  int // 0: no limit
	MaxConnections       int // 0: no limit
	FilterPatterns       bool
	AllowedOrigins       []string // empty: every origin
	// Message bus (NATS). Without MessagingURL the bus is in process,
	// which only a development server may do.
	MessagingURL             string
	MessagingCredentialsFile string
	MessagingSubjectPrefix   string
}

// Off disables MetricsListen and ControlSocket.
const Off = "off"

// Setting describes one setting: where it is read from, its default and
// its meaning.
type Setting struct {
	Env     string
	Flag    string // empty when the setting has no flag
	Default string
	Help    string
	// DocDefault describes a default computed at start-up.
	DocDefault string
	set        func(c *Config, v string) error
	isBool     bool
}

// ErrUsage marks errors in the settings given; the command exits with
// status 2 on them.
var ErrUsage = errors.New("invalid configuration")

// ErrHelp is returned by Load when the flags ask for help.
var ErrHelp = errors.New("help requested")

// Settings lists every setting in the order they are documented.
func Settings() []Setting {
	return []Setting{
		boolSetting("ENVIRONMENT__DEV", "dev", "false", "Development mode: generate and keep a key in the development key file, in-memory registry and bus; missing production settings are not errors.", func(c *Config) *bool { return &c.Dev }),
		boolSetting("ENVIRONMENT__ISPROD", "", "false", "Production mode; conflicts with --dev.", func(c *Config) *bool { return &c.IsProd }),
		strSetting("ENVIRONMENT__LISTEN", "listen", ":8080", "Address the HTTP and WebSocket server listens on.", func(c *Config) *string { return &c.Listen }),
		strSetting("ENVIRONMENT__MACHINESERVERPRIVATE", "", "", "The server's RSA private key: base64 of a PEM text (PKCS#1 or PKCS#8), or the PEM text itself. Required in production.", func(c *Config) *string { return &c.PrivateKey }),
		{Env: "ENVIRONMENT__MACHINESERVERKEYEXPIRES", Default: "", Help: "When the server key expires (RFC 3339). Required in production; in development 90 days after the key file was made.", set: func(c *Config, v string) error {
			if v == "" {
				c.KeyExpires = time.Time{}
				return nil
			}
			t, err := parseTime(v)
			if err != nil {
				return err
			}
			c.KeyExpires = t
			return nil
		}},
		strSetting("ENVIRONMENT__DEVELOPMENTKEYFILE", "dev-key-file", "debug-privatekey.pem", "Development mode: file that keeps the generated server key.", func(c *Config) *string { return &c.DevKeyFile }),
		documented(strSetting("ENVIRONMENT__MACHINENAME", "", "", "Machine name sent in the welcome message.", func(c *Config) *string { return &c.MachineName }), "the host name"),
		documented(strSetting("ENVIRONMENT__INSTANCEID", "", "", "This instance's id: the sender of the server's messages and the owner of its registrations.", func(c *Config) *string { return &c.InstanceID }), "service-<machine>-<uuid>"),
		strSetting("ENVIRONMENT__REDIRECTURL", "", "", "Where GET / redirects; without it / answers 404.", func(c *Config) *string { return &c.RedirectURL }),
		intSetting("ENVIRONMENT__MAXMESSAGESIZE", "", "1048576", "Largest message (bytes) an authenticated client may send.", func(c *Config) *int { return &c.MaxMessageSize }),
		intSetting("ENVIRONMENT__MAXBYTESBEFOREAUTHENTICATION", "", "100000", "Wire bytes a connection may send before it is authenticated.", func(c *Config) *int { return &c.MaxBytesBeforeAuth }),
		intSetting("ENVIRONMENT__WEBSOCKETRECEIVEBUFFERSIZE", "", "512", "Read buffer per connection (bytes). Larger messages are read straight into their own buffer, so a small buffer keeps idle connections cheap.", func(c *Config) *int { return &c.ReceiveBufferSize }),
		intSetting("ENVIRONMENT__SENDQUEUELENGTH", "", "64", "Messages that may wait to be written to one client; a client that falls further behind is closed.", func(c *Config) *int { return &c.SendQueueLength }),
		secondsSetting("ENVIRONMENT__AUTHTIMEOUTSECONDS", "", "30", "Seconds after the welcome within which the auth message must arrive.", func(c *Config) *time.Duration { return &c.AuthTimeout }),
		secondsSetting("ENVIRONMENT__PINGINTERVALSECONDS", "", "60", "Seconds between WebSocket pings; a client silent for two intervals is closed.", func(c *Config) *time.Duration { return &c.PingInterval }),
		secondsSetting("ENVIRONMENT__WRITETIMEOUTSECONDS", "", "10", "Seconds one write to a client may take.", func(c *Config) *time.Duration { return &c.WriteTimeout }),
		secondsSetting("ENVIRONMENT__SHUTDOWNTIMEOUTSECONDS", "", "10", "Seconds shutdown waits for connections to close before cutting them.", func(c *Config) *time.Duration { return &c.ShutdownTimeout }),
		secondsSetting("ENVIRONMENT__CONTROLLERTIMEOUTSECONDS", "", "30", "Seconds a token validation by the controller may take.", func(c *Config) *time.Duration { return &c.ControllerTimeout }),
		secondsSetting("ENVIRONMENT__CONTROLTIMEOUTSECONDS", "", "30", "Seconds to wait for an agent's answer to a control request.", func(c *Config) *time.Duration { return &c.ControlTimeout }),
		secondsSetting("ENVIRONMENT__STATUSREPORTINTERVALSECONDS", "", "30", "Seconds between status reports in the log (0 disables them).", func(c *Config) *time.Duration { return &c.StatusReportInterval }),
		secondsSetting("ENVIRONMENT__SECONDSBETWEENSTATISTICS", "", "300", "Seconds between exports of the statistics counters, which are then reset (0 disables).", func(c *Config) *time.Duration { return &c.StatisticsInterval }),
		boolSetting("ENVIRONMENT__DISABLEPINGMESSAGES", "", "false", "Do not publish a Ping activity event for agent pings.", func(c *Config) *bool { return &c.DisablePingMessages }),
		strSetting("DATABASE__CONNECTIONSTRING", "", "", "PostgreSQL for the shared client registry, client history and statistics: a postgres:// URL, libpq key=value pairs, or Npgsql style Host=...;Port=...;Database=...;Username=...;Password=... . Without it everything is in memory (development only, unless ENVIRONMENT__INMEMORYCLIENTLIST and ENVIRONMENT__DISABLEDATABASESTATISTICS are true).", func(c *Config) *string { return &c.DatabaseConnectionString }),
		documented(strSetting("DATABASE__ADMINCONNECTIONSTRING", "", "", "Connection string (same forms) for applying the schema migrations: `machineservice migrate`, and serve in development.", func(c *Config) *string { return &c.DatabaseAdminConnectionString }), "DATABASE__CONNECTIONSTRING"),
		secondsSetting("DATABASE__TIMEOUTSECONDS", "", "3", "Seconds one registry write or list query may take; a slower database counts as unreachable and clients are kept locally until it is back.", func(c *Config) *time.Duration { return &c.DatabaseTimeout }),
		strSetting("ENVIRONMENT__PUBLICURL", "", "", "This instance's public URL (for example wss://ms1.example.com), listed to portals as machineServerUri.", func(c *Config) *string { return &c.PublicURL }),
		secondsSetting("ENVIRONMENT__CLIENTTIMEOUTSECONDS", "", "300", "Seconds a registration stays listed without a refresh (auth or ping).", func(c *Config) *time.Duration { return &c.ClientTimeout }),
		secondsSetting("ENVIRONMENT__INSTANCEHEARTBEATSECONDS", "", "15", "Seconds between this instance's heartbeats in the database.", func(c *Config) *time.Duration { return &c.HeartbeatInterval }),
		secondsSetting("ENVIRONMENT__INSTANCETIMEOUTSECONDS", "", "60", "Seconds after its last heartbeat that an instance's clients stop being listed and are removed (an instance that died without cleaning up).", func(c *Config) *time.Duration { return &c.InstanceTimeout }),
		boolSetting("ENVIRONMENT__INMEMORYCLIENTLIST", "", "false", "Keep the client registry in memory even with a database (one instance only).", func(c *Config) *bool { return &c.InMemoryClientList }),
		boolSetting("ENVIRONMENT__DISABLEDATABASESTATISTICS", "", "false", "Do not persist the statistics counters in the database (they are logged instead).", func(c *Config) *bool { return &c.DisableDatabaseStatistics }),
		boolSetting("ENVIRONMENT__DISABLEDATABASECLIENTHISTORY", "", "false", "Do not record registers and unregisters (with bytes in and out) in the database.", func(c *Config) *bool { return &c.DisableDatabaseClientHistory }),
		intSetting("ENVIRONMENT__STATISTICSRETENTIONDAYS", "", "30", "Days statistics and client history are kept; the daily cleanup purges older rows.", func(c *Config) *int { return &c.StatisticsRetentionDays }),
		boolSetting("ENVIRONMENT__VERIFYSCHEMA", "", "true", "In production, refuse to start unless the database schema is up to date (run `machineservice migrate`).", func(c *Config) *bool { return &c.VerifySchema }),
		strSetting("AUTH__TOKENSFILE", "tokens", "", "Built-in controller: JSON file of static agent and portal tokens.", func(c *Config) *string { return &c.TokensFile }),
		strSetting("AUTH__JWTSECRET", "", "", "Built-in controller: HS256 secret for verifying JWT tokens.", func(c *Config) *string { return &c.JWTSecret }),
		strSetting("AUTH__JWTPUBLICKEYFILE", "", "", "Built-in controller: PEM public key (RSA, ECDSA P-256 or Ed25519) for verifying RS256/ES256/EdDSA JWT tokens.", func(c *Config) *string { return &c.JWTPublicKeyFile }),
		strSetting("AUTH__JWTISSUER", "", "", "Built-in controller: required JWT issuer (iss) when set.", func(c *Config) *string { return &c.JWTIssuer }),

		strSetting("METRICS__LISTEN", "metrics-listen", "127.0.0.1:9091", "Address of the Prometheus /metrics and the /ready endpoints; off disables them.", func(c *Config) *string { return &c.MetricsListen }),
		documented(strSetting("ENVIRONMENT__CONTROLSOCKET", "", "", "Unix socket (mode 0600) that machineservice ctl talks to; off disables it.", func(c *Config) *string { return &c.ControlSocket }), "machineservice.sock in development, else /run/machineservice/control.sock"),
		strSetting("SERILOG__MINIMUMLEVEL__DEFAULT", "", "", "Log level: Verbose, Debug, Information, Warning, Error, Fatal (or debug, info, warn, error). Wins over LOGGING__LOGLEVEL__DEFAULT.", func(c *Config) *string { return &c.SerilogLevel }),
		strSetting("LOGGING__LOGLEVEL__DEFAULT", "", "Information", "Log level: Trace, Debug, Information, Warning, Error, Critical, None (or debug, info, warn, error).", func(c *Config) *string { return &c.LoggingLevel }),
		strSetting("IPBLACKLIST__STORAGE", "", "", "Where the IP blacklist is kept: file://DIR, a directory path, or an http(s):// base URL.", func(c *Config) *string { return &c.BlacklistStorage }),
		strSetting("IPBLACKLIST__ENTRY", "", "", "The blacklist's file or object name in IPBLACKLIST__STORAGE: a JSON list of {\"cidr\",\"description\"}.", func(c *Config) *string { return &c.BlacklistEntry }),
		secondsSetting("IPBLACKLIST__IPRULESCACHELIFETIMESECONDS", "", "86400", "Seconds between reloads of the IP blacklist; a failed reload keeps the last good rules.", func(c *Config) *time.Duration { return &c.BlacklistLifetime }),
		{Env: "SECURITY__TRUSTEDPROXIES", Help: "Proxies (CIDR or addresses, separated by ; or ,) whose X-Forwarded-For is believed; the client is its rightmost address that is not one of them.", set: func(c *Config, v string) error {
			p, err := parsePrefixes(v)
			c.TrustedProxies = p
			return err
		}},
		boolSetting("SECURITY__RATELIMITENABLED", "", "false", "Limit HTTP requests and WebSocket upgrades per client address (IPv6 by /64).", func(c *Config) *bool { return &c.RateLimitEnabled }),
		intSetting("SECURITY__MAXREQUESTSPERSECONDPERIP", "", "10", "Requests per second one client address may make when the rate limit is on; more are answered 429.", func(c *Config) *int { return &c.MaxRequestsPerSecond }),
		intSetting("SECURITY__MAXCONNECTIONSPERIP", "", "0", "Open WebSocket connections one client address may hold (0: no limit); more are refused with 503.", func(c *Config) *int { return &c.MaxConnectionsPerIP }),
		intSetting("SECURITY__MAXCONNECTIONS", "", "0", "Open WebSocket connections in total (0: no limit); more are refused with 503.", func(c *Config) *int { return &c.MaxConnections }),
		boolSetting("SECURITY__FILTERPATTERNS", "", "false", "Answer requests for common scanner paths (/wp-admin, *.php, /.env, /.git/, ...) with 404 at once, unlogged, and count them.", func(c *Config) *bool { return &c.FilterPatterns }),
		{Env: "CORS__ALLOWEDORIGINS", Help: "Origins (separated by ;) browsers may use: a /portal upgrade from another origin is refused with 403, and HTTP routes answer these with CORS headers. Empty: every origin.", set: func(c *Config, v string) error {
			c.AllowedOrigins = splitList(v, ";")
			return nil
		}},
		strSetting("MESSAGING__CONNECTIONSTRING", "nats", "", "NATS URL of the message bus, nats://host:port; several comma-separated for a cluster; credentials may be in the URL (nats://user:password@host:port). Required in production; a development server without it keeps the bus in process.", func(c *Config) *string { return &c.MessagingURL }),
		strSetting("MESSAGING__CREDENTIALSFILE", "", "", "NATS credentials file (user JWT and NKey seed).", func(c *Config) *string { return &c.MessagingCredentialsFile }),
		strSetting("MESSAGING__SUBJECTPREFIX", "", "machineservice", "First token(s) of every NATS subject the instances and the controller use.", func(c *Config) *string { return &c.MessagingSubjectPrefix }),
	}
}

// Load reads the settings: defaults, then the environment, then flags in
// args. It validates the result.
func Load(args []string, getenv func(string) string) (*Config, error) {
	c, err := parse("serve", args, getenv, func(s Setting) bool { return s.Flag != "" })
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// parse reads the defaults, then the environment, then the flags that
// hasFlag picks, and fills the machine-dependent defaults.
func parse(name string, args []string, getenv func(string) string, hasFlag func(Setting) bool) (*Config, error) {
	c := &Config{}
	settings := Settings()
	for _, s := range settings {
		if err := s.set(c, s.Default); err != nil {
			return nil, fmt.Errorf("default of %s: %w", s.Env, err)
		}
	}
	for _, s := range settings {
		if v, ok := lookup(getenv, s.Env); ok {
			if err := s.set(c, v); err != nil {
				return nil, fmt.Errorf("%w: %s=%q: %v", ErrUsage, s.Env, v, err)
			}
		}
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, s := range settings {
		if s.Flag != "" && hasFlag(s) {
			fs.Var(&flagValue{c: c, s: s}, s.Flag, s.Help)
		}
	}
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return nil, ErrHelp
	} else if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q", ErrUsage, fs.Arg(0))
	}
	if err := c.complete(); err != nil {
		return nil, err
	}
	return c, nil
}

// complete fills the defaults that depend on the machine.
func (c *Config) complete() error {
	if c.MachineName == "" {
		h, err := os.Hostname()
		if err != nil {
			h = "unknown"
		}
		c.MachineName = h
	}
	if c.InstanceID == "" {
		c.InstanceID = fmt.Sprintf("service-%s-%s", c.MachineName, uuid.NewString())
	}
	if c.ControlSocket == "" {
		c.ControlSocket = DefaultControlSocket
		if c.Dev {
			c.ControlSocket = DevControlSocket
		}
	}
	return nil
}

// Default control socket paths.
const (
	DevControlSocket     = "machineservice.sock"
	DefaultControlSocket = "/run/machineservice/control.sock"
)

// Validate checks the settings together. Every error names the setting.
func (c *Config) Validate() error {
	var errs []error
	bad := func(env, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", env, fmt.Sprintf(format, args...)))
	}
	if c.Dev && c.IsProd {
		bad("ENVIRONMENT__ISPROD", "true conflicts with --dev (ENVIRONMENT__DEV)")
	}
	if !c.Dev {
		if c.PrivateKey == "" {
			bad("ENVIRONMENT__MACHINESERVERPRIVATE", "required in production (or run with --dev)")
		}
		if c.KeyExpires.IsZero() {
			bad("ENVIRONMENT__MACHINESERVERKEYEXPIRES", "required in production (or run with --dev)")
		}
		if c.MessagingURL == "" {
			bad("MESSAGING__CONNECTIONSTRING", "required in production: the NATS server the controller answers on, nats://host:port (or run with --dev)")
		}
	}
	errs = append(errs, c.validateMessaging()...)
	if c.Listen == "" {
		bad("ENVIRONMENT__LISTEN", "must not be empty")
	}
	positive := []struct {
		env string
		v   int
	}{
		{"ENVIRONMENT__MAXMESSAGESIZE", c.MaxMessageSize},
		{"ENVIRONMENT__MAXBYTESBEFOREAUTHENTICATION", c.MaxBytesBeforeAuth},
		{"ENVIRONMENT__WEBSOCKETRECEIVEBUFFERSIZE", c.ReceiveBufferSize},
		{"ENVIRONMENT__SENDQUEUELENGTH", c.SendQueueLength},
	}
	for _, p := range positive {
		if p.v <= 0 {
			bad(p.env, "must be greater than 0, got %d", p.v)
		}
	}
	durations := []struct {
		env string
		v   time.Duration
	}{
		{"ENVIRONMENT__AUTHTIMEOUTSECONDS", c.AuthTimeout},
		{"ENVIRONMENT__PINGINTERVALSECONDS", c.PingInterval},
		{"ENVIRONMENT__WRITETIMEOUTSECONDS", c.WriteTimeout},
		{"ENVIRONMENT__SHUTDOWNTIMEOUTSECONDS", c.ShutdownTimeout},
		{"ENVIRONMENT__CONTROLLERTIMEOUTSECONDS", c.ControllerTimeout},
		{"ENVIRONMENT__CONTROLTIMEOUTSECONDS", c.ControlTimeout},
	}
	for _, d := range durations {
		if d.v <= 0 {
			bad(d.env, "must be greater than 0")
		}
	}
	if c.StatusReportInterval < 0 {
		bad("ENVIRONMENT__STATUSREPORTINTERVALSECONDS", "must not be negative")
	}
	if c.StatisticsInterval < 0 {
		bad("ENVIRONMENT__SECONDSBETWEENSTATISTICS", "must not be negative")
	}
	errs = append(errs, c.validateDatabase()...)
	if c.JWTSecret != "" && c.JWTPublicKeyFile != "" {
		bad("AUTH__JWTSECRET", "set either AUTH__JWTSECRET or AUTH__JWTPUBLICKEYFILE, not both")
	}
	if c.RedirectURL != "" && !strings.HasPrefix(c.RedirectURL, "http://") && !strings.HasPrefix(c.RedirectURL, "https://") && !strings.HasPrefix(c.RedirectURL, "/") {
		bad("ENVIRONMENT__REDIRECTURL", "must be an http(s) URL or an absolute path, got %q", c.RedirectURL)
	}
	errs = append(errs, c.validateOps()...)
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", ErrUsage, errors.Join(errs...))
	}
	return nil
}

// validateDatabase checks the PostgreSQL settings.
func (c *Config) validateDatabase() []error {
	var errs []error
	bad := func(env, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", env, fmt.Sprintf(format, args...)))
	}
	for _, cs := range []struct{ env, v string }{
		{"DATABASE__CONNECTIONSTRING", c.DatabaseConnectionString},
		{"DATABASE__ADMINCONNECTIONSTRING", c.DatabaseAdminConnectionString},
	} {
		if _, err := PostgresConnString(cs.v); err != nil {
			bad(cs.env, "%v", err) // never quotes the value, which may hold a password
		}
	}
	if !c.Dev && c.DatabaseConnectionString == "" && (!c.InMemoryClientList || !c.DisableDatabaseStatistics) {
		bad("DATABASE__CONNECTIONSTRING", "required in production, unless ENVIRONMENT__INMEMORYCLIENTLIST=true and ENVIRONMENT__DISABLEDATABASESTATISTICS=true (or run with --dev)")
	}
	if c.DatabaseTimeout <= 0 {
		bad("DATABASE__TIMEOUTSECONDS", "must be greater than 0")
	}
	if c.ClientTimeout <= 0 {
		bad("ENVIRONMENT__CLIENTTIMEOUTSECONDS", "must be greater than 0")
	}
	if c.HeartbeatInterval <= 0 {
		bad("ENVIRONMENT__INSTANCEHEARTBEATSECONDS", "must be greater than 0")
	}
	if c.InstanceTimeout < 2*c.HeartbeatInterval {
		bad("ENVIRONMENT__INSTANCETIMEOUTSECONDS", "must be at least twice ENVIRONMENT__INSTANCEHEARTBEATSECONDS, got %v and %v", c.InstanceTimeout, c.HeartbeatInterval)
	}
	if c.StatisticsRetentionDays <= 0 {
		bad("ENVIRONMENT__STATISTICSRETENTIONDAYS", "must be greater than 0, got %d", c.StatisticsRetentionDays)
	}
	if c.PublicURL != "" {
		u, err := url.Parse(c.PublicURL)
		if err != nil || u.Host == "" || !slices.Contains([]string{"http", "https", "ws", "wss"}, u.Scheme) {
			bad("ENVIRONMENT__PUBLICURL", "must be an absolute http(s) or ws(s) URL, got %q", c.PublicURL)
		}
	}
	return errs
}

// PrintEnv writes every setting with its default and meaning.
func PrintEnv(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tFLAG\tDEFAULT\tMEANING")
	settings := Settings()
	for _, s := range settings {
		f := "-"
		if s.Flag != "" {
			f = "--" + s.Flag
		}
		d := s.Default
		if s.DocDefault != "" {
			d = s.DocDefault
		}
		if d == "" {
			d = "(none)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.Env, f, d, s.Help)
	}
	return tw.Flush()
}

// PrintFlags writes the flags of serve with the variables they override.
func PrintFlags(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FLAG\tVARIABLE\tDEFAULT\tMEANING")
	for _, s := range Settings() {
		if s.Flag == "" {
			continue
		}
		d := s.Default
		if d == "" {
			d = "(none)"
		}
		fmt.Fprintf(tw, "--%s\t%s\t%s\t%s\n", s.Flag, s.Env, d, s.Help)
	}
	return tw.Flush()
}

func lookup(getenv func(string) string, key string) (string, bool) {
	if getenv == nil {
		return "", false
	}
	v := getenv(key)
	return v, v != ""
}

type flagValue struct {
	c *Config
	s Setting
}

func (f *flagValue) String() string     { return f.s.Default }
func (f *flagValue) Set(v string) error { return f.s.set(f.c, v) }
func (f *flagValue) IsBoolFlag() bool   { return f.s.isBool }

func documented(s Setting, doc string) Setting {
	s.DocDefault = doc
	return s
}

func strSetting(env, fl, def, help string, field func(*Config) *string) Setting {
	return Setting{Env: env, Flag: fl, Default: def, Help: help, set: func(c *Config, v string) error {
		*field(c) = v
		return nil
	}}
}

func boolSetting(env, fl, def, help string, field func(*Config) *bool) Setting {
	return Setting{Env: env, Flag: fl, Default: def, Help: help, isBool: true, set: func(c *Config, v string) error {
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			return fmt.Errorf("not a boolean (true or false)")
		}
		*field(c) = b
		return nil
	}}
}

func intSetting(env, fl, def, help string, field func(*Config) *int) Setting {
	return Setting{Env: env, Flag: fl, Default: def, Help: help, set: func(c *Config, v string) error {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return fmt.Errorf("not a whole number")
		}
		*field(c) = n
		return nil
	}}
}

func secondsSetting(env, fl, def, help string, field func(*Config) *time.Duration) Setting {
	return Setting{Env: env, Flag: fl, Default: def, Help: help, set: func(c *Config, v string) error {
		f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || math.IsNaN(f) {
			return fmt.Errorf("not a number of seconds")
		}
		// Converting a float beyond the range of a Duration gives a
		// value that depends on the CPU.
		ns := f * float64(time.Second)
		if ns >= math.MaxInt64 || ns < math.MinInt64 {
			return fmt.Errorf("out of range")
		}
		*field(c) = time.Duration(ns)
		return nil
	}}
}

func parseTime(v string) (time.Time, error) {
	v = strings.TrimSpace(v)
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02"} {
		if t, err := time.Parse(layout, v); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("not a time: use RFC 3339, for example 2030-01-01T00:00:00Z")
}
