package config

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestDatabaseDefaults(t *testing.T) {
	c, err := Load([]string{"--dev"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.DatabaseConnectionString != "" || c.ClientTimeout != 300*time.Second || c.HeartbeatInterval != 15*time.Second ||
		c.InstanceTimeout != 60*time.Second || c.DatabaseTimeout != 3*time.Second || c.StatisticsRetentionDays != 30 ||
		!c.VerifySchema || c.InMemoryClientList || c.DisableDatabaseStatistics || c.DisableDatabaseClientHistory || c.PublicURL != "" {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestDatabaseValidation(t *testing.T) {
	prod := map[string]string{
		"ENVIRONMENT__MACHINESERVERPRIVATE":    "set",
		"ENVIRONMENT__MACHINESERVERKEYEXPIRES": "2030-01-01T00:00:00Z",
		"MESSAGING__CONNECTIONSTRING":          "nats://127.0.0.1:4222",
	}
	tests := []struct {
		name    string
		env     map[string]string
		wantErr string // a setting the error names; empty: valid
	}{
		{"production needs a database", nil, "DATABASE__CONNECTIONSTRING"},
		{"production with only an in-memory list still needs it for statistics",
			map[string]string{"ENVIRONMENT__INMEMORYCLIENTLIST": "true"}, "DATABASE__CONNECTIONSTRING"},
		{"production fully in memory", map[string]string{"ENVIRONMENT__INMEMORYCLIENTLIST": "true", "ENVIRONMENT__DISABLEDATABASESTATISTICS": "true"}, ""},
		{"production with a URL", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://u@db/x"}, ""},
		{"production with Npgsql", map[string]string{"DATABASE__CONNECTIONSTRING": "Host=db;Database=x;Username=u;Password=p"}, ""},
		{"bad connection string", map[string]string{"DATABASE__CONNECTIONSTRING": "Host=db;Colour=blue"}, "DATABASE__CONNECTIONSTRING"},
		{"bad admin connection string", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x", "DATABASE__ADMINCONNECTIONSTRING": "Host=db;Port=x"}, "DATABASE__ADMINCONNECTIONSTRING"},
		{"public URL", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x", "ENVIRONMENT__PUBLICURL": "wss://ms1.example.com"}, ""},
		{"public URL without scheme", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x", "ENVIRONMENT__PUBLICURL": "ms1.example.com"}, "ENVIRONMENT__PUBLICURL"},
		{"instance window shorter than two heartbeats", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x",
			"ENVIRONMENT__INSTANCEHEARTBEATSECONDS": "40"}, "ENVIRONMENT__INSTANCETIMEOUTSECONDS"},
		{"zero client timeout", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x", "ENVIRONMENT__CLIENTTIMEOUTSECONDS": "0"}, "ENVIRONMENT__CLIENTTIMEOUTSECONDS"},
		{"zero retention", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x", "ENVIRONMENT__STATISTICSRETENTIONDAYS": "0"}, "ENVIRONMENT__STATISTICSRETENTIONDAYS"},
		{"zero database timeout", map[string]string{"DATABASE__CONNECTIONSTRING": "postgres://db/x", "DATABASE__TIMEOUTSECONDS": "0"}, "DATABASE__TIMEOUTSECONDS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range prod {
				env[k] = v
			}
			for k, v := range tt.env {
				env[k] = v
			}
			_, err := Load(nil, func(k string) string { return env[k] })
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrUsage) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want a usage error naming %s", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "blue") || strings.Contains(err.Error(), "Password=p") {
				t.Fatalf("error quotes the connection string: %v", err)
			}
		})
	}
}
