package registry

import "context"

// Traffic is what one connection received and sent on the wire.
type Traffic struct {
	BytesIn, BytesOut int64
}

// TrafficRecorder is implemented by registries that keep a history of
// connections: UnregisterTraffic is Unregister that also records the
// connection's traffic.
type TrafficRecorder interface {
	UnregisterTraffic(ctx context.Context, clientID, organizationID, connectionID string, t Traffic) error
}

// UnregisterWithTraffic unregisters through r's UnregisterTraffic when it
// keeps a history, else through Unregister.
func UnregisterWithTraffic(ctx context.Context, r Registry, clientID, organizationID, connectionID string, t Traffic) error {
	if h, ok := r.(TrafficRecorder); ok {
		return h.UnregisterTraffic(ctx, clientID, organizationID, connectionID, t)
	}
	return r.Unregister(ctx, clientID, organizationID, connectionID)
}
