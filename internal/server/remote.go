package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// controlForwardMargin is how much longer than the control timeout a
// control request forwarded to another instance may take.
const controlForwardMargin = 5 * time.Second

// Remote reaches the other instances, through the message bus. The
// registry tells which instance holds a client.
type Remote interface {
	// Relay hands env, sent by from, to instance instanceID, which
	// delivers it with the same organization checks as a local relay.
	Relay(ctx context.Context, instanceID string, env *wire.Envelope, from bus.Sender) (bus.RelayResult, error)
	// Control forwards a control request to the instance that holds the
	// agent.
	Control(ctx context.Context, instanceID string, req bus.ControlRequest) (bus.ControlResponse, error)
	// ListChanged tells every instance that an organization's agents
	// changed.
	ListChanged(ctx context.Context, organizationID string) error
}

// relayRemote relays env to a client another instance holds, when the
// registry names one. It reports whether the relay was dealt with: sent,
// or denied (and the sender closed); false leaves the caller to answer
// that the destination is not available.
func (c *conn) relayRemote(env *wire.Envelope, id *identity) bool {
	s := c.srv
	if s.remote == nil {
		return false
	}
	entries, err := s.reg.Locate(s.ctx, env.To)
	if err != nil {
		s.stats.Inc(stats.RegistryFailure)
		c.logger().Warn("locating the relay destination failed", "to", env.To, "err", err)
		return false
	}
	instance := ""
	for _, e := range entries {
		if e.InstanceID == "" || e.InstanceID == s.cfg.InstanceID {
			continue // an entry of ours without a connection is stale
		}
		if instance == "" || slices.Contains(id.orgs, e.OrganizationID) {
			instance = e.InstanceID
		}
	}
	if instance == "" {
		return false
	}
	out := *env
	out.From = id.clientID
	res, err := s.remote.Relay(s.ctx, instance, &out, bus.Sender{
		ClientID:       id.clientID,
		OrganizationID: id.orgID,
		Organizations:  id.orgs,
		Role:           c.role,
		Impersonated:   id.impersonated,
	})
	if err != nil {
		c.logger().Info("relay to another instance failed", "to", env.To, "instance", instance, "err", err)
		return false
	}
	switch res {
	case bus.RelayOK:
		s.stats.Inc(stats.CommandRelaySuccess)
		return true
	case bus.RelayDenied:
		s.stats.Inc(stats.CommandRelayDenied)
		c.logger().Warn("relay to another organization denied", "to", env.To, "instance", instance)
		c.close(reasonAccessDenied)
		return true
	}
	return false
}

// DeliverRemote relays a message that a client of another instance sent
// to a client of this one, with the checks of a local relay: the sender's
// instance acts on the answer.
func (s *Server) DeliverRemote(env *wire.Envelope, from bus.Sender) bus.RelayResult {
	orgs := from.Organizations
	if len(orgs) == 0 {
		orgs = []string{from.OrganizationID}
	}
	id := &identity{role: from.Role, clientID: from.ClientID, orgID: from.OrganizationID, orgs: orgs, impersonated: from.Impersonated}
	log := s.log.With("from", from.ClientID, "from_org", from.OrganizationID, "to", env.To, "type", env.Type)
	if id.impersonated {
		log.Warn("relayed message from an impersonating portal denied")
		return bus.RelayDenied
	}
	target := s.hub.client(env.To, id)
	if target == nil {
		return bus.RelayUnavailable
	}
	tid := target.identity()
	if tid == nil {
		return bus.RelayUnavailable
	}
	if !mayReach(id, tid) {
		log.Warn("relayed message to another organization denied", "to_org", tid.orgID)
		return bus.RelayDenied
	}
	out := *env
	out.From = from.ClientID
	if !target.send(&out) {
		return bus.RelayUnavailable
	}
	return bus.RelayOK
}

// announceList tells the other instances that org's agents changed.
func (s *Server) announceList(org string) {
	if s.remote == nil {
		return
	}
	if err := s.remote.ListChanged(s.ctx, org); err != nil {
		s.log.Warn("announcing a list change failed", "org", org, "err", err)
	}
}

// RouteControl handles a control request from the controller: here when
// this instance holds the agent, else on the instance the registry names.
// Like Control, the answer describes the outcome and the error classifies
// it.
func (s *Server) RouteControl(ctx context.Context, req bus.ControlRequest) (bus.ControlResponse, error) {
	if s.remote == nil || s.controlStale(req) || s.hub.agent(req.AgentID, req.OrganizationID) != nil {
		return s.Control(ctx, req)
	}
	entry, ok, err := s.reg.LookupAgent(ctx, req.AgentID, req.OrganizationID)
	if err != nil {
		s.stats.Inc(stats.RegistryFailure)
		s.stats.Inc(stats.ControlRelayFailure)
		s.log.Warn("looking up the agent of a control request failed", "agent", req.AgentID, "org", req.OrganizationID, "err", err)
		// Another instance may hold the agent: not finding out is no
		// reason to answer that it is not connected.
		return bus.ControlResponse{AgentID: req.AgentID, OrganizationID: req.OrganizationID, Message: wire.TextRegistryUnavailable},
			fmt.Errorf("look up agent %s: %w", req.AgentID, err)
	}
	if !ok || entry.InstanceID == "" || entry.InstanceID == s.cfg.InstanceID {
		return s.Control(ctx, req) // answers that the agent is not connected
	}
	fctx, cancel := context.WithTimeout(ctx, s.cfg.ControlTimeout+controlForwardMargin)
	defer cancel()
	resp, err := s.remote.Control(fctx, entry.InstanceID, req)
	if err == nil {
		return resp, nil
	}
	resp = bus.ControlResponse{AgentID: req.AgentID, OrganizationID: req.OrganizationID}
	if errors.Is(err, bus.ErrNoResponders) {
		// The registry names an instance that is gone.
		s.stats.Inc(stats.ControlRelayDestinationNotAvailable)
		resp.Message = wire.TextDestinationNotConnected
		return resp, fmt.Errorf("%w: instance %s: %v", ErrNotConnected, entry.InstanceID, err)
	}
	s.stats.Inc(stats.ControlRelayFailure)
	resp.Message = fmt.Sprintf("Failed to send message to client: %v", err)
	return resp, fmt.Errorf("forward control to instance %s: %w", entry.InstanceID, err)
}

func (s *Server) controlStale(req bus.ControlRequest) bool {
	return !req.SentTime.IsZero() && s.now().Sub(req.SentTime) > MaxControlAge
}

var _ bus.Instance = (*Server)(nil)
