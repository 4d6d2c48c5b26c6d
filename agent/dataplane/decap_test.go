package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
)

// decapHarness runs the decapsulator, unpinned, through BPF_PROG_TEST_RUN.
type decapHarness struct {
	tb testing.TB
	d  *Decap
}

func newDecapHarness(tb testing.TB, locals ...string) *decapHarness {
	tb.Helper()
	requirePrivileged(tb)
	d, err := LoadDecap(DecapOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	var addrs []netip.Addr
	for _, s := range locals {
		addrs = append(addrs, netip.MustParseAddr(s))
	}
	if err := d.SetLocals(addrs); err != nil {
		tb.Fatal(err)
	}
	if err := d.SetGUEPort(DefaultGUEPort); err != nil {
		tb.Fatal(err)
	}
	return &decapHarness{tb: tb, d: d}
}

func (h *decapHarness) run(in []byte) (Verdict, []byte) {
	h.tb.Helper()
	out := make([]byte, len(in)+64)
	opts := ebpf.RunOptions{Data: in, DataOut: out}
	ret, err := h.d.objs.VfDecap.Run(&opts)
	if err != nil {
		h.tb.Fatalf("run decap on %d bytes: %v", len(in), err)
	}
	return Verdict(ret), opts.DataOut
}

func (h *decapHarness) stats() DecapStats {
	h.tb.Helper()
	s, err := h.d.Stats()
	if err != nil {
		h.tb.Fatal(err)
	}
	return s
}

// gueVariant0 is the 4-byte GUE base header, which gopacket does not know:
// variant 0, no control bit, no options, the inner protocol. The raw field
// overrides the first byte and the flags, to build bad headers.
type gueVariant0 struct {
	proto layers.IPProtocol
	first byte
	flags uint16
}

func (g *gueVariant0) LayerType() gopacket.LayerType { return gopacket.LayerTypePayload }

func (g *gueVariant0) SerializeTo(b gopacket.SerializeBuffer, _ gopacket.SerializeOptions) error {
	buf, err := b.PrependBytes(4)
	if err != nil {
		return err
	}
	buf[0], buf[1] = g.first, byte(g.proto)
	binary.BigEndian.PutUint16(buf[2:], g.flags)
	return nil
}

// gueReference builds what a balancer sends a real in GUE: outer IP from
// the encapsulation source to the real, UDP to port with the checksum
// gopacket computes, the GUE header (none for variant 1, which is how
// Katran sends it), then inner, in an Ethernet frame from the gateway.
func gueReference(t testing.TB, inner []byte, realAddr netip.Addr, port uint16, hdr *gueVariant0, vlan uint16) []byte {
	t.Helper()
	udp := &layers.UDP{SrcPort: 43211, DstPort: layers.UDPPort(port)}
	var outer gopacket.SerializableLayer
	if realAddr.Is4() {
		ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP,
			SrcIP: encapSrc4.AsSlice(), DstIP: realAddr.AsSlice()}
		udp.SetNetworkLayerForChecksum(ip)
		outer = ip
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP,
			SrcIP: encapSrc6.AsSlice(), DstIP: realAddr.AsSlice()}
		udp.SetNetworkLayerForChecksum(ip)
		outer = ip
	}
	ls := []gopacket.SerializableLayer{outer, udp}
	if hdr != nil {
		ls = append(ls, hdr)
	}
	ls = append(ls, gopacket.Payload(inner))
	return withMACs(frame(t, serialize(t, ls...), vlan), gwMAC, lbMAC)
}

// Every encapsulation the decapsulator accepts, in both outer families and
// with both inner ones, comes out as exactly the inner packet in the
// frame's own Ethernet header (VLAN tag kept), counted by kind.
func TestDecapForms(t *testing.T) {
	h := newDecapHarness(t, real4b, real6a)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	inner4 := pkt{src: client4, dst: vip4, sport: 49000, dport: 8080, proto: tcp, tcpFlags: "S", payload: []byte("abc")}
	inner6 := pkt{src: client6, dst: vip6, sport: 49001, dport: 53, proto: udp, payload: []byte("query")}
	r4, r6 := netip.MustParseAddr(real4b), netip.MustParseAddr(real6a)
	v0 := func(proto layers.IPProtocol) *gueVariant0 { return &gueVariant0{proto: proto} }
	cases := []struct {
		name   string
		inner  pkt
		vlan   uint16
		tunnel func(inner []byte, vlan uint16) []byte
	}{
		{"ipip", inner4, 0, func(in []byte, v uint16) []byte { return ipipReference(t, in, r4, v) }},
		{"ipip vlan", inner4, 9, func(in []byte, v uint16) []byte { return ipipReference(t, in, r4, v) }},
		{"ip6ip6", inner6, 0, func(in []byte, v uint16) []byte { return ipipReference(t, in, r6, v) }},
		{"6in4", inner6, 0, func(in []byte, v uint16) []byte { return ipip6in4(t, in, r4, v) }},
		{"gue v1 4in4", inner4, 0, func(in []byte, v uint16) []byte { return gueReference(t, in, r4, 6080, nil, v) }},
		{"gue v1 6in4", inner6, 0, func(in []byte, v uint16) []byte { return gueReference(t, in, r4, 6080, nil, v) }},
		{"gue v1 6in6", inner6, 0, func(in []byte, v uint16) []byte { return gueReference(t, in, r6, 6080, nil, v) }},
		{"gue v1 4in6", inner4, 0, func(in []byte, v uint16) []byte { return gueReference(t, in, r6, 6080, nil, v) }},
		{"gue v1 vlan", inner4, 12, func(in []byte, v uint16) []byte { return gueReference(t, in, r4, 6080, nil, v) }},
		{"gue v0 4in4", inner4, 0, func(in []byte, v uint16) []byte {
			return gueReference(t, in, r4, 6080, v0(layers.IPProtocolIPv4), v)
		}},
		{"gue v0 6in6", inner6, 0, func(in []byte, v uint16) []byte {
			return gueReference(t, in, r6, 6080, v0(layers.IPProtocolIPv6), v)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			inner := tc.inner.l3(t)
			verdict, out := h.run(tc.tunnel(inner, tc.vlan))
			want := withMACs(frame(t, inner, tc.vlan), gwMAC, lbMAC)
			if verdict != VerdictPass || !bytes.Equal(out, want) {
				t.Fatalf("verdict %v\n got  %x\n want %x", verdict, out, want)
			}
		})
	}
	s := h.stats()
	want := DecapStats{IPIP4Packets: 3, IPIP6Packets: 1, GUE4Packets: 4, GUE6Packets: 3, DecapBytes: s.DecapBytes}
	if s != want || s.DecapBytes == 0 {
		t.Fatalf("counters %+v, want %+v", s, want)
	}
}

// ipip6in4 is an IPv6 packet in an IPv4 outer header (protocol 41).
func ipip6in4(t testing.TB, inner []byte, realAddr netip.Addr, vlan uint16) []byte {
	t.Helper()
	outer := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolIPv6,
		SrcIP: encapSrc4.AsSlice(), DstIP: realAddr.AsSlice()}
	return withMACs(frame(t, serialize(t, outer, gopacket.Payload(inner)), vlan), gwMAC, lbMAC)
}

// Packets that are not tunnel packets for this host pass untouched; tunnel
// packets for it whose headers do not add up are dropped, each counted
// under its reason. None of them crashes or confuses the program.
func TestDecapBadInput(t *testing.T) {
	h := newDecapHarness(t, real4b, real6a)
	r4, r6 := netip.MustParseAddr(real4b), netip.MustParseAddr(real6a)
	inner4 := pkt{src: client4, dst: vip4, sport: 49000, dport: 8080, proto: layers.IPProtocolTCP, tcpFlags: "S"}.l3(t)
	inner6 := pkt{src: client6, dst: vip6, sport: 49001, dport: 53, proto: layers.IPProtocolUDP}.l3(t)
	gue4 := func() []byte { return gueReference(t, inner4, r4, 6080, nil, 0) }
	const outer4 = 14 + 20 // Ethernet and the outer IPv4 header
	set16 := func(b []byte, off int, v uint16) []byte { binary.BigEndian.PutUint16(b[off:], v); return b }

	cases := []struct {
		name    string
		in      []byte
		verdict Verdict
		count   func(*DecapStats) *uint64
	}{
		{"plain packet", pkt{src: client4, dst: vip4, sport: 1, dport: 80, proto: layers.IPProtocolTCP}.frame(t),
			VerdictPass, func(s *DecapStats) *uint64 { return &s.PassNotTunnel }},
		{"udp to another port", gueReference(t, inner4, r4, 6081, nil, 0),
			VerdictPass, func(s *DecapStats) *uint64 { return &s.PassNotTunnel }},
		{"udp header cut before the port", gue4()[:outer4+2],
			VerdictPass, func(s *DecapStats) *uint64 { return &s.PassNotTunnel }},
		{"qinq", qinq(t, gue4()), VerdictPass, func(s *DecapStats) *uint64 { return &s.PassNotTunnel }},
		{"ipip for another host", ipipReference(t, inner4, netip.MustParseAddr(real4a), 0),
			VerdictPass, func(s *DecapStats) *uint64 { return &s.PassNotLocal }},
		{"gue for another host", gueReference(t, inner4, netip.MustParseAddr(real4a), 6080, nil, 0),
			VerdictPass, func(s *DecapStats) *uint64 { return &s.PassNotLocal }},
		{"gue control message", gueReference(t, inner4, r4, 6080, &gueVariant0{first: 0x20}, 0),
			VerdictPass, func(s *DecapStats) *uint64 { return &s.PassGUEControl }},
		{"gue variant 2", gueReference(t, inner4, r4, 6080, &gueVariant0{first: 0x80, proto: layers.IPProtocolIPv4}, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropGUEVariant }},
		{"gue variant 3", gueReference(t, inner6, r6, 6080, &gueVariant0{first: 0xc0, proto: layers.IPProtocolIPv6}, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropGUEVariant }},
		{"gue v0 with options", gueReference(t, inner4, r4, 6080, &gueVariant0{first: 0x01, proto: layers.IPProtocolIPv4}, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropGUEUnsupported }},
		{"gue v0 with flags", gueReference(t, inner4, r4, 6080, &gueVariant0{proto: layers.IPProtocolIPv4, flags: 0x8000}, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropGUEUnsupported }},
		{"gue v0 carrying udp", gueReference(t, inner4, r4, 6080, &gueVariant0{proto: layers.IPProtocolUDP}, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropGUEUnsupported }},
		{"gue v1 version nibble 5", func() []byte { b := gue4(); b[outer4+8] = 0x55; return b }(),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropGUEUnsupported }},
		{"gue v0 announcing ipv4, carrying ipv6", gueReference(t, inner6, r4, 6080, &gueVariant0{proto: layers.IPProtocolIPv4}, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropBadInner }},
		{"udp length below its header", set16(gue4(), outer4+4, 4),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropBadLength }},
		{"udp length past the ip payload", set16(gue4(), outer4+4, uint16(8+len(inner4)+1)),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropBadLength }},
		{"udp with no payload", gueReference(t, nil, r4, 6080, nil, 0),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropTruncated }},
		{"gue inner length one short", set16(gue4(), outer4+8+2, uint16(len(inner4)-1)),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropBadLength }},
		{"ipip inner length one long", set16(ipipReference(t, inner4, r4, 0), outer4+2, uint16(len(inner4)+1)),
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropBadLength }},
		{"gue frame cut in the inner header", gue4()[:outer4+8+10],
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropTruncated }},
		{"gue frame cut in the payload", gue4()[:outer4+8+len(inner4)-1],
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropTruncated }},
		{"ipip frame cut in the inner header", ipipReference(t, inner4, r4, 0)[:outer4+10],
			VerdictDrop, func(s *DecapStats) *uint64 { return &s.DropTruncated }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := h.stats()
			in := append([]byte(nil), tc.in...)
			verdict, out := h.run(in)
			if verdict != tc.verdict {
				t.Fatalf("verdict %v, want %v", verdict, tc.verdict)
			}
			if verdict == VerdictPass && !bytes.Equal(out, tc.in) {
				t.Fatalf("a packet passed to the stack was changed\n got  %x\n want %x", out, tc.in)
			}
			// Exactly one counter moved, by one: the expected one.
			want := before
			*tc.count(&want)++
			if got := h.stats(); got != want {
				t.Fatalf("counters\n got  %+v\n want %+v", got, want)
			}
		})
	}
}

// With the GUE port set to 0, GUE is off: a GUE packet for this host is
// just UDP to the stack, while IPIP is still decapsulated.
func TestDecapGUEOff(t *testing.T) {
	h := newDecapHarness(t, real4b)
	if err := h.d.SetGUEPort(0); err != nil {
		t.Fatal(err)
	}
	r4 := netip.MustParseAddr(real4b)
	inner := pkt{src: client4, dst: vip4, sport: 49000, dport: 8080, proto: layers.IPProtocolTCP, tcpFlags: "S"}.l3(t)
	gue := gueReference(t, inner, r4, 6080, nil, 0)
	if v, out := h.run(gue); v != VerdictPass || !bytes.Equal(out, gue) {
		t.Fatalf("GUE with GUE off: verdict %v, changed %v", v, !bytes.Equal(out, gue))
	}
	if v, _ := h.run(ipipReference(t, inner, r4, 0)); v != VerdictPass {
		t.Fatalf("IPIP with GUE off: verdict %v", v)
	}
	// Another port works as the default did.
	if err := h.d.SetGUEPort(7777); err != nil {
		t.Fatal(err)
	}
	if v, out := h.run(gueReference(t, inner, r4, 7777, nil, 0)); v != VerdictPass || !bytes.Equal(out, withMACs(frame(t, inner, 0), gwMAC, lbMAC)) {
		t.Fatalf("GUE to port 7777: verdict %v, out %x", v, out)
	}
	if s := h.stats(); s.PassNotTunnel != 1 || s.IPIP4Packets != 1 || s.GUE4Packets != 1 {
		t.Fatalf("counters %+v", s)
	}
}

// SetLocals replaces the set; Locals reads it back; the kernel agrees.
func TestDecapSetLocals(t *testing.T) {
	h := newDecapHarness(t, real4a, real4b)
	a := netip.MustParseAddr
	if err := h.d.SetLocals([]netip.Addr{a(real4b), a(real6a), a("::ffff:10.0.0.99")}); err != nil {
		t.Fatal(err)
	}
	got, err := h.d.Locals()
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.Addr{a(real4b), a("10.0.0.99"), a(real6a)}; !equalAddrs(got, want) {
		t.Fatalf("locals %v, want %v", got, want)
	}
	inner := pkt{src: client4, dst: vip4, sport: 1, dport: 2, proto: layers.IPProtocolTCP}.l3(t)
	if v, _ := h.run(ipipReference(t, inner, a(real4a), 0)); v != VerdictPass || h.stats().PassNotLocal != 1 {
		t.Fatalf("a removed local address is still decapsulated: %v %+v", v, h.stats())
	}
	tooMany := make([]netip.Addr, MaxDecapLocals+1)
	for i := range tooMany {
		tooMany[i] = netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)})
	}
	if err := h.d.SetLocals(tooMany); err == nil {
		t.Fatal("more local addresses than the map holds were accepted")
	}
	// A full map can be replaced by another full set.
	for _, third := range []byte{1, 2} {
		full := make([]netip.Addr, MaxDecapLocals)
		for i := range full {
			full[i] = netip.AddrFrom4([4]byte{10, 8, third, byte(i)})
		}
		if err := h.d.SetLocals(full); err != nil {
			t.Fatalf("replacing the set with %d others: %v", len(full), err)
		}
		if got, _ := h.d.Locals(); len(got) != MaxDecapLocals || got[0] != full[0] {
			t.Fatalf("after replacing the set: %d addresses from %v", len(got), got[:1])
		}
	}
	if err := h.d.SetLocals([]netip.Addr{a("10.0.0.99"), a(real4b), a(real6a)}); err != nil {
		t.Fatal(err)
	}
	if err := h.d.SetLocals([]netip.Addr{{}}); err == nil {
		t.Fatal("an invalid address was accepted")
	}
	if got, _ := h.d.Locals(); !equalAddrs(got, []netip.Addr{a(real4b), a("10.0.0.99"), a(real6a)}) {
		t.Fatalf("a refused SetLocals changed the set: %v", got)
	}
}

func equalAddrs(a, b []netip.Addr) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// A pinned decapsulator keeps its maps for the next run, which adopts the
// link on the interface rather than attaching anew, and OpenPinnedDecap
// reads what it configured. An interface made again under the same name
// gets a new link. RemovePins takes it all away.
func TestDecapPinnedAdoption(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	a := netip.MustParseAddr
	inNewNetns(t, func() {
		const ifname = "vfdc0"
		veth := vethPair(t, ifname)
		first, err := LoadDecap(DecapOptions{PinPath: pin})
		if err != nil {
			t.Fatal(err)
		}
		if err := first.SetLocals([]netip.Addr{a(real4b)}); err != nil {
			t.Fatal(err)
		}
		if err := first.SetGUEPort(6090); err != nil {
			t.Fatal(err)
		}
		if adopted, err := first.Attach(ifname, XDPNative); err != nil || adopted {
			t.Fatalf("first attach: adopted %v, %v", adopted, err)
		}
		links, err := first.PinnedLinks()
		if err != nil || len(links) != 1 || links[0].Interface != ifname {
			t.Fatalf("pinned links %+v, %v", links, err)
		}
		firstLink := links[0].LinkID
		if err := first.Close(); err != nil {
			t.Fatal(err)
		}
		if xdp := linkXDP(t, veth); xdp == nil || !xdp.Attached {
			t.Fatal("closing the pinned decapsulator took it off the interface")
		}

		second, err := LoadDecap(DecapOptions{PinPath: pin})
		if err != nil {
			t.Fatal(err)
		}
		defer second.Close()
		if port, err := second.GUEPort(); err != nil || port != 6090 {
			t.Fatalf("the restarted decapsulator lost the GUE port: %d, %v", port, err)
		}
		if adopted, err := second.Attach(ifname, XDPNative); err != nil || !adopted {
			t.Fatalf("second attach: adopted %v, %v", adopted, err)
		}
		info, err := second.objs.VfDecap.Info()
		if err != nil {
			t.Fatal(err)
		}
		progID, _ := info.ID()
		links, err = second.PinnedLinks()
		if err != nil || len(links) != 1 || links[0].LinkID != firstLink || links[0].ProgramID != uint32(progID) {
			t.Fatalf("after adoption: links %+v, want link %d running program %d: %v", links, firstLink, progID, err)
		}

		ro, err := OpenPinnedDecap(pin)
		if err != nil {
			t.Fatal(err)
		}
		locals, err := ro.Locals()
		ro.Close()
		if err != nil || !equalAddrs(locals, []netip.Addr{a(real4b)}) {
			t.Fatalf("locals read from the pins: %v, %v", locals, err)
		}

		// The interface goes and comes back: the link is severed, and
		// Attach makes a new one there.
		if err := netlink.LinkDel(veth); err != nil {
			t.Fatal(err)
		}
		if severed, err := second.Severed(); err != nil || len(severed) != 1 || severed[0] != ifname {
			t.Fatalf("severed links %v, %v", severed, err)
		}
		veth = vethPair(t, ifname)
		if adopted, err := second.Attach(ifname, XDPNative); err != nil || adopted {
			t.Fatalf("attach to the re-created interface: adopted %v, %v", adopted, err)
		}
		if xdp := linkXDP(t, veth); xdp == nil || !xdp.Attached || xdp.ProgId != uint32(progID) {
			t.Fatalf("XDP on the re-created interface is %+v, want program %d", xdp, progID)
		}

		// Asked for another mode, it moves to a link in that mode.
		if adopted, err := second.Attach(ifname, XDPGeneric); err != nil || adopted {
			t.Fatalf("attach in generic mode: adopted %v, %v", adopted, err)
		}
		if mode, err := attachedMode(veth.Attrs().Index); err != nil || mode != XDPGeneric {
			t.Fatalf("after asking for generic: mode %q, %v", mode, err)
		}

		if err := RemovePins(pin); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("pin directory still there after RemovePins: %v", err)
		}
		if _, err := OpenPinnedDecap(pin); err == nil {
			t.Fatal("OpenPinnedDecap succeeded with no pins")
		}
		second.Close() // the last reference to the link: it goes now
		if xdp := linkXDP(t, veth); xdp != nil && xdp.Attached {
			t.Fatalf("XDP still on the interface after RemovePins: %+v", xdp)
		}
	})
}

// FuzzDecap feeds the decapsulator arbitrary frames, seeded with every
// form it accepts. Whatever arrives, one counter moves; a dropped frame or
// one passed as it came is untouched; a frame it changed kept its MACs and
// lost only outer headers: what follows them is the input's tail.
func FuzzDecap(f *testing.F) {
	h := newDecapHarness(f, real4b, real6a)
	r4, r6 := netip.MustParseAddr(real4b), netip.MustParseAddr(real6a)
	inner4 := pkt{src: client4, dst: vip4, sport: 49000, dport: 8080, proto: layers.IPProtocolTCP, tcpFlags: "S"}.l3(f)
	inner6 := pkt{src: client6, dst: vip6, sport: 49001, dport: 53, proto: layers.IPProtocolUDP}.l3(f)
	f.Add(ipipReference(f, inner4, r4, 0))
	f.Add(ipipReference(f, inner6, r6, 3))
	f.Add(ipip6in4(f, inner6, r4, 0))
	f.Add(gueReference(f, inner4, r4, DefaultGUEPort, nil, 0))
	f.Add(gueReference(f, inner6, r6, DefaultGUEPort, nil, 7))
	f.Add(gueReference(f, inner6, r4, DefaultGUEPort, &gueVariant0{proto: layers.IPProtocolIPv6}, 0))
	f.Add(gueReference(f, inner4, r6, DefaultGUEPort, &gueVariant0{first: 0x20}, 0))

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 14 || len(in) > 4096 {
			t.Skip("BPF_PROG_TEST_RUN needs an Ethernet header; larger frames add nothing")
		}
		h := &decapHarness{tb: t, d: h.d} // f's helpers must not be used inside the target
		before := h.stats()
		verdict, out := h.run(append([]byte(nil), in...))
		after := h.stats()
		moved := after.Decapsulated() + after.Dropped() + after.PassNotTunnel + after.PassNotLocal + after.PassGUEControl -
			(before.Decapsulated() + before.Dropped() + before.PassNotTunnel + before.PassNotLocal + before.PassGUEControl)
		if moved != 1 {
			t.Fatalf("counters moved by %d packets for one frame", moved)
		}
		decapsulated := after.Decapsulated() != before.Decapsulated()
		switch {
		case verdict == VerdictPass && decapsulated:
			l2 := 14
			if len(out) >= 14 && binary.BigEndian.Uint16(out[12:14]) == uint16(layers.EthernetTypeDot1Q) {
				l2 = 18
			}
			if len(out) >= len(in) || len(out) < l2 || !bytes.Equal(out[:12], in[:12]) || !bytes.HasSuffix(in, out[l2:]) {
				t.Fatalf("decapsulated frame is not the input less outer headers\n in  %x\n out %x", in, out)
			}
		case verdict == VerdictPass, verdict == VerdictDrop:
			if !bytes.Equal(out, in) {
				t.Fatalf("%v modified the frame", verdict)
			}
		default:
			t.Fatalf("verdict %v", verdict)
		}
	})
}
