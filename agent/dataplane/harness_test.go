package dataplane

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/veloflux/veloflux/tests/testenv"
)

// requirePrivileged skips without root, or fails when privileged tests are
// mandatory (testenv).
func requirePrivileged(tb testing.TB) {
	tb.Helper()
	testenv.RequireRoot(tb, "load BPF programs")
}

// A small prime keeps ring writes cheap in tests; production uses 65537.
const testRingSize = 251

// testRunIfindex is the ingress interface BPF_PROG_TEST_RUN reports when it
// is given no context: the loopback device of the caller's namespace, index
// 1 in every namespace. The harness registers lbMAC as its MAC, which makes
// it the balancer's interface for the tests.
const testRunIfindex = 1

// testRunMTU is the MTU the harness registers for that interface: the
// usual Ethernet one, which the tests' small packets fit encapsulated.
const testRunMTU = 1500

var (
	clientMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	lbMAC     = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0xfe}
	gwMAC     = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x99}
	encapSrc4 = netip.MustParseAddr("10.0.0.254")
	encapSrc6 = netip.MustParseAddr("fd00::fe")
)

func realMAC(id uint32) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0xbe, 0, 0, byte(id >> 8), byte(id)}
}

type harness struct {
	tb testing.TB
	dp *Dataplane
}

func newHarness(tb testing.TB, opts Options) *harness {
	tb.Helper()
	requirePrivileged(tb)
	if opts.RingSize == 0 {
		opts.RingSize = testRingSize
	}
	if opts.ConntrackSize == 0 {
		opts.ConntrackSize = 4096
	}
	if opts.MaxReals == 0 {
		opts.MaxReals = 256
	}
	if opts.MaxVIPs == 0 {
		opts.MaxVIPs = 64
	}
	dp, err := Load(opts)
	if err != nil {
		tb.Fatalf("load: %v", err)
	}
	tb.Cleanup(func() { dp.Close() })
	h := &harness{tb: tb, dp: dp}
	h.must(dp.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
	h.must(dp.SetSettings(Settings{
		GatewayMAC:       gwMAC,
		EncapSource4:     encapSrc4,
		EncapSource6:     encapSrc6,
		GUEPort:          DefaultGUEPort,
		TCPIdleTimeoutNs: 300e9,
		UDPIdleTimeoutNs: 30e9,
	}))
	return h
}

func (h *harness) must(err error) {
	h.tb.Helper()
	if err != nil {
		h.tb.Fatal(err)
	}
}

// real registers a real with a MAC derived from its id.
func (h *harness) real(id uint32, addr string) {
	h.tb.Helper()
	h.must(h.dp.SetReal(id, Real{Addr: netip.MustParseAddr(addr), MAC: realMAC(id), State: RealUp}))
}

func (h *harness) setState(id uint32, state RealState) {
	h.tb.Helper()
	reals, err := h.dp.Reals()
	h.must(err)
	r := reals[id]
	r.State = state
	h.must(h.dp.SetReal(id, r))
}

// ring fills a VIP's ring by repeating ids; the data plane tests care about
// which ids are in the ring, not about Maglev's placement.
func (h *harness) ring(vipID uint32, ids ...uint32) {
	h.tb.Helper()
	ring := make([]uint32, h.dp.RingSize())
	for i := range ring {
		if len(ids) > 0 {
			ring[i] = ids[i%len(ids)]
		}
	}
	h.must(h.dp.SetRing(vipID, ring))
}

func (h *harness) vip(addr string, port uint16, proto Protocol, meta VIPMeta, realIDs ...uint32) VIP {
	h.tb.Helper()
	v := VIP{Addr: netip.MustParseAddr(addr), Port: port, Proto: proto}
	h.must(h.dp.SetVIP(v, meta))
	h.ring(meta.ID, realIDs...)
	return v
}

// run feeds one packet to the balancer through BPF_PROG_TEST_RUN.
func (h *harness) run(pkt []byte) (Verdict, []byte) {
	h.tb.Helper()
	out := make([]byte, len(pkt)+256)
	opts := ebpf.RunOptions{Data: pkt, DataOut: out}
	ret, err := h.dp.objs.VfBalancer.Run(&opts)
	if err != nil {
		h.tb.Fatalf("run balancer on %d bytes: %v", len(pkt), err)
	}
	return Verdict(ret), opts.DataOut
}

func (h *harness) counters() []Counter {
	h.tb.Helper()
	c, err := h.dp.Counters()
	h.must(err)
	return c
}

// --- packet construction (gopacket, independent of the code under test) ---

type pkt struct {
	src, dst     string
	sport, dport uint16
	proto        layers.IPProtocol
	vlan         uint16 // 0 = untagged
	ipv4Options  []layers.IPv4Option
	df           bool
	tos          uint8
	tcpFlags     string // "S" for SYN, "A" for ACK
	payload      []byte
	v6ext        []layers.IPProtocol // IPv6 extension headers to insert
}

func serialize(tb testing.TB, ls ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
		tb.Fatalf("serialize: %v", err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

// l3 builds the IP packet (no Ethernet) described by p.
func (p pkt) l3(tb testing.TB) []byte {
	tb.Helper()
	src, dst := netip.MustParseAddr(p.src), netip.MustParseAddr(p.dst)
	var ls []gopacket.SerializableLayer
	var netLayer gopacket.NetworkLayer
	if src.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: p.proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice(),
			Options: p.ipv4Options, TOS: p.tos}
		if p.df {
			ip.Flags = layers.IPv4DontFragment
		}
		ls, netLayer = append(ls, ip), ip
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: p.proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice(),
			TrafficClass: p.tos}
		ls, netLayer = append(ls, ip), ip
		if len(p.v6ext) > 0 {
			ip.NextHeader = p.v6ext[0]
			for i, ext := range p.v6ext {
				next := p.proto
				if i+1 < len(p.v6ext) {
					next = p.v6ext[i+1]
				}
				ls = append(ls, &rawExt{next: next, kind: ext})
			}
		}
	}
	switch p.proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(p.sport), DstPort: layers.TCPPort(p.dport), Window: 64240, Seq: 1}
		for _, f := range p.tcpFlags {
			switch f {
			case 'S':
				tcp.SYN = true
			case 'A':
				tcp.ACK = true
			}
		}
		tcp.SetNetworkLayerForChecksum(netLayer)
		ls = append(ls, tcp)
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(p.sport), DstPort: layers.UDPPort(p.dport)}
		udp.SetNetworkLayerForChecksum(netLayer)
		ls = append(ls, udp)
	}
	ls = append(ls, gopacket.Payload(p.payload))
	return serialize(tb, ls...)
}

// frame wraps an L3 packet in Ethernet (and a VLAN tag) from the client to
// the LB. It is built by hand because gopacket pads frames to 60 bytes, and
// the tests compare exact lengths.
func frame(tb testing.TB, l3 []byte, vlan uint16) []byte {
	tb.Helper()
	etype := uint16(layers.EthernetTypeIPv4)
	if len(l3) > 0 && l3[0]>>4 == 6 {
		etype = uint16(layers.EthernetTypeIPv6)
	}
	out := make([]byte, 0, 18+len(l3))
	out = append(out, lbMAC...)
	out = append(out, clientMAC...)
	if vlan != 0 {
		out = binary.BigEndian.AppendUint16(out, uint16(layers.EthernetTypeDot1Q))
		out = binary.BigEndian.AppendUint16(out, vlan)
	}
	out = binary.BigEndian.AppendUint16(out, etype)
	return append(out, l3...)
}

func (p pkt) frame(tb testing.TB) []byte { return frame(tb, p.l3(tb), p.vlan) }

// rawExt is a minimal 8-byte IPv6 extension header (hop-by-hop, routing,
// destination options) padded with PadN, or a fragment header.
type rawExt struct {
	next layers.IPProtocol
	kind layers.IPProtocol
}

func (e *rawExt) LayerType() gopacket.LayerType { return gopacket.LayerTypePayload }

func (e *rawExt) SerializeTo(b gopacket.SerializeBuffer, _ gopacket.SerializeOptions) error {
	buf, err := b.PrependBytes(8)
	if err != nil {
		return err
	}
	buf[0] = byte(e.next)
	if e.kind == layers.IPProtocolIPv6Fragment {
		// offset 0, M=1, id 0x1234: a first fragment
		copy(buf[1:], []byte{0, 0, 1, 0, 0, 0x12, 0x34})
		return nil
	}
	// Hdr Ext Len 0 (8 bytes), then a PadN option filling 6 bytes.
	copy(buf[1:], []byte{0, 1, 4, 0, 0, 0, 0})
	return nil
}

// withMACs returns a copy of frame with new destination and source MACs.
func withMACs(in []byte, dst, src net.HardwareAddr) []byte {
	out := append([]byte(nil), in...)
	copy(out[0:6], dst)
	copy(out[6:12], src)
	return out
}
