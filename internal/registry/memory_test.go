package registry_test

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/testclock"
	"github.com/machineservice/machineservice/wire"
)

const (
	orgC = "33333333-3333-3333-3333-333333333333"
)

var epoch = time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)

const timeout = 5 * time.Minute

func newMemory(t *testing.T) (*registry.Memory, *testclock.Clock) {
	t.Helper()
	clk := testclock.New(epoch)
	return registry.NewMemory(timeout, clk.Now), clk
}

func agent(id, org, conn string) registry.Client {
	return registry.Client{
		ClientID:              id,
		OrganizationID:        org,
		Type:                  wire.ClientTypeAgent,
		ConnectionID:          conn,
		InstanceID:            "instance-1",
		ClientVersion:         "2.1.0",
		MachineRegistrationID: "reg-" + id,
		ClientIP:              "127.0.0.1",
	}
}

func portal(id, org, conn string) registry.Client {
	c := agent(id, org, conn)
	c.Type = wire.ClientTypePortal
	c.MachineRegistrationID = ""
	return c
}

func register(t *testing.T, m *registry.Memory, cs ...registry.Client) {
	t.Helper()
	for _, c := range cs {
		if err := m.Register(context.Background(), c); err != nil {
			t.Fatalf("Register(%s): %v", c.ClientID, err)
		}
	}
}

// memListed returns the client ids Agents lists for orgs.
func memListed(t *testing.T, m *registry.Memory, orgs ...string) []string {
	t.Helper()
	cs, err := m.Agents(context.Background(), orgs)
	if err != nil {
		t.Fatalf("Agents(%v): %v", orgs, err)
	}
	ids := make([]string, 0, len(cs))
	for _, c := range cs {
		ids = append(ids, c.OrganizationID[:1]+"/"+c.ClientID)
	}
	return ids
}

func lookup(t *testing.T, m *registry.Memory, id string, orgs ...string) (registry.Client, bool) {
	t.Helper()
	c, ok, err := m.Lookup(context.Background(), id, orgs)
	if err != nil {
		t.Fatalf("Lookup(%s): %v", id, err)
	}
	return c, ok
}

func TestMemoryRegisterKeepsFirstSeen(t *testing.T) {
	m, clk := newMemory(t)
	c := agent("a1", orgA, "conn-1")
	c.FirstSeen = epoch.Add(-time.Hour) // the registry keeps its own times
	register(t, m, c)

	got, ok := lookup(t, m, "a1", orgA)
	if !ok {
		t.Fatal("a1 not found after Register")
	}
	want := agent("a1", orgA, "conn-1")
	want.FirstSeen, want.LastUpdated = epoch, epoch
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Lookup = %+v\nwant     %+v", got, want)
	}

	clk.Advance(time.Minute)
	again := agent("a1", orgA, "conn-2")
	again.ClientVersion = "2.2.0"
	register(t, m, again)
	got, _ = lookup(t, m, "a1", orgA)
	if !got.FirstSeen.Equal(epoch) {
		t.Errorf("FirstSeen after the second Register = %v, want the first %v", got.FirstSeen, epoch)
	}
	if !got.LastUpdated.Equal(epoch.Add(time.Minute)) || got.ConnectionID != "conn-2" || got.ClientVersion != "2.2.0" {
		t.Errorf("the second Register did not replace the entry: %+v", got)
	}

	// The same client id in another organization is another entry.
	register(t, m, agent("a1", orgB, "conn-3"))
	if got, _ := lookup(t, m, "a1", orgB); !got.FirstSeen.Equal(epoch.Add(time.Minute)) {
		t.Errorf("orgB entry FirstSeen = %v, want its own registration time", got.FirstSeen)
	}
	if got, _ := lookup(t, m, "a1", orgA); got.ConnectionID != "conn-2" {
		t.Errorf("registering in orgB changed the orgA entry: %+v", got)
	}
}

func TestMemoryTouch(t *testing.T) {
	ctx := context.Background()
	m, clk := newMemory(t)
	register(t, m, agent("a1", orgA, "conn-1"))

	clk.Advance(4 * time.Minute)
	if err := m.Touch(ctx, "a1", orgA, "conn-old"); err != nil {
		t.Fatal(err)
	}
	if got, _ := lookup(t, m, "a1", orgA); !got.LastUpdated.Equal(epoch) {
		t.Errorf("Touch by another connection refreshed the entry: LastUpdated = %v", got.LastUpdated)
	}
	if err := m.Touch(ctx, "a1", orgB, "conn-1"); err != nil {
		t.Fatal(err)
	}
	if err := m.Touch(ctx, "a1", orgA, "conn-1"); err != nil {
		t.Fatal(err)
	}
	got, _ := lookup(t, m, "a1", orgA)
	if !got.LastUpdated.Equal(epoch.Add(4*time.Minute)) || !got.FirstSeen.Equal(epoch) {
		t.Errorf("after Touch: FirstSeen %v, LastUpdated %v; want %v, %v", got.FirstSeen, got.LastUpdated, epoch, epoch.Add(4*time.Minute))
	}
	if _, ok := lookup(t, m, "a1", orgB); ok {
		t.Error("Touch in orgB created an entry")
	}

	// Touched entries outlive the timeout from their registration.
	clk.Advance(4 * time.Minute)
	if ids := memListed(t, m, orgA); !reflect.DeepEqual(ids, []string{"1/a1"}) {
		t.Errorf("Agents 8 min after Register, 4 after Touch = %v, want [1/a1]", ids)
	}
	if err := m.Touch(ctx, "unknown", orgA, "conn-1"); err != nil {
		t.Errorf("Touch of an unknown client: %v", err)
	}
}

func TestMemoryUnregister(t *testing.T) {
	ctx := context.Background()
	m, _ := newMemory(t)
	register(t, m, agent("a1", orgA, "conn-old"))
	// The client reconnects; the new connection's entry replaces the old.
	register(t, m, agent("a1", orgA, "conn-new"))

	// The old connection closes afterwards: its Unregister must not
	// remove the new connection's entry.
	if err := m.Unregister(ctx, "a1", orgA, "conn-old"); err != nil {
		t.Fatal(err)
	}
	got, ok := lookup(t, m, "a1", orgA)
	if !ok || got.ConnectionID != "conn-new" {
		t.Fatalf("after the old connection's Unregister: %+v, %v; want the new connection's entry", got, ok)
	}
	if err := m.Unregister(ctx, "a1", orgB, "conn-new"); err != nil {
		t.Fatal(err)
	}
	if _, ok := lookup(t, m, "a1", orgA); !ok {
		t.Fatal("Unregister in another organization removed the entry")
	}
	if err := m.Unregister(ctx, "a1", orgA, "conn-new"); err != nil {
		t.Fatal(err)
	}
	if _, ok := lookup(t, m, "a1", orgA); ok {
		t.Error("entry still there after its connection's Unregister")
	}
	if ids := memListed(t, m, orgA); len(ids) != 0 {
		t.Errorf("Agents after Unregister = %v", ids)
	}
	if err := m.Unregister(ctx, "a1", orgA, "conn-new"); err != nil {
		t.Errorf("a second Unregister: %v", err)
	}
}

func TestMemoryTimeout(t *testing.T) {
	m, clk := newMemory(t)
	register(t, m, agent("old", orgA, "c1"))
	clk.Advance(2 * time.Minute)
	register(t, m, agent("new", orgA, "c2"), portal("p", orgA, "c3"))

	clk.Advance(timeout - 2*time.Minute - time.Second)
	if ids := memListed(t, m, orgA); !reflect.DeepEqual(ids, []string{"1/new", "1/old"}) {
		t.Errorf("just before the timeout: Agents = %v, want [1/new 1/old]", ids)
	}
	clk.Advance(time.Second)
	if ids := memListed(t, m, orgA); !reflect.DeepEqual(ids, []string{"1/new"}) {
		t.Errorf("at the timeout of old: Agents = %v, want [1/new]", ids)
	}
	if _, ok := lookup(t, m, "old", orgA); ok {
		t.Error("Lookup finds an entry older than the timeout")
	}
	if _, ok := lookup(t, m, "p", orgA); !ok {
		t.Error("Lookup does not find a fresh portal")
	}
	clk.Advance(2 * time.Minute)
	if ids := memListed(t, m, orgA); len(ids) != 0 {
		t.Errorf("after every timeout: Agents = %v", ids)
	}
	if _, ok := lookup(t, m, "p", orgA); ok {
		t.Error("Lookup finds a portal older than the timeout")
	}
	// A new Register makes it fresh again.
	register(t, m, agent("old", orgA, "c4"))
	if ids := memListed(t, m, orgA); !reflect.DeepEqual(ids, []string{"1/old"}) {
		t.Errorf("after registering again: Agents = %v", ids)
	}
}

func TestMemoryDefaultTimeout(t *testing.T) {
	clk := testclock.New(epoch)
	m := registry.NewMemory(0, clk.Now)
	register(t, m, agent("a1", orgA, "c1"))
	clk.Advance(registry.DefaultClientTimeout - time.Second)
	if ids := memListed(t, m, orgA); len(ids) != 1 {
		t.Errorf("within DefaultClientTimeout: Agents = %v", ids)
	}
	clk.Advance(time.Second)
	if ids := memListed(t, m, orgA); len(ids) != 0 {
		t.Errorf("after DefaultClientTimeout: Agents = %v", ids)
	}
}

func TestMemoryAgentsFilter(t *testing.T) {
	m, _ := newMemory(t)
	register(t, m,
		agent("b2", orgB, "c1"),
		agent("a2", orgA, "c2"),
		portal("pa", orgA, "c3"),
		agent("a1", orgA, "c4"),
		agent("c1", orgC, "c5"),
		agent("b1", orgB, "c6"),
		portal("pb", orgB, "c7"),
	)
	tests := []struct {
		orgs []string
		want []string
	}{
		{[]string{orgA}, []string{"1/a1", "1/a2"}},
		{[]string{orgB}, []string{"2/b1", "2/b2"}},
		{[]string{orgB, orgA}, []string{"1/a1", "1/a2", "2/b1", "2/b2"}},
		{[]string{orgA, orgA}, []string{"1/a1", "1/a2"}},
		{[]string{orgA, orgB, orgC}, []string{"1/a1", "1/a2", "2/b1", "2/b2", "3/c1"}},
		{[]string{"44444444-4444-4444-4444-444444444444"}, []string{}},
		{nil, []string{}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(len(tt.orgs), tt.orgs), func(t *testing.T) {
			if got := memListed(t, m, tt.orgs...); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Agents = %v, want %v", got, tt.want)
			}
		})
	}

	// Lookup searches every organization given, and only those.
	if c, ok := lookup(t, m, "b1", orgA, orgB); !ok || c.OrganizationID != orgB {
		t.Errorf("Lookup(b1, orgA+orgB) = %+v, %v", c, ok)
	}
	if _, ok := lookup(t, m, "b1", orgA, orgC); ok {
		t.Error("Lookup(b1) outside orgB found it")
	}
	if c, ok := lookup(t, m, "pa", orgA); !ok || c.Type != wire.ClientTypePortal {
		t.Errorf("Lookup(pa) = %+v, %v; want the portal", c, ok)
	}
}

func TestMemoryRegistration(t *testing.T) {
	c := agent("a1", orgA, "c1")
	c.MachineServerURI = "wss://relay.example/agent"
	c.LastUpdated = time.Date(2030, 1, 2, 3, 4, 5, 0, time.FixedZone("x", 3600))
	r := c.Registration()
	want := wire.ClientRegistration{
		ClientID:              "a1",
		ClientVersion:         "2.1.0",
		OrganizationID:        orgA,
		MachineRegistrationID: "reg-a1",
		MachineServerURI:      "wss://relay.example/agent",
		Type:                  wire.ClientTypeAgent,
		LastUpdated:           time.Date(2030, 1, 2, 2, 4, 5, 0, time.UTC),
		GatewayID:             "instance-1",
		LastUpdatedOn:         time.Date(2030, 1, 2, 2, 4, 5, 0, time.UTC),
	}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("Registration = %+v\nwant %+v", r, want)
	}
}

// TestMemoryConcurrent runs every method from many goroutines; run it
// with -race.
func TestMemoryConcurrent(t *testing.T) {
	ctx := context.Background()
	m, clk := newMemory(t)
	const workers, rounds = 8, 200
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("agent-%d", w)
			for i := range rounds {
				conn := fmt.Sprintf("conn-%d-%d", w, i)
				c := agent(id, orgA, conn)
				if err := m.Register(ctx, c); err != nil {
					errs <- err
					return
				}
				if err := m.Touch(ctx, id, orgA, conn); err != nil {
					errs <- err
					return
				}
				if _, err := m.Agents(ctx, []string{orgA, orgB}); err != nil {
					errs <- err
					return
				}
				if _, _, err := m.Lookup(ctx, id, []string{orgA}); err != nil {
					errs <- err
					return
				}
				if i%2 == 1 {
					if err := m.Unregister(ctx, id, orgA, conn); err != nil {
						errs <- err
						return
					}
				}
				clk.Advance(time.Millisecond)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Every worker ended with a Register followed by its Unregister.
	if ids := memListed(t, m, orgA); len(ids) != 0 {
		t.Errorf("Agents after every worker unregistered = %v", ids)
	}
	for w := range workers {
		register(t, m, agent(fmt.Sprintf("agent-%d", w), orgA, "final"))
	}
	if ids := memListed(t, m, orgA); len(ids) != workers {
		t.Errorf("Agents = %v, want %d entries", ids, workers)
	}
}
