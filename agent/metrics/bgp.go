package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// BGPPeer is one BGP session as veloflux_bgp_peer_up and
// veloflux_bgp_peer_transitions_total report it.
type BGPPeer struct {
	Peer        string // the peer's address
	Up          bool
	Transitions uint64 // times the session went up or down
}

// BGPState is the speaker's state at scrape time.
type BGPState struct {
	Peers []BGPPeer
	// Announced says, per VIP address, whether this node announces it.
	Announced map[string]bool
}

// VIPRing is the fingerprint of one VIP's installed Maglev ring.
type VIPRing struct {
	VIP         string // "10.0.0.1:80/tcp", as the other VIP families
	Fingerprint uint64 // fits a float64 exactly
}

// clusterCollector reports what must agree across the nodes behind one
// router: the BGP sessions and announcements, and the ring fingerprints.
type clusterCollector struct {
	bgp   func() (BGPState, bool)
	rings func() []VIPRing

	peerUp, peerTransitions, announced, fingerprint *prometheus.Desc
}

func newClusterCollector(bgp func() (BGPState, bool), rings func() []VIPRing) *clusterCollector {
	return &clusterCollector{
		bgp: bgp, rings: rings,
		peerUp: prometheus.NewDesc("veloflux_bgp_peer_up",
			"Whether the BGP session with the peer is established (1) or not (0). Present only with a bgp section.",
			[]string{"peer"}, nil),
		peerTransitions: prometheus.NewDesc("veloflux_bgp_peer_transitions_total",
			"Times the BGP session with the peer went up or down since the speaker started.",
			[]string{"peer"}, nil),
		announced: prometheus.NewDesc("veloflux_bgp_announced",
			"Whether this node announces the VIP address over BGP (1) or withdraws it (0): announced while XDP is attached, a ring of the address has a live backend and the node is not drained.",
			[]string{"vip"}, nil),
		fingerprint: prometheus.NewDesc("veloflux_vip_ring_fingerprint",
			"A hash of the content of the VIP's installed Maglev table (which backend each slot sends flows to). Nodes behind one router must show the same value for a VIP, or flows that move between them change backend.",
			[]string{"vip"}, nil),
	}
}

func (c *clusterCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.peerUp
	ch <- c.peerTransitions
	ch <- c.announced
	ch <- c.fingerprint
}

func (c *clusterCollector) Collect(ch chan<- prometheus.Metric) {
	if c.bgp != nil {
		if st, on := c.bgp(); on {
			for _, p := range st.Peers {
				emit(ch, c.peerUp, prometheus.GaugeValue, boolValue(p.Up), p.Peer)
				emit(ch, c.peerTransitions, prometheus.CounterValue, float64(p.Transitions), p.Peer)
			}
			for vip, on := range st.Announced {
				emit(ch, c.announced, prometheus.GaugeValue, boolValue(on), vip)
			}
		}
	}
	if c.rings != nil {
		for _, r := range c.rings() {
			emit(ch, c.fingerprint, prometheus.GaugeValue, float64(r.Fingerprint), r.VIP)
		}
	}
}
