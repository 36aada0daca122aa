package server_test

import (
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/internal/testclient"
	"github.com/machineservice/machineservice/wire"
)

// ignored is a message of a type the server ignores, padded to about n
// bytes of JSON.
func ignored(n int) *wire.Envelope {
	env := testclient.Message("padding", "server", nil)
	env.Payload = testclient.RawJSON(strings.Repeat("x", n))
	return env
}

func TestPreAuthBudget(t *testing.T) {
	const budget = 4000
	e := start(t, withConfig(func(c *config.Config) { c.MaxBytesBeforeAuth = budget }))
	tests := []struct {
		name string
		role string
		send func(c *testclient.Conn)
	}{
		{"first message too large on portal", "/portal", func(c *testclient.Conn) {
			c.Send(ignored(budget + 100))
		}},
		{"first message too large on agent", "/agent", func(c *testclient.Conn) {
			c.Send(ignored(budget + 100))
		}},
		{"small messages on portal", "/portal", func(c *testclient.Conn) {
			for range 2 * budget / 500 {
				c.Send(ignored(500))
			}
		}},
		{"small binary frames on agent", "/agent", func(c *testclient.Conn) {
			// Binary frames are ignored unread but count all the same.
			for range 2 * budget / 500 {
				if c.WS.WriteMessage(websocket.BinaryMessage, make([]byte, 500)) != nil {
					return // the server has closed; ExpectClose reads why
				}
			}
		}},
		{"ping frames", "/agent", func(c *testclient.Conn) {
			payload := []byte(strings.Repeat("p", 125))
			for range 2 * budget / len(payload) {
				if err := c.WS.WriteControl(websocket.PingMessage, payload, time.Now().Add(time.Second)); err != nil {
					return // the server has closed; ExpectClose reads why
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c *testclient.Conn
			if tt.role == "/agent" {
				c = e.agentT(t, 1)
			} else {
				c = e.portalT(t)
			}
			tt.send(c)
			c.ExpectClose(websocket.ClosePolicyViolation, wire.TextTooMuchDataBeforeAuth)
		})
	}
	t.Run("within budget", func(t *testing.T) {
		p := e.portalT(t)
		for range budget / 500 / 2 {
			p.Send(ignored(500))
		}
		if res := p.AuthPortal(portalA, false); !res.Accepted {
			t.Fatal("auth within the budget refused")
		}
		// After auth the budget no longer applies.
		for range 2 * budget / 500 {
			p.Send(ignored(500))
		}
		ping(t, p)
	})
	if got := e.closes("pre_auth_budget"); got != int64(len(tests)) {
		t.Fatalf("%d closes counted as pre_auth_budget, want %d", got, len(tests))
	}
}

func TestMessageTooLarge(t *testing.T) {
	const limit = 8 << 10
	e := start(t, withConfig(func(c *config.Config) { c.MaxMessageSize = limit }))
	t.Run("portal", func(t *testing.T) {
		p := e.authedPortalT(t, portalA, false)
		p.Send(ignored(limit - 200)) // just under: ignored
		ping(t, p)
		p.Send(ignored(limit + 10))
		p.ExpectClose(websocket.CloseMessageTooBig, wire.TextMessageTooLarge)
	})
	t.Run("agent", func(t *testing.T) {
		a := e.authedAgentT(t, 1, agentA1)
		a.Send(ignored(limit + 10))
		a.ExpectClose(websocket.CloseMessageTooBig, wire.TextMessageTooLarge)
	})
}

func TestAuthTimeout(t *testing.T) {
	e := start(t, withConfig(func(c *config.Config) { c.AuthTimeout = 300 * time.Millisecond }))
	t.Run("silent", func(t *testing.T) {
		p := e.portalT(t)
		p.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationTimeout)
	})
	// A client that keeps sending, but never authenticates, is closed
	// all the same: only the auth message lifts the deadline.
	t.Run("chatty", func(t *testing.T) {
		p := e.portalT(t)
		env := ignored(10)
		env.From = p.ClientID
		frame := p.Encode(env)
		a := p // a portal's ignored messages cost nothing, so it may chat
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				select {
				case <-stop:
					return
				case <-time.After(50 * time.Millisecond):
				}
				if a.WS.WriteMessage(websocket.TextMessage, frame) != nil {
					return
				}
			}
		}()
		a.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationTimeout)
		close(stop)
		<-done
	})
	t.Run("authenticated in time", func(t *testing.T) {
		witness := e.portalT(t) // opened with a and p, never authenticates
		a := e.authedAgentT(t, 1, agentA1)
		p := e.authedPortalT(t, portalA, false)
		witness.ExpectClose(websocket.ClosePolicyViolation, wire.TextAuthenticationTimeout)
		// The auth deadline of a and p has passed too.
		ping(t, a)
		ping(t, p)
	})
}

// pinger reads a connection in the background, counting the server's
// WebSocket pings and answering them unless mute, and hands on the
// messages it reads.
type pinger struct {
	c     *testclient.Conn
	pings atomic.Int32
	msgs  chan wire.Envelope
	err   chan error
}

func newPinger(c *testclient.Conn, mute bool) *pinger {
	p := &pinger{c: c, msgs: make(chan wire.Envelope, 16), err: make(chan error, 1)}
	c.WS.SetPingHandler(func(data string) error {
		p.pings.Add(1)
		if mute {
			return nil
		}
		err := c.WS.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
		if errors.Is(err, websocket.ErrCloseSent) {
			return nil
		}
		return err
	})
	go func() {
		for {
			_ = c.WS.SetReadDeadline(time.Now().Add(testclient.Timeout))
			mt, data, err := c.WS.ReadMessage()
			if err != nil {
				p.err <- err
				close(p.msgs)
				return
			}
			if mt != websocket.TextMessage {
				continue
			}
			var env wire.Envelope
			if c.Role == wire.ClientTypeAgent {
				env, err = wire.OpenEnvelope(data, c.Key)
			} else {
				env, err = wire.DecodeEnvelope(data)
			}
			if err != nil {
				p.err <- err
				close(p.msgs)
				return
			}
			p.msgs <- env
		}
	}()
	return p
}

// next returns the next message, failing on a close or a timeout.
func (p *pinger) next(t *testing.T) wire.Envelope {
	t.Helper()
	select {
	case env, ok := <-p.msgs:
		if !ok {
			t.Fatalf("connection ended: %v", <-p.err)
		}
		return env
	case <-time.After(testclient.Timeout):
		t.Fatal("no message")
	}
	return wire.Envelope{}
}

// closed waits for the end of the connection and returns the close error.
func (p *pinger) closed(t *testing.T) error {
	t.Helper()
	for {
		select {
		case env, ok := <-p.msgs:
			if !ok {
				return <-p.err
			}
			t.Logf("message before the close: %s", env.Type)
		case <-time.After(testclient.Timeout + time.Second):
			t.Fatal("the connection was not closed")
		}
	}
}

func TestIdle(t *testing.T) {
	const interval = 250 * time.Millisecond
	e := start(t, withConfig(func(c *config.Config) { c.PingInterval = interval }))
	for _, role := range []string{"agent", "portal"} {
		dial := func(t *testing.T) *testclient.Conn {
			if role == "agent" {
				return e.authedAgentT(t, 1, agentA1)
			}
			return e.authedPortalT(t, portalB, false)
		}
		t.Run(role+" that stops answering is closed", func(t *testing.T) {
			t.Parallel()
			c := dial(t)
			began := time.Now()
			p := newPinger(c, true)
			err := p.closed(t)
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.CloseGoingAway || ce.Text != wire.TextIdleTimeout {
				t.Fatalf("closed with %v, want %d %q", err, websocket.CloseGoingAway, wire.TextIdleTimeout)
			}
			if p.pings.Load() == 0 {
				t.Fatal("the server sent no ping")
			}
			// Two intervals of silence, and some slack for a loaded
			// machine: far less than the test client's 10 s timeout.
			if d := time.Since(began); d > 12*interval {
				t.Fatalf("closed after %v, want about %v", d, 2*interval)
			}
		})
		t.Run(role+" that answers stays", func(t *testing.T) {
			t.Parallel()
			c := dial(t)
			p := newPinger(c, false)
			waitFor(t, "four pings", func() bool { return p.pings.Load() >= 4 })
			c.Send(testclient.Message(wire.TypePing, "server", nil))
			for {
				env := p.next(t)
				if env.Type == wire.TypePong {
					break
				}
				if env.Type != wire.TypeList {
					t.Fatalf("got %s", env.Type)
				}
			}
		})
	}
	// The listed agent of a dead connection disappears with it.
	t.Run("half-open agent leaves the list", func(t *testing.T) {
		t.Parallel()
		portal := e.authedPortalT(t, portalA, false)
		pp := newPinger(portal, false)
		a := e.authedAgentT(t, 2, agentA2)
		newPinger(a, true)
		listed := false
		for {
			env := pp.next(t)
			if env.Type != wire.TypeList {
				continue
			}
			var l []wire.ClientRegistration
			if err := env.DecodePayload(&l); err != nil {
				t.Fatal(err)
			}
			ids := []string{}
			for _, r := range l {
				ids = append(ids, r.ClientID)
			}
			if slices.Contains(ids, a.ClientID) {
				listed = true
			} else if listed {
				break // pushed when the silent agent was closed
			}
		}
	})
}

// TestSlowConsumer floods a portal that does not read with command answers
// from an agent: the portal is cut, the agent is not held up and stays
// connected, and other portals keep getting its messages.
func TestSlowConsumer(t *testing.T) {
	t.Parallel()
	e := start(t, withConfig(func(c *config.Config) {
		c.SendQueueLength = 4
		c.WriteTimeout = 5 * time.Second
	}))
	a := e.authedAgentT(t, 1, agentA1)
	slow := e.authedPortalT(t, portalA, false)
	other := e.authedPortalT(t, portalA, false)
	op := newPinger(other, false)

	body := strings.Repeat("A", 256<<10)
	answer := map[string]any{"statusCode": 200, "body": body}
	sent := 0
	for e.closes("slow_consumer") == 0 {
		if sent == 400 { // 100 MiB: far more than any socket buffers
			t.Fatal("the portal that does not read was never cut")
		}
		a.Send(command(slow.ClientID, answer))
		sent++
	}
	t.Logf("portal cut after %d messages of %d KiB", sent, len(body)>>10)

	// The agent is connected and working.
	ping(t, a)
	cmd := command(other.ClientID, map[string]int{"statusCode": 204})
	a.Send(cmd)
	for {
		env := op.next(t)
		if env.Type == wire.TypeCommand {
			if env.MessageID != cmd.MessageID || env.From != a.ClientID {
				t.Fatalf("other portal got %+v", env)
			}
			break
		}
	}
	// The slow portal's connection is gone: reading it ends in an error
	// after what was buffered.
	_ = slow.WS.SetReadDeadline(time.Now().Add(testclient.Timeout))
	for {
		if _, _, err := slow.WS.ReadMessage(); err != nil {
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the slow portal's connection is still open")
			}
			break
		}
	}
	// And it is no longer a relay target.
	before := e.stats.Get(stats.CommandRelayDestinationNotAvailable)
	a.Send(command(slow.ClientID, answer))
	ping(t, a)
	if got := e.stats.Get(stats.CommandRelayDestinationNotAvailable); got != before+1 {
		t.Fatalf("CommandRelayDestinationNotAvailable = %d, want %d", got, before+1)
	}
}

// TestWriteDeadline stalls a portal that does not read, with a send queue
// long enough never to fill: the write deadline cuts it.
func TestWriteDeadline(t *testing.T) {
	t.Parallel()
	e := start(t, withConfig(func(c *config.Config) {
		c.SendQueueLength = 1000
		c.WriteTimeout = 300 * time.Millisecond
	}))
	a := e.authedAgentT(t, 1, agentA1)
	stuck := e.authedPortalT(t, portalA, false)
	answer := map[string]any{"statusCode": 200, "body": strings.Repeat("B", 256<<10)}
	for sent := 0; e.closes("write_failed") == 0; sent++ {
		if sent == 400 { // 100 MiB: far more than any socket buffers
			t.Fatal("the stalled portal was never cut")
		}
		a.Send(command(stuck.ClientID, answer))
	}
	if got := e.closes("slow_consumer"); got != 0 {
		t.Fatalf("%d slow_consumer closes; the queue should not have filled", got)
	}
	ping(t, a)
}
