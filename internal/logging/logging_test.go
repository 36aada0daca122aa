package logging_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/machineservice/machineservice/internal/logging"
)

func TestParseLevel(t *testing.T) {
	tests := []struct {
		name string
		want slog.Level
	}{
		{"Verbose", logging.LevelTrace},
		{"trace", logging.LevelTrace},
		{"Debug", slog.LevelDebug},
		{"debug", slog.LevelDebug},
		{"Information", slog.LevelInfo},
		{"INFO", slog.LevelInfo},
		{"Warning", slog.LevelWarn},
		{"warn", slog.LevelWarn},
		{"Error", slog.LevelError},
		{"Fatal", logging.LevelFatal},
		{"Critical", logging.LevelFatal},
		{"None", logging.LevelNone},
		{" information ", slog.LevelInfo},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := logging.ParseLevel(tt.name)
			if err != nil || got != tt.want {
				t.Fatalf("ParseLevel(%q) = %v, %v; want %v", tt.name, got, err, tt.want)
			}
			back, err := logging.ParseLevel(logging.LevelName(got))
			if err != nil || back != got {
				t.Fatalf("LevelName(%v) = %q does not parse back: %v %v", got, logging.LevelName(got), back, err)
			}
		})
	}
	for _, bad := range []string{"", "loud", "warnings"} {
		if _, err := logging.ParseLevel(bad); !errors.Is(err, logging.ErrUnknownLevel) {
			t.Errorf("ParseLevel(%q) error = %v, want ErrUnknownLevel", bad, err)
		}
	}
}

// buffer collects JSON log lines.
type buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// messages returns the msg of every record written, and clears the buffer.
func (b *buffer) messages(t *testing.T) []string {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(b.buf.String()), "\n") {
		if line == "" {
			continue
		}
		var rec struct{ Msg string }
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("not a JSON record: %q", line)
		}
		out = append(out, rec.Msg)
	}
	b.buf.Reset()
	return out
}

func TestLevelAtRunTime(t *testing.T) {
	var b buffer
	c := logging.NewControl(slog.LevelInfo)
	log := logging.New(&b, true, c)

	log.Debug("hidden")
	log.Info("shown")
	c.SetLevel(slog.LevelDebug)
	log.Debug("debug now shown")
	c.SetLevel(slog.LevelError)
	log.Warn("warn hidden")
	c.Reset()
	log.Info("info after reset")
	got := strings.Join(b.messages(t), ",")
	if want := "shown,debug now shown,info after reset"; got != want {
		t.Fatalf("logged %q, want %q", got, want)
	}
	if c.Level() != slog.LevelInfo || c.Default() != slog.LevelInfo {
		t.Fatalf("level %v default %v after reset", c.Level(), c.Default())
	}
}

func TestTrace(t *testing.T) {
	var b buffer
	c := logging.NewControl(slog.LevelWarn)
	log := logging.New(&b, true, c)

	traced := log.With("conn", "c1", "client", "alice")
	other := log.With("conn", "c2", "client", "bob")
	preAuth := log.With("conn", "c1") // the same connection before its client id was known
	c.Trace("alice")

	traced.Debug("alice with")
	other.Debug("bob with")
	log.Debug("alice in record", "client", "alice")
	log.Debug("bob in record", "client", "bob")
	preAuth.Debug("alice by learned conn")
	log.Debug("nobody")
	log.Debug("alice among other attrs", "k", 1, "client", "alice")
	log.Log(t.Context(), logging.LevelTrace, "below debug", "client", "alice")
	other.Warn("bob warn passes the level")
	if got, want := strings.Join(b.messages(t), ","), "alice with,alice in record,alice by learned conn,alice among other attrs,bob warn passes the level"; got != want {
		t.Fatalf("logged %q, want %q", got, want)
	}
	if c.Traced() != "alice" {
		t.Fatalf("Traced() = %q", c.Traced())
	}

	c.Trace("bob", "c9")
	log.With("conn", "c9").Debug("bob by given conn")
	traced.Debug("alice no longer")
	c.TraceOff()
	other.Debug("bob no longer")
	if got, want := strings.Join(b.messages(t), ","), "bob by given conn"; got != want {
		t.Fatalf("logged %q, want %q", got, want)
	}
	if c.Traced() != "" {
		t.Fatalf("Traced() = %q after TraceOff", c.Traced())
	}
}

func TestTextInDevelopment(t *testing.T) {
	var b bytes.Buffer
	logging.New(&b, false, logging.NewControl(slog.LevelInfo)).Info("hello", "k", "v")
	if s := b.String(); !strings.Contains(s, "msg=hello") || !strings.Contains(s, "k=v") {
		t.Fatalf("text record %q", s)
	}
}
