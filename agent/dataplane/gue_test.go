package dataplane

import (
	"bytes"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// vfgueFlowHash is the balancer's flow hash of a 5-tuple (vfHashWords over
// its words as the program stores them), so the tests can predict GUE's
// source port without asking the program.
func vfgueFlowHash(src, dst netip.Addr, sport, dport uint16, proto layers.IPProtocol) uint32 {
	var words []uint32
	for _, a := range []netip.Addr{src, dst} {
		b := a.AsSlice()
		for i := 0; i < len(b); i += 4 {
			words = append(words, binary.LittleEndian.Uint32(b[i:]))
		}
	}
	swap := func(v uint16) uint32 { return uint32(bits.ReverseBytes16(v)) }
	return vfHashWords(append(words, swap(sport)<<16|swap(dport), uint32(proto))...)
}

// vfgueSourcePort is the UDP source port GUE must send a flow's packets
// from: its hash folded into the dynamic range 49152-65535.
func vfgueSourcePort(p pkt) uint16 {
	h := vfgueFlowHash(netip.MustParseAddr(p.src), netip.MustParseAddr(p.dst), p.sport, p.dport, p.proto)
	return 0xc000 | uint16(h&0x3fff)
}

// balancerGUEReference builds the expected GUE frame independently of the BPF
// code: outer IP (checksum by gopacket), then UDP to the GUE port with a
// zero checksum, then the inner IP packet unchanged (variant 1).
func balancerGUEReference(t testing.TB, p pkt, realAddr netip.Addr, port uint16) []byte {
	t.Helper()
	inner := p.l3(t)
	udp := &layers.UDP{SrcPort: layers.UDPPort(vfgueSourcePort(p)), DstPort: layers.UDPPort(port)}
	buf := gopacket.NewSerializeBuffer()
	// Lengths only: the balancer leaves the UDP checksum zero (see vf_gue_fill_udp).
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, udp, gopacket.Payload(inner)); err != nil {
		t.Fatal(err)
	}
	l4 := buf.Bytes()
	if realAddr.Is4() {
		innerIP := &layers.IPv4{}
		if err := innerIP.DecodeFromBytes(inner, gopacket.NilDecodeFeedback); err != nil {
			t.Fatal(err)
		}
		outer := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP,
			SrcIP: encapSrc4.AsSlice(), DstIP: realAddr.AsSlice(), TOS: innerIP.TOS,
			Flags: innerIP.Flags & layers.IPv4DontFragment}
		return withMACs(frame(t, serialize(t, outer, gopacket.Payload(l4)), p.vlan), gwMAC, lbMAC)
	}
	innerIP := &layers.IPv6{}
	if err := innerIP.DecodeFromBytes(inner, gopacket.NilDecodeFeedback); err != nil {
		t.Fatal(err)
	}
	outer := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP,
		SrcIP: encapSrc6.AsSlice(), DstIP: realAddr.AsSlice(), TrafficClass: innerIP.TrafficClass}
	return withMACs(frame(t, serialize(t, outer, gopacket.Payload(l4)), p.vlan), gwMAC, lbMAC)
}

const (
	vfgueVIP4ID = 20
	vfgueVIP6ID = 21
	vfgueVIP4   = "10.100.0.20"
	vfgueVIP6   = "fd00:100::20"
)

// vfgueHarness: a gue VIP per family, each with one real so the output is exact.
func vfgueHarness(tb testing.TB) *harness {
	h := newHarness(tb, Options{})
	h.real(1, real4a)
	h.real(3, real6a)
	h.vip(vfgueVIP4, 443, ProtoTCP, VIPMeta{ID: vfgueVIP4ID, Mode: ModeGUE}, 1)
	h.vip(vfgueVIP6, 53, ProtoUDP, VIPMeta{ID: vfgueVIP6ID, Mode: ModeGUE}, 3)
	return h
}

// TestGUEEncapsulation: a gue VIP's packets leave inside outer IP + UDP to
// the GUE port, from a source port that the flow's hash decides, byte for
// byte as gopacket builds them, for both families, with a VLAN tag, and
// for a reply-less ACK of an established flow.
func TestGUEEncapsulation(t *testing.T) {
	h := vfgueHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	payload := []byte("hello, gue")
	cases := []struct {
		name string
		p    pkt
		real string
	}{
		{"ipv4 tcp syn with df and tos", pkt{src: client4, dst: vfgueVIP4, sport: 41000, dport: 443, proto: tcp, tcpFlags: "S", df: true, tos: 0x28}, real4a},
		{"ipv4 established ack", pkt{src: client4, dst: vfgueVIP4, sport: 41000, dport: 443, proto: tcp, tcpFlags: "A", df: true, payload: payload}, real4a},
		{"ipv4 other flow", pkt{src: client4, dst: vfgueVIP4, sport: 41001, dport: 443, proto: tcp, tcpFlags: "S"}, real4a},
		{"ipv4 vlan", pkt{src: client4, dst: vfgueVIP4, sport: 41002, dport: 443, proto: tcp, tcpFlags: "S", vlan: 42}, real4a},
		{"ipv6 udp", pkt{src: client6, dst: vfgueVIP6, sport: 41003, dport: 53, proto: udp, payload: payload, tos: 0xb8}, real6a},
		{"ipv6 vlan", pkt{src: client6, dst: vfgueVIP6, sport: 41004, dport: 53, proto: udp, payload: payload, vlan: 7}, real6a},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := h.counters()[ReasonTxGUE].Packets
			verdict, out := h.run(tc.p.frame(t))
			if verdict != VerdictTx {
				t.Fatalf("verdict %v, want %v", verdict, VerdictTx)
			}
			if got := h.counters()[ReasonTxGUE].Packets - before; got != 1 {
				t.Fatalf("tx_gue moved by %d, want 1", got)
			}
			want := balancerGUEReference(t, tc.p, netip.MustParseAddr(tc.real), DefaultGUEPort)
			if !bytes.Equal(out, want) {
				t.Fatalf("output differs\n got  %x\n want %x", out, want)
			}
		})
	}
}

// TestGUESourcePortSpreads: different flows of one client get different
// UDP source ports (what RSS and ECMP hash on), all in the dynamic range.
func TestGUESourcePortSpreads(t *testing.T) {
	h := vfgueHarness(t)
	ports := map[uint16]bool{}
	const flows = 64
	for i := range flows {
		p := pkt{src: client4, dst: vfgueVIP4, sport: uint16(42000 + i), dport: 443, proto: layers.IPProtocolTCP, tcpFlags: "S"}
		verdict, out := h.run(p.frame(t))
		if verdict != VerdictTx {
			t.Fatalf("flow %d: verdict %v, want %v", i, verdict, VerdictTx)
		}
		pk := gopacket.NewPacket(out, layers.LayerTypeEthernet, gopacket.Default)
		u, ok := pk.Layer(layers.LayerTypeUDP).(*layers.UDP)
		if !ok {
			t.Fatalf("flow %d: no outer UDP header in %x", i, out)
		}
		if u.SrcPort < 49152 || u.DstPort != layers.UDPPort(DefaultGUEPort) {
			t.Fatalf("flow %d: UDP %d -> %d, want a source port >= 49152 and destination %d", i, u.SrcPort, u.DstPort, DefaultGUEPort)
		}
		ports[uint16(u.SrcPort)] = true
	}
	// 64 flows into 16384 ports: a collision or two is chance, a handful is a bug.
	if len(ports) < flows-4 {
		t.Fatalf("%d flows used only %d source ports", flows, len(ports))
	}
}

// TestGUEPortSetting: the GUE port is read back as set, another port is
// used at once, and with port 0 a gue VIP's packets are dropped as
// impossible to encapsulate rather than sent to port 0.
func TestGUEPortSetting(t *testing.T) {
	h := vfgueHarness(t)
	s, err := h.dp.Settings()
	if err != nil {
		t.Fatal(err)
	}
	if s.GUEPort != DefaultGUEPort {
		t.Fatalf("GUE port read back %d, want %d", s.GUEPort, DefaultGUEPort)
	}
	p := pkt{src: client4, dst: vfgueVIP4, sport: 43000, dport: 443, proto: layers.IPProtocolTCP, tcpFlags: "S"}

	s.GUEPort = 7000
	h.must(h.dp.SetSettings(s))
	if _, out := h.run(p.frame(t)); !bytes.Equal(out, balancerGUEReference(t, p, netip.MustParseAddr(real4a), 7000)) {
		t.Fatalf("after setting port 7000: %x", out)
	}

	s.GUEPort = 0
	h.must(h.dp.SetSettings(s))
	before := h.counters()[ReasonDropEncap].Packets
	if verdict, _ := h.run(p.frame(t)); verdict != VerdictDrop {
		t.Fatalf("with GUE port 0: verdict %v, want %v", verdict, VerdictDrop)
	}
	if got := h.counters()[ReasonDropEncap].Packets - before; got != 1 {
		t.Fatalf("drop_encap moved by %d, want 1", got)
	}
}

// TestGUEThroughDecap: what the balancer sends a gue VIP's real, given to
// the decapsulator that real runs, comes out as the client's packet again
// (zero UDP checksum and all), in both families.
func TestGUEThroughDecap(t *testing.T) {
	h := vfgueHarness(t)
	d := newDecapHarness(t, real4a, real6a)
	for _, p := range []pkt{
		{src: client4, dst: vfgueVIP4, sport: 44000, dport: 443, proto: layers.IPProtocolTCP, tcpFlags: "S", df: true},
		{src: client6, dst: vfgueVIP6, sport: 44001, dport: 53, proto: layers.IPProtocolUDP, payload: []byte("query")},
	} {
		verdict, tunnel := h.run(p.frame(t))
		if verdict != VerdictTx {
			t.Fatalf("%s: balancer verdict %v, want %v", p.src, verdict, VerdictTx)
		}
		verdict, out := d.run(tunnel)
		// The decapsulator keeps the tunnel frame's Ethernet header.
		want := withMACs(frame(t, p.l3(t), 0), gwMAC, lbMAC)
		if verdict != VerdictPass || !bytes.Equal(out, want) {
			t.Fatalf("%s: decap verdict %v\n got  %x\n want %x", p.src, verdict, out, want)
		}
	}
	if s := d.stats(); s.GUE4Packets != 1 || s.GUE6Packets != 1 || s.Dropped() != 0 {
		t.Fatalf("decap counters %+v, want one GUE packet per family and no drops", s)
	}
}
