package agent_test

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"github.com/machineservice/machineservice/agent"
)

// An agent that exposes a local web UI on port 8200 to the portals of its
// organization, storing renewed tokens.
func Example() {
	fwd, err := agent.NewForwarder("http://127.0.0.1:8200", nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	defer fwd.Close()
	a, err := agent.New(agent.Config{
		Server:  "https://relay.example.com",
		Token:   os.Getenv("AGENT_TOKEN"),
		Handler: fwd,
		OnToken: func(token string) {
			// Keep it for the next start: the old one is about to expire.
			_ = os.WriteFile("agent-token", []byte(token), 0o600)
		},
		OnState: func(e agent.Event) {
			switch e.State {
			case agent.Rejected:
				fmt.Fprintf(os.Stderr, "token refused, check AGENT_TOKEN: %v; retrying in %s\n", e.Err, e.RetryIn)
			case agent.Disconnected:
				fmt.Fprintf(os.Stderr, "disconnected: %v; retrying in %s\n", e.Err, e.RetryIn)
			}
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	_ = a.Run(ctx) // returns once interrupted
}

// A handler of one's own instead of a Forwarder.
func ExampleHandlerFunc() {
	h := agent.HandlerFunc(func(ctx context.Context, req *agent.Request) *agent.Response {
		if req.Method != "GET" || req.Path != "/status" {
			return &agent.Response{StatusCode: 404}
		}
		return &agent.Response{StatusCode: 200, Body: []byte("all good")}
	})
	resp := h.ServeCommand(context.Background(), &agent.Request{Method: "GET", Path: "/status"})
	fmt.Println(resp.StatusCode, string(resp.Body))
	// Output: 200 all good
}
