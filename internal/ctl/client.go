package ctl

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Do sends one request to the server at socket and returns its answer. An
// error means the server could not be asked or did not answer.
func Do(ctx context.Context, socket string, req Request) (Response, error) {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, requestTimeout)
	c, err := d.DialContext(dctx, "unix", socket)
	cancel()
	if err != nil {
		return Response{}, fmt.Errorf("connect to the control socket %s: %w", socket, err)
	}
	defer c.Close()
	deadline := time.Now().Add(commandTimeout + requestTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.SetDeadline(deadline) // fails only on a closed conn, which the write sees
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()

	data, err := json.Marshal(req)
	if err != nil {
		return Response{}, fmt.Errorf("encode request: %w", err)
	}
	if _, err := c.Write(append(data, '\n')); err != nil {
		return Response{}, fmt.Errorf("send request: %w", err)
	}
	line, err := bufio.NewReader(io.LimitReader(c, maxOutputSize)).ReadBytes('\n')
	if err != nil && (!errors.Is(err, io.EOF) || len(line) == 0) {
		return Response{}, fmt.Errorf("read answer: %w", err)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return Response{}, fmt.Errorf("decode answer: %w", err)
	}
	return resp, nil
}

// Run sends the command in args (COMMAND [ARG]...) to the server at
// socket, prints its output to stdout and its error to stderr, and
// returns the exit status: 0 on success, 1 when the command failed, 2 on
// a usage error or when the server cannot be reached.
func Run(ctx context.Context, socket string, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintf(stderr, "machineservice ctl: no command\n\n%s", Usage)
		return 2
	}
	resp, err := Do(ctx, socket, Request{Command: args[0], Args: args[1:]})
	if err != nil {
		fmt.Fprintf(stderr, "machineservice ctl: %v\n", err)
		return 2
	}
	fmt.Fprint(stdout, resp.Output)
	switch {
	case resp.OK:
		return 0
	case resp.Usage:
		fmt.Fprintf(stderr, "machineservice ctl: %s\n\n%s", resp.Error, Usage)
		return 2
	}
	fmt.Fprintf(stderr, "machineservice ctl: %s\n", resp.Error)
	return 1
}
