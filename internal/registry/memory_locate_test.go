package registry_test

import (
	"context"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/wire"
)

func TestMemoryLookupAgentAndLocate(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	m := registry.NewMemory(time.Minute, clock)
	ctx := context.Background()
	reg := func(client, org, agentID, instance string, typ wire.ClientType) {
		t.Helper()
		if err := m.Register(ctx, registry.Client{ClientID: client, OrganizationID: org, Type: typ, ConnectionID: client + org,
			InstanceID: instance, MachineRegistrationID: agentID}); err != nil {
			t.Fatal(err)
		}
	}
	reg("c1", "o1", "reg-1", "i-a", wire.ClientTypeAgent)
	now = now.Add(time.Second)
	reg("c2", "o2", "reg-1", "i-b", wire.ClientTypeAgent) // the same registered id in another organization, newer
	reg("p1", "o1", "", "i-a", wire.ClientTypePortal)
	reg("p1", "o2", "", "i-b", wire.ClientTypePortal)

	lookups := []struct {
		name, agentID, org string
		found              bool
		instance           string
	}{
		{"in its organization", "reg-1", "o1", true, "i-a"},
		{"any organization, the newest", "reg-1", "", true, "i-b"},
		{"wrong organization", "reg-1", "o3", false, ""},
		{"unknown", "reg-2", "", false, ""},
		{"portals are not agents", "", "o1", false, ""},
	}
	for _, tc := range lookups {
		t.Run(tc.name, func(t *testing.T) {
			c, ok, err := m.LookupAgent(ctx, tc.agentID, tc.org)
			if err != nil || ok != tc.found || c.InstanceID != tc.instance {
				t.Fatalf("LookupAgent = %+v, %v, %v", c, ok, err)
			}
		})
	}

	t.Run("locate", func(t *testing.T) {
		got, err := m.Locate(ctx, "p1")
		if err != nil || len(got) != 2 || got[0].OrganizationID != "o1" || got[1].InstanceID != "i-b" {
			t.Fatalf("Locate = %+v, %v", got, err)
		}
		if got, _ := m.Locate(ctx, "nobody"); len(got) != 0 {
			t.Fatalf("Locate(nobody) = %+v", got)
		}
	})
	t.Run("stale entries are not found", func(t *testing.T) {
		now = now.Add(2 * time.Minute)
		if _, ok, _ := m.LookupAgent(ctx, "reg-1", ""); ok {
			t.Fatal("found a stale agent")
		}
		if got, _ := m.Locate(ctx, "p1"); len(got) != 0 {
			t.Fatalf("located stale entries %+v", got)
		}
	})
}
