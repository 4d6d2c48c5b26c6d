// Package bench holds end-to-end benchmarks of VeloFlux on the namespace lab
// (tests/lab). They need root, and wrk, haproxy and nft on the PATH
// (deploy/install-deps.sh bench); without them they skip.
//
//	go test -run '^$' -bench BenchmarkL4 -benchtime 1x ./tests/bench/ -v
//
// BenchmarkL4 puts three peers in front of the same three backends, one
// after the other on one lab, in interleaved rounds: the VeloFlux agent in
// dsr mode, nftables DNAT load balancing and HAProxy in TCP mode. It measures
// each with wrk from the client namespace, new connections per second and
// keep-alive requests per second, and then times the agent's SIGHUP reload to
// 1,000 VIPs and reads its RSS. docs/BENCHMARKS.md records the figures.
package bench
