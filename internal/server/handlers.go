package server

import (
	"context"
	"crypto/rsa"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/machineservice/machineservice/internal/bus"
	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/internal/registry"
	"github.com/machineservice/machineservice/internal/stats"
	"github.com/machineservice/machineservice/wire"
)

// handleFrame decodes one text frame in the wrapping the connection's role
// calls for and dispatches it by type.
func (c *conn) handleFrame(data []byte) {
	id := c.identity()
	var env wire.Envelope
	var err error
	if c.role == wire.ClientTypeAgent {
		if id == nil && c.authPending.Load() {
			c.discardWhilePending()
			return
		}
		env, err = wire.OpenEnvelope(data, c.srv.key)
	} else {
		env, err = wire.DecodeEnvelope(data)
	}
	if err != nil {
		if errors.Is(err, wire.ErrNotJWE) {
			c.logger().Info("agent frame is not a JWE for the server key", "err", err)
			c.close(reasonNotEncrypted)
			return
		}
		c.logger().Info("malformed message", "err", err)
		c.close(reasonMalformed)
		return
	}
	if st, ok := env.PayloadStyle(); ok {
		c.embedded.Store(st == wire.StyleEmbedded)
	}
	// An expired connection may still authenticate again with a fresh
	// token; anything else gets the warning and the close.
	reauth := env.Type == wire.TypeAuth || env.Type == wire.TypeAuthPortal
	if id != nil && !reauth && !id.expires.IsZero() && !c.srv.now().Before(id.expires) {
		c.logger().Info("token expired", "expired", id.expires)
		c.send(&wire.Envelope{From: c.srv.cfg.InstanceID, To: id.clientID, Type: wire.TypeWarning,
			MessageID: uuid.NewString(), ErrorMessage: wire.TextTokenExpired})
		c.close(reasonTokenExpired)
		return
	}

	if id == nil && c.role == wire.ClientTypeAgent && env.Type != wire.TypeAuth && env.Type != wire.TypeAuthPortal && env.Type != wire.TypeList {
		// Each agent frame costs an RSA decryption: before authentication
		// only the auth message is worth one.
		c.logger().Info("agent message before authentication", "type", env.Type)
		c.close(reasonNotAuthenticated)
		return
	}
	switch env.Type {
	case wire.TypeAuth:
		if c.role != wire.ClientTypeAgent {
			c.close(reasonWrongStateForAuth)
			return
		}
		c.handleAgentAuth(&env)
	case wire.TypeAuthPortal:
		if c.role != wire.ClientTypePortal {
			c.close(reasonWrongStateForAuth)
			return
		}
		c.handlePortalAuth(&env)
	case wire.TypeList:
		c.handleList(&env, id)
	case wire.TypeCommand:
		c.handleRelay(&env, id)
	case wire.TypeControl:
		c.handleControl(&env, id)
	case wire.TypePing:
		c.handlePing(&env, id)
	default:
		c.srv.stats.Inc(stats.MessagesIgnored)
		c.logger().Info("message of unknown type ignored", "type", env.Type, "message_id", env.MessageID)
	}
}

// discardWhilePending drops a frame that arrived while the agent's auth
// awaits the controller; too many close the connection.
func (c *conn) discardWhilePending() {
	c.discarded++
	c.srv.stats.Inc(stats.MessagesIgnored)
	if c.discarded > maxPendingFrames {
		c.close(reasonTooManyWhilePending)
		return
	}
	c.logger().Debug("frame discarded while authentication is pending", "discarded", c.discarded)
}

// authRequest checks an auth or authportal payload; on failure it closes
// the connection and returns false.
func (c *conn) authRequest(env *wire.Envelope) (wire.AuthRequest, bool) {
	var req wire.AuthRequest
	if !env.HasPayload() {
		c.close(reasonAuthNoPayload)
		return req, false
	}
	if err := env.DecodePayload(&req); err != nil {
		c.logger().Info("invalid auth payload", "err", err)
		c.close(reasonAuthBadPayload)
		return req, false
	}
	if req.Token == "" {
		c.close(reasonAuthNoToken)
		return req, false
	}
	if c.role == wire.ClientTypeAgent && !slices.Contains(wire.SupportedProtocolVersions, req.ProtocolVersion) {
		c.close(reasonBadProtocolVersion)
		return req, false
	}
	return req, true
}

func (c *conn) clientIDFor(env *wire.Envelope) string {
	if env.From != "" {
		return env.From
	}
	return c.connID
}

// handleAgentAuth validates an agent's token without blocking the read
// loop: frames that arrive meanwhile are discarded unread.
func (c *conn) handleAgentAuth(env *wire.Envelope) {
	c.authSeen.Store(true)
	if c.authPending.Load() {
		c.discardWhilePending()
		return
	}
	req, ok := c.authRequest(env)
	if !ok {
		return
	}
	key, err := wire.ParsePublicKey(req.PublicKey)
	if err != nil {
		c.logger().Info("invalid agent public key", "err", err)
		c.close(reasonBadPublicKey)
		return
	}
	c.authPending.Store(true)
	c.authRunning.Add(1)
	go c.authenticateAgent(*env, req, key)
}

func (c *conn) authenticateAgent(env wire.Envelope, req wire.AuthRequest, key *rsa.PublicKey) {
	s := c.srv
	defer c.authRunning.Done()
	defer c.authPending.Store(false)
	ctx, cancel := context.WithTimeout(s.authCtx, s.cfg.ControllerTimeout)
	res, err := s.ctrl.ValidateAgent(ctx, req.Token)
	cancel()
	reply := &wire.Envelope{From: s.cfg.InstanceID, To: env.From, Type: wire.TypeAuth, MessageID: env.MessageID}
	if err != nil && s.shuttingDown() {
		c.close(reasonShuttingDown) // not the controller's failure
		return
	}
	if err != nil {
		why := reasonAuthRejected
		switch {
		case errors.Is(err, controller.ErrAgentNotFound):
			s.stats.Inc(stats.AuthClientNotFound)
		case errors.Is(err, controller.ErrRejected):
			s.stats.Inc(stats.AuthClientFailure)
		default:
			s.stats.Inc(stats.AuthClientTimeoutFailure)
			why = reasonControllerUnavailable // the client may retry later
		}
		c.logger().Info("agent authentication failed", "err", err)
		_ = reply.SetPayload(wire.AuthResult{Accepted: false})
		c.sendTo(reply, key)
		c.close(why)
		return
	}
	id := &identity{
		role:              wire.ClientTypeAgent,
		clientID:          c.clientIDFor(&env),
		orgID:             res.OrganizationID,
		orgs:              []string{res.OrganizationID},
		registeredAgentID: res.RegisteredAgentID,
		clientVersion:     req.ClientVersion,
		expires:           res.Expires,
		key:               key,
	}
	result := wire.AuthResult{Accepted: true, WillReplaceToken: res.NewToken != ""}
	if res.NewToken != "" {
		result.NewToken = &res.NewToken
	}
	_ = reply.SetPayload(result)
	if !c.becomeAuthenticated(id, reply) {
		return
	}
	s.stats.Inc(stats.AuthClientSuccess)
	c.logger().Info("agent authenticated", "agent", id.registeredAgentID, "version", id.clientVersion)
	c.publish(bus.ActivityConnected, id, req.Metadata)
	s.pushList(id.orgID)
}

// handlePortalAuth validates a portal's token. It blocks the read loop, so
// a portal may send list or command right behind its authportal.
func (c *conn) handlePortalAuth(env *wire.Envelope) {
	s := c.srv
	c.authSeen.Store(true)
	req, ok := c.authRequest(env)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(s.authCtx, s.cfg.ControllerTimeout)
	res, err := s.ctrl.ValidatePortal(ctx, req.Token, req.IncludeSubOrgs)
	cancel()
	reply := &wire.Envelope{From: s.cfg.InstanceID, To: env.From, Type: wire.TypeAuthPortal, MessageID: env.MessageID}
	if err != nil && s.shuttingDown() {
		c.close(reasonShuttingDown) // not the controller's failure
		return
	}
	if err != nil {
		why := reasonAuthRejected
		if errors.Is(err, controller.ErrRejected) || errors.Is(err, controller.ErrAgentNotFound) {
			s.stats.Inc(stats.AuthPortalFailure)
		} else {
			s.stats.Inc(stats.AuthPortalTimeoutFailure)
			why = reasonControllerUnavailable // the client may retry later
		}
		c.logger().Info("portal authentication failed", "err", err)
		_ = reply.SetPayload(wire.AuthResult{Accepted: false})
		c.send(reply)
		c.close(why)
		return
	}
	orgs := []string{res.OrganizationID}
	if req.IncludeSubOrgs {
		for _, o := range res.SubOrganizations {
			if o != "" && !slices.Contains(orgs, o) {
				orgs = append(orgs, o)
			}
		}
	}
	id := &identity{
		role:          wire.ClientTypePortal,
		clientID:      c.clientIDFor(env),
		orgID:         res.OrganizationID,
		orgs:          orgs,
		clientVersion: req.ClientVersion,
		impersonated:  res.Impersonated,
		expires:       res.Expires,
	}
	_ = reply.SetPayload(wire.AuthResult{Accepted: true})
	if !c.becomeAuthenticated(id, reply) {
		return
	}
	s.stats.Inc(stats.AuthPortalSuccess)
	c.logger().Info("portal authenticated", "impersonated", id.impersonated, "organizations", len(id.orgs))
}

// becomeAuthenticated installs id, lifts the pre-auth limits, queues the
// auth answer, indexes the connection and registers it. It returns false
// when the connection closed meanwhile. The answer is queued before the
// connection can be found, so that nothing relayed to the client (a
// command, a control request) reaches it before its auth answer: the
// Duplicati agent drops a connection whose first message after the auth is
// not the answer.
func (c *conn) becomeAuthenticated(id *identity, reply *wire.Envelope) bool {
	s := c.srv
	if s.hub.taken(c, id) {
		c.refuseTaken(id, reply)
		return false
	}
	// Registered first, so that a list the client asks for once it has its
	// answer shows it.
	err := s.reg.Register(s.ctx, registry.Client{
		ClientID:              id.clientID,
		OrganizationID:        id.orgID,
		Type:                  c.role,
		ConnectionID:          c.connID,
		InstanceID:            s.cfg.InstanceID,
		MachineServerURI:      s.cfg.PublicURL,
		ClientVersion:         id.clientVersion,
		MachineRegistrationID: id.registeredAgentID,
		ClientIP:              c.remoteIP,
	})
	switch {
	case errors.Is(err, registry.ErrConflict):
		c.refuseTaken(id, reply)
		return false
	case err != nil:
		s.stats.Inc(stats.RegistryFailure)
		c.logger().Warn("registering the client failed", "err", err)
	}
	old := c.id.Swap(id)
	s.metrics.Authenticated(&c.gauge)
	c.nc.limit.Store(0)
	// The answer is queued before the connection can be found, so nothing
	// relayed to it can overtake it, and written only once it can be
	// found, so the client can be reached as soon as it has its answer.
	c.cork()
	c.send(reply)
	replaced, taken := s.hub.authenticated(c, old, id)
	if taken {
		// Another client took the id meanwhile: take the answer back.
		c.mu.Lock()
		if n := len(c.queue); n > 0 {
			c.queue = c.queue[:n-1]
		}
		c.mu.Unlock()
		c.id.Store(old)
		c.uncork()
		if err == nil {
			if uerr := s.reg.Unregister(s.ctx, id.clientID, id.orgID, c.connID); uerr != nil {
				c.logger().Warn("unregistering the refused client failed", "err", uerr)
			}
		}
		c.refuseTaken(id, reply)
		return false
	}
	c.uncork()
	if replaced != nil {
		replaced.logger().Info("connection replaced by a newer one", "new_conn", c.connID)
		replaced.close(reasonReplaced)
	}
	if old != nil && (old.clientID != id.clientID || old.orgID != id.orgID) {
		c.unregister(old)
	}
	if c.isClosing() {
		return false
	}
	c.extendReadDeadline()
	return true
}

// refuseTaken refuses an authentication whose client id another client of
// the organization holds (a portal claiming an agent's id, or one agent
// another's): the holder is not pushed out.
func (c *conn) refuseTaken(id *identity, reply *wire.Envelope) {
	s := c.srv
	if c.role == wire.ClientTypeAgent {
		s.stats.Inc(stats.AuthClientFailure)
	} else {
		s.stats.Inc(stats.AuthPortalFailure)
	}
	c.logger().Warn("client id taken by another client of the organization", "client_id", id.clientID, "org", id.orgID)
	_ = reply.SetPayload(wire.AuthResult{Accepted: false})
	c.sendTo(reply, id.key)
	c.close(reasonAccessDenied)
}

// unregister removes the registration of a former identity and tells the
// organization's portals when an agent left.
func (c *conn) unregister(id *identity) {
	s := c.srv
	traffic := registry.Traffic{BytesIn: c.nc.in.Load(), BytesOut: c.nc.out.Load()}
	if err := registry.UnregisterWithTraffic(context.Background(), s.reg, id.clientID, id.orgID, c.connID, traffic); err != nil {
		s.stats.Inc(stats.RegistryFailure)
		c.logger().Warn("unregistering the client failed", "err", err)
	}
	if c.role == wire.ClientTypeAgent {
		// An agent that reconnected before its old connection ended (a
		// replaced or half-open one) has not left.
		if s.hub.agent(id.registeredAgentID, id.orgID) == nil {
			c.publish(bus.ActivityDisconnected, id, nil)
		}
		s.pushList(id.orgID)
	}
}

func (c *conn) publish(t bus.ActivityType, id *identity, metadata map[string]*string) {
	s := c.srv
	err := s.events.PublishActivity(context.Background(), bus.AgentActivity{
		ActivityType:      t,
		ActivityTimestamp: s.now().UTC(),
		RegisteredAgentID: id.registeredAgentID,
		OrganizationID:    id.orgID,
		ClientVersion:     id.clientVersion,
		Metadata:          metadata,
	})
	if err != nil {
		c.logger().Warn("publishing agent activity failed", "activity", t, "err", err)
	}
}

// handleList answers a portal's list request.
func (c *conn) handleList(env *wire.Envelope, id *identity) {
	switch {
	case c.role != wire.ClientTypePortal:
		c.close(reasonWrongStateForList)
		return
	case id == nil:
		c.close(reasonNotAuthenticated)
		return
	}
	c.sendList(env.MessageID, id)
}

// sendList sends the portal the agents of its organizations.
func (c *conn) sendList(messageID string, id *identity) {
	list, err := c.srv.agentList(id.orgs)
	c.sendListResult(messageID, id, list, err)
}

// agentList lists the agents of the organizations, as a list answer
// carries them.
func (s *Server) agentList(orgs []string) ([]wire.ClientRegistration, error) {
	agents, err := s.reg.Agents(s.ctx, orgs)
	if err != nil {
		return nil, err
	}
	list := make([]wire.ClientRegistration, 0, len(agents))
	for _, a := range agents {
		list = append(list, a.Registration())
	}
	return list, nil
}

// sendListResult sends a list answer, or its failure.
func (c *conn) sendListResult(messageID string, id *identity, list []wire.ClientRegistration, err error) {
	s := c.srv
	reply := &wire.Envelope{From: s.cfg.InstanceID, To: id.clientID, Type: wire.TypeList, MessageID: messageID}
	if err != nil {
		s.stats.Inc(stats.ListFailure)
		c.logger().Warn("listing agents failed", "err", err)
		reply.ErrorMessage = wire.TextRegistryUnavailable
		c.send(reply)
		return
	}
	_ = reply.SetPayload(list)
	if c.send(reply) {
		s.stats.Inc(stats.ListCommandSuccess)
	}
}

// pushList sends a fresh list to every portal that sees org, here and on
// the other instances.
func (s *Server) pushList(org string) {
	if !s.shuttingDown() {
		s.PushList(org) // this instance's portals are closing too
	}
	s.announceList(org)
}

// listPushDelay gathers the list pushes of an organization: when many of
// its agents come or go at once (a restart, a network blip) its portals
// get one fresh list, not one per agent.
const listPushDelay = 100 * time.Millisecond

// PushList sends, shortly, a fresh list to every portal of this instance
// that sees org.
func (s *Server) PushList(org string) {
	s.listMu.Lock()
	defer s.listMu.Unlock()
	if s.listDue[org] {
		return // a push is already on its way and will see this change
	}
	s.listDue[org] = true
	time.AfterFunc(listPushDelay, func() {
		s.listMu.Lock()
		delete(s.listDue, org)
		s.listMu.Unlock()
		s.pushListNow(org)
	})
}

// pushListNow sends the lists, asking the registry once for each set of
// organizations the portals see.
func (s *Server) pushListNow(org string) {
	if s.shuttingDown() {
		return
	}
	type group struct {
		id      *identity
		portals []*conn
	}
	groups := map[string]*group{}
	for _, p := range s.hub.portalsOf(org) {
		id := p.identity()
		if id == nil {
			continue
		}
		k := strings.Join(id.orgs, "\x00")
		if groups[k] == nil {
			groups[k] = &group{id: id}
		}
		groups[k].portals = append(groups[k].portals, p)
	}
	for _, g := range groups {
		list, err := s.agentList(g.id.orgs)
		for _, p := range g.portals {
			if id := p.identity(); id != nil {
				p.sendListResult(uuid.NewString(), id, list, err)
			}
		}
	}
}

// handleRelay passes a command (or an unsolicited control message) to the
// client named in "to", with "from" set to the sender's authenticated id.
func (c *conn) handleRelay(env *wire.Envelope, id *identity) {
	s := c.srv
	if id == nil {
		c.close(reasonNotAuthenticated)
		return
	}
	if id.impersonated {
		s.stats.Inc(stats.CommandRelayDenied)
		c.logger().Warn("impersonating portal may not send commands", "to", env.To)
		c.close(reasonAccessDenied)
		return
	}
	target := s.hub.client(env.To, id)
	if target != nil {
		tid := target.identity()
		if tid == nil {
			target = nil
		} else if !mayReach(id, tid) {
			s.stats.Inc(stats.CommandRelayDenied)
			c.logger().Warn("relay denied: another organization, or not between a portal and an agent", "to", env.To, "to_org", tid.orgID)
			c.close(reasonAccessDenied)
			return
		}
	}
	if target == nil && c.relayRemote(env, id) {
		return
	}
	out := *env
	out.From = id.clientID
	if target != nil && target.send(&out) {
		s.stats.Inc(stats.CommandRelaySuccess)
		s.timeRelay(c, target, env)
		return
	}
	s.stats.Inc(stats.CommandRelayDestinationNotAvailable)
	if c.role == wire.ClientTypePortal {
		c.send(&wire.Envelope{From: s.cfg.InstanceID, To: id.clientID, Type: env.Type,
			MessageID: env.MessageID, ErrorMessage: wire.TextDestinationNotAvailable})
		return
	}
	// Agents are not sent errors they do not expect (the Duplicati agent
	// disconnects on them); the drop is logged and counted.
	c.logger().Info("relay destination not available", "type", env.Type, "to", env.To, "message_id", env.MessageID)
}

// handleControl takes an agent's answer to a control request, or relays a
// control message between clients like a command.
func (c *conn) handleControl(env *wire.Envelope, id *identity) {
	s := c.srv
	if id == nil {
		s.stats.Inc(stats.ControlRelayDestinationNotAuthenticated)
		c.close(reasonNotAuthenticated)
		return
	}
	if c.role == wire.ClientTypeAgent {
		if p := s.pending.take(c, env.MessageID); p != nil {
			var res wire.ControlResponse
			if err := env.DecodePayload(&res); err != nil {
				p <- controlAnswer{err: errInvalidControlResponse}
				c.close(reasonBadControlResponse)
				return
			}
			p <- controlAnswer{res: res}
			return
		}
		if env.To == s.cfg.InstanceID {
			// An answer to this instance that nobody waits for any more.
			s.stats.Inc(stats.MessagesIgnored)
			c.logger().Info("control answer after its request timed out, or to no request", "message_id", env.MessageID)
			return
		}
	}
	c.handleRelay(env, id)
}

// handlePing answers an authenticated client's ping and refreshes its
// registration. Pings before authentication are ignored.
func (c *conn) handlePing(env *wire.Envelope, id *identity) {
	s := c.srv
	if id == nil {
		c.logger().Debug("ping before authentication ignored")
		return
	}
	if err := s.reg.Touch(s.ctx, id.clientID, id.orgID, c.connID); err != nil {
		s.stats.Inc(stats.RegistryFailure)
		c.logger().Warn("refreshing the registration failed", "err", err)
	}
	if c.role == wire.ClientTypeAgent && !s.cfg.DisablePingMessages {
		c.publish(bus.ActivityPing, id, nil)
	}
	if c.send(&wire.Envelope{From: s.cfg.InstanceID, To: id.clientID, Type: wire.TypePong, MessageID: uuid.NewString()}) {
		s.stats.Inc(stats.PingCommandSuccess)
	}
}
