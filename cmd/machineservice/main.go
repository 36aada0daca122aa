// Command machineservice runs the Machine Services relay and its tools.
//
//	machineservice serve [--dev] [--listen ADDR] [--tokens FILE] [--metrics-listen ADDR]
//	machineservice migrate
//	machineservice ctl [--socket PATH] COMMAND [ARG]...
//	machineservice controller [--tokens FILE] [--nats URL]
//	machineservice agent --server URL (--token TOKEN | --token-file FILE) --forward URL [--certificates URL]
//	machineservice portal --server URL --token TOKEN list [--json]
//	machineservice portal --server URL --token TOKEN request AGENT METHOD PATH [-H 'Name: value']... [--data STRING|@FILE]
//	machineservice env
//	machineservice version
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/machineservice/machineservice/internal/config"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage: machineservice COMMAND [flags]

commands:
  serve       run the server (flags: --dev, --listen ADDR, --tokens FILE, --dev-key-file FILE, --metrics-listen ADDR, --nats URL)
  migrate     apply the database schema migrations and exit (also: initonly)
  controller  run the built-in controller alone on the NATS bus (flags: --tokens FILE, --nats URL, --dev)
  ctl         control a running server: machineservice ctl [--socket PATH] COMMAND (ctl help lists them)
  agent       connect as an agent and forward requests to a local HTTP API
              (--server URL (--token TOKEN | --token-file FILE) --forward URL [--certificates URL])
  portal      list agents or send one a request through the relay
              (--server URL --token TOKEN list [--json] | request AGENT METHOD PATH [-H 'Name: value']... [--data STRING|@FILE])
  env         print every setting with its default and meaning
  version     print the version
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command and returns the exit status: 0 on success, 1 on
// a failure while running, 2 on a usage or configuration error.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(args[1:], stdout, stderr)
	case "migrate", "initonly":
		err = migrate(args[1:], stdout, os.Getenv)
	case "ctl":
		return runCtl(args[1:], stdout, stderr, os.Getenv)
	case "controller":
		err = controllerCommand(args[1:], stderr)
	case "agent":
		err = agentCmd(args[1:], stderr)
	case "portal":
		return portalCmd(args[1:], stdout, stderr)
	case "env":
		err = config.PrintEnv(stdout)
	case "version":
		fmt.Fprintln(stdout, version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "machineservice: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "machineservice: %v\n", err)
		if errors.Is(err, config.ErrUsage) {
			return 2
		}
		return 1
	}
	return 0
}
