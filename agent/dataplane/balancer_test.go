package dataplane

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

const (
	vip4     = "10.100.0.1"
	vip6     = "fd00:100::1"
	client4  = "192.168.1.10"
	client6  = "fd00:1::10"
	real4a   = "10.0.0.11"
	real4b   = "10.0.0.12"
	real4c   = "10.0.0.13"
	real6a   = "fd00::11"
	vipIDDSR = 1
	vipIDIP  = 2
	vipIDUDP = 3
	vipIDAny = 4
	vipID6   = 5
	vipID6IP = 6
	vipIDEmp = 7
	vipIDGUE = 10 // 8 and 9 are the fuzz harness's nat VIPs
	vipID6GU = 11
	vipGUE4  = "10.100.0.4"
	vipGUE6  = "fd00:100::4"
)

// standardHarness: one real per VIP so the expected output is exact.
func standardHarness(tb testing.TB) *harness {
	h := newHarness(tb, Options{})
	h.real(1, real4a)
	h.real(2, real4b)
	h.real(3, real6a)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: vipIDDSR, Mode: ModeDSR}, 1)
	h.vip(vip4, 8080, ProtoTCP, VIPMeta{ID: vipIDIP, Mode: ModeIPIP}, 2)
	h.vip(vip4, 53, ProtoUDP, VIPMeta{ID: vipIDUDP, Mode: ModeDSR}, 2)
	h.vip("10.100.0.2", 0, ProtoTCP, VIPMeta{ID: vipIDAny, Mode: ModeDSR}, 2)
	h.vip(vip6, 443, ProtoTCP, VIPMeta{ID: vipID6, Mode: ModeDSR}, 3)
	h.vip(vip6, 53, ProtoUDP, VIPMeta{ID: vipID6IP, Mode: ModeIPIP}, 3)
	h.vip("10.100.0.3", 80, ProtoTCP, VIPMeta{ID: vipIDEmp, Mode: ModeDSR})
	h.vip(vipGUE4, 443, ProtoTCP, VIPMeta{ID: vipIDGUE, Mode: ModeGUE}, 2)
	h.vip(vipGUE6, 53, ProtoUDP, VIPMeta{ID: vipID6GU, Mode: ModeGUE}, 3)
	return h
}

// ipipReference builds the expected encapsulated frame independently of the
// BPF code: gopacket computes the outer header and its checksum.
func ipipReference(t testing.TB, inner []byte, realAddr netip.Addr, vlan uint16) []byte {
	t.Helper()
	if realAddr.Is4() {
		innerIP := &layers.IPv4{}
		if err := innerIP.DecodeFromBytes(inner, gopacket.NilDecodeFeedback); err != nil {
			t.Fatal(err)
		}
		outer := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolIPv4,
			SrcIP: encapSrc4.AsSlice(), DstIP: realAddr.AsSlice(), TOS: innerIP.TOS,
			Flags: innerIP.Flags & layers.IPv4DontFragment}
		l3 := serialize(t, outer, gopacket.Payload(inner))
		return withMACs(frame(t, l3, vlan), gwMAC, lbMAC)
	}
	innerIP := &layers.IPv6{}
	if err := innerIP.DecodeFromBytes(inner, gopacket.NilDecodeFeedback); err != nil {
		t.Fatal(err)
	}
	outer := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolIPv6,
		SrcIP: encapSrc6.AsSlice(), DstIP: realAddr.AsSlice(), TrafficClass: innerIP.TrafficClass}
	l3 := serialize(t, outer, gopacket.Payload(inner))
	return withMACs(frame(t, l3, vlan), gwMAC, lbMAC)
}

func TestForwarding(t *testing.T) {
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	payload := []byte("hello, balancer")
	ipOpts := []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}

	type want struct {
		verdict Verdict
		reason  Reason
		dsrTo   uint32 // real id whose MAC the DSR frame must carry
		ipipTo  string // real address of the expected IPIP frame
	}
	cases := []struct {
		name string
		p    pkt
		want want
	}{
		{"tcp syn dsr", pkt{src: client4, dst: vip4, sport: 40000, dport: 80, proto: tcp, tcpFlags: "S"},
			want{VerdictTx, ReasonTxDSR, 1, ""}},
		{"udp dsr", pkt{src: client4, dst: vip4, sport: 40001, dport: 53, proto: udp, payload: payload},
			want{VerdictTx, ReasonTxDSR, 2, ""}},
		{"tcp syn ipip", pkt{src: client4, dst: vip4, sport: 40002, dport: 8080, proto: tcp, tcpFlags: "S", df: true, tos: 0x28},
			want{VerdictTx, ReasonTxIPIP, 0, real4b}},
		{"wildcard port vip", pkt{src: client4, dst: "10.100.0.2", sport: 40003, dport: 8443, proto: tcp, tcpFlags: "S"},
			want{VerdictTx, ReasonTxDSR, 2, ""}},
		{"ipv6 tcp dsr", pkt{src: client6, dst: vip6, sport: 40004, dport: 443, proto: tcp, tcpFlags: "S"},
			want{VerdictTx, ReasonTxDSR, 3, ""}},
		{"ipv6 udp ip6ip6", pkt{src: client6, dst: vip6, sport: 40005, dport: 53, proto: udp, payload: payload, tos: 0xb8},
			want{VerdictTx, ReasonTxIPIP, 0, real6a}},
		{"ipv6 with extension headers", pkt{src: client6, dst: vip6, sport: 40006, dport: 443, proto: tcp, tcpFlags: "S",
			v6ext: []layers.IPProtocol{layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Destination}},
			want{VerdictTx, ReasonTxDSR, 3, ""}},
		{"ipv4 options", pkt{src: client4, dst: vip4, sport: 40007, dport: 80, proto: tcp, tcpFlags: "S", ipv4Options: ipOpts},
			want{VerdictTx, ReasonTxDSR, 1, ""}},
		{"vlan dsr", pkt{src: client4, dst: vip4, sport: 40008, dport: 80, proto: tcp, tcpFlags: "S", vlan: 42},
			want{VerdictTx, ReasonTxDSR, 1, ""}},
		{"vlan ipip", pkt{src: client4, dst: vip4, sport: 40009, dport: 8080, proto: tcp, tcpFlags: "A", vlan: 42, payload: payload},
			want{VerdictTx, ReasonTxIPIP, 0, real4b}},
		{"ipip with ipv4 options", pkt{src: client4, dst: vip4, sport: 40010, dport: 8080, proto: tcp, tcpFlags: "S", ipv4Options: ipOpts},
			want{VerdictTx, ReasonTxIPIP, 0, real4b}},
		{"not a vip address", pkt{src: client4, dst: "10.100.9.9", sport: 40011, dport: 80, proto: tcp, tcpFlags: "S"},
			want{VerdictPass, ReasonPassNotVIP, 0, ""}},
		{"vip address, other port", pkt{src: client4, dst: vip4, sport: 40012, dport: 81, proto: tcp, tcpFlags: "S"},
			want{VerdictPass, ReasonPassNotVIP, 0, ""}},
		{"vip port, other protocol", pkt{src: client4, dst: vip4, sport: 40013, dport: 80, proto: udp},
			want{VerdictPass, ReasonPassNotVIP, 0, ""}},
		{"vip without reals", pkt{src: client4, dst: "10.100.0.3", sport: 40014, dport: 80, proto: tcp, tcpFlags: "S"},
			want{VerdictDrop, ReasonDropNoReal, 0, ""}},
		{"unknown l4 protocol", pkt{src: client4, dst: vip4, proto: layers.IPProtocolGRE, payload: payload},
			want{VerdictPass, ReasonPassUnknownL4, 0, ""}},
		{"ipv6 fragment", pkt{src: client6, dst: vip6, sport: 40015, dport: 443, proto: tcp, tcpFlags: "S",
			v6ext: []layers.IPProtocol{layers.IPProtocolIPv6Fragment}},
			want{VerdictPass, ReasonPassFragment, 0, ""}},
		{"ipv6 extension chain past the bound", pkt{src: client6, dst: vip6, sport: 40016, dport: 443, proto: tcp, tcpFlags: "S",
			v6ext: []layers.IPProtocol{0, 60, 60, 60, 60}},
			want{VerdictPass, ReasonPassIPv6ExtLimit, 0, ""}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.p.frame(t)
			before := h.counters()
			verdict, out := h.run(in)
			if verdict != tc.want.verdict {
				t.Fatalf("verdict %v, want %v", verdict, tc.want.verdict)
			}
			after := h.counters()
			if got := after[tc.want.reason].Packets - before[tc.want.reason].Packets; got != 1 {
				t.Fatalf("counter %v moved by %d, want 1", tc.want.reason, got)
			}
			var expect []byte
			switch {
			case tc.want.dsrTo != 0:
				expect = withMACs(in, realMAC(tc.want.dsrTo), lbMAC)
			case tc.want.ipipTo != "":
				expect = ipipReference(t, tc.p.l3(t), netip.MustParseAddr(tc.want.ipipTo), tc.p.vlan)
			default:
				expect = in // pass and drop leave the packet as it came
			}
			if !bytes.Equal(out, expect) {
				t.Fatalf("output differs\n got  %x\n want %x", out, expect)
			}
		})
	}
}

func TestPacketRules(t *testing.T) {
	h := standardHarness(t)
	good := pkt{src: client4, dst: vip4, sport: 41000, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)

	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name   string
		in     []byte
		reason Reason
	}{
		{"arp", mutate(func(b []byte) []byte { b[12], b[13] = 0x08, 0x06; return b }), ReasonPassNotIP},
		{"ipv4 more fragments", mutate(func(b []byte) []byte { b[14+6] |= 0x20; return b }), ReasonPassFragment},
		{"ipv4 fragment offset", mutate(func(b []byte) []byte { b[14+7] = 0x10; return b }), ReasonPassFragment},
		{"ipv4 ihl below 5", mutate(func(b []byte) []byte { b[14] = 0x44; return b }), ReasonDropMalformedL3},
		{"ipv4 version 5", mutate(func(b []byte) []byte { b[14] = 0x55; return b }), ReasonDropMalformedL3},
		{"ipv4 total length past the frame", mutate(func(b []byte) []byte { b[14+2], b[14+3] = 0x05, 0xdc; return b }), ReasonDropMalformedL3},
		{"tcp data offset below 5", mutate(func(b []byte) []byte { b[14+20+12] = 0x40; return b }), ReasonDropMalformedL4},
		{"qinq", qinq(t, good), ReasonPassVLANNested},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := h.counters()
			verdict, out := h.run(tc.in)
			if verdict != tc.reason.Verdict() {
				t.Fatalf("verdict %v, want %v (%v)", verdict, tc.reason.Verdict(), tc.reason)
			}
			if got := h.counters()[tc.reason].Packets - before[tc.reason].Packets; got != 1 {
				t.Fatalf("counter %v moved by %d, want 1", tc.reason, got)
			}
			if !bytes.Equal(out, tc.in) {
				t.Fatalf("a %v packet was modified", verdict)
			}
		})
	}
}

func qinq(t testing.TB, untagged []byte) []byte {
	t.Helper()
	out := append([]byte(nil), untagged[:12]...)
	out = append(out, 0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x14)
	return append(out, untagged[12:]...)
}

// Cutting a frame at any byte, header boundaries included, must never yield
// XDP_TX: the program may only send what it fully parsed.
func TestTruncatedNeverTransmitted(t *testing.T) {
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	frames := map[string][]byte{
		"v4 tcp":      pkt{src: client4, dst: vip4, sport: 42000, dport: 80, proto: tcp, tcpFlags: "S"}.frame(t),
		"v4 udp ipip": pkt{src: client4, dst: vip4, sport: 42001, dport: 53, proto: udp, payload: []byte("x")}.frame(t),
		"v6 ext tcp": pkt{src: client6, dst: vip6, sport: 42002, dport: 443, proto: tcp, tcpFlags: "S",
			v6ext: []layers.IPProtocol{layers.IPProtocolIPv6HopByHop}}.frame(t),
		"vlan v4 tcp": pkt{src: client4, dst: vip4, sport: 42003, dport: 80, proto: tcp, tcpFlags: "S", vlan: 7}.frame(t),
		"icmp error":  icmpFragNeeded(t, vip4, client4, 80, 42004, layers.IPProtocolTCP),
	}
	for name, full := range frames {
		if v, _ := h.run(full); v != VerdictTx {
			t.Fatalf("%s: the whole frame gives %v, want tx", name, v)
		}
		for n := 14; n < len(full); n++ {
			if v, _ := h.run(full[:n]); v == VerdictTx {
				t.Fatalf("%s cut to %d of %d bytes was transmitted", name, n, len(full))
			}
		}
	}
}

// flowOnReal1 sets up two reals and a DSR VIP (vip4:80, id 1) whose ring
// names real 1 only, and sends a TCP SYN to it, which must go to real 1: a
// flow in conntrack, for the tests of what keeps it there.
func flowOnReal1(t *testing.T, h *harness) pkt {
	t.Helper()
	h.real(1, real4a)
	h.real(2, real4b)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	flow := pkt{src: client4, dst: vip4, sport: 43000, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}
	if got := flowReal(t, h, flow); got != 1 {
		t.Fatalf("flow went to real %d, want 1", got)
	}
	return flow
}

// flowReal sends p and returns the id of the real the DSR frame went to.
func flowReal(t *testing.T, h *harness, p pkt) uint32 {
	t.Helper()
	verdict, out := h.run(p.frame(t))
	if verdict != VerdictTx {
		t.Fatalf("flow %s:%d -> %s:%d: verdict %v, want tx", p.src, p.sport, p.dst, p.dport, verdict)
	}
	return uint32(out[4])<<8 | uint32(out[5])
}

func TestConntrackSurvivesRingChange(t *testing.T) {
	h := newHarness(t, Options{})
	flowA := flowOnReal1(t, h)
	h.ring(1, 2) // every slot now names real 2
	flowA.tcpFlags = "A"
	if got := flowReal(t, h, flowA); got != 1 {
		t.Fatalf("established flow A moved to real %d after the ring changed", got)
	}
	flowB := flowA
	flowB.sport = 43001
	flowB.tcpFlags = "S"
	if got := flowReal(t, h, flowB); got != 2 {
		t.Fatalf("new flow B went to real %d, want 2 from the new ring", got)
	}
	stats, err := h.dp.VIPStats(1)
	h.must(err)
	if stats.Packets != 3 || stats.NewFlows != 2 {
		t.Fatalf("VIP stats %+v, want 3 packets and 2 new flows", stats)
	}

	// A SYN opens a connection: it is balanced by the ring, not by
	// conntrack (a client reusing flow A's port, or a SYN retransmitted
	// before any real answered), and the new choice is remembered.
	flowA.tcpFlags = "S"
	if got := flowReal(t, h, flowA); got != 2 {
		t.Fatalf("a SYN on flow A's tuple went to real %d, want 2 from the ring", got)
	}
	flowA.tcpFlags = "A"
	if got := flowReal(t, h, flowA); got != 2 {
		t.Fatalf("the connection the SYN opened went to real %d, want 2", got)
	}
	// A SYN-ACK is not an opening SYN: it follows conntrack.
	flowB.tcpFlags = "SA"
	h.ring(1, 1)
	if got := flowReal(t, h, flowB); got != 2 {
		t.Fatalf("a SYN-ACK on flow B went to real %d, want 2 from conntrack", got)
	}
}

func TestRealStates(t *testing.T) {
	h := newHarness(t, Options{})
	h.real(1, real4a)
	h.real(2, real4b)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	tcp := layers.IPProtocolTCP
	downFlow := pkt{src: client4, dst: vip4, sport: 44000, dport: 80, proto: tcp, tcpFlags: "S"}
	drainFlow := pkt{src: client4, dst: vip4, sport: 44001, dport: 80, proto: tcp, tcpFlags: "S"}
	for _, p := range []pkt{downFlow, drainFlow} {
		if got := flowReal(t, h, p); got != 1 {
			t.Fatalf("flow from port %d went to %d, want 1", p.sport, got)
		}
	}
	downFlow.tcpFlags, drainFlow.tcpFlags = "A", "A" // established from here on

	// Draining: off the ring, but established flows stay.
	h.setState(1, RealDraining)
	h.ring(1, 2)
	if got := flowReal(t, h, drainFlow); got != 1 {
		t.Fatalf("flow on a draining real moved to %d", got)
	}
	fresh := pkt{src: client4, dst: vip4, sport: 44002, dport: 80, proto: tcp, tcpFlags: "S"}
	if got := flowReal(t, h, fresh); got != 2 {
		t.Fatalf("new flow went to %d while real 1 drains, want 2", got)
	}

	// Down: established flows are selected again.
	h.setState(1, RealDown)
	if got := flowReal(t, h, downFlow); got != 2 {
		t.Fatalf("flow of a down real went to %d, want re-selection to 2", got)
	}
	// A down real that is still in a stale ring is never chosen.
	h.ring(1, 1)
	if v, _ := h.run(pkt{src: client4, dst: vip4, sport: 44003, dport: 80, proto: tcp, tcpFlags: "S"}.frame(t)); v != VerdictDrop {
		t.Fatalf("verdict %v for a ring holding only a down real, want drop", v)
	}
}

func TestIdleTimeoutReselects(t *testing.T) {
	h := newHarness(t, Options{})
	h.real(1, real4a)
	h.real(2, real4b)
	h.vip(vip4, 53, ProtoUDP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	flow := pkt{src: client4, dst: vip4, sport: 45000, dport: 53, proto: layers.IPProtocolUDP}
	if got := flowReal(t, h, flow); got != 1 {
		t.Fatalf("first packet to %d, want 1", got)
	}
	h.ring(1, 2)
	h.must(h.dp.SetSettings(Settings{TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: uint64(time.Millisecond)}))
	// The coarse clock ticks once per jiffy (at most 10 ms).
	time.Sleep(30 * time.Millisecond)
	if got := flowReal(t, h, flow); got != 2 {
		t.Fatalf("idle UDP flow stayed on %d, want re-selection to 2", got)
	}
}

func TestSourceAffinity(t *testing.T) {
	h := newHarness(t, Options{})
	ids := []uint32{1, 2, 3, 4, 5}
	for _, id := range ids {
		h.real(id, netip.AddrFrom4([4]byte{10, 0, 0, byte(10 + id)}).String())
	}
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR, SourceAffinity: true}, ids...)
	h.vip(vip4, 81, ProtoTCP, VIPMeta{ID: 2, Mode: ModeDSR}, ids...)

	seen := map[uint32]bool{}
	for c := 0; c < 40; c++ {
		src := netip.AddrFrom4([4]byte{192, 168, 2, byte(c)}).String()
		first := uint32(0)
		for port := uint16(50000); port < 50020; port++ {
			got := flowReal(t, h, pkt{src: src, dst: vip4, sport: port, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"})
			if first == 0 {
				first = got
			}
			if got != first {
				t.Fatalf("client %s: port %d went to %d, earlier ports to %d", src, port, got, first)
			}
		}
		seen[first] = true
	}
	if len(seen) < 3 {
		t.Fatalf("40 clients reached only %d of 5 reals: the source hash does not spread", len(seen))
	}

	// Without affinity, one client's ports spread over the reals.
	spread := map[uint32]bool{}
	for port := uint16(50000); port < 50040; port++ {
		spread[flowReal(t, h, pkt{src: client4, dst: vip4, sport: port, dport: 81, proto: layers.IPProtocolTCP, tcpFlags: "S"})] = true
	}
	if len(spread) < 3 {
		t.Fatalf("40 ports of one client reached only %d reals without affinity", len(spread))
	}
}

func TestDenylist(t *testing.T) {
	h := standardHarness(t)
	h.must(h.dp.AddDeny(netip.MustParsePrefix("192.168.1.0/24")))
	h.must(h.dp.AddDeny(netip.MustParsePrefix("fd00:1::/64")))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	events := make(chan Event, 16)
	done := make(chan error, 1)
	go func() { done <- h.dp.ReadEvents(ctx, func(e Event) { events <- e }) }()

	denied := pkt{src: client4, dst: vip4, sport: 46000, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}
	if v, _ := h.run(denied.frame(t)); v != VerdictDrop {
		t.Fatalf("denied v4 source: verdict %v", v)
	}
	denied6 := pkt{src: client6, dst: vip6, sport: 46001, dport: 443, proto: layers.IPProtocolTCP, tcpFlags: "S"}
	if v, _ := h.run(denied6.frame(t)); v != VerdictDrop {
		t.Fatalf("denied v6 source: verdict %v", v)
	}
	other := denied
	other.src = "192.168.2.10"
	if v, _ := h.run(other.frame(t)); v != VerdictTx {
		t.Fatalf("source outside the denied prefix: verdict %v", v)
	}
	if got := h.counters()[ReasonDropDenylist].Packets; got != 2 {
		t.Fatalf("denylist counter %d, want 2", got)
	}
	for _, wantSrc := range []string{client4, client6} {
		select {
		case e := <-events:
			if e.Reason != ReasonDropDenylist || e.Src != netip.MustParseAddr(wantSrc) {
				t.Fatalf("event %+v, want a denylist drop from %s", e, wantSrc)
			}
		case <-ctx.Done():
			t.Fatalf("no event for the denied packet from %s", wantSrc)
		}
	}

	list, err := h.dp.DenyList()
	h.must(err)
	if len(list) != 2 {
		t.Fatalf("deny list %v, want 2 prefixes", list)
	}
	h.must(h.dp.RemoveDeny(netip.MustParsePrefix("192.168.1.0/24")))
	if v, _ := h.run(denied.frame(t)); v != VerdictTx {
		t.Fatalf("after removal: verdict %v, want tx", v)
	}
	cancel()
	<-done
}

// icmpFragNeeded builds the ICMP error a router sends to the VIP about a
// reply (VIP -> client) that did not fit the path.
func icmpFragNeeded(t testing.TB, vip, client string, vipPort, clientPort uint16, proto layers.IPProtocol) []byte {
	t.Helper()
	quoted := pkt{src: vip, dst: client, sport: vipPort, dport: clientPort, proto: proto, tcpFlags: "A", payload: make([]byte, 32)}.l3(t)
	router := "10.9.9.9"
	if netip.MustParseAddr(vip).Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4,
			SrcIP: netip.MustParseAddr(router).AsSlice(), DstIP: netip.MustParseAddr(vip).AsSlice()}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 4), Seq: 1400}
		return frame(t, serialize(t, ip, icmp, gopacket.Payload(quoted[:28+8])), 0)
	}
	ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolICMPv6,
		SrcIP: netip.MustParseAddr("fd00:9::9").AsSlice(), DstIP: netip.MustParseAddr(vip).AsSlice()}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(2, 0)}
	icmp.SetNetworkLayerForChecksum(ip)
	mtu := make([]byte, 4)
	binary.BigEndian.PutUint32(mtu, 1280)
	return frame(t, serialize(t, ip, icmp, gopacket.Payload(append(mtu, quoted[:48]...))), 0)
}

func TestICMPErrorFollowsFlow(t *testing.T) {
	h := newHarness(t, Options{})
	ids := []uint32{1, 2, 3, 4}
	for _, id := range ids {
		h.real(id, netip.AddrFrom4([4]byte{10, 0, 0, byte(10 + id)}).String())
	}
	h.real(9, real6a)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, ids...)
	h.vip(vip6, 443, ProtoTCP, VIPMeta{ID: 2, Mode: ModeDSR}, 9)
	tcp := layers.IPProtocolTCP

	// An established flow keeps its real for its ICMP errors, ring change or not.
	flow := pkt{src: client4, dst: vip4, sport: 47000, dport: 80, proto: tcp, tcpFlags: "S"}
	owner := flowReal(t, h, flow)
	other := ids[(int(owner))%len(ids)]
	h.ring(1, other)
	v, out := h.run(icmpFragNeeded(t, vip4, client4, 80, 47000, tcp))
	if v != VerdictTx || uint32(out[5]) != owner {
		t.Fatalf("ICMP error for a flow of real %d: verdict %v, sent to %d", owner, v, out[5])
	}

	// Without conntrack, the ICMP error is hashed like the flow it quotes,
	// and it does not create a conntrack entry of its own.
	h.ring(1, ids...)
	before, err := h.dp.Flows(0)
	h.must(err)
	v, out = h.run(icmpFragNeeded(t, vip4, client4, 80, 47001, tcp))
	if v != VerdictTx {
		t.Fatalf("ICMP error for an unknown flow: verdict %v", v)
	}
	after, err := h.dp.Flows(0)
	h.must(err)
	if len(after) != len(before) {
		t.Fatalf("an ICMP error created a conntrack entry")
	}
	icmpReal := uint32(out[5])
	if got := flowReal(t, h, pkt{src: client4, dst: vip4, sport: 47001, dport: 80, proto: tcp, tcpFlags: "S"}); got != icmpReal {
		t.Fatalf("ICMP error went to %d but its flow goes to %d", icmpReal, got)
	}

	// IPv6 packet too big.
	flowReal(t, h, pkt{src: client6, dst: vip6, sport: 47002, dport: 443, proto: tcp, tcpFlags: "S"})
	if v, out := h.run(icmpFragNeeded(t, vip6, client6, 443, 47002, tcp)); v != VerdictTx || uint32(out[5]) != 9 {
		t.Fatalf("ICMPv6 packet too big: verdict %v to %d, want tx to 9", v, out[5])
	}

	// An ICMP error quoting something that is not a VIP flow is not ours.
	if v, _ := h.run(icmpFragNeeded(t, "10.100.9.9", client4, 80, 47003, tcp)); v != VerdictPass {
		t.Fatalf("ICMP error about a non-VIP: verdict %v, want pass", v)
	}
}

// Every packet is counted exactly once, under the reason its verdict names.
func TestCountersAddUp(t *testing.T) {
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	frames := [][]byte{
		pkt{src: client4, dst: vip4, sport: 48000, dport: 80, proto: tcp, tcpFlags: "S"}.frame(t),
		pkt{src: client4, dst: vip4, sport: 48001, dport: 8080, proto: tcp, tcpFlags: "S"}.frame(t),
		pkt{src: client4, dst: "10.1.1.1", sport: 48002, dport: 80, proto: tcp}.frame(t),
		pkt{src: client6, dst: vip6, sport: 48003, dport: 53, proto: udp}.frame(t),
		pkt{src: client4, dst: "10.100.0.3", sport: 48004, dport: 80, proto: tcp}.frame(t),
	}
	frames = append(frames, frames[0][:30], frames[1][:54-4])
	var verdicts [4]uint64
	var bytesIn uint64
	const rounds = 7
	for r := 0; r < rounds; r++ {
		for _, f := range frames {
			v, _ := h.run(f)
			verdicts[v]++
			bytesIn += uint64(len(f))
		}
	}
	counters := h.counters()
	var byVerdict [4]uint64
	var total, totalBytes uint64
	for reason, c := range counters {
		byVerdict[Reason(reason).Verdict()] += c.Packets
		total += c.Packets
		totalBytes += c.Bytes
	}
	if want := uint64(rounds * len(frames)); total != want || totalBytes != bytesIn {
		t.Fatalf("counters sum to %d packets / %d bytes, sent %d / %d", total, totalBytes, want, bytesIn)
	}
	if byVerdict != verdicts {
		t.Fatalf("counters by verdict %v, verdicts returned %v", byVerdict, verdicts)
	}
	var vipPackets, vipDrops uint64
	for _, id := range []uint32{vipIDDSR, vipIDIP, vipID6IP, vipIDEmp} {
		s, err := h.dp.VIPStats(id)
		h.must(err)
		vipPackets += s.Packets
		vipDrops += s.Drops
	}
	if vipPackets != 4*rounds {
		t.Fatalf("VIP stats count %d packets, want %d", vipPackets, 4*rounds)
	}
	if vipDrops != rounds { // the VIP without reals
		t.Fatalf("VIP stats count %d drops, want %d", vipDrops, rounds)
	}
	var realPackets uint64
	for _, id := range []uint32{1, 2, 3} {
		s, err := h.dp.RealStats(id)
		h.must(err)
		realPackets += s.Packets
	}
	if realPackets != byVerdict[VerdictTx] {
		t.Fatalf("real stats count %d packets, %d were transmitted", realPackets, byVerdict[VerdictTx])
	}
}

func TestSetRingsInstallsEveryRing(t *testing.T) {
	h := newHarness(t, Options{})
	h.real(1, real4a)
	h.real(2, real4b)
	rings := map[uint32][]uint32{}
	for id := uint32(1); id <= 3; id++ {
		ring := make([]uint32, h.dp.RingSize())
		for i := range ring {
			ring[i] = 1 + uint32(i+int(id))%2
		}
		rings[id] = ring
	}
	h.must(h.dp.SetRings(rings))
	for id, want := range rings {
		got, err := h.dp.Ring(id)
		h.must(err)
		if !slices.Equal(got, want) {
			t.Fatalf("ring %d read back differs from what was installed", id)
		}
	}
	if err := h.dp.SetRings(map[uint32][]uint32{9: make([]uint32, 7)}); err == nil {
		t.Fatal("a ring of the wrong size was accepted")
	}
}
