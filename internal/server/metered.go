package server

import (
	"errors"
	"net"
	"sync/atomic"
)

// errPreAuthBudget is returned by a metered connection's Read once an
// unauthenticated client has sent more than its budget.
var errPreAuthBudget = errors.New("pre-authentication byte budget exceeded")

// meteredListener wraps every accepted connection in a meteredConn.
type meteredListener struct{ net.Listener }

func (l meteredListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &meteredConn{Conn: c}, nil
}

// meteredConn counts the bytes on the wire and enforces the byte budget
// of an unauthenticated client.
type meteredConn struct {
	net.Conn
	in, out atomic.Int64
	limit   atomic.Int64 // bytes in allowed in total; 0: no limit
}

func (c *meteredConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	total := c.in.Add(int64(n))
	if l := c.limit.Load(); l > 0 && total > l {
		return 0, errPreAuthBudget
	}
	return n, err
}

func (c *meteredConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.out.Add(int64(n))
	return n, err
}
