package dataplane

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

const (
	snat4      = "10.0.0.100"
	snat6      = "fd00::100"
	natVIPPort = 8000
	realPort   = 9000
	natPortMin = 40000
	natPortMax = 40009
)

// natHarness: one nat VIP per family and protocol, each with one real, so
// that the expected output is exact.
func natHarness(tb testing.TB) *harness {
	h := newHarness(tb, Options{})
	h.natSettings(natPortMin, natPortMax)
	h.real(1, real4a)
	h.real(3, real6a)
	nat4 := NATTarget{SNAT: netip.MustParseAddr(snat4), RealPort: realPort}
	nat6 := NATTarget{SNAT: netip.MustParseAddr(snat6), RealPort: realPort}
	h.vip(vip4, natVIPPort, ProtoTCP, VIPMeta{ID: 1, Mode: ModeNAT, NAT: nat4}, 1)
	h.vip(vip4, natVIPPort, ProtoUDP, VIPMeta{ID: 2, Mode: ModeNAT, NAT: nat4}, 1)
	h.vip(vip6, natVIPPort, ProtoTCP, VIPMeta{ID: 3, Mode: ModeNAT, NAT: nat6}, 3)
	h.vip(vip6, natVIPPort, ProtoUDP, VIPMeta{ID: 4, Mode: ModeNAT, NAT: nat6}, 3)
	return h
}

func (h *harness) natSettings(lo, hi uint16) {
	h.tb.Helper()
	h.must(h.dp.SetSettings(Settings{
		GatewayMAC:       gwMAC,
		TCPIdleTimeoutNs: 300e9,
		UDPIdleTimeoutNs: 30e9,
		NAT:              NATSettings{PortMin: lo, PortMax: hi, ClosingTimeoutNs: 10e9},
	}))
}

// natFlow finds the nat flow of a client port.
func natFlow(t *testing.T, h *harness, client netip.AddrPort, proto Protocol) (NATFlow, bool) {
	t.Helper()
	flows, err := h.dp.NATFlows(0)
	h.must(err)
	for _, f := range flows {
		if f.Client == client && f.Proto == proto {
			return f, true
		}
	}
	return NATFlow{}, false
}

// natExpect is the reference for a translated packet: the same packet as
// gopacket builds it with the new addresses and ports (and so its own
// checksums), sent from the balancer's MAC to the gateway.
func natExpect(t *testing.T, p pkt, src, dst netip.AddrPort) []byte {
	t.Helper()
	p.src, p.dst = src.Addr().String(), dst.Addr().String()
	p.sport, p.dport = src.Port(), dst.Port()
	return withMACs(p.frame(t), gwMAC, lbMAC)
}

func (h *harness) expectTx(t *testing.T, in []byte, reason Reason, want []byte) {
	t.Helper()
	before := h.counters()
	verdict, out := h.run(in)
	if verdict != reason.Verdict() {
		t.Fatalf("verdict %v, want %v (%v)", verdict, reason.Verdict(), reason)
	}
	if got := h.counters()[reason].Packets - before[reason].Packets; got != 1 {
		t.Fatalf("counter %v moved by %d, want 1", reason, got)
	}
	if want != nil && !bytes.Equal(out, want) {
		t.Fatalf("output differs\n got  %x\n want %x", out, want)
	}
}

// Both directions of TCP and UDP flows, byte for byte: the client's packet
// leaves from the SNAT address and an allocated port toward the real's
// port, and the real's reply to that port goes back as VIP to client.
func TestNATBothDirections(t *testing.T) {
	h := natHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	payload := []byte("full nat, both ways")
	cases := []struct {
		name             string
		client, vip      string
		real, snat       string
		proto            layers.IPProtocol
		flags, replyFlag string
		noUDPChecksum    bool
	}{
		{"ipv4 tcp", client4, vip4, real4a, snat4, tcp, "S", "SA", false},
		{"ipv4 udp", client4, vip4, real4a, snat4, udp, "", "", false},
		{"ipv4 udp without checksum", client4, vip4, real4a, snat4, udp, "", "", true},
		{"ipv6 tcp", client6, vip6, real6a, snat6, tcp, "S", "SA", false},
		{"ipv6 udp", client6, vip6, real6a, snat6, udp, "", "", false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cport := uint16(41000 + i)
			client := netip.AddrPortFrom(netip.MustParseAddr(tc.client), cport)
			vip := netip.AddrPortFrom(netip.MustParseAddr(tc.vip), natVIPPort)
			real := netip.AddrPortFrom(netip.MustParseAddr(tc.real), realPort)
			out := pkt{src: tc.client, dst: tc.vip, sport: cport, dport: natVIPPort, proto: tc.proto,
				tcpFlags: tc.flags, payload: payload, df: true, tos: 0x10}
			in := out.frame(t)
			if tc.noUDPChecksum {
				in = zeroUDPChecksum(in)
			}
			before := h.counters()
			v, first := h.run(in)
			if v != VerdictTx {
				t.Fatalf("client packet: verdict %v", v)
			}
			if h.counters()[ReasonTxNAT].Packets != before[ReasonTxNAT].Packets+1 {
				t.Fatal("tx_nat did not count the client packet")
			}
			flow, ok := natFlow(t, h, client, Protocol(tc.proto))
			if !ok {
				t.Fatal("no nat flow for the client")
			}
			port := flow.SNAT.Port()
			if port < natPortMin || port > natPortMax || flow.SNAT.Addr().String() != tc.snat || flow.Real != real || flow.VIP != vip {
				t.Fatalf("flow %+v: want SNAT %s:[%d,%d] to %v", flow, tc.snat, natPortMin, natPortMax, real)
			}
			snat := flow.SNAT
			want := natExpect(t, out, snat, real)
			if tc.noUDPChecksum {
				want = zeroUDPChecksum(want)
			}
			if !bytes.Equal(first, want) {
				t.Fatalf("first packet differs\n got  %x\n want %x", first, want)
			}
			// The next client packet takes the same translation, byte for byte.
			next := out
			if tc.proto == tcp {
				next.tcpFlags = "A"
			}
			nextIn := next.frame(t)
			nextWant := natExpect(t, next, snat, real)
			if tc.noUDPChecksum {
				nextIn, nextWant = zeroUDPChecksum(nextIn), zeroUDPChecksum(nextWant)
			}
			h.expectTx(t, nextIn, ReasonTxNAT, nextWant)

			// The real's reply to the SNAT port comes back as VIP -> client.
			reply := pkt{src: tc.real, dst: snat.Addr().String(), sport: realPort, dport: port, proto: tc.proto,
				tcpFlags: tc.replyFlag, payload: payload}
			replyIn, replyWant := reply.frame(t), natExpect(t, reply, vip, client)
			if tc.noUDPChecksum {
				replyIn, replyWant = zeroUDPChecksum(replyIn), zeroUDPChecksum(replyWant)
			}
			h.expectTx(t, replyIn, ReasonTxNATReply, replyWant)
		})
	}
}

// zeroUDPChecksum clears the UDP checksum of an untagged frame: IPv4 allows
// sending none, and a translated packet must keep none.
func zeroUDPChecksum(frame []byte) []byte {
	out := append([]byte(nil), frame...)
	if out[12] == 0x08 && out[13] == 0x00 && out[14+9] == byte(layers.IPProtocolUDP) {
		off := 14 + int(out[14]&0x0f)*4 + 6
		out[off], out[off+1] = 0, 0
	}
	return out
}

// A packet to the SNAT address that no nat flow owns (the node's own
// connection, a flow long gone) is the stack's, untouched.
func TestNATReplyWithoutFlowPasses(t *testing.T) {
	h := natHarness(t)
	in := pkt{src: real4a, dst: snat4, sport: realPort, dport: natPortMin, proto: layers.IPProtocolTCP, tcpFlags: "A"}.frame(t)
	h.expectTx(t, in, ReasonPassNotVIP, in)
	// From another port of the real, after a flow exists: still not ours.
	h.run(pkt{src: client4, dst: vip4, sport: 42100, dport: natVIPPort, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t))
	flow, _ := natFlow(t, h, netip.MustParseAddrPort(client4+":42100"), ProtoTCP)
	in = pkt{src: real4a, dst: snat4, sport: realPort + 1, dport: flow.SNAT.Port(), proto: layers.IPProtocolTCP, tcpFlags: "A"}.frame(t)
	h.expectTx(t, in, ReasonPassNotVIP, in)
}

// icmpKind is one ICMP error, in the numbering of each family.
type icmpKind struct {
	name           string
	v4Type, v4Code uint8
	v6Type, v6Code uint8
}

var (
	icmpTooBig     = icmpKind{"frag needed", 3, 4, 2, 0}
	icmpKindsOfNAT = []icmpKind{
		icmpTooBig,
		{"port unreachable", 3, 3, 1, 4},
		{"host unreachable", 3, 1, 1, 3},
		{"admin prohibited", 3, 13, 1, 1},
		{"time exceeded", 11, 0, 3, 0},
		{"parameter problem", 12, 0, 4, 0},
	}
)

// icmpError wraps the first quoteLen bytes of an IP packet in an ICMP
// "fragmentation needed" (IPv4) or "packet too big" (IPv6) from src to dst.
func icmpError(t *testing.T, src, dst string, quoted []byte, quoteLen int) []byte {
	t.Helper()
	return icmpErrorOf(t, icmpTooBig, src, dst, quoted, quoteLen)
}

// icmpErrorOf is icmpError for any kind of error. The 32 bits after the
// type and code (MTU, pointer or unused) are set as for "too big".
func icmpErrorOf(t testing.TB, kind icmpKind, src, dst string, quoted []byte, quoteLen int) []byte {
	t.Helper()
	s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
	if s.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: s.AsSlice(), DstIP: d.AsSlice()}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(kind.v4Type, kind.v4Code), Seq: 1400}
		return frame(t, serialize(t, ip, icmp, gopacket.Payload(quoted[:quoteLen])), 0)
	}
	ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolICMPv6, SrcIP: s.AsSlice(), DstIP: d.AsSlice()}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(kind.v6Type, kind.v6Code)}
	icmp.SetNetworkLayerForChecksum(ip)
	mtu := binary.BigEndian.AppendUint32(nil, 1280)
	return frame(t, serialize(t, ip, icmp, gopacket.Payload(append(mtu, quoted[:quoteLen]...))), 0)
}

// An ICMP error about a NATed packet is translated with its flow: from the
// real's path (to the SNAT address, quoting what we sent the real) it goes
// to the client from the VIP, quoting what the client sent; from the
// client's path (to the VIP, quoting what we sent the client) it goes to
// the real from the SNAT address, quoting what the real sent.
func TestNATICMPErrors(t *testing.T) {
	h := natHarness(t)
	tcp := layers.IPProtocolTCP
	for _, fam := range []struct {
		name, client, vip, real, snat, router string
		quoteLen                              int
	}{
		{"ipv4", client4, vip4, real4a, snat4, "10.9.9.9", 20 + 8},
		{"ipv6", client6, vip6, real6a, snat6, "fd00:9::9", 40 + 8},
	} {
		t.Run(fam.name, func(t *testing.T) {
			cport := uint16(43000)
			fwd := pkt{src: fam.client, dst: fam.vip, sport: cport, dport: natVIPPort, proto: tcp, tcpFlags: "S", payload: make([]byte, 64)}
			if v, _ := h.run(fwd.frame(t)); v != VerdictTx {
				t.Fatalf("client packet: verdict %v", v)
			}
			client := netip.AddrPortFrom(netip.MustParseAddr(fam.client), cport)
			flow, ok := natFlow(t, h, client, ProtoTCP)
			if !ok {
				t.Fatal("no nat flow")
			}
			snat, real, vip := flow.SNAT, flow.Real, flow.VIP

			// From the real's path.
			sent := fwd
			sent.src, sent.dst, sent.sport, sent.dport = snat.Addr().String(), fam.real, snat.Port(), realPort
			in := icmpError(t, fam.router, snat.Addr().String(), sent.l3(t), fam.quoteLen)
			want := icmpError(t, vip.Addr().String(), fam.client, fwd.l3(t), fam.quoteLen)
			h.expectTx(t, in, ReasonTxNATReply, withMACs(want, gwMAC, lbMAC))

			// From the client's path.
			toClient := pkt{src: fam.vip, dst: fam.client, sport: natVIPPort, dport: cport, proto: tcp, tcpFlags: "SA", payload: make([]byte, 64)}
			fromReal := toClient
			fromReal.src, fromReal.dst, fromReal.sport, fromReal.dport = real.Addr().String(), snat.Addr().String(), realPort, snat.Port()
			in = icmpError(t, fam.router, fam.vip, toClient.l3(t), fam.quoteLen)
			want = icmpError(t, snat.Addr().String(), fam.real, fromReal.l3(t), fam.quoteLen)
			h.expectTx(t, in, ReasonTxNAT, withMACs(want, gwMAC, lbMAC))

			// About a flow the balancer does not know: nothing to translate.
			other := toClient
			other.dport = cport + 1
			in = icmpError(t, fam.router, fam.vip, other.l3(t), fam.quoteLen)
			h.expectTx(t, in, ReasonDropNoReal, in)
		})
	}
}

// Every ICMP error that quotes its packet is translated for a nat flow, in
// both directions, with the quoted transport checksum fixed whenever the
// quote holds it: gopacket's quote of the translated packet, with its own
// checksums, is the reference, cut where the original quote was cut (short
// of the checksum, inside it, just after it, or not at all).
func TestNATICMPErrorKinds(t *testing.T) {
	h := natHarness(t)
	for _, fam := range []struct {
		name, client, vip, real, router string
		ipLen                           int
	}{
		{"ipv4", client4, vip4, real4a, "10.9.9.9", 20},
		{"ipv6", client6, vip6, real6a, "fd00:9::9", 40},
	} {
		for i, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP} {
			cport := uint16(43100 + i)
			fwd := pkt{src: fam.client, dst: fam.vip, sport: cport, dport: natVIPPort, proto: proto, tcpFlags: "S", payload: make([]byte, 64)}
			if v, _ := h.run(fwd.frame(t)); v != VerdictTx {
				t.Fatalf("%s %v client packet: verdict %v", fam.name, proto, v)
			}
			flow, ok := natFlow(t, h, netip.AddrPortFrom(netip.MustParseAddr(fam.client), cport), Protocol(proto))
			if !ok {
				t.Fatalf("%s %v: no nat flow", fam.name, proto)
			}
			snat, real := flow.SNAT, flow.Real
			sent := fwd
			sent.src, sent.dst, sent.sport, sent.dport = snat.Addr().String(), fam.real, snat.Port(), realPort
			toClient := pkt{src: fam.vip, dst: fam.client, sport: natVIPPort, dport: cport, proto: proto, tcpFlags: "SA", payload: make([]byte, 64)}
			fromReal := toClient
			fromReal.src, fromReal.dst, fromReal.sport, fromReal.dport = real.Addr().String(), snat.Addr().String(), realPort, snat.Port()
			checkAt := fam.ipLen + 16 // TCP
			if proto == layers.IPProtocolUDP {
				checkAt = fam.ipLen + 6
			}
			full := len(fwd.l3(t))
			for _, kind := range icmpKindsOfNAT {
				for _, quoteLen := range []int{fam.ipLen + 8, checkAt, checkAt + 1, checkAt + 2, full} {
					t.Run(fmt.Sprintf("%s/%v/%s/quote%d", fam.name, proto, kind.name, quoteLen), func(t *testing.T) {
						// A quote that ends inside the checksum field cannot
						// have it fixed: its one byte stays as it was.
						halfCheck := func(translated, original []byte) []byte {
							if quoteLen == checkAt+1 {
								translated = append([]byte(nil), translated...)
								translated[checkAt] = original[checkAt]
							}
							return translated
						}
						in := icmpErrorOf(t, kind, fam.router, snat.Addr().String(), sent.l3(t), quoteLen)
						want := icmpErrorOf(t, kind, fam.vip, fam.client, halfCheck(fwd.l3(t), sent.l3(t)), quoteLen)
						h.expectTx(t, in, ReasonTxNATReply, withMACs(want, gwMAC, lbMAC))

						in = icmpErrorOf(t, kind, fam.router, fam.vip, toClient.l3(t), quoteLen)
						want = icmpErrorOf(t, kind, snat.Addr().String(), fam.real, halfCheck(fromReal.l3(t), toClient.l3(t)), quoteLen)
						h.expectTx(t, in, ReasonTxNAT, withMACs(want, gwMAC, lbMAC))
					})
				}
			}
		}
	}
}

// Bytes after the IP packet (Ethernet padding, here made long enough to
// hold a quoted TCP checksum) are not part of the quote: left as they are.
func TestNATICMPErrorPaddingIsNotQuote(t *testing.T) {
	h := natHarness(t)
	cport := uint16(43200)
	fwd := pkt{src: client4, dst: vip4, sport: cport, dport: natVIPPort, proto: layers.IPProtocolTCP, tcpFlags: "S", payload: make([]byte, 64)}
	if v, _ := h.run(fwd.frame(t)); v != VerdictTx {
		t.Fatalf("client packet: verdict %v", v)
	}
	flow, ok := natFlow(t, h, netip.AddrPortFrom(netip.MustParseAddr(client4), cport), ProtoTCP)
	if !ok {
		t.Fatal("no nat flow")
	}
	sent := fwd
	sent.src, sent.dst, sent.sport, sent.dport = flow.SNAT.Addr().String(), real4a, flow.SNAT.Port(), realPort
	padding := bytes.Repeat([]byte{0xa5}, 12)
	in := append(icmpError(t, "10.9.9.9", snat4, sent.l3(t), 20+8), padding...)
	want := append(icmpError(t, vip4, client4, fwd.l3(t), 20+8), padding...)
	h.expectTx(t, in, ReasonTxNATReply, withMACs(want, gwMAC, lbMAC))
}

// Ports come from the configured range only, one per flow toward a real;
// when every port tried is held by a live flow the new flow is dropped and
// counted; a flow that expired gives its port back.
func TestNATPortExhaustionAndExpiry(t *testing.T) {
	h := natHarness(t)
	h.natSettings(natPortMin, natPortMin+1) // two ports
	udp := layers.IPProtocolUDP
	open := func(cport uint16) Verdict {
		v, _ := h.run(pkt{src: client4, dst: vip4, sport: cport, dport: natVIPPort, proto: udp}.frame(t))
		return v
	}
	if open(44000) != VerdictTx || open(44001) != VerdictTx {
		t.Fatal("the first two flows were not translated")
	}
	a, _ := natFlow(t, h, netip.MustParseAddrPort(client4+":44000"), ProtoUDP)
	b, _ := natFlow(t, h, netip.MustParseAddrPort(client4+":44001"), ProtoUDP)
	if a.SNAT.Port() == b.SNAT.Port() {
		t.Fatalf("two flows share SNAT port %d", a.SNAT.Port())
	}
	before := h.counters()[ReasonDropNATNoPort].Packets
	if v := open(44002); v != VerdictDrop {
		t.Fatalf("third flow on a two-port range: verdict %v, want drop", v)
	}
	if got := h.counters()[ReasonDropNATNoPort].Packets - before; got != 1 {
		t.Fatalf("nat_no_port moved by %d, want 1", got)
	}
	// An established flow still goes through while the range is full.
	if v := open(44000); v != VerdictTx {
		t.Fatalf("established flow during exhaustion: verdict %v", v)
	}
	if st, err := h.dp.NATStats(); err != nil || st.Flows != 2 || st.Capacity != int(DefaultNATTableSize) {
		t.Fatalf("NATStats with two flows = %+v, %v", st, err)
	}

	// Expiry: with a 1 ms UDP timeout both flows die and the ports return.
	h.must(h.dp.SetSettings(Settings{GatewayMAC: gwMAC, TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: uint64(time.Millisecond),
		NAT: NATSettings{PortMin: natPortMin, PortMax: natPortMin + 1, ClosingTimeoutNs: 10e9}}))
	time.Sleep(30 * time.Millisecond) // the coarse clock ticks once per jiffy (at most 10 ms)
	// The real's late reply to an expired flow is no longer translated.
	late := pkt{src: real4a, dst: snat4, sport: realPort, dport: b.SNAT.Port(), proto: udp}.frame(t)
	h.expectTx(t, late, ReasonPassNotVIP, late)
	if st, err := h.dp.NATStats(); err != nil || st.Flows != 0 {
		t.Fatalf("NATStats after both flows expired = %+v, %v; want 0 in use", st, err)
	}
	if v := open(44002); v != VerdictTx {
		t.Fatalf("new flow after expiry: verdict %v, want tx", v)
	}
	c, ok := natFlow(t, h, netip.MustParseAddrPort(client4+":44002"), ProtoUDP)
	if !ok || (c.SNAT.Port() != a.SNAT.Port() && c.SNAT.Port() != b.SNAT.Port()) {
		t.Fatalf("flow after expiry: %+v, want one of the freed ports", c)
	}
}

// A TCP FIN or RST marks both directions of the flow closing, so that it
// expires after the short closing timeout rather than the idle one.
func TestNATClosingShortensTimeout(t *testing.T) {
	h := natHarness(t)
	tcp := layers.IPProtocolTCP
	p := pkt{src: client4, dst: vip4, sport: 45000, dport: natVIPPort, proto: tcp, tcpFlags: "S"}
	h.run(p.frame(t))
	flow, _ := natFlow(t, h, netip.MustParseAddrPort(client4+":45000"), ProtoTCP)
	if flow.Closing {
		t.Fatal("a SYN marked the flow closing")
	}
	fin := p.frame(t)
	fin[14+20+13] = 0x11 // FIN|ACK; the checksum is the balancer's to fix, not to check
	h.run(fin)
	flow, _ = natFlow(t, h, netip.MustParseAddrPort(client4+":45000"), ProtoTCP)
	if !flow.Closing {
		t.Fatal("a FIN did not mark the flow closing")
	}
	// A new SYN on the tuple (the client reuses its port) is a connection
	// again: the idle timeout is back.
	h.run(p.frame(t))
	if flow, _ = natFlow(t, h, netip.MustParseAddrPort(client4+":45000"), ProtoTCP); flow.Closing {
		t.Fatal("a SYN reusing a closing flow left it closing")
	}
	h.run(fin)
	h.must(h.dp.SetSettings(Settings{GatewayMAC: gwMAC, TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9,
		NAT: NATSettings{PortMin: natPortMin, PortMax: natPortMax, ClosingTimeoutNs: uint64(time.Millisecond)}}))
	time.Sleep(30 * time.Millisecond)
	reply := pkt{src: real4a, dst: snat4, sport: realPort, dport: flow.SNAT.Port(), proto: tcp, tcpFlags: "A"}.frame(t)
	h.expectTx(t, reply, ReasonPassNotVIP, reply)
}

// Drain and down follow conntrack's rules: a draining real keeps its nat
// flows, a down real's flows are balanced again with a new translation.
func TestNATRealStates(t *testing.T) {
	h := natHarness(t)
	h.real(2, real4b)
	tcp := layers.IPProtocolTCP
	p := pkt{src: client4, dst: vip4, sport: 46000, dport: natVIPPort, proto: tcp, tcpFlags: "A"}
	client := netip.MustParseAddrPort(client4 + ":46000")
	h.run(p.frame(t))
	first, _ := natFlow(t, h, client, ProtoTCP)

	h.setState(1, RealDraining)
	h.ring(1, 2)
	h.run(p.frame(t))
	if f, _ := natFlow(t, h, client, ProtoTCP); f.RealID != 1 {
		t.Fatalf("flow of a draining real moved to %d", f.RealID)
	}
	h.setState(1, RealDown)
	h.run(p.frame(t))
	f, _ := natFlow(t, h, client, ProtoTCP)
	if f.RealID != 2 || f.Real.Addr().String() != real4b {
		t.Fatalf("flow of a down real: %+v, want real 2", f)
	}
	// The old translation is gone: the old real's late reply is not ours.
	late := pkt{src: real4a, dst: snat4, sport: realPort, dport: first.SNAT.Port(), proto: tcp, tcpFlags: "A"}.frame(t)
	if f.SNAT.Port() != first.SNAT.Port() {
		h.expectTx(t, late, ReasonPassNotVIP, late)
	}
}

// A packet to no VIP and no SNAT address passes untouched whether or not
// nat is on, and a nat VIP without a translation is refused up front.
func TestNATConfiguration(t *testing.T) {
	h := natHarness(t)
	in := pkt{src: client4, dst: "10.100.9.9", sport: 47000, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
	h.expectTx(t, in, ReasonPassNotVIP, in)
	v := VIP{Addr: netip.MustParseAddr(vip4), Port: 8001, Proto: ProtoTCP}
	for _, meta := range []VIPMeta{
		{ID: 9, Mode: ModeNAT},
		{ID: 9, Mode: ModeNAT, NAT: NATTarget{SNAT: netip.MustParseAddr(snat6), RealPort: 1}},
		{ID: 9, Mode: ModeNAT, NAT: NATTarget{SNAT: netip.MustParseAddr(snat4)}},
	} {
		if err := h.dp.SetVIP(v, meta); err == nil {
			t.Errorf("SetVIP(%+v) accepted", meta)
		}
	}
	if err := h.dp.SetSettings(Settings{NAT: NATSettings{PortMin: 5, PortMax: 4}}); err == nil {
		t.Error("an inverted port range was accepted")
	}
	vips, err := h.dp.VIPs()
	h.must(err)
	got := vips[VIP{Addr: netip.MustParseAddr(vip4), Port: natVIPPort, Proto: ProtoTCP}]
	if got.Mode != ModeNAT || got.NAT.SNAT != netip.MustParseAddr(snat4) || got.NAT.RealPort != realPort {
		t.Errorf("VIPs() read back %+v", got)
	}
}

// Settings replaced by an upgrade (a new layout, rebuiltPins) come back
// without the SNAT address bits, and the adopting agent's reconcile writes
// no VIP it finds unchanged. Load derives the bits again, so the replies
// of the pinned nat flows are still translated.
func TestNATRepliesSurviveReplacedSettings(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	opts := Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64}
	first, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{tb: t, dp: first}
	h.must(first.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
	h.natSettings(natPortMin, natPortMax)
	h.real(1, real4a)
	h.vip(vip4, natVIPPort, ProtoTCP, VIPMeta{ID: 1, Mode: ModeNAT,
		NAT: NATTarget{SNAT: netip.MustParseAddr(snat4), RealPort: realPort}}, 1)
	h.run(pkt{src: client4, dst: vip4, sport: 48000, dport: natVIPPort, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t))
	flow, ok := natFlow(t, h, netip.MustParseAddrPort(client4+":48000"), ProtoTCP)
	if !ok {
		t.Fatal("no nat flow")
	}
	h.must(first.Close())
	h.must(removePin(pin, "vf_settings"))
	pinStale(t, pin, "vf_settings")

	second, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { second.Close() })
	h = &harness{tb: t, dp: second}
	h.must(second.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
	h.natSettings(natPortMin, natPortMax) // the agent writes its settings at start
	reply := pkt{src: real4a, dst: snat4, sport: realPort, dport: flow.SNAT.Port(), proto: layers.IPProtocolTCP, tcpFlags: "SA"}
	h.expectTx(t, reply.frame(t), ReasonTxNATReply, natExpect(t, reply, flow.VIP, flow.Client))
}

// The ICMP errors that only nat translates stay the stack's for VIPs of the
// other modes, as they were before nat took them: passed untouched and not
// counted for the VIP, for a flow conntrack knows or not, in both families,
// and so is such an error whose quote is cut short. "Fragmentation needed"
// still follows its flow (TestICMPErrorFollowsFlow).
func TestICMPErrorsOnlyNATTakesPassOtherModes(t *testing.T) {
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	for _, c := range []struct {
		name, client, vip, router string
		vipID, ipLen              int
		vipPort                   uint16
		proto                     layers.IPProtocol
	}{
		{"dsr ipv4 tcp", client4, vip4, "10.9.9.9", vipIDDSR, 20, 80, tcp},
		{"ipip ipv4 tcp", client4, vip4, "10.9.9.9", vipIDIP, 20, 8080, tcp},
		{"dsr ipv4 udp", client4, vip4, "10.9.9.9", vipIDUDP, 20, 53, udp},
		{"dsr ipv6 tcp", client6, vip6, "fd00:9::9", vipID6, 40, 443, tcp},
		{"ipip ipv6 udp", client6, vip6, "fd00:9::9", vipID6IP, 40, 53, udp},
	} {
		t.Run(c.name, func(t *testing.T) {
			cport := uint16(44000)
			open := pkt{src: c.client, dst: c.vip, sport: cport, dport: c.vipPort, proto: c.proto, tcpFlags: "S"}
			if v, _ := h.run(open.frame(t)); v != VerdictTx {
				t.Fatalf("opening the flow: verdict %v", v)
			}
			reply := pkt{src: c.vip, dst: c.client, sport: c.vipPort, proto: c.proto, tcpFlags: "SA", payload: make([]byte, 32)}
			for _, kind := range icmpKindsOfNAT[1:] {
				for _, port := range []uint16{cport, cport + 1} { // known to conntrack, and not
					reply.dport = port
					for _, quoteLen := range []int{c.ipLen + 8, c.ipLen + 2} {
						before, err := h.dp.VIPStats(uint32(c.vipID))
						h.must(err)
						in := icmpErrorOf(t, kind, c.router, c.vip, reply.l3(t), quoteLen)
						h.expectTx(t, in, ReasonPassNotVIP, in)
						after, err := h.dp.VIPStats(uint32(c.vipID))
						h.must(err)
						if after != before {
							t.Fatalf("%s to port %d, quote %d: VIP stats moved from %+v to %+v", kind.name, port, quoteLen, before, after)
						}
					}
				}
			}
		})
	}
}

// Two reals of one nat VIP listening on different ports: a new flow goes to
// the port of the real it was balanced to, byte for byte, and the real's
// reply from that port comes back as VIP to client. A real without a port
// of its own takes the VIP's.
func TestNATRealPorts(t *testing.T) {
	h := newHarness(t, Options{})
	h.natSettings(natPortMin, natPortMax)
	h.real(1, real4a)
	h.real(2, real4b)
	nat := NATTarget{SNAT: netip.MustParseAddr(snat4), RealPort: realPort}
	h.vip(vip4, natVIPPort, ProtoTCP, VIPMeta{ID: 1, Mode: ModeNAT, NAT: nat}, 1, 2)
	ports := map[string]uint16{real4a: 9001, real4b: 9002}
	h.must(h.dp.SetNATRealPort(NATRealKey{VIPID: 1, RealID: 1}, ports[real4a]))
	h.must(h.dp.SetNATRealPort(NATRealKey{VIPID: 1, RealID: 2}, ports[real4b]))
	installed, err := h.dp.NATRealPorts()
	h.must(err)
	if len(installed) != 2 || installed[NATRealKey{VIPID: 1, RealID: 2}] != 9002 {
		t.Fatalf("NATRealPorts = %v", installed)
	}

	payload := []byte("one port per real")
	vip := netip.AddrPortFrom(netip.MustParseAddr(vip4), natVIPPort)
	// send opens a flow from a client port and checks both directions;
	// it returns the real the flow went to.
	send := func(cport uint16) netip.AddrPort {
		t.Helper()
		client := netip.AddrPortFrom(netip.MustParseAddr(client4), cport)
		out := pkt{src: client4, dst: vip4, sport: cport, dport: natVIPPort, proto: layers.IPProtocolTCP,
			tcpFlags: "S", payload: payload, df: true}
		v, got := h.run(out.frame(t))
		if v != VerdictTx {
			t.Fatalf("client port %d: verdict %v", cport, v)
		}
		flow, ok := natFlow(t, h, client, ProtoTCP)
		if !ok {
			t.Fatalf("client port %d: no nat flow", cport)
		}
		if want := natExpect(t, out, flow.SNAT, flow.Real); !bytes.Equal(got, want) {
			t.Fatalf("client port %d to %v: packet differs\n got  %x\n want %x", cport, flow.Real, got, want)
		}
		reply := pkt{src: flow.Real.Addr().String(), dst: snat4, sport: flow.Real.Port(), dport: flow.SNAT.Port(),
			proto: layers.IPProtocolTCP, tcpFlags: "SA", payload: payload}
		h.expectTx(t, reply.frame(t), ReasonTxNATReply, natExpect(t, reply, vip, client))
		return flow.Real
	}

	seen := map[string]bool{}
	for cport := uint16(42000); cport < 42000+natPortMax-natPortMin && len(seen) < 2; cport++ {
		real := send(cport)
		addr := real.Addr().String()
		if want := ports[addr]; real.Port() != want {
			t.Fatalf("flow to %s went to port %d, want its own %d", addr, real.Port(), want)
		}
		seen[addr] = true
	}
	if len(seen) != 2 {
		t.Fatalf("flows reached only %v; the test needs both reals", seen)
	}

	// Without a port of its own, a real takes the VIP's.
	h.must(h.dp.DeleteNATRealPort(NATRealKey{VIPID: 1, RealID: 1}))
	h.must(h.dp.DeleteNATRealPort(NATRealKey{VIPID: 1, RealID: 2}))
	if real := send(42100); real.Port() != realPort {
		t.Fatalf("without real ports the flow went to %v, want port %d", real, realPort)
	}
}
