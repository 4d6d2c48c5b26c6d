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
	}
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
// header length.
func servedVIP(frame []byte) (VIP, int, bool) {
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
	case proto == 1 && dst.Is4() && l4[0] == 3 && l4[1] == 4, proto == 58 && dst.Is6() && l4[0] == 2:
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
//     and the forwarded packet itself is carried unchanged;
//   - pass and drop leave the frame untouched;
//   - each frame moves the counters by exactly one packet.
func FuzzBalancer(f *testing.F) {
	h := standardHarness(f)
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
	}
	for _, s := range seeds {
		f.Add(s.frame(f))
	}
	f.Add(icmpFragNeeded(f, vip4, client4, 80, 40000, tcp))
	f.Add(icmpFragNeeded(f, vip6, client6, 443, 40004, tcp))

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 14 || len(in) > 4096 {
			t.Skip("BPF_PROG_TEST_RUN needs an Ethernet header; larger frames add nothing")
		}
		h := &harness{tb: t, dp: h.dp} // f's helpers must not be used inside the target
		before := totalPackets(h)
		verdict, out := h.run(in)
		if moved := totalPackets(h) - before; moved != 1 {
			t.Fatalf("counters moved by %d packets for one frame", moved)
		}
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

		v, l2, ok := servedVIP(in)
		if !ok {
			t.Fatalf("transmitted a frame that does not decode as TCP/UDP or an ICMP error:\n%x", in)
		}
		target, ok := lookupFuzzVIP(vips, v)
		if !ok || !target.hasReal {
			t.Fatalf("transmitted a frame for %v, which is not a VIP with a live real:\n%x", v, in)
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
		grow := 0
		if target.mode == ModeIPIP {
			grow = 20
			if v.Addr.Is6() {
				grow = 40
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
