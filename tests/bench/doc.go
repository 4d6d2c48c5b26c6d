// Package bench holds VeloFlux's benchmarks against its peers. They need
// root, and wrk, haproxy, nginx and nft on the PATH (deploy/install-deps.sh
// bench, which `make bench` runs); without them they skip.
//
//	go test -run '^$' -bench 'BenchmarkL4$|BenchmarkL7$' -benchtime 1x ./tests/bench/ -v
//
// BenchmarkL4 puts three peers in front of the same three backends, one
// after the other on one lab, in interleaved rounds: the VeloFlux agent in
// dsr mode, nftables DNAT load balancing and HAProxy in TCP mode. It measures
// each with wrk from the client namespace, new connections per second and
// keep-alive requests per second, and then times the agent's SIGHUP reload to
// 1,000 VIPs and reads its RSS.
//
// BenchmarkL7 compares the agent's L7 proxy with HAProxy in HTTP mode and
// nginx, equivalently configured over the same three loopback backends, each
// proxy pinned to one CPU, plain and with TLS; BenchmarkProfileL7 runs the
// same proxy in-process for CPU profiles. docs/BENCHMARKS.md records the
// figures.
package bench
