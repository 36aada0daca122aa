package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/machineservice/machineservice/internal/controller"
	"github.com/machineservice/machineservice/wire"
)

// Defaults of NATSOptions.
const (
	DefaultAuthTimeout     = 30 * time.Second
	DefaultRelayTimeout    = 5 * time.Second
	DefaultControlDeadline = 2 * time.Minute
	DefaultReconnectMin    = 100 * time.Millisecond
	DefaultReconnectMax    = 5 * time.Second
)

// Queue groups. A request on a queue-group subscription goes to one member
// only.
const (
	queueInstances  = "instances"
	queueController = "controller"
)

// maxControls bounds the control requests one instance handles at once;
// each may wait for an agent's answer for the control timeout.
const maxControls = 1024

// NATSOptions configure a NATS bus.
type NATSOptions struct {
	// URL is one NATS URL or several, comma-separated (a cluster).
	// Credentials may be given in it: nats://user:password@host:4222.
	URL string
	// CredentialsFile is a NATS credentials file (user JWT and NKey seed).
	CredentialsFile string
	// SubjectPrefix starts every subject; empty means
	// DefaultSubjectPrefix.
	SubjectPrefix string
	// Name names the connection in the NATS server's monitoring.
	Name string
	// AuthTimeout bounds a token validation request (the caller's context
	// may end it sooner); zero means DefaultAuthTimeout.
	AuthTimeout time.Duration
	// RelayTimeout bounds handing a message to another instance; zero
	// means DefaultRelayTimeout.
	RelayTimeout time.Duration
	// ControlDeadline bounds one control request taken from the bus,
	// including the wait for the agent; zero means DefaultControlDeadline.
	ControlDeadline time.Duration
	// ReconnectMin and ReconnectMax bound the growing pause between
	// reconnection attempts; zero means DefaultReconnectMin and
	// DefaultReconnectMax. Attempts never stop.
	ReconnectMin, ReconnectMax time.Duration
	// Logger receives connection changes and the errors of incoming
	// messages, which have no caller to return them to; nil discards.
	Logger *slog.Logger
}

// Instance is what the bus needs of a server instance to serve the
// requests other instances and the controller send it. *server.Server
// implements it.
type Instance interface {
	// InstanceID names the instance; its subjects carry it.
	InstanceID() string
	// RouteControl handles a control request from the controller: here
	// when this instance holds the agent, else through the instance that
	// does.
	RouteControl(ctx context.Context, req ControlRequest) (ControlResponse, error)
	// Control handles a control request for an agent of this instance.
	Control(ctx context.Context, req ControlRequest) (ControlResponse, error)
	// DeliverRemote relays a message another instance received to a
	// client of this one.
	DeliverRemote(env *wire.Envelope, from Sender) RelayResult
	// PushList sends a fresh list to this instance's portals that see
	// the organization.
	PushList(organizationID string)
}

// NATS is the message bus on NATS: the controller contract (token
// validation by request/reply, events, control requests in a queue group)
// and the traffic between instances. It is safe for concurrent use.
//
// Subjects, under the prefix P:
//
//	P.auth.agent                  request {token} -> TokenValidationResponse
//	P.auth.portal                 request {token, includeSubOrgs} -> TokenValidationResponse
//	P.control                     request ControlRequest -> ControlResponse (queue group "instances")
//	P.events.activity             AgentActivity
//	P.events.certificate          Certificate
//	P.events.list                 ListChanged
//	P.instance.<id>.relay         request {envelope, sender} -> {result}
//	P.instance.<id>.control       request ControlRequest -> ControlResponse
type NATS struct {
	// static after DialNATS
	nc   *nats.Conn
	o    NATSOptions
	log  *slog.Logger
	subj subjects
	// ctx ends the handlers of control requests when Close gives up
	// waiting for them.
	ctx      context.Context
	cancel   context.CancelFunc
	closedCh chan struct{} // closed by the connection's closed handler

	controls chan struct{} // a slot per control request being handled
	handlers sync.WaitGroup

	mu         sync.Mutex
	closed     bool
	instanceID string
	lastErr    error // the last connection error, for Ready
	// link ends when the connection drops, so requests waiting for a
	// reply fail then; a new one starts on reconnecting.
	link     context.Context
	linkDown context.CancelFunc
}

var (
	_ controller.Controller = (*NATS)(nil)
	_ Publisher             = (*NATS)(nil)
)

// DialNATS connects to NATS. An unreachable server is not an error: the
// connection is retried in the background, forever, and requests fail at
// once with ErrNotConnected meanwhile.
func DialNATS(o NATSOptions) (*NATS, error) {
	if strings.TrimSpace(o.URL) == "" {
		return nil, errors.New("nats: no URL")
	}
	if o.SubjectPrefix == "" {
		o.SubjectPrefix = DefaultSubjectPrefix
	}
	if err := ValidSubjectPrefix(o.SubjectPrefix); err != nil {
		return nil, err
	}
	o.AuthTimeout = orDefault(o.AuthTimeout, DefaultAuthTimeout)
	o.RelayTimeout = orDefault(o.RelayTimeout, DefaultRelayTimeout)
	o.ControlDeadline = orDefault(o.ControlDeadline, DefaultControlDeadline)
	o.ReconnectMin = orDefault(o.ReconnectMin, DefaultReconnectMin)
	o.ReconnectMax = max(orDefault(o.ReconnectMax, DefaultReconnectMax), o.ReconnectMin)
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.CredentialsFile != "" {
		if _, err := os.Stat(o.CredentialsFile); err != nil {
			return nil, fmt.Errorf("nats credentials file: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &NATS{
		o:        o,
		log:      o.Logger,
		subj:     newSubjects(o.SubjectPrefix),
		ctx:      ctx,
		cancel:   cancel,
		closedCh: make(chan struct{}),
		controls: make(chan struct{}, maxControls),
	}
	b.link, b.linkDown = context.WithCancel(context.Background())
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.RetryOnFailedConnect(true),
		nats.CustomReconnectDelay(b.backoff),
		// A server that vanished without closing the TCP connection is
		// noticed within a minute.
		nats.PingInterval(20 * time.Second),
		nats.MaxPingsOutstanding(3),
		nats.ConnectHandler(func(nc *nats.Conn) {
			b.log.Info("connected to NATS", "url", nc.ConnectedUrlRedacted())
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			b.mu.Lock()
			closing := b.closed
			b.linkDown()
			b.mu.Unlock()
			if closing {
				return
			}
			b.setLastErr(err)
			b.log.Warn("disconnected from NATS; reconnecting", "err", err)
		}),
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			b.setLastErr(err)
			b.log.Debug("reconnecting to NATS failed", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			b.mu.Lock()
			b.linkDown()
			b.link, b.linkDown = context.WithCancel(context.Background())
			b.mu.Unlock()
			b.setLastErr(nil)
			b.log.Info("reconnected to NATS", "url", nc.ConnectedUrlRedacted())
		}),
		nats.ClosedHandler(func(*nats.Conn) { close(b.closedCh) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			b.log.Warn("NATS error", "subject", subject, "err", err)
		}),
	}
	if o.CredentialsFile != "" {
		opts = append(opts, nats.UserCredentials(o.CredentialsFile))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("nats: %w", err)
	}
	b.nc = nc
	if !nc.IsConnected() {
		err := nc.LastError()
		b.setLastErr(err)
		b.log.Warn("NATS is not reachable yet; retrying in the background", "err", err)
	}
	return b, nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// backoff doubles the pause with every round of failed attempts, up to
// ReconnectMax, with up to 20% jitter so instances do not return in step.
func (b *NATS) backoff(attempts int) time.Duration {
	d := b.o.ReconnectMin << min(max(attempts-1, 0), 20)
	if d <= 0 || d > b.o.ReconnectMax {
		d = b.o.ReconnectMax
	}
	return d + rand.N(d/5+1) //nolint:gosec // jitter needs no cryptographic randomness
}

func (b *NATS) setLastErr(err error) {
	b.mu.Lock()
	b.lastErr = err
	b.mu.Unlock()
}

// Ready reports whether the bus is connected: nil when it is, else why
// not. Readiness checks report it.
func (b *NATS) Ready(context.Context) error {
	if b.nc.IsConnected() {
		return nil
	}
	if b.nc.IsClosed() {
		return ErrClosed
	}
	return b.notConnected()
}

func (b *NATS) notConnected() error {
	b.mu.Lock()
	err := b.lastErr
	b.mu.Unlock()
	if err == nil {
		err = b.nc.LastError()
	}
	if err != nil {
		return fmt.Errorf("%w (%s): %v", ErrNotConnected, strings.ToLower(b.nc.Status().String()), err)
	}
	return fmt.Errorf("%w (%s)", ErrNotConnected, strings.ToLower(b.nc.Status().String()))
}

// Close stops taking requests, waits within ctx for the control requests
// being handled, then drains and closes the connection.
func (b *NATS) Close(ctx context.Context) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()

	done := make(chan struct{})
	go func() { b.handlers.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		b.cancel()
		<-done
	}
	b.cancel()
	b.mu.Lock()
	b.linkDown()
	b.mu.Unlock()
	var err error
	if b.nc.IsConnected() {
		err = b.nc.Drain()
	}
	if !b.nc.IsConnected() || err != nil {
		b.nc.Close()
	}
	select {
	case <-b.closedCh:
	case <-ctx.Done():
		b.nc.Close()
		<-b.closedCh
	}
	if err != nil {
		return fmt.Errorf("drain nats connection: %w", err)
	}
	return nil
}

// startHandler reserves a slot for a control request, or reports false
// when the bus is closing or too many are in flight.
func (b *NATS) startHandler() (ok bool, busy bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false, false
	}
	select {
	case b.controls <- struct{}{}:
	default:
		return false, true
	}
	b.handlers.Add(1)
	return true, false
}

func (b *NATS) endHandler() {
	<-b.controls
	b.handlers.Done()
}

// request sends a JSON request and decodes the JSON reply, within
// timeout. Without a connection it fails at once rather than queue the
// request until the deadline.
func (b *NATS) request(ctx context.Context, subject string, timeout time.Duration, req, resp any) error {
	if !b.nc.IsConnected() {
		return b.notConnected()
	}
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode request for %s: %w", subject, err)
	}
	if mp := b.nc.MaxPayload(); mp > 0 && int64(len(data)) > mp {
		return fmt.Errorf("%w: %d bytes for %s, max_payload is %d", ErrTooLarge, len(data), subject, mp)
	}
	b.mu.Lock()
	link := b.link
	b.mu.Unlock()
	if link.Err() != nil {
		// Connected again, and the reconnect handler has not run yet.
		link = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// A reply cannot come once the connection drops: fail then rather
	// than at the deadline.
	defer context.AfterFunc(link, cancel)()
	// A reply that arrives after the deadline finds no one waiting for
	// its reply subject and is dropped by the client.
	msg, err := b.nc.RequestWithContext(ctx, subject, data)
	switch {
	case err == nil:
	case link.Err() != nil:
		return fmt.Errorf("%w: the connection dropped during the request on %s", ErrNotConnected, subject)
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("%w on %s", ErrNoResponders, subject)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: nothing on %s", ErrTimeout, subject)
	case errors.Is(err, nats.ErrDisconnected), errors.Is(err, nats.ErrConnectionReconnecting):
		return fmt.Errorf("%w: request on %s: %v", ErrNotConnected, subject, err)
	default:
		return fmt.Errorf("request on %s: %w", subject, err)
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("%w on %s: %v", ErrBadReply, subject, err)
	}
	return nil
}

func (b *NATS) publish(subject string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode event for %s: %w", subject, err)
	}
	// While reconnecting the client buffers what is published and sends
	// it once connected; a full buffer is an error.
	if err := b.nc.Publish(subject, data); err != nil {
		return fmt.Errorf("publish on %s: %w", subject, err)
	}
	return nil
}

// ValidateAgent asks the controller on <prefix>.auth.agent.
func (b *NATS) ValidateAgent(ctx context.Context, token string) (controller.Agent, error) {
	var r TokenValidationResponse
	if err := b.request(ctx, b.subj.authAgent, b.o.AuthTimeout, ValidateAgentRequest{Token: token}, &r); err != nil {
		return controller.Agent{}, fmt.Errorf("%w: %w", controller.ErrUnavailable, err)
	}
	if !r.Success {
		if strings.Contains(r.Message, MessageAgentNotFound) {
			return controller.Agent{}, fmt.Errorf("%w: %s", controller.ErrAgentNotFound, r.Message)
		}
		return controller.Agent{}, fmt.Errorf("%w: %s", controller.ErrRejected, reason(r.Message))
	}
	switch {
	case r.OrganizationID == "":
		return controller.Agent{}, fmt.Errorf("%w: the controller accepted the token without an organizationId", controller.ErrRejected)
	case r.RegisteredAgentID == "":
		return controller.Agent{}, fmt.Errorf("%w: the controller accepted the token without a registeredAgentId", controller.ErrAgentNotFound)
	}
	return controller.Agent{
		OrganizationID:    r.OrganizationID,
		RegisteredAgentID: r.RegisteredAgentID,
		Expires:           timeOf(r.Expires),
		NewToken:          r.NewToken,
	}, nil
}

// ValidatePortal asks the controller on <prefix>.auth.portal.
func (b *NATS) ValidatePortal(ctx context.Context, token string, includeSubOrgs bool) (controller.Portal, error) {
	var r TokenValidationResponse
	req := ValidatePortalRequest{Token: token, IncludeSubOrgs: includeSubOrgs}
	if err := b.request(ctx, b.subj.authPortal, b.o.AuthTimeout, req, &r); err != nil {
		return controller.Portal{}, fmt.Errorf("%w: %w", controller.ErrUnavailable, err)
	}
	if !r.Success {
		return controller.Portal{}, fmt.Errorf("%w: %s", controller.ErrRejected, reason(r.Message))
	}
	if r.OrganizationID == "" {
		return controller.Portal{}, fmt.Errorf("%w: the controller accepted the token without an organizationId", controller.ErrRejected)
	}
	return controller.Portal{
		OrganizationID:   r.OrganizationID,
		SubOrganizations: r.SubOrganizations,
		Impersonated:     r.IsImpersonated,
		Expires:          timeOf(r.Expires),
	}, nil
}

func reason(msg string) string {
	if msg == "" {
		return "no reason given"
	}
	return msg
}

func timeOf(t *time.Time) time.Time {
	if t == nil {
		return time.Time{}
	}
	return *t
}

// PublishActivity publishes a on <prefix>.events.activity.
func (b *NATS) PublishActivity(_ context.Context, a AgentActivity) error {
	return b.publish(b.subj.activity, a)
}

// PublishCertificate publishes c on <prefix>.events.certificate and
// waits, within ctx, until the NATS server has it, so the caller's retry
// covers an outage.
func (b *NATS) PublishCertificate(ctx context.Context, c Certificate) error {
	if !b.nc.IsConnected() {
		return b.notConnected()
	}
	if err := b.publish(b.subj.certificate, c); err != nil {
		return err
	}
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := b.nc.FlushWithContext(fctx); err != nil {
		return fmt.Errorf("flush certificate: %w", err)
	}
	return nil
}
