// Package live is the live proof of VeloFlux's API contract (docs/ARCHITECTURE.md,
// "API and WebSocket contract"): one namespace lab
// (tests/lab), one real `veloflux` agent on the balancer veth with traffic
// flowing through a dsr VIP, and clients nobody here wrote talking to it:
//
//   - the original project's quick-test python snippet, verbatim, with
//     /usr/bin/python3 and python3-websockets, on each of the seven channels;
//   - tests/test_websockets_validation.sh (the operator's validation script), run
//     inside the balancer namespace, which must pass 100%;
//   - :8080/metrics parsed with prometheus/common/expfmt and linted with
//     client_golang's promlint;
//   - a gorilla/websocket client on the metrics channel, whose VIP packet
//     counter must move by what was sent (2,000 UDP datagrams) within 1%;
//   - API writes that must reach the file (with a .bak), survive a restart,
//     and a bad body that must change nothing.
//
// The benchmarks (bench_test.go) put 1,000 WebSocket clients on the metrics
// channel and time /metrics scrapes with 1,000 VIPs; docs/BENCHMARKS.md
// ("API and WebSockets") records the figures.
//
// The agent's :9090 and :8080 listen inside the balancer namespace; the
// tests reach them with dialers that run in that namespace, or run their
// clients there with `ip netns exec`. Everything (agent, private bpffs and
// its pins, namespaces) is removed in t.Cleanup, also on failure.
//
// Root is needed; without it the tests skip, or fail when
// VELOFLUX_REQUIRE_PRIV=1.
//
//	go test ./tests/live/ -count=1 -v
//	go test ./tests/live/ -run '^$' -bench . -benchtime 1x -v
package live
