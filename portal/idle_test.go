package portal_test

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/portal"
)

// freezer is a TCP proxy whose path can be frozen: from then on it
// forwards nothing either way and closes nothing, as a network path that
// dies silently (a cable pulled, a NAT entry dropped) does.
type freezer struct {
	l      net.Listener
	target string

	frozen     chan struct{}
	freezeOnce sync.Once

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func startFreezer(t *testing.T, target string) *freezer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{l: l, target: target, frozen: make(chan struct{})}
	f.wg.Go(f.accept)
	t.Cleanup(func() {
		_ = l.Close()
		f.mu.Lock()
		for _, c := range f.conns {
			_ = c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

// Base is the proxy's base URL for the portal.
func (f *freezer) Base() string { return "http://" + f.l.Addr().String() }

// Freeze stops all forwarding for good.
func (f *freezer) Freeze() { f.freezeOnce.Do(func() { close(f.frozen) }) }

func (f *freezer) accept() {
	for {
		in, err := f.l.Accept()
		if err != nil {
			return // closed at the end of the test
		}
		out, err := net.Dial("tcp", f.target)
		if err != nil {
			_ = in.Close()
			continue
		}
		f.mu.Lock()
		f.conns = append(f.conns, in, out)
		f.mu.Unlock()
		f.wg.Go(func() { f.pipe(out, in) })
		f.wg.Go(func() { f.pipe(in, out) })
	}
}

// pipe copies src to dst until the path freezes; then it drops what
// arrives, and an end of src is not passed on either.
func (f *freezer) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !f.isFrozen() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !f.isFrozen() && !errors.Is(err, net.ErrClosed) {
				_ = dst.Close() // a live path passes the hang-up on
			}
			return
		}
	}
}

func (f *freezer) isFrozen() bool {
	select {
	case <-f.frozen:
		return true
	default:
		return false
	}
}

// TestIdleConnectionIsNoticed freezes the path between a portal and a
// server that pings often: the portal must close the connection by
// itself, fail the request it was waiting for with ErrClosed (not wait
// for the request timeout) and close Updates.
func TestIdleConnectionIsNoticed(t *testing.T) {
	const ping = 250 * time.Millisecond
	srv := servertest.Start(t, func(c *config.Config) { c.PingInterval = ping })
	px := startFreezer(t, srv.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pc, err := portal.Dial(ctx, portal.Config{
		Server:         px.Base(),
		Token:          servertest.PortalToken,
		IdleTimeout:    4 * ping,
		RequestTimeout: time.Minute,
	})
	if err != nil {
		t.Fatalf("portal.Dial: %v", err)
	}
	t.Cleanup(func() { _ = pc.Close() })

	// While the path is alive the server's pings keep the quiet
	// connection open well past the idle timeout.
	select {
	case <-pc.Done():
		t.Fatalf("a live but quiet connection was closed: %v", pc.Err())
	case <-time.After(3 * 4 * ping):
	}
	if _, err := pc.List(ctx); err != nil {
		t.Fatalf("list on the live path: %v", err)
	}

	px.Freeze()
	_, err = pc.List(ctx)
	if !errors.Is(err, portal.ErrClosed) || !errors.Is(err, portal.ErrIdleTimeout) {
		t.Fatalf("list on the frozen path: %v, want ErrClosed and ErrIdleTimeout", err)
	}
	if !errors.Is(pc.Err(), portal.ErrIdleTimeout) {
		t.Fatalf("Err() = %v, want ErrIdleTimeout", pc.Err())
	}
	select {
	case _, ok := <-pc.Updates():
		for ok {
			_, ok = <-pc.Updates()
		}
	case <-ctx.Done():
		t.Fatal("Updates not closed after the connection was found dead")
	}
	if _, err := pc.List(context.Background()); !errors.Is(err, portal.ErrClosed) {
		t.Fatalf("list after the close: %v", err)
	}
}
