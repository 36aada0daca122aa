// Package ctl is the run-time control of a running server: a Unix socket
// the server listens on (mode 0600, so only its user and root may use
// it), and the client behind `machineservice ctl`.
//
// The protocol is one JSON request line and one JSON response line per
// connection:
//
//	-> {"command":"loglevel","args":["debug"]}
//	<- {"ok":true,"output":"log level debug (was info)\n"}
//
// Commands: loglevel debug|info|warn|error|reset, trace CLIENTID|off,
// connections, stats, control AGENTID COMMAND [KEY=VALUE]...
package ctl

import (
	"errors"
	"time"
)

// Request is what the client sends.
type Request struct {
	Command string   `json:"command"`
	Args    []string `json:"args,omitempty"`
}

// Response is what the server answers.
type Response struct {
	OK     bool   `json:"ok"`
	Output string `json:"output,omitempty"`
	Error  string `json:"error,omitempty"`
	// Usage marks a request the server could not take: an unknown command
	// or wrong arguments.
	Usage bool `json:"usage,omitempty"`
}

// Usage describes the commands.
const Usage = `commands:
  loglevel debug|info|warn|error|reset   change the log level (reset: back to the configured one)
  trace CLIENTID|off                     log everything about one client at debug level
  connections                            list the open connections
  stats                                  print the statistics counters and totals
  control AGENTID COMMAND [KEY=VALUE]... send a control request to a connected agent
`

// Errors returned by this package.
var (
	// ErrUsage marks a request that is not a valid command.
	ErrUsage = errors.New("invalid request")
	// ErrSocketInUse means another server is listening on the socket.
	ErrSocketInUse = errors.New("control socket in use by another process")
	// ErrCommandFailed means the server ran the command and it failed.
	ErrCommandFailed = errors.New("command failed")
)

// Timeouts. A control request waits for the agent's answer, which the
// server bounds with its control timeout (30 s by default).
const (
	requestTimeout = 5 * time.Second
	commandTimeout = 2 * time.Minute
	maxRequestSize = 64 << 10
	maxOutputSize  = 16 << 20
)
