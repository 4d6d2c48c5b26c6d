// Package e2e holds VeloFlux's privileged end-to-end tests: the real
// `veloflux` binary, built once per run, drives the XDP balancer on the
// balancer veth of a tests/lab topology, and real TCP, UDP and HTTP traffic
// from the lab's client namespace goes through it to the backends.
//
// Every test builds its own lab (unique namespace prefix and subnet), mounts
// a private BPF filesystem under t.TempDir() for the agent's --pin-path, so
// no pin can leak onto the host, and removes the agent, its pins, the mount
// and the lab in t.Cleanup, also on failure. The agent's output goes to the
// test log, line by line.
//
// The binary is built from this checkout with `go build ./cmd/veloflux`;
// VELOFLUX_E2E_BINARY=/path/to/veloflux tests a prebuilt one instead.
//
// The tests skip without root, or fail instead when VELOFLUX_REQUIRE_PRIV=1.
// Loads are bounded in request count and time. Tests run one at a time:
// several assert on timings and shares, and the machines are small.
//
//	sudo go test ./tests/e2e/ -count=1 -v
package e2e
