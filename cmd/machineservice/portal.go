package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/machineservice/machineservice/portal"
)

const portalUsage = `usage:
  machineservice portal --server URL --token TOKEN list [--json]
  machineservice portal --server URL --token TOKEN request AGENT METHOD PATH [-H 'Name: value']... [--data STRING|@FILE]

list     the organization's connected agents (--json: the JSON array as the server sends it)
request  one HTTP request to an agent through the relay: the response body goes to
         standard output, "HTTP <status>" to standard error. AGENT is the agent's
         client id or its machine registration id. --data @FILE reads the body from
         FILE (@- from standard input).

optional: --timeout DURATION (default 60s), --include-sub-orgs

exit status: 0 for a 2xx or 3xx answer (or a list), 1 for any other answer or
when the agent is not connected or does not answer in time, 2 for usage,
connection or authentication errors (a refused token, or an authentication
service that is unavailable).
`

// Exit statuses of the portal command.
const (
	exitOK      = 0
	exitFailed  = 1
	exitProblem = 2
)

// headerFlags collects repeated -H flags.
type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ", ") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

// portalCmd runs one portal command and returns the exit status.
func portalCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("portal", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	server := fs.String("server", "", "server base URL")
	token := fs.String("token", "", "portal token")
	asJSON := fs.Bool("json", false, "list: print the JSON array as the server sends it")
	var headers headerFlags
	fs.Var(&headers, "H", "request: a header 'Name: value' (repeatable)")
	data := fs.String("data", "", "request: the body, or @FILE to read it from FILE (@- for standard input)")
	timeout := fs.Duration("timeout", portal.DefaultRequestTimeout, "how long to wait for the server and the agent")
	subOrgs := fs.Bool("include-sub-orgs", false, "see the agents of sub-organizations too")
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "machineservice: portal: %s\n\n%s", fmt.Sprintf(format, a...), portalUsage)
		return exitProblem
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, portalUsage)
			return exitOK
		}
		return usage("%v", err)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	switch {
	case *server == "":
		return usage("--server is required")
	case *token == "":
		return usage("--token is required")
	case *timeout <= 0:
		return usage("--timeout must be positive")
	case len(pos) == 0:
		return usage("a command is required: list or request")
	}
	var body []byte
	switch pos[0] {
	case "list":
		if len(pos) > 1 {
			return usage("list takes no arguments, got %q", pos[1])
		}
		if set["H"] || set["data"] {
			return usage("-H and --data belong to request")
		}
	case "request":
		if len(pos) != 4 {
			return usage("request needs AGENT METHOD PATH")
		}
		if set["json"] {
			return usage("--json belongs to list")
		}
		if !strings.HasPrefix(pos[3], "/") {
			return usage("PATH must start with /, got %q", pos[3])
		}
		for _, h := range headers {
			if name, _, ok := strings.Cut(h, ":"); !ok || strings.TrimSpace(name) == "" {
				return usage("-H %q: want 'Name: value'", h)
			}
		}
		if set["data"] {
			if body, err = readData(*data); err != nil {
				return usage("--data: %v", err)
			}
		}
	default:
		return usage("unknown portal command %q", pos[0])
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	status := newStatusLine(stderr)
	status.Set("connecting to " + *server + " ...")
	dctx, cancel := context.WithTimeout(ctx, *timeout)
	c, err := portal.Dial(dctx, portal.Config{Server: *server, Token: *token, IncludeSubOrgs: *subOrgs, RequestTimeout: *timeout})
	cancel()
	status.Set("")
	if err != nil {
		switch {
		case errors.Is(err, portal.ErrAuthRejected):
			fmt.Fprintf(stderr, "machineservice: portal: authentication refused: check --token\n")
		case errors.Is(err, portal.ErrAuthUnavailable):
			fmt.Fprintf(stderr, "machineservice: portal: the server's authentication service is unavailable; the token was not checked, try again later\n")
		default:
			fmt.Fprintf(stderr, "machineservice: %v\n", err)
		}
		return exitProblem
	}
	defer c.Close()

	if pos[0] == "list" {
		return portalList(ctx, c, *asJSON, stdout, stderr)
	}
	return portalRequest(ctx, c, status, pos[1], pos[2], pos[3], headers, body, set["data"], stdout, stderr)
}

// parseInterspersed parses flags that may come before, between or after
// the positional arguments, and returns those.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func readData(v string) ([]byte, error) {
	switch {
	case v == "@-":
		return io.ReadAll(os.Stdin)
	case strings.HasPrefix(v, "@"):
		return os.ReadFile(v[1:])
	}
	return []byte(v), nil
}

// failure prints err and returns the exit status it calls for: 2 when the
// connection failed, 1 when the request itself did not succeed.
func failure(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "machineservice: %v\n", err) // the library's errors begin with "portal:"
	if errors.Is(err, portal.ErrClosed) || errors.Is(err, portal.ErrRequestTooLarge) || errors.Is(err, context.Canceled) {
		return exitProblem
	}
	return exitFailed
}

func portalList(ctx context.Context, c *portal.Client, asJSON bool, stdout, stderr io.Writer) int {
	raw, err := c.ListJSON(ctx)
	if err != nil {
		if errors.Is(err, portal.ErrTimeout) {
			return failure(stderr, fmt.Errorf("%w: the server did not answer the list", portal.ErrClosed))
		}
		return failure(stderr, err)
	}
	if asJSON {
		fmt.Fprintf(stdout, "%s\n", raw)
		return exitOK
	}
	var list []portal.Agent
	if err := json.Unmarshal(raw, &list); err != nil {
		return failure(stderr, fmt.Errorf("%w: list: %v", portal.ErrProtocol, err))
	}
	if len(list) == 0 {
		fmt.Fprintln(stderr, "no agents connected")
		return exitOK
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT ID\tREGISTRATION\tVERSION\tORGANIZATION\tLAST UPDATED")
	for _, a := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", a.ClientID, a.MachineRegistrationID, a.ClientVersion,
			a.OrganizationID, a.LastUpdated.Local().Format(time.DateTime))
	}
	if err := tw.Flush(); err != nil {
		return failure(stderr, err)
	}
	return exitOK
}

// errAmbiguous means AGENT names several connected agents.
var errAmbiguous = errors.New("ambiguous agent")

// resolveAgent turns AGENT into a client id: a listed client id as it is,
// else the one agent with that machine registration id. An agent not
// listed is tried as a client id, and the server says whether it is
// there.
func resolveAgent(ctx context.Context, c *portal.Client, name string) (string, error) {
	list, err := c.List(ctx)
	if err != nil {
		return "", err
	}
	var byReg []string
	for _, a := range list {
		if a.ClientID == name {
			return name, nil
		}
		if a.MachineRegistrationID == name {
			byReg = append(byReg, a.ClientID)
		}
	}
	switch len(byReg) {
	case 0:
		return name, nil
	case 1:
		return byReg[0], nil
	}
	return "", fmt.Errorf("%w: %q has %d connections (%s); give a client id", errAmbiguous, name, len(byReg), strings.Join(byReg, ", "))
}

func portalRequest(ctx context.Context, c *portal.Client, status *statusLine, name, method, path string,
	headers []string, body []byte, hasBody bool, stdout, stderr io.Writer) int {
	id, err := resolveAgent(ctx, c, name)
	if err != nil {
		if errors.Is(err, portal.ErrTimeout) {
			return failure(stderr, fmt.Errorf("%w: the server did not answer the list", portal.ErrClosed))
		}
		if errors.Is(err, errAmbiguous) {
			fmt.Fprintf(stderr, "machineservice: portal: %v\n", err)
			return exitProblem
		}
		return failure(stderr, err)
	}
	var rd io.Reader
	if hasBody {
		rd = bytes.NewReader(body)
	}
	// Only the path and query travel, through the relay; the host is a
	// placeholder that is never dialled.
	req, err := http.NewRequestWithContext(ctx, strings.ToUpper(method), "http://agent"+path, rd) //nolint:gosec // see above
	if err != nil {
		fmt.Fprintf(stderr, "machineservice: portal: %v\n", err)
		return exitProblem
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	done := status.Elapsed("waiting for the agent's answer: %d s")
	// RoundTrip, not an http.Client: redirects are shown, not followed.
	resp, err := c.Transport(id).RoundTrip(req)
	done()
	if err != nil {
		return failure(stderr, err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(stdout, resp.Body); err != nil {
		fmt.Fprintf(stderr, "machineservice: portal: write the body: %v\n", err)
		return exitFailed
	}
	fmt.Fprintf(stderr, "HTTP %d\n", resp.StatusCode)
	if resp.StatusCode >= 200 && resp.StatusCode < 400 {
		return exitOK
	}
	return exitFailed
}
