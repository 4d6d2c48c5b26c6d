// Package lab builds a throwaway network-namespace topology for exercising
// the VeloFlux XDP load balancer: one client, one balancer and N backends,
// all on a single L2 segment, so privileged tests and `make demo` share the
// same wiring.
//
// Layout (P is a short unique prefix such as "vf3a9c", X the subnet byte):
//
//	               namespace P-switch
//	         ┌───────────── bridge Pbr ─────────────┐
//	       Pcp            Plbp (XDP_PASS)          Pb0p ...
//	        │               │                        │
//	P-client: Pc     P-balancer: Plb            P-backend0: Pb0
//	10.X.0.2          10.X.0.1                   10.X.0.10 + VIPs on lo
//	fd00:X::2         fd00:X::1                  fd00:X::10
//
// The client routes every VIP via the balancer's address, so VIP traffic
// reaches the balancer's veth (where the XDP program attaches) carrying the
// balancer's MAC. Backends hold the VIPs on loopback and answer the client
// directly (direct server return); ARP/NDP for the VIPs is suppressed so
// only the balancer draws that traffic.
//
// With Options.BalancerInRoot the balancer end lives in the namespace of the
// calling process instead, so an agent listening on localhost is reachable;
// the bridge stays in its own namespace either way.
//
// Namespaces are named and bind-mounted under /run/netns exactly like
// `ip netns add`, so `ip netns exec P-client ...` works while a lab is up.
package lab
