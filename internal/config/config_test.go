package config_test

import (
	"bytes"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/config"
)

// devArgs makes Load succeed without production settings.
var devArgs = []string{"--dev"}

// envOf returns a getenv over m.
func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// mustLoad loads the configuration and fails the test on an error.
func mustLoad(t *testing.T, args []string, env map[string]string) *config.Config {
	t.Helper()
	c, err := config.Load(args, envOf(env))
	if err != nil {
		t.Fatalf("Load(%q): %v", args, err)
	}
	return c
}

// loadErr loads the configuration and returns its error, failing the test
// when there is none or when it is not a usage error.
func loadErr(t *testing.T, args []string, env map[string]string) error {
	t.Helper()
	c, err := config.Load(args, envOf(env))
	if err == nil {
		t.Fatalf("Load(%q, %v) = %+v, want an error", args, env, c)
	}
	if !errors.Is(err, config.ErrUsage) {
		t.Fatalf("Load(%q, %v) error %v is not ErrUsage", args, env, err)
	}
	return err
}

func TestLoadDefaults(t *testing.T) {
	c := mustLoad(t, devArgs, nil)
	if c.Listen != ":8080" {
		t.Errorf("Listen = %q, want :8080", c.Listen)
	}
	if c.MaxMessageSize != 1048576 {
		t.Errorf("MaxMessageSize = %d, want 1048576", c.MaxMessageSize)
	}
	if c.MaxBytesBeforeAuth != 100000 {
		t.Errorf("MaxBytesBeforeAuth = %d, want 100000", c.MaxBytesBeforeAuth)
	}
	if c.AuthTimeout != 30*time.Second {
		t.Errorf("AuthTimeout = %v, want 30s", c.AuthTimeout)
	}
	if c.PingInterval != 60*time.Second {
		t.Errorf("PingInterval = %v, want 60s", c.PingInterval)
	}
	if c.StatisticsInterval != 300*time.Second {
		t.Errorf("StatisticsInterval = %v, want 300s", c.StatisticsInterval)
	}
	if c.DevKeyFile != "debug-privatekey.pem" {
		t.Errorf("DevKeyFile = %q, want debug-privatekey.pem", c.DevKeyFile)
	}
	if !c.Dev || c.IsProd {
		t.Errorf("Dev, IsProd = %v, %v; want true, false", c.Dev, c.IsProd)
	}
	if c.TokensFile != "" || c.JWTSecret != "" || c.PrivateKey != "" || !c.KeyExpires.IsZero() {
		t.Errorf("settings without a default are set: %+v", c)
	}
}

func TestLoadEnvironment(t *testing.T) {
	env := map[string]string{
		"ENVIRONMENT__DEV":                          "true",
		"ENVIRONMENT__LISTEN":                       "127.0.0.1:9000",
		"ENVIRONMENT__MAXMESSAGESIZE":               "2048",
		"ENVIRONMENT__MAXBYTESBEFOREAUTHENTICATION": " 4096 ",
		"ENVIRONMENT__AUTHTIMEOUTSECONDS":           "1.5",
		"ENVIRONMENT__PINGINTERVALSECONDS":          "5",
		"ENVIRONMENT__SECONDSBETWEENSTATISTICS":     "0",
		"ENVIRONMENT__DISABLEPINGMESSAGES":          "TRUE",
		"ENVIRONMENT__MACHINENAME":                  "box",
		"ENVIRONMENT__INSTANCEID":                   "instance-7",
		"ENVIRONMENT__REDIRECTURL":                  "https://example.org/",
		"AUTH__TOKENSFILE":                          "env-tokens.json",
		"AUTH__JWTISSUER":                           "issuer",
	}
	c := mustLoad(t, nil, env)
	checks := []struct {
		name      string
		got, want any
	}{
		{"Dev", c.Dev, true},
		{"Listen", c.Listen, "127.0.0.1:9000"},
		{"MaxMessageSize", c.MaxMessageSize, 2048},
		{"MaxBytesBeforeAuth", c.MaxBytesBeforeAuth, 4096},
		{"AuthTimeout", c.AuthTimeout, 1500 * time.Millisecond},
		{"PingInterval", c.PingInterval, 5 * time.Second},
		{"StatisticsInterval", c.StatisticsInterval, time.Duration(0)},
		{"DisablePingMessages", c.DisablePingMessages, true},
		{"MachineName", c.MachineName, "box"},
		{"InstanceID", c.InstanceID, "instance-7"},
		{"RedirectURL", c.RedirectURL, "https://example.org/"},
		{"TokensFile", c.TokensFile, "env-tokens.json"},
		{"JWTIssuer", c.JWTIssuer, "issuer"},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
}

func TestLoadFlagsOverrideEnvironment(t *testing.T) {
	env := map[string]string{
		"ENVIRONMENT__DEV":                "false",
		"ENVIRONMENT__LISTEN":             "127.0.0.1:9000",
		"AUTH__TOKENSFILE":                "env-tokens.json",
		"ENVIRONMENT__DEVELOPMENTKEYFILE": "env.pem",
	}
	args := []string{"--dev", "--listen", "127.0.0.1:9001", "--tokens=flag-tokens.json", "-dev-key-file", "flag.pem"}
	c := mustLoad(t, args, env)
	if !c.Dev {
		t.Error("Dev = false, want --dev to win over ENVIRONMENT__DEV=false")
	}
	if c.Listen != "127.0.0.1:9001" {
		t.Errorf("Listen = %q, want the flag's 127.0.0.1:9001", c.Listen)
	}
	if c.TokensFile != "flag-tokens.json" {
		t.Errorf("TokensFile = %q, want the flag's flag-tokens.json", c.TokensFile)
	}
	if c.DevKeyFile != "flag.pem" {
		t.Errorf("DevKeyFile = %q, want the flag's flag.pem", c.DevKeyFile)
	}

	// An explicit --dev=false beats ENVIRONMENT__DEV=true, and then the
	// production settings are required.
	err := loadErr(t, []string{"--dev=false"}, map[string]string{"ENVIRONMENT__DEV": "true"})
	if !strings.Contains(err.Error(), "ENVIRONMENT__MACHINESERVERPRIVATE") {
		t.Errorf("--dev=false: error %q does not ask for the production key", err)
	}
}

func TestLoadBadValues(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want []string // substrings of the error
	}{
		{"size not a number", devArgs, map[string]string{"ENVIRONMENT__MAXMESSAGESIZE": "1MB"}, []string{"ENVIRONMENT__MAXMESSAGESIZE", `"1MB"`, "not a whole number"}},
		{"size fractional", devArgs, map[string]string{"ENVIRONMENT__SENDQUEUELENGTH": "1.5"}, []string{"ENVIRONMENT__SENDQUEUELENGTH", "not a whole number"}},
		{"size zero", devArgs, map[string]string{"ENVIRONMENT__MAXMESSAGESIZE": "0"}, []string{"ENVIRONMENT__MAXMESSAGESIZE", "greater than 0"}},
		{"size negative", devArgs, map[string]string{"ENVIRONMENT__MAXBYTESBEFOREAUTHENTICATION": "-1"}, []string{"ENVIRONMENT__MAXBYTESBEFOREAUTHENTICATION", "greater than 0"}},
		{"buffer zero", devArgs, map[string]string{"ENVIRONMENT__WEBSOCKETRECEIVEBUFFERSIZE": "0"}, []string{"ENVIRONMENT__WEBSOCKETRECEIVEBUFFERSIZE"}},
		{"boolean", nil, map[string]string{"ENVIRONMENT__DEV": "yes please"}, []string{"ENVIRONMENT__DEV", "not a boolean"}},
		{"boolean no flag", devArgs, map[string]string{"ENVIRONMENT__DISABLEPINGMESSAGES": "on"}, []string{"ENVIRONMENT__DISABLEPINGMESSAGES", "not a boolean"}},
		{"seconds not a number", devArgs, map[string]string{"ENVIRONMENT__AUTHTIMEOUTSECONDS": "30s"}, []string{"ENVIRONMENT__AUTHTIMEOUTSECONDS", "not a number of seconds"}},
		{"seconds zero", devArgs, map[string]string{"ENVIRONMENT__PINGINTERVALSECONDS": "0"}, []string{"ENVIRONMENT__PINGINTERVALSECONDS", "greater than 0"}},
		{"seconds negative", devArgs, map[string]string{"ENVIRONMENT__SECONDSBETWEENSTATISTICS": "-5"}, []string{"ENVIRONMENT__SECONDSBETWEENSTATISTICS", "negative"}},
		{"seconds NaN", devArgs, map[string]string{"ENVIRONMENT__WRITETIMEOUTSECONDS": "NaN"}, []string{"ENVIRONMENT__WRITETIMEOUTSECONDS", "not a number of seconds"}},
		{"seconds infinite", devArgs, map[string]string{"ENVIRONMENT__STATUSREPORTINTERVALSECONDS": "+Inf"}, []string{"ENVIRONMENT__STATUSREPORTINTERVALSECONDS", "out of range"}},
		{"seconds too many", devArgs, map[string]string{"ENVIRONMENT__SECONDSBETWEENSTATISTICS": "1e300"}, []string{"ENVIRONMENT__SECONDSBETWEENSTATISTICS", "out of range"}},
		{"expiry not a time", devArgs, map[string]string{"ENVIRONMENT__MACHINESERVERKEYEXPIRES": "next year"}, []string{"ENVIRONMENT__MACHINESERVERKEYEXPIRES", "RFC 3339"}},
		{"empty listen flag", []string{"--dev", "--listen="}, nil, []string{"ENVIRONMENT__LISTEN", "empty"}},
		{"redirect", devArgs, map[string]string{"ENVIRONMENT__REDIRECTURL": "example.org"}, []string{"ENVIRONMENT__REDIRECTURL"}},
		{"both jwt keys", devArgs, map[string]string{"AUTH__JWTSECRET": "s", "AUTH__JWTPUBLICKEYFILE": "k.pem"}, []string{"AUTH__JWTSECRET", "AUTH__JWTPUBLICKEYFILE"}},
		{"bad flag value", []string{"--dev=maybe"}, nil, []string{"dev"}},
		{"unknown flag", []string{"--dev", "--lisen", ":1"}, nil, []string{"lisen"}},
		{"flag without value", []string{"--dev", "--listen"}, nil, []string{"listen"}},
		{"stray argument", []string{"--dev", "extra"}, nil, []string{`"extra"`}},
		{"dev and production", devArgs, map[string]string{"ENVIRONMENT__ISPROD": "true"}, []string{"ENVIRONMENT__ISPROD", "--dev"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := loadErr(t, tt.args, tt.env)
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestLoadProductionRequiresKey(t *testing.T) {
	err := loadErr(t, nil, nil)
	for _, w := range []string{"ENVIRONMENT__MACHINESERVERPRIVATE", "ENVIRONMENT__MACHINESERVERKEYEXPIRES"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %s", err, w)
		}
	}

	err = loadErr(t, nil, map[string]string{"ENVIRONMENT__MACHINESERVERPRIVATE": "a key"})
	if !strings.Contains(err.Error(), "ENVIRONMENT__MACHINESERVERKEYEXPIRES") || strings.Contains(err.Error(), "ENVIRONMENT__MACHINESERVERPRIVATE") {
		t.Errorf("with a key but no expiry: error %q should name only ENVIRONMENT__MACHINESERVERKEYEXPIRES", err)
	}

	c := mustLoad(t, nil, map[string]string{
		"ENVIRONMENT__ISPROD":                    "true",
		"ENVIRONMENT__MACHINESERVERPRIVATE":      "a key",
		"ENVIRONMENT__MACHINESERVERKEYEXPIRES":   "2030-01-01T00:00:00Z",
		"ENVIRONMENT__INMEMORYCLIENTLIST":        "true",
		"MESSAGING__CONNECTIONSTRING":            "nats://127.0.0.1:4222",
		"ENVIRONMENT__DISABLEDATABASESTATISTICS": "true",
	})
	if c.Dev || !c.IsProd {
		t.Errorf("Dev, IsProd = %v, %v; want false, true", c.Dev, c.IsProd)
	}
}

func TestLoadMachineDefaults(t *testing.T) {
	host, err := os.Hostname()
	if err != nil {
		t.Skipf("no host name here: %v", err)
	}
	c := mustLoad(t, devArgs, nil)
	if c.MachineName != host {
		t.Errorf("MachineName = %q, want the host name %q", c.MachineName, host)
	}
	shape := regexp.MustCompile(`^service-` + regexp.QuoteMeta(host) + `-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	if !shape.MatchString(c.InstanceID) {
		t.Errorf("InstanceID = %q, want service-<host>-<uuid>", c.InstanceID)
	}
	if again := mustLoad(t, devArgs, nil); again.InstanceID == c.InstanceID {
		t.Errorf("two loads gave the same instance id %q; want a new uuid each start", c.InstanceID)
	}

	c = mustLoad(t, devArgs, map[string]string{"ENVIRONMENT__MACHINENAME": "relay-1"})
	if !regexp.MustCompile(`^service-relay-1-[0-9a-f-]{36}$`).MatchString(c.InstanceID) {
		t.Errorf("InstanceID = %q, want it built from ENVIRONMENT__MACHINENAME", c.InstanceID)
	}
}

func TestLoadKeyExpiry(t *testing.T) {
	tests := []struct {
		in   string
		want time.Time
	}{
		{"2030-01-02T03:04:05Z", time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)},
		{"2030-01-02T03:04:05+02:00", time.Date(2030, 1, 2, 1, 4, 5, 0, time.UTC)},
		{"2030-01-02T03:04:05.25Z", time.Date(2030, 1, 2, 3, 4, 5, 250e6, time.UTC)},
		{" 2030-01-02T03:04:05Z ", time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)},
		{"2030-01-02", time.Date(2030, 1, 2, 0, 0, 0, 0, time.UTC)},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			c := mustLoad(t, devArgs, map[string]string{"ENVIRONMENT__MACHINESERVERKEYEXPIRES": tt.in})
			if !c.KeyExpires.Equal(tt.want) {
				t.Errorf("KeyExpires = %v, want %v", c.KeyExpires, tt.want)
			}
		})
	}
}

func TestPrintEnv(t *testing.T) {
	var buf bytes.Buffer
	if err := config.PrintEnv(&buf); err != nil {
		t.Fatal(err)
	}
	lines := map[string]string{}
	for _, l := range strings.Split(buf.String(), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			lines[f[0]] = l
		}
	}
	settings := config.Settings()
	if len(settings) < 20 {
		t.Fatalf("Settings() lists %d settings; want every setting", len(settings))
	}
	for _, s := range settings {
		l, ok := lines[s.Env]
		if !ok {
			t.Errorf("PrintEnv does not list %s", s.Env)
			continue
		}
		f := strings.Fields(l)
		if len(f) < 4 {
			t.Errorf("%s: line %q lacks columns", s.Env, l)
			continue
		}
		wantFlag := "-"
		if s.Flag != "" {
			wantFlag = "--" + s.Flag
		}
		if f[1] != wantFlag {
			t.Errorf("%s: flag column %q, want %q", s.Env, f[1], wantFlag)
		}
		wantDefault := s.Default
		if s.DocDefault != "" {
			wantDefault = s.DocDefault
		}
		if wantDefault == "" {
			wantDefault = "(none)"
		}
		if !strings.Contains(l, "  "+wantDefault+"  ") {
			t.Errorf("%s: line %q does not show the default %q", s.Env, l, wantDefault)
		}
		if s.Help == "" || !strings.HasSuffix(l, s.Help) {
			t.Errorf("%s: line %q does not end with its meaning %q", s.Env, l, s.Help)
		}
	}
	if len(lines) != len(settings)+1 { // and the header
		t.Errorf("PrintEnv has %d lines, want %d settings and a header", len(lines), len(settings))
	}
}
