package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/machineservice/machineservice/internal/config"
	"github.com/machineservice/machineservice/internal/ctl"
)

// runCtl is `machineservice ctl [--socket PATH] COMMAND [ARG]...`.
func runCtl(args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := fs.String("socket", "", "control socket path")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stdout, "usage: machineservice ctl [--socket PATH] COMMAND [ARG]...\n\n%s", ctl.Usage)
			return 0
		}
		fmt.Fprintf(stderr, "machineservice ctl: %v\n\nusage: machineservice ctl [--socket PATH] COMMAND [ARG]...\n\n%s", err, ctl.Usage)
		return 2
	}
	if fs.NArg() == 1 && fs.Arg(0) == "help" {
		fmt.Fprintf(stdout, "usage: machineservice ctl [--socket PATH] COMMAND [ARG]...\n\n%s", ctl.Usage)
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return ctl.Run(ctx, ctlSocket(*socket, getenv), fs.Args(), stdout, stderr)
}

// ctlSocket picks the socket as the server does: --socket, else
// ENVIRONMENT__CONTROLSOCKET, else the development socket in the working
// directory when ENVIRONMENT__DEV is set or only that one exists, else
// the production one.
func ctlSocket(flagValue string, getenv func(string) string) string {
	if flagValue != "" {
		return flagValue
	}
	if v := getenv("ENVIRONMENT__CONTROLSOCKET"); v != "" {
		return v
	}
	if dev, _ := strconv.ParseBool(getenv("ENVIRONMENT__DEV")); dev {
		return config.DevControlSocket
	}
	if _, err := os.Stat(config.DefaultControlSocket); err != nil {
		if _, err := os.Stat(config.DevControlSocket); err == nil {
			return config.DevControlSocket
		}
	}
	return config.DefaultControlSocket
}
