package portal_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/machineservice/machineservice/agent"
	"github.com/machineservice/machineservice/internal/servertest"
	"github.com/machineservice/machineservice/portal"
)

// A portal that lists its organization's agents and calls the first one's
// API through the relay with an ordinary http.Client.
func Example() {
	ctx := context.Background()
	c, err := portal.Dial(ctx, portal.Config{Server: "https://relay.example.com", Token: "portal-token"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	agents, err := c.List(ctx)
	if err != nil || len(agents) == 0 {
		log.Fatal("no agent connected: ", err)
	}
	hc := &http.Client{Transport: c.Transport(agents[0].ClientID), Timeout: 30 * time.Second}
	resp, err := hc.Get("http://agent/api/v1/serverstate") // scheme and host are not sent
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status, string(body))
}

// The whole path in one process: a relay server, an agent that forwards
// to a local web server, and a portal request through both.
func Example_relay() {
	srv, err := servertest.Launch("127.0.0.1:0", nil)
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Stop()
	local := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s", r.URL.Path)
	}))
	defer local.Close()

	fwd, err := agent.NewForwarder(local.URL, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer fwd.Close()
	a, err := agent.New(agent.Config{Server: srv.Base, Token: servertest.AgentToken, Handler: fwd})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- a.Run(ctx) }()
	defer func() { stop(); <-ran }()

	c, err := portal.Dial(context.Background(), portal.Config{Server: srv.Base, Token: servertest.PortalToken})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	// Wait until the agent is connected: it is listed, or a list the
	// server pushes when it arrives has it.
	for listed := false; !listed; {
		list, err := c.List(context.Background())
		if err != nil {
			log.Fatal(err)
		}
		if listed = len(list) == 1 && list[0].ClientID == a.ClientID(); !listed {
			select {
			case <-c.Updates():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	hc := &http.Client{Transport: c.Transport(a.ClientID())}
	resp, err := hc.Get("http://agent/status")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status)
	fmt.Println(string(body))
	// Output:
	// 200 OK
	// hello from /status
}
