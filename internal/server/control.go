package server

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/metrics"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// MaxControlAge is how old a control request may be when it arrives.
const MaxControlAge = 5 * time.Minute

type controlAnswer struct {
	res wire.ControlResponse
	err error
}

type pendingKey struct {
	c         *conn
	messageID string
}

// pendingControls correlates control requests sent to agents with their
// answers, by connection and message id.
type pendingControls struct {
	mu      sync.Mutex
	waiting map[pendingKey]chan controlAnswer
}

func (p *pendingControls) init() { p.waiting = map[pendingKey]chan controlAnswer{} }

func (p *pendingControls) add(c *conn, messageID string) chan controlAnswer {
	ch := make(chan controlAnswer, 1)
	p.mu.Lock()
	p.waiting[pendingKey{c, messageID}] = ch
	p.mu.Unlock()
	return ch
}

// take removes and returns the waiter for an answer, or nil.
func (p *pendingControls) take(c *conn, messageID string) chan controlAnswer {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := pendingKey{c, messageID}
	ch := p.waiting[k]
	delete(p.waiting, k)
	return ch
}

// dropConn fails every request waiting on c.
func (p *pendingControls) dropConn(c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, ch := range p.waiting {
		if k.c == c {
			ch <- controlAnswer{err: ErrClosed}
			delete(p.waiting, k)
		}
	}
}

// Control sends a control request to the agent with the registered agent
// id req.AgentID, if this instance holds it, and waits for its answer.
// The answer always describes the outcome; the error tells callers which
// of ErrNotConnected, ErrControlStale, ErrControlTimeout or ErrClosed
// happened.
func (s *Server) Control(ctx context.Context, req bus.ControlRequest) (bus.ControlResponse, error) {
	resp := bus.ControlResponse{AgentID: req.AgentID, OrganizationID: req.OrganizationID}
	if !req.SentTime.IsZero() && s.now().Sub(req.SentTime) > MaxControlAge {
		s.stats.Inc(stats.ControlRelayStaleMessage)
		resp.Message = wire.TextControlRequestExpired
		return resp, ErrControlStale
	}
	c := s.hub.agent(req.AgentID, req.OrganizationID)
	if c == nil {
		s.stats.Inc(stats.ControlRelayDestinationNotAvailable)
		resp.Message = wire.TextDestinationNotConnected
		return resp, ErrNotConnected
	}
	id := c.identity()
	s.stats.Inc(stats.ControlRelayInitiated)
	env := &wire.Envelope{From: s.cfg.InstanceID, To: id.clientID, Type: wire.TypeControl, MessageID: uuid.NewString()}
	params := req.Settings
	if params == nil {
		params = map[string]*string{}
	}
	_ = env.SetPayload(wire.ControlRequest{Command: req.Command, Parameters: params})
	wait := s.pending.add(c, env.MessageID)
	if !c.send(env) {
		s.pending.take(c, env.MessageID)
		s.stats.Inc(stats.ControlRelayFailure)
		resp.Message = "Failed to send message to client: connection closed"
		return resp, ErrClosed
	}
	sent := time.Now()
	timer := time.NewTimer(s.cfg.ControlTimeout)
	defer timer.Stop()
	select {
	case a := <-wait:
		if a.err != nil {
			s.stats.Inc(stats.ControlRelayFailure)
			resp.Message = fmt.Sprintf("Failed to send message to client: %v", a.err)
			return resp, a.err
		}
		s.stats.Inc(stats.ControlRelaySuccess)
		s.metrics.ObserveRelay(metrics.KindControl, time.Since(sent))
		resp.Success = a.res.Success
		resp.Settings = a.res.Output
		if a.res.ErrorMessage != nil {
			resp.Message = *a.res.ErrorMessage
		}
		return resp, nil
	case <-timer.C:
		s.pending.take(c, env.MessageID)
		s.stats.Inc(stats.ControlRelayFailure)
		resp.Message = wire.TextControlTimeout
		return resp, ErrControlTimeout
	case <-ctx.Done():
		s.pending.take(c, env.MessageID)
		s.stats.Inc(stats.ControlRelayFailure)
		resp.Message = wire.TextControlTimeout
		return resp, fmt.Errorf("%w: %v", ErrControlTimeout, ctx.Err())
	}
}
