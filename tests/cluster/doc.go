// Package cluster tests VeloFlux as several nodes behind an ECMP router:
// three namespaces each run a real agent that announces the VIP over BGP to
// a router namespace running BIRD 2, which spreads the client's flows over
// the nodes with an L4 hash; the backends answer the client directly (dsr).
//
// Layout, on one tests/lab segment 10.X.0.0/24:
//
//	client 10.X.0.5 ──► router 10.X.0.2 (BIRD, ECMP) ──► node0 .1, node1 .3, node2 .4
//	                                                       │ XDP, Maglev
//	   ◄──────────────── backends .10 .11 .12 (VIPs on lo) ◄┘
//
// Two VIPs: one dsr, one ipip whose backends run the decapsulator as an
// operator would (`veloflux decap`). Every scenario opens 50 long-lived TCP
// streams from the client to the dsr VIP (the node-killed one 50 more to
// the ipip VIP), each exchanging a line every 50 ms with a backend that prefixes its
// name to every echo, makes something happen to one node (killed, silent,
// restarted, drained, or cut off from its backends' health checks), and
// asserts how the router's kernel route changed and that every stream
// survived and never changed backend (for the node cut off from the health
// checks, the withdrawal only: it moves the flows of the backends it sees
// down first, as a single node would). A negative control gives one node another
// backend set and checks that streams do break and the fingerprints and
// the alert rule show why.
//
// Everything (namespaces, agents, BIRD, pins, mounts) is removed in
// t.Cleanup, also on failure. The tests skip without root or without BIRD
// (apt bird2; deploy/install-deps.sh test installs it), or fail instead
// when VELOFLUX_REQUIRE_PRIV=1. The agent binary is built from this
// checkout; VELOFLUX_CLUSTER_BINARY=/path/to/veloflux tests a prebuilt one.
//
//	sudo go test ./tests/cluster/ -count=1 -v
package cluster
