package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/wire"
)

// Relay hands env, sent by from, to the instance instanceID, which
// delivers it to its client env.To and answers what it did.
func (b *NATS) Relay(ctx context.Context, instanceID string, env *wire.Envelope, from Sender) (RelayResult, error) {
	style, _ := env.PayloadStyle()
	raw, err := env.Marshal(style)
	if err != nil {
		return RelayUnavailable, fmt.Errorf("encode relayed message: %w", err)
	}
	var r relayReply
	if err := b.request(ctx, b.subj.instance(instanceID, "relay"), b.o.RelayTimeout, relayRequest{Envelope: raw, Sender: from}, &r); err != nil {
		return RelayUnavailable, err
	}
	switch r.Result {
	case RelayOK, RelayDenied, RelayUnavailable:
		return r.Result, nil
	}
	return RelayUnavailable, fmt.Errorf("%w: unknown relay result %q", ErrBadReply, r.Result)
}

// Control forwards a control request to the instance instanceID, which
// holds the agent, and returns its answer.
func (b *NATS) Control(ctx context.Context, instanceID string, req ControlRequest) (ControlResponse, error) {
	var r ControlResponse
	err := b.request(ctx, b.subj.instance(instanceID, "control"), b.o.ControlDeadline, req, &r)
	return r, err
}

// ListChanged tells every instance that the agents of an organization
// changed, so they push a fresh list to their portals.
func (b *NATS) ListChanged(_ context.Context, organizationID string) error {
	b.mu.Lock()
	self := b.instanceID
	b.mu.Unlock()
	return b.publish(b.subj.list, ListChanged{OrganizationID: organizationID, InstanceID: self})
}

// Attach serves inst on the bus: control requests from the controller (in
// the queue group of all instances), and the relays, control requests and
// list changes other instances send it.
func (b *NATS) Attach(inst Instance) error {
	id := inst.InstanceID()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	b.instanceID = id
	b.mu.Unlock()
	return b.subscribe([]subscription{
		{b.subj.control, queueInstances, b.controlHandler(inst.RouteControl)},
		{b.subj.instance(id, "control"), "", b.controlHandler(inst.Control)},
		{b.subj.instance(id, "relay"), "", b.relayHandler(inst)},
		{b.subj.list, "", b.listHandler(id, inst)},
	})
}

type subscription struct {
	subject, queue string
	handler        nats.MsgHandler
}

func (b *NATS) subscribe(list []subscription) error {
	_, err := b.subscribeAll(list)
	return err
}

// subscribeAll makes every subscription of list, or none.
func (b *NATS) subscribeAll(list []subscription) ([]*nats.Subscription, error) {
	subs := make([]*nats.Subscription, 0, len(list))
	for _, s := range list {
		sub, err := b.nc.QueueSubscribe(s.subject, s.queue, s.handler)
		if err != nil {
			for _, done := range subs {
				_ = done.Unsubscribe() // best effort: the first error is the one to report
			}
			return nil, fmt.Errorf("subscribe to %s: %w", s.subject, err)
		}
		subs = append(subs, sub)
	}
	b.flushSubscriptions()
	return subs, nil
}

// flushSubscriptions waits until the NATS server knows the subscriptions
// just made, so requests sent from elsewhere right after find them. When
// not connected they are sent on connecting.
func (b *NATS) flushSubscriptions() {
	if !b.nc.IsConnected() {
		return
	}
	if err := b.nc.FlushTimeout(5 * time.Second); err != nil {
		b.log.Warn("flushing subscriptions to NATS failed", "err", err)
	}
}

// controlHandler answers control requests with handle, each in its own
// goroutine: one may wait for an agent for the control timeout.
func (b *NATS) controlHandler(handle func(context.Context, ControlRequest) (ControlResponse, error)) nats.MsgHandler {
	return func(m *nats.Msg) {
		var req ControlRequest
		err := json.Unmarshal(m.Data, &req)
		if err == nil && req.AgentID == "" {
			err = errors.New("no agentId")
		}
		if err != nil {
			b.log.Warn("invalid control request", "subject", m.Subject, "err", err)
			b.respond(m, ControlResponse{AgentID: req.AgentID, OrganizationID: req.OrganizationID,
				Message: "Invalid control request: " + err.Error()})
			return
		}
		ok, busy := b.startHandler()
		if !ok {
			msg := wire.TextShuttingDown
			if busy {
				msg = "Too many control requests in progress"
			}
			b.log.Warn("control request refused", "agent", req.AgentID, "org", req.OrganizationID, "reason", msg)
			b.respond(m, ControlResponse{AgentID: req.AgentID, OrganizationID: req.OrganizationID, Message: msg})
			return
		}
		go func() {
			defer b.endHandler()
			ctx, cancel := context.WithTimeout(b.ctx, b.o.ControlDeadline)
			defer cancel()
			resp, err := handle(ctx, req)
			lvl := slog.LevelDebug
			if err != nil {
				lvl = slog.LevelInfo
			}
			b.log.Log(ctx, lvl, "control request handled", "subject", m.Subject, "agent", req.AgentID,
				"org", req.OrganizationID, "command", req.Command, "success", resp.Success, "message", resp.Message, "err", err)
			b.respond(m, resp)
		}()
	}
}

// relayHandler delivers messages other instances relay to this one. It
// runs on the subscription's goroutine, so messages keep their order.
func (b *NATS) relayHandler(inst Instance) nats.MsgHandler {
	return func(m *nats.Msg) {
		res := RelayUnavailable
		var req relayRequest
		if err := json.Unmarshal(m.Data, &req); err != nil {
			b.log.Warn("invalid relay request", "subject", m.Subject, "err", err)
		} else if env, err := wire.DecodeEnvelope(req.Envelope); err != nil {
			b.log.Warn("invalid relayed envelope", "subject", m.Subject, "from", req.Sender.ClientID, "err", err)
		} else {
			res = inst.DeliverRemote(&env, req.Sender)
		}
		b.respond(m, relayReply{Result: res})
	}
}

func (b *NATS) listHandler(self string, inst Instance) nats.MsgHandler {
	return func(m *nats.Msg) {
		var ev ListChanged
		if err := json.Unmarshal(m.Data, &ev); err != nil || ev.OrganizationID == "" {
			b.log.Warn("invalid list event", "subject", m.Subject, "err", err, "data", string(m.Data))
			return
		}
		if ev.InstanceID == self {
			return // its portals were told when it published
		}
		inst.PushList(ev.OrganizationID)
	}
}

// respond answers a request with v as JSON. A request sent without a
// reply subject cannot be answered; that is logged.
func (b *NATS) respond(m *nats.Msg, v any) {
	if m.Reply == "" {
		b.log.Warn("request without a reply subject; the answer is dropped", "subject", m.Subject)
		return
	}
	data, err := json.Marshal(v)
	if err != nil {
		b.log.Error("encoding a reply failed", "subject", m.Subject, "err", err)
		return
	}
	if err := m.Respond(data); err != nil {
		b.log.Warn("replying failed", "subject", m.Subject, "err", err)
	}
}
