package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestPostgresConnString(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"empty", "  ", ""},
		{"url", "postgres://u:p@db:5432/x?sslmode=disable", "postgres://u:p@db:5432/x?sslmode=disable"},
		{"postgresql url", "postgresql://db/x", "postgresql://db/x"},
		{"libpq", "host=db port=5432 dbname=x user=u", "host=db port=5432 dbname=x user=u"},
		{"libpq quoted", `host=db password='a b;c'`, `host=db password='a b;c'`},
		{"npgsql", "Host=db;Port=5433;Database=x;Username=u;Password=p",
			"host='db' port='5433' dbname='x' user='u' password='p'"},
		{"single pair", "Host=db", "host='db'"},
		{"aliases", "Server=db; User ID=u; Pwd=p; DB=x; SSL Mode=Require",
			"host='db' dbname='x' user='u' password='p' sslmode='require'"},
		{"uid psw", "server=db;uid=u;psw=p", "host='db' user='u' password='p'"},
		{"case and spaces", "  HOST = db ;  userName= u  ;", "host='db' user='u'"},
		{"double quoted with semicolon", `Host=db;Password="a;b""c"`, `host='db' password='a;b"c'`},
		{"single quoted doubled", `Host=db;Password='it''s'`, `host='db' password='it\'s'`},
		{"backslash escaped for libpq", `Host=db;Password=a\b`, `host='db' password='a\\b'`},
		{"equals in key is doubled", "Host=db;Password=a=b", "host='db' password='a=b'"},
		{"verify modes", "Host=db;SslMode=VerifyFull", "host='db' sslmode='verify-full'"},
		{"verify ca", "Host=db;SSL Mode=verify-ca", "host='db' sslmode='verify-ca'"},
		{"timeouts", "Host=db;Timeout=7;Command Timeout=30", "host='db' connect_timeout='7' statement_timeout='30000'"},
		{"search path and app", "Host=db;Search Path=s1,public;Application Name=ms",
			"host='db' search_path='s1,public' application_name='ms'"},
		{"pool sizes", "Host=db;Maximum Pool Size=20;Min Pool Size=2;Connection Idle Lifetime=60",
			"host='db' pool_max_conns='20' pool_min_conns='2' pool_max_conn_idle_time='60s'"},
		{"ignored keys", "Host=db;Pooling=true;Trust Server Certificate=true;Include Error Detail=true", "host='db'"},
		{"host list with ports", "Host=a:5433,b;Port=5434", "host='a,b' port='5433,5434'"},
		{"ipv6 host", "Host=[::1]:5433", "host='::1' port='5433'"},
		{"plain ipv6 host", "Host=::1;Port=5433", "host='::1' port='5433'"},
		{"empty pairs", ";;Host=db;;", "host='db'"},
		{"last wins", "Host=a;Host=b", "host='b'"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := PostgresConnString(tt.in)
			if err != nil {
				t.Fatalf("PostgresConnString(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("PostgresConnString(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestPostgresConnStringErrors(t *testing.T) {
	for _, in := range []string{
		"Host=db;Colour=blue",
		"Host=db;Password",
		"Host=db;Password=\"open",
		"Host=db;Password=\"a\"b",
		"Host=db;SSL Mode=sometimes",
		"Host=db;Timeout=soon",
		"Host=db;Port=99999",
		"Host=[::1",
		"=x",
		"Host=,b",
	} {
		t.Run(in, func(t *testing.T) {
			_, err := PostgresConnString(in)
			if !errors.Is(err, ErrConnString) {
				t.Fatalf("PostgresConnString(%q) = %v, want ErrConnString", in, err)
			}
		})
	}
}

// TestPostgresConnStringParses checks that what the converter writes
// means to pgx what the Npgsql string meant.
func TestPostgresConnStringParses(t *testing.T) {
	in := `Host=db.example;Port=6543;Database=ms db;Username=o'brien;Password="p;a\ss""word";Search Path=s1;SSL Mode=Disable;Timeout=4`
	out, err := PostgresConnString(in)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pgconn.ParseConfig(out)
	if err != nil {
		t.Fatalf("pgx cannot parse %q: %v", out, err)
	}
	if cfg.Host != "db.example" || cfg.Port != 6543 || cfg.Database != "ms db" || cfg.User != "o'brien" ||
		cfg.Password != `p;a\ss"word` || cfg.RuntimeParams["search_path"] != "s1" || cfg.TLSConfig != nil ||
		cfg.ConnectTimeout.Seconds() != 4 {
		t.Fatalf("parsed %q as host %q port %d db %q user %q password %q params %v tls %v timeout %v",
			out, cfg.Host, cfg.Port, cfg.Database, cfg.User, cfg.Password, cfg.RuntimeParams, cfg.TLSConfig != nil, cfg.ConnectTimeout)
	}
}

// TestPostgresConnStringErrorsHidePassword: errors end up in logs and
// exit messages.
func TestPostgresConnStringErrorsHidePassword(t *testing.T) {
	for _, in := range []string{
		"host=db password=s3cr3t port=abc",
		"postgres://u:s3cr3t@db:abc/x",
		"Host=db;Password=s3cr3t;Target Session Attributes=bogus",
		"Host=db;Password='s3 cr3t';Target Session Attributes=bogus",
	} {
		t.Run(in, func(t *testing.T) {
			_, err := PostgresConnString(in)
			if err == nil {
				t.Fatal("no error")
			}
			if strings.Contains(err.Error(), "s3") {
				t.Fatalf("error shows the password: %v", err)
			}
		})
	}
}
