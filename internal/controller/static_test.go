package controller_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/testclock"
)

const (
	orgA   = "11111111-1111-1111-1111-111111111111"
	orgB   = "22222222-2222-2222-2222-222222222222"
	orgSub = "33333333-3333-3333-3333-333333333333"
)

// epoch is the tests' "now".
var epoch = time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)

func testTokens() controller.TokensFile {
	return controller.TokensFile{
		Agents: []controller.AgentToken{
			{Token: "agent-a1", OrganizationID: orgA, RegisteredAgentID: "reg-a1", Expires: epoch.Add(time.Hour)},
			{Token: "agent-renew", OrganizationID: orgA, RegisteredAgentID: "reg-renew", Expires: epoch.Add(time.Minute), NewToken: "agent-renewed"},
			{Token: "agent-forever", OrganizationID: orgB, RegisteredAgentID: "reg-b"},
		},
		Portals: []controller.PortalToken{
			{Token: "portal-a", OrganizationID: orgA, SubOrganizations: []string{orgSub}, Expires: epoch.Add(time.Hour)},
			{Token: "portal-imp", OrganizationID: orgB, Impersonated: true},
		},
	}
}

func newStatic(t *testing.T, now func() time.Time) *controller.Static {
	t.Helper()
	s, err := controller.NewStatic(testTokens(), now)
	if err != nil {
		t.Fatalf("NewStatic: %v", err)
	}
	return s
}

func TestStaticAgent(t *testing.T) {
	ctx := context.Background()
	s := newStatic(t, testclock.New(epoch).Now)
	tests := []struct {
		token string
		want  controller.Agent
	}{
		{"agent-a1", controller.Agent{OrganizationID: orgA, RegisteredAgentID: "reg-a1", Expires: epoch.Add(time.Hour)}},
		{"agent-renew", controller.Agent{OrganizationID: orgA, RegisteredAgentID: "reg-renew", Expires: epoch.Add(time.Minute), NewToken: "agent-renewed"}},
		{"agent-forever", controller.Agent{OrganizationID: orgB, RegisteredAgentID: "reg-b"}},
	}
	for _, tt := range tests {
		t.Run(tt.token, func(t *testing.T) {
			got, err := s.ValidateAgent(ctx, tt.token)
			if err != nil {
				t.Fatalf("ValidateAgent: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ValidateAgent = %+v, want %+v", got, tt.want)
			}
		})
	}
	for _, token := range []string{"", "agent-a", "agent-a1 ", "AGENT-A1", "portal-a", "agent-renewed"} {
		t.Run("unknown "+token, func(t *testing.T) {
			_, err := s.ValidateAgent(ctx, token)
			if !errors.Is(err, controller.ErrRejected) {
				t.Errorf("ValidateAgent(%q) error = %v, want ErrRejected", token, err)
			}
		})
	}
}

func TestStaticPortal(t *testing.T) {
	ctx := context.Background()
	s := newStatic(t, testclock.New(epoch).Now)
	tests := []struct {
		name    string
		token   string
		subOrgs bool
		want    controller.Portal
	}{
		{"without sub-organizations", "portal-a", false, controller.Portal{OrganizationID: orgA, Expires: epoch.Add(time.Hour)}},
		{"with sub-organizations", "portal-a", true, controller.Portal{OrganizationID: orgA, SubOrganizations: []string{orgSub}, Expires: epoch.Add(time.Hour)}},
		{"impersonated", "portal-imp", true, controller.Portal{OrganizationID: orgB, Impersonated: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.ValidatePortal(ctx, tt.token, tt.subOrgs)
			if err != nil {
				t.Fatalf("ValidatePortal: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ValidatePortal = %+v, want %+v", got, tt.want)
			}
		})
	}

	// The answer is a copy: changing it does not change the next one.
	p, err := s.ValidatePortal(ctx, "portal-a", true)
	if err != nil {
		t.Fatal(err)
	}
	p.SubOrganizations[0] = orgB
	if p, _ := s.ValidatePortal(ctx, "portal-a", true); p.SubOrganizations[0] != orgSub {
		t.Errorf("sub-organizations changed through an earlier answer: %v", p.SubOrganizations)
	}

	for _, token := range []string{"", "portal", "agent-a1"} {
		if _, err := s.ValidatePortal(ctx, token, true); !errors.Is(err, controller.ErrRejected) {
			t.Errorf("ValidatePortal(%q) error = %v, want ErrRejected", token, err)
		}
	}
}

func TestStaticExpiry(t *testing.T) {
	ctx := context.Background()
	clk := testclock.New(epoch)
	s := newStatic(t, clk.Now)

	clk.Set(epoch.Add(time.Hour - time.Nanosecond))
	if _, err := s.ValidateAgent(ctx, "agent-a1"); err != nil {
		t.Errorf("agent token just before its expiry: %v", err)
	}
	if _, err := s.ValidatePortal(ctx, "portal-a", false); err != nil {
		t.Errorf("portal token just before its expiry: %v", err)
	}

	for _, at := range []time.Time{epoch.Add(time.Hour), epoch.Add(48 * time.Hour)} {
		clk.Set(at)
		if _, err := s.ValidateAgent(ctx, "agent-a1"); !errors.Is(err, controller.ErrRejected) || !strings.Contains(err.Error(), "expired") {
			t.Errorf("agent token at %v: error %v, want an expiry rejection", at, err)
		}
		if _, err := s.ValidatePortal(ctx, "portal-a", false); !errors.Is(err, controller.ErrRejected) || !strings.Contains(err.Error(), "expired") {
			t.Errorf("portal token at %v: error %v, want an expiry rejection", at, err)
		}
		// Tokens without an expiry never expire.
		if _, err := s.ValidateAgent(ctx, "agent-forever"); err != nil {
			t.Errorf("agent token without expiry at %v: %v", at, err)
		}
		if _, err := s.ValidatePortal(ctx, "portal-imp", false); err != nil {
			t.Errorf("portal token without expiry at %v: %v", at, err)
		}
	}
}

func TestNewStaticInvalid(t *testing.T) {
	agent := func(token, org, reg string) controller.AgentToken {
		return controller.AgentToken{Token: token, OrganizationID: org, RegisteredAgentID: reg}
	}
	portal := func(token, org string) controller.PortalToken {
		return controller.PortalToken{Token: token, OrganizationID: org}
	}
	tests := []struct {
		name string
		f    controller.TokensFile
		want string
	}{
		{"agent token empty", controller.TokensFile{Agents: []controller.AgentToken{agent("a", orgA, "r"), agent("", orgA, "r")}}, "agents[1]: token is empty"},
		{"agent organization empty", controller.TokensFile{Agents: []controller.AgentToken{agent("a", "", "r")}}, "agents[0]: organizationId is empty"},
		{"agent id empty", controller.TokensFile{Agents: []controller.AgentToken{agent("a", orgA, "")}}, "agents[0]: registeredAgentId is empty"},
		{"agent token twice", controller.TokensFile{Agents: []controller.AgentToken{agent("a", orgA, "r1"), agent("a", orgB, "r2")}}, "agents[1]: token listed twice"},
		{"portal token empty", controller.TokensFile{Portals: []controller.PortalToken{portal("", orgA)}}, "portals[0]: token is empty"},
		{"portal organization empty", controller.TokensFile{Portals: []controller.PortalToken{portal("p", "")}}, "portals[0]: organizationId is empty"},
		{"portal token twice", controller.TokensFile{Portals: []controller.PortalToken{portal("p", orgA), portal("q", orgA), portal("p", orgB)}}, "portals[2]: token listed twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := controller.NewStatic(tt.f, nil)
			if err == nil {
				t.Fatalf("NewStatic = %v, want an error", s)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}

	// One token may serve as an agent's and as a portal's.
	f := controller.TokensFile{Agents: []controller.AgentToken{agent("t", orgA, "r")}, Portals: []controller.PortalToken{portal("t", orgA)}}
	if _, err := controller.NewStatic(f, nil); err != nil {
		t.Errorf("the same token for an agent and a portal: %v", err)
	}
}

func TestLoadTokensFileExample(t *testing.T) {
	s, err := controller.LoadTokensFile(filepath.Join("..", "..", "examples", "tokens.json"), func() time.Time { return epoch })
	if err != nil {
		t.Fatalf("examples/tokens.json: %v", err)
	}
	if agents, portals := s.Len(); agents == 0 || portals == 0 {
		t.Errorf("examples/tokens.json has %d agent and %d portal tokens; want some of each", agents, portals)
	}
	ctx := context.Background()
	a, err := s.ValidateAgent(ctx, "dev-agent-token-1")
	if err != nil {
		t.Fatalf("dev-agent-token-1: %v", err)
	}
	if a.OrganizationID != orgA || a.RegisteredAgentID != "agent-1" {
		t.Errorf("dev-agent-token-1 = %+v", a)
	}
	p, err := s.ValidatePortal(ctx, "dev-portal-token", false)
	if err != nil {
		t.Fatalf("dev-portal-token: %v", err)
	}
	if p.OrganizationID != orgA {
		t.Errorf("dev-portal-token = %+v", p)
	}
}

func TestLoadTokensFileInvalid(t *testing.T) {
	tests := []struct {
		name, content, want string
	}{
		{"not JSON", `{"agents": [`, "parse tokens file"},
		{"wrong shape", `{"agents": {"token": "a"}}`, "parse tokens file"},
		{"bad time", `{"portals": [{"token": "p", "organizationId": "o", "expires": "soon"}]}`, "parse tokens file"},
		{"invalid entry", `{"agents": [{"token": "a", "organizationId": "o"}]}`, "registeredAgentId is empty"},
		// A misspelt field would otherwise be dropped: a token meant to
		// expire would never expire.
		{"unknown field", `{"agents": [{"token": "a", "organizationId": "o", "registeredAgentId": "r", "expiry": "2030-01-01T00:00:00Z"}]}`, `"expiry"`},
		{"trailing data", `{"agents": []} {"portals": []}`, "parse tokens file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tokens.json")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := controller.LoadTokensFile(path, nil)
			if err == nil {
				t.Fatalf("LoadTokensFile = %v, want an error", s)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}

	_, err := controller.LoadTokensFile(filepath.Join(t.TempDir(), "missing.json"), nil)
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: error %v, want os.ErrNotExist", err)
	}
}
