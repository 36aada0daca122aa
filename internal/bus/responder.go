package bus

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/internal/controller"
)

// ControllerOptions configure ServeController.
type ControllerOptions struct {
	// Timeout bounds one validation; zero means DefaultAuthTimeout.
	Timeout time.Duration
	// LogEvents logs the activity and certificate events seen on the bus.
	LogEvents bool
}

// ServeController answers the token validation requests on the bus with
// ctrl, as the controller does: in a queue group, so several controllers
// (or instances running one in process) share the requests. It returns a
// function that stops answering.
func (b *NATS) ServeController(ctrl controller.Controller, o ControllerOptions) (stop func(), err error) {
	o.Timeout = orDefault(o.Timeout, DefaultAuthTimeout)
	// Validation by the built-in controller is a map look-up or a
	// signature check, so requests are answered on the subscription's
	// goroutine, in order.
	list := []subscription{
		{b.subj.authAgent, queueController, func(m *nats.Msg) { b.respond(m, validateAgent(ctrl, o.Timeout, b.log, m.Data)) }},
		{b.subj.authPortal, queueController, func(m *nats.Msg) { b.respond(m, validatePortal(ctrl, o.Timeout, b.log, m.Data)) }},
	}
	if o.LogEvents {
		list = append(list,
			subscription{b.subj.activity, queueController, b.logActivity},
			subscription{b.subj.certificate, queueController, b.logCertificate})
	}
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	subs, err := b.subscribeAll(list)
	if err != nil {
		return nil, err
	}
	return func() {
		for _, s := range subs {
			_ = s.Unsubscribe() // fails only when the connection is already closed
		}
	}, nil
}

func validateAgent(ctrl controller.Controller, timeout time.Duration, log *slog.Logger, data []byte) agentValidationReply {
	var req ValidateAgentRequest
	if msg := decodeTokenRequest(data, &req, &req.Token); msg != "" {
		log.Info("invalid agent validation request", "reason", msg)
		return agentValidationReply{Message: &msg}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	a, err := ctrl.ValidateAgent(ctx, req.Token)
	if err != nil {
		msg := err.Error()
		if errors.Is(err, controller.ErrAgentNotFound) && !strings.Contains(msg, MessageAgentNotFound) {
			msg = MessageAgentNotFound + ": " + msg
		}
		log.Info("agent token refused", "err", err)
		return agentValidationReply{Message: &msg}
	}
	log.Debug("agent token accepted", "org", a.OrganizationID, "agent", a.RegisteredAgentID)
	return agentValidationReply{
		Success:           true,
		OrganizationID:    &a.OrganizationID,
		RegisteredAgentID: &a.RegisteredAgentID,
		Expires:           timePtr(a.Expires),
		NewToken:          strPtr(a.NewToken),
	}
}

func validatePortal(ctrl controller.Controller, timeout time.Duration, log *slog.Logger, data []byte) portalValidationReply {
	var req ValidatePortalRequest
	if msg := decodeTokenRequest(data, &req, &req.Token); msg != "" {
		log.Info("invalid portal validation request", "reason", msg)
		return portalValidationReply{Message: &msg}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	p, err := ctrl.ValidatePortal(ctx, req.Token, req.IncludeSubOrgs)
	if err != nil {
		msg := err.Error()
		log.Info("portal token refused", "err", err)
		return portalValidationReply{Message: &msg}
	}
	log.Debug("portal token accepted", "org", p.OrganizationID, "impersonated", p.Impersonated)
	return portalValidationReply{
		Success:          true,
		OrganizationID:   &p.OrganizationID,
		Expires:          timePtr(p.Expires),
		IsImpersonated:   p.Impersonated,
		SubOrganizations: p.SubOrganizations,
	}
}

// decodeTokenRequest decodes a validation request and returns why it is
// unusable, or "".
func decodeTokenRequest(data []byte, req any, token *string) string {
	if err := json.Unmarshal(data, req); err != nil {
		return "Invalid request: " + err.Error()
	}
	if *token == "" {
		return "Request without token"
	}
	return ""
}

func (b *NATS) logActivity(m *nats.Msg) {
	var a AgentActivity
	if err := json.Unmarshal(m.Data, &a); err != nil {
		b.log.Warn("invalid activity event", "subject", m.Subject, "err", err)
		return
	}
	b.log.Info("agent activity", "type", a.ActivityType, "at", a.ActivityTimestamp.Format(time.RFC3339),
		"agent", a.RegisteredAgentID, "org", a.OrganizationID, "version", a.ClientVersion, "metadata", len(a.Metadata))
}

func (b *NATS) logCertificate(m *nats.Msg) {
	var c Certificate
	if err := json.Unmarshal(m.Data, &c); err != nil {
		b.log.Warn("invalid certificate event", "subject", m.Subject, "err", err)
		return
	}
	b.log.Info("server certificate", "instance", c.ClientID, "hash", c.HashedPublicKey, "expires", c.Expires.Format(time.RFC3339))
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

func strPtr(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
