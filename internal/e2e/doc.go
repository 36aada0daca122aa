// Package e2e holds the end-to-end tests that cross the parts of the
// server: several instances sharing one PostgreSQL registry and one NATS
// bus, wired as cmd/machineservice wires them, driven by the agent and
// portal client libraries and by bare protocol clients. It has no code of
// its own.
//
// The tests need MACHINESERVICE_TEST_POSTGRES (a PostgreSQL URL) and skip
// without it; they use MACHINESERVICE_TEST_NATS when set, else an embedded
// NATS server.
package e2e
