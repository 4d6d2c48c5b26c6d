package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestClusterMetrics(t *testing.T) {
	on := true
	c := newClusterCollector(func() (BGPState, bool) {
		return BGPState{
			Peers:     []BGPPeer{{Peer: "192.0.2.1", Up: true, Transitions: 3}, {Peer: "192.0.2.2", Transitions: 0}},
			Announced: map[string]bool{"10.0.0.1": true, "10.0.0.2": false},
		}, on
	}, func() []VIPRing {
		return []VIPRing{{VIP: "10.0.0.1:80/tcp", Fingerprint: 1<<52 - 1}}
	})
	want := `
# HELP veloflux_bgp_announced Whether this node announces the VIP address over BGP (1) or withdraws it (0): announced while XDP is attached, a ring of the address has a live backend and the node is not drained.
# TYPE veloflux_bgp_announced gauge
veloflux_bgp_announced{vip="10.0.0.1"} 1
veloflux_bgp_announced{vip="10.0.0.2"} 0
# HELP veloflux_bgp_peer_transitions_total Times the BGP session with the peer went up or down since the speaker started.
# TYPE veloflux_bgp_peer_transitions_total counter
veloflux_bgp_peer_transitions_total{peer="192.0.2.1"} 3
veloflux_bgp_peer_transitions_total{peer="192.0.2.2"} 0
# HELP veloflux_bgp_peer_up Whether the BGP session with the peer is established (1) or not (0). Present only with a bgp section.
# TYPE veloflux_bgp_peer_up gauge
veloflux_bgp_peer_up{peer="192.0.2.1"} 1
veloflux_bgp_peer_up{peer="192.0.2.2"} 0
# HELP veloflux_vip_ring_fingerprint A hash of the content of the VIP's installed Maglev table (which backend each slot sends flows to). Nodes behind one router must show the same value for a VIP, or flows that move between them change backend.
# TYPE veloflux_vip_ring_fingerprint gauge
veloflux_vip_ring_fingerprint{vip="10.0.0.1:80/tcp"} 4.503599627370495e+15
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	on = false
	if n := testutil.CollectAndCount(c, "veloflux_bgp_peer_up", "veloflux_bgp_announced"); n != 0 {
		t.Errorf("without a speaker %d bgp series, want none", n)
	}
}
