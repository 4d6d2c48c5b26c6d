package dataplane

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
)

// fuzzVIP describes what standardHarness configured, seen from outside the
// program: which destinations may be transmitted, and how.
type fuzzVIP struct {
	mode    Mode
	hasReal bool
}

func standardVIPs() map[VIP]fuzzVIP {
	a := netip.MustParseAddr
	return map[VIP]fuzzVIP{
		{a(vip4), 80, ProtoTCP}:         {ModeDSR, true},
		{a(vip4), 8080, ProtoTCP}:       {ModeIPIP, true},
		{a(vip4), 53, ProtoUDP}:         {ModeDSR, true},
		{a("10.100.0.2"), 0, ProtoTCP}:  {ModeDSR, true},
		{a(vip6), 443, ProtoTCP}:        {ModeDSR, true},
		{a(vip6), 53, ProtoUDP}:         {ModeIPIP, true},
		{a("10.100.0.3"), 80, ProtoTCP}: {ModeDSR, false},
		{a(vip4), natVIPPort, ProtoTCP}: {ModeNAT, true},
		{a(vip6), natVIPPort, ProtoUDP}: {ModeNAT, true},
		{a(vipGUE4), 443, ProtoTCP}:     {ModeGUE, true},
		{a(vipGUE6), 53, ProtoUDP}:      {ModeGUE, true},
	}
}

// The fuzz target's nat VIPs have a single SNAT port, so that a seed can be
// a reply to the flow that holds it.
const fuzzNATPort = natPortMin

// fuzzNAT adds nat VIPs to the standard harness and opens one flow on each,
// which holds the only SNAT port.
func fuzzNAT(f *testing.F, h *harness) {
	h.must(h.dp.SetSettings(Settings{
		GatewayMAC: gwMAC, EncapSource4: encapSrc4, EncapSource6: encapSrc6,
		TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9,
		NAT: NATSettings{PortMin: fuzzNATPort, PortMax: fuzzNATPort, ClosingTimeoutNs: 10e9},
	}))
	h.vip(vip4, natVIPPort, ProtoTCP, VIPMeta{ID: 8, Mode: ModeNAT,
		NAT: NATTarget{SNAT: netip.MustParseAddr(snat4), RealPort: realPort}}, 1)
	h.vip(vip6, natVIPPort, ProtoUDP, VIPMeta{ID: 9, Mode: ModeNAT,
		NAT: NATTarget{SNAT: netip.MustParseAddr(snat6), RealPort: realPort}}, 3)
	for _, p := range []pkt{
		{src: client4, dst: vip4, sport: 40100, dport: natVIPPort, proto: layers.IPProtocolTCP, tcpFlags: "S"},
		{src: client6, dst: vip6, sport: 40101, dport: natVIPPort, proto: layers.IPProtocolUDP},
	} {
		if v, _ := h.run(p.frame(f)); v != VerdictTx {
			f.Fatalf("opening the fuzz target's nat flow %v: verdict %v", p, v)
		}
	}
}

// isSNAT says whether a destination is one of the fuzz target's SNAT
// addresses: a frame to it may be a nat reply.
func isSNAT(a netip.Addr) bool {
	return a == netip.MustParseAddr(snat4) || a == netip.MustParseAddr(snat6)
}

// natRewritten holds what a nat translation may change: the IP addresses,
// the ports, the checksums; for an ICMP error the same in the quoted
// packet. Everything else of the packet, its length first, stays.
func natRewritten(in, out []byte, l2 int) bool {
	if len(in) != len(out) {
		return false
	}
	diff := 0
	for i := l2; i < len(in); i++ {
		if in[i] != out[i] {
			diff++
		}
	}
	// Two addresses and two ports of the packet and of a quote, and four
	// checksums (IPv4, ICMP, the quoted IPv4 and transport ones): at most
	// 2*16 + 2*16 + 4*2 + 4*2 bytes.
	return diff <= 2*16+2*16+4*2+4*2
}

func lookupFuzzVIP(vips map[VIP]fuzzVIP, v VIP) (fuzzVIP, bool) {
	if got, ok := vips[v]; ok {
		return got, true
	}
	v.Port = 0
	got, ok := vips[v]
	return got, ok
}

// servedVIP decodes the frame with a parser written separately from the BPF
// one (gopacket misreads some IPv4 options, so it cannot serve here) and
// names the VIP the frame may be forwarded for: its destination for TCP/UDP,
// or the quoted flow's source for an ICMP error. It also returns the L2
// header length, and whether the frame is an ICMP error that only nat may
// take (any but "fragmentation needed" and "packet too big").
func servedVIP(frame []byte) (v VIP, l2 int, natOnly bool, ok bool) {
	v, l2, ok = servedVIPOrError(frame)
	if ok && len(frame) > l2 {
		natOnly = icmpNATOnly(frame[l2:])
	}
	return v, l2, natOnly, ok
}

// icmpNATOnly reads the type and code of an IP packet that is an ICMP
// error, as servedVIPOrError decoded it.
func icmpNATOnly(ip []byte) bool {
	switch {
	case len(ip) >= 20 && ip[0]>>4 == 4 && ip[9] == 1:
		ihl := int(ip[0]&0xf) * 4
		return len(ip) >= ihl+2 && !(ip[ihl] == 3 && ip[ihl+1] == 4)
	case len(ip) >= 41 && ip[0]>>4 == 6 && ip[6] == 58:
		return ip[40] != 2
	}
	return false
}

func servedVIPOrError(frame []byte) (VIP, int, bool) {
	l2 := 14
	etype := binary.BigEndian.Uint16(frame[12:14])
	if etype == 0x8100 || etype == 0x88a8 {
		if len(frame) < 18 {
			return VIP{}, l2, false
		}
		l2, etype = 18, binary.BigEndian.Uint16(frame[16:18])
	}
	dst, proto, l4, ok := splitIP(frame[l2:], etype)
	if !ok || len(l4) < 4 {
		return VIP{}, l2, false
	}
	switch {
	case proto == 6 || proto == 17:
		return VIP{dst, binary.BigEndian.Uint16(l4[2:4]), Protocol(proto)}, l2, true
	case proto == 1 && dst.Is4() && (l4[0] == 3 || l4[0] == 11 || l4[0] == 12),
		proto == 58 && dst.Is6() && l4[0] >= 1 && l4[0] <= 4:
		if len(l4) < 8 {
			return VIP{}, l2, false
		}
		quoted := l4[8:]
		if len(quoted) == 0 {
			return VIP{}, l2, false
		}
		qtype := uint16(0x0800)
		if quoted[0]>>4 == 6 {
			qtype = 0x86dd
		}
		_, qproto, ql4, ok := splitIP(quoted, qtype)
		if !ok || len(ql4) < 2 {
			return VIP{}, l2, false
		}
		var src netip.Addr
		if qtype == 0x0800 {
			src = netip.AddrFrom4([4]byte(quoted[12:16]))
		} else {
			src = netip.AddrFrom16([16]byte(quoted[8:24]))
		}
		return VIP{src, binary.BigEndian.Uint16(ql4[0:2]), Protocol(qproto)}, l2, true
	}
	return VIP{}, l2, false
}

// outerSource is the source address of the frame's IP header.
func outerSource(frame []byte, l2 int) (netip.Addr, bool) {
	b := frame[l2:]
	switch {
	case len(b) >= 20 && b[0]>>4 == 4:
		return netip.AddrFrom4([4]byte(b[12:16])), true
	case len(b) >= 40 && b[0]>>4 == 6:
		return netip.AddrFrom16([16]byte(b[8:24])), true
	}
	return netip.Addr{}, false
}

// martian says whether no client can send from src to the VIP at dst,
// written from the RFCs rather than from the BPF code.
func martian(src, dst netip.Addr) bool {
	if src == dst || src.IsUnspecified() || src.IsLoopback() || src.IsMulticast() {
		return true
	}
	if src.Is4() {
		b := src.As4()
		return b[0] == 0 || src == netip.AddrFrom4([4]byte{255, 255, 255, 255})
	}
	return false
}

// splitIP returns an IP packet's destination, its L4 protocol and the bytes
// from the L4 header on, walking IPv6 extension headers.
func splitIP(b []byte, etype uint16) (netip.Addr, uint8, []byte, bool) {
	switch etype {
	case 0x0800:
		if len(b) < 20 {
			return netip.Addr{}, 0, nil, false
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl {
			return netip.Addr{}, 0, nil, false
		}
		return netip.AddrFrom4([4]byte(b[16:20])), b[9], b[ihl:], true
	case 0x86dd:
		if len(b) < 40 {
			return netip.Addr{}, 0, nil, false
		}
		next, rest := b[6], b[40:]
		for next == 0 || next == 43 || next == 60 || next == 51 {
			if len(rest) < 2 {
				return netip.Addr{}, 0, nil, false
			}
			n := (int(rest[1]) + 1) * 8
			if next == 51 {
				n = (int(rest[1]) + 2) * 4
			}
			if len(rest) < n {
				return netip.Addr{}, 0, nil, false
			}
			next, rest = rest[0], rest[n:]
		}
		return netip.AddrFrom16([16]byte(b[24:40])), next, rest, true
	}
	return netip.Addr{}, 0, nil, false
}

func totalPackets(h *harness) uint64 {
	var n uint64
	for _, c := range h.counters() {
		n += c.Packets
	}
	return n
}

// FuzzBalancer holds these over random and mutated frames:
//   - XDP_TX only for a frame whose (decoded) destination is a VIP with a live real,
//     sent to the interface's MAC from a source that is not martian, and the frame
//     leaves with the interface's MAC as its source;
//   - the output length is the input's for dsr, +20 (IPv4) or +40 (IPv6) for ipip,
//     8 more for gue's UDP header, unless an ipip or gue packet too big for the MTU
//     was answered: then the answer goes back to the frame's source MAC and quotes
//     the packet's first bytes,
//     and the forwarded packet itself is carried unchanged;
//   - nat (both directions, a reply being a frame to an SNAT address) keeps the
//     length and changes at most the addresses, ports and checksums;
//   - pass and drop leave the frame untouched;
//   - each frame moves the counters by exactly one packet.
func FuzzBalancer(f *testing.F) {
	h := standardHarness(f)
	fuzzNAT(f, h)
	s, err := h.dp.Settings()
	h.must(err)
	s.GUEPort = DefaultGUEPort // fuzzNAT's settings leave it 0
	s.ICMPTooBig = true
	h.must(h.dp.SetSettings(s))
	vips := standardVIPs()
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	seeds := []pkt{
		{src: client4, dst: vip4, sport: 40000, dport: 80, proto: tcp, tcpFlags: "S"},
		{src: client4, dst: vip4, sport: 40001, dport: 53, proto: udp, payload: []byte("q")},
		{src: client4, dst: vip4, sport: 40002, dport: 8080, proto: tcp, tcpFlags: "S", df: true},
		{src: client4, dst: "10.100.0.2", sport: 40003, dport: 9999, proto: tcp, tcpFlags: "A"},
		{src: client6, dst: vip6, sport: 40004, dport: 443, proto: tcp, tcpFlags: "S"},
		{src: client6, dst: vip6, sport: 40005, dport: 53, proto: udp, payload: []byte("q")},
		{src: client6, dst: vip6, sport: 40006, dport: 443, proto: tcp, v6ext: []layers.IPProtocol{0, 60}},
		{src: client4, dst: vip4, sport: 40007, dport: 80, proto: tcp, vlan: 5,
			ipv4Options: []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}},
		{src: client4, dst: "10.100.0.3", sport: 40008, dport: 80, proto: tcp},
		{src: client4, dst: "10.9.9.9", sport: 40009, dport: 80, proto: tcp},
		{src: client4, dst: vipGUE4, sport: 40010, dport: 443, proto: tcp, tcpFlags: "S", df: true, vlan: 9},
		{src: client6, dst: vipGUE6, sport: 40011, dport: 53, proto: udp, payload: []byte("q")},
	}
	// Too big for the 1500-byte MTU once encapsulated.
	seeds = append(seeds,
		vfgueSized(f, pkt{src: client4, dst: vip4, sport: 40012, dport: 8080, proto: tcp, tcpFlags: "A", df: true}, 1500),
		vfgueSized(f, pkt{src: client6, dst: vipGUE6, sport: 40013, dport: 53, proto: udp, vlan: 3}, 1460))
	for _, s := range seeds {
		f.Add(s.frame(f))
	}
	f.Add(icmpFragNeeded(f, vip4, client4, 80, 40000, tcp))
	f.Add(icmpFragNeeded(f, vip6, client6, 443, 40004, tcp))
	// nat: a client packet, a real's reply to the SNAT port, ICMP errors
	// quoting the flow in both directions.
	f.Add(pkt{src: client4, dst: vip4, sport: 40100, dport: natVIPPort, proto: tcp, tcpFlags: "A", payload: []byte("x")}.frame(f))
	f.Add(pkt{src: real4a, dst: snat4, sport: realPort, dport: fuzzNATPort, proto: tcp, tcpFlags: "SA"}.frame(f))
	f.Add(pkt{src: real6a, dst: snat6, sport: realPort, dport: fuzzNATPort, proto: udp, payload: []byte("r")}.frame(f))
	f.Add(icmpFragNeeded(f, vip4, client4, natVIPPort, 40100, tcp))
	f.Add(icmpFragNeeded(f, snat4, real4a, fuzzNATPort, realPort, tcp))
	f.Add(icmpFragNeeded(f, snat6, real6a, fuzzNATPort, realPort, udp))
	// The ICMP errors only nat takes, quoted whole so that the quoted
	// checksum is there to fix, toward both the VIP and an SNAT address.
	for i, kind := range icmpKindsOfNAT[1:] {
		toReal := pkt{src: snat4, dst: real4a, sport: fuzzNATPort, dport: realPort, proto: tcp, tcpFlags: "A", payload: []byte("q")}
		toClient := pkt{src: vip6, dst: client6, sport: natVIPPort, dport: 40100, proto: udp, payload: []byte("r")}
		if i%2 == 1 {
			toReal.src, toReal.dst, toReal.proto = snat6, real6a, udp
			toClient.src, toClient.dst, toClient.proto = vip4, client4, tcp
		}
		for _, quoted := range []pkt{toReal, toClient} {
			router := "10.9.9.9"
			if netip.MustParseAddr(quoted.src).Is6() {
				router = "fd00:9::9"
			}
			q := quoted.l3(f)
			f.Add(icmpErrorOf(f, kind, router, quoted.src, q, len(q)))
		}
	}
	f.Add(icmpFragNeeded(f, vipGUE4, client4, 443, 40010, tcp))

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 14 || len(in) > 4096 {
			t.Skip("BPF_PROG_TEST_RUN needs an Ethernet header; larger frames add nothing")
		}
		h := &harness{tb: t, dp: h.dp} // f's helpers must not be used inside the target
		before := totalPackets(h)
		tooBigBefore := h.counters()[ReasonTxICMPTooBig].Packets
		verdict, out := h.run(in)
		if moved := totalPackets(h) - before; moved != 1 {
			t.Fatalf("counters moved by %d packets for one frame", moved)
		}
		answered := h.counters()[ReasonTxICMPTooBig].Packets != tooBigBefore
		switch verdict {
		case VerdictPass, VerdictDrop:
			if !bytes.Equal(out, in) {
				t.Fatalf("%v modified the frame", verdict)
			}
			return
		case VerdictTx:
		default:
			t.Fatalf("unexpected verdict %v", verdict)
		}

		v, l2, natOnly, ok := servedVIP(in)
		if !ok {
			t.Fatalf("transmitted a frame that does not decode as TCP/UDP or an ICMP error:\n%x", in)
		}
		if isSNAT(v.Addr) {
			// A nat reply: only to our MAC, from our MAC, translated in place.
			if !bytes.Equal(in[0:6], lbMAC) || !bytes.Equal(out[6:12], lbMAC) {
				t.Fatalf("nat reply between %x and %x, not through the interface's %s", in[0:6], out[6:12], lbMAC)
			}
			if !natRewritten(in, out, l2) {
				t.Fatalf("nat reply changed beyond addresses, ports and checksums:\n in  %x\n out %x", in, out)
			}
			return
		}
		target, ok := lookupFuzzVIP(vips, v)
		if !ok || !target.hasReal {
			t.Fatalf("transmitted a frame for %v, which is not a VIP with a live real:\n%x", v, in)
		}
		if natOnly && target.mode != ModeNAT {
			t.Fatalf("transmitted an ICMP error that only nat takes for a %v VIP:\n%x", target.mode, in)
		}
		if !bytes.Equal(in[0:6], lbMAC) {
			t.Fatalf("transmitted a frame addressed to %x, not to the interface's %s:\n%x", in[0:6], lbMAC, in)
		}
		if !bytes.Equal(out[6:12], lbMAC) {
			t.Fatalf("transmitted from %x, not from the interface's %s", out[6:12], lbMAC)
		}
		if src, ok := outerSource(in, l2); !ok || martian(src.Unmap(), v.Addr) {
			t.Fatalf("transmitted a frame from the martian source %v:\n%x", src, in)
		}
		if target.mode == ModeNAT {
			if !natRewritten(in, out, l2) {
				t.Fatalf("nat changed beyond addresses, ports and checksums:\n in  %x\n out %x", in, out)
			}
			return
		}
		if answered {
			if target.mode != ModeIPIP && target.mode != ModeGUE {
				t.Fatalf("a %v packet was answered as too big:\n%x", target.mode, in)
			}
			hdr := 20 + 8
			if v.Addr.Is6() {
				hdr = 40 + 8
			}
			if len(out) != l2+hdr+vfgueQuoteLen || !bytes.Equal(out[0:6], in[6:12]) ||
				!bytes.Equal(out[l2+hdr:], in[l2:l2+vfgueQuoteLen]) {
				t.Fatalf("the too-big answer is not %d bytes to %x quoting the packet:\n in  %x\n out %x",
					l2+hdr+vfgueQuoteLen, in[6:12], in, out)
			}
			return
		}
		grow := 0
		if target.mode == ModeIPIP || target.mode == ModeGUE {
			grow = 20
			if v.Addr.Is6() {
				grow = 40
			}
			if target.mode == ModeGUE {
				grow += 8
			}
		}
		if len(out) != len(in)+grow {
			t.Fatalf("%v output is %d bytes for %d in, want +%d", target.mode, len(out), len(in), grow)
		}
		if !bytes.Equal(out[l2+grow:], in[l2:]) {
			t.Fatalf("the forwarded packet was changed beyond its L2 header")
		}
	})
}
