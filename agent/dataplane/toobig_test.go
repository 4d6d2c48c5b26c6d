package dataplane

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// vfgueQuoteLen is how much of the packet an ICMP too-big answer quotes
// (VF_PTB_QUOTE_LEN).
const vfgueQuoteLen = 128

// tooBigReference builds the expected answer to p independently of the BPF
// code: from the VIP to the client, out of the interface p came in by (MACs
// swapped, VLAN tag kept), ICMP "fragmentation needed" or ICMPv6 "packet too
// big" with mtu, quoting the first vfgueQuoteLen bytes of p's IP packet;
// gopacket computes every checksum.
func tooBigReference(t testing.TB, p pkt, mtu uint16) []byte {
	t.Helper()
	quote := p.l3(t)[:vfgueQuoteLen]
	src, dst := netip.MustParseAddr(p.dst), netip.MustParseAddr(p.src)
	var l3 []byte
	if src.Is4() {
		ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4,
			SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable,
			layers.ICMPv4CodeFragmentationNeeded), Seq: mtu} // unused 16 bits (Id), then the next-hop MTU
		l3 = serialize(t, ip, icmp, gopacket.Payload(quote))
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolICMPv6,
			SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypePacketTooBig, 0)}
		if err := icmp.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		body := binary.BigEndian.AppendUint32(nil, uint32(mtu))
		l3 = serialize(t, ip, icmp, gopacket.Payload(append(body, quote...)))
	}
	return withMACs(frame(t, l3, p.vlan), clientMAC, lbMAC)
}

// vfgueSized is p with its payload sized so that its IP packet is l3Len bytes.
func vfgueSized(t testing.TB, p pkt, l3Len int) pkt {
	t.Helper()
	p.payload = nil
	p.payload = make([]byte, l3Len-len(p.l3(t)))
	for i := range p.payload {
		p.payload[i] = byte(i)
	}
	return p
}

// TestICMPTooBig: with the interface's MTU at 1500, an ipip or gue packet
// one byte too long to fit once encapsulated is answered with the ICMP
// error carrying the MTU the client must use (1500 minus 20/28 for IPv4,
// 40/48 for IPv6), byte for byte as gopacket builds it; one that just fits
// is forwarded; IPv4 without DF and everything with the answer switched
// off are forwarded as before.
func TestICMPTooBig(t *testing.T) {
	h := standardHarness(t)
	s, err := h.dp.Settings()
	h.must(err)
	s.ICMPTooBig = true
	h.must(h.dp.SetSettings(s))
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	ipip4 := pkt{src: client4, dst: vip4, sport: 45000, dport: 8080, proto: tcp, tcpFlags: "A", df: true}
	gue4 := pkt{src: client4, dst: vipGUE4, sport: 45001, dport: 443, proto: tcp, tcpFlags: "A", df: true, vlan: 42}
	ipip6 := pkt{src: client6, dst: vip6, sport: 45002, dport: 53, proto: udp}
	gue6 := pkt{src: client6, dst: vipGUE6, sport: 45003, dport: 53, proto: udp, vlan: 7}
	noDF := pkt{src: client4, dst: vip4, sport: 45004, dport: 8080, proto: tcp, tcpFlags: "A"}

	cases := []struct {
		name   string
		p      pkt
		l3Len  int
		reason Reason
		mtu    uint16 // of the ICMP answer; 0: forwarded
	}{
		{"ipip ipv4 one byte over", ipip4, 1481, ReasonTxICMPTooBig, 1480},
		{"ipip ipv4 exact fit", ipip4, 1480, ReasonTxIPIP, 0},
		{"gue ipv4 vlan one byte over", gue4, 1473, ReasonTxICMPTooBig, 1472},
		{"gue ipv4 exact fit", gue4, 1472, ReasonTxGUE, 0},
		{"ipip ipv6 one byte over", ipip6, 1461, ReasonTxICMPTooBig, 1460},
		{"ipip ipv6 exact fit", ipip6, 1460, ReasonTxIPIP, 0},
		{"gue ipv6 vlan full size", gue6, 1500, ReasonTxICMPTooBig, 1452},
		{"gue ipv6 exact fit", gue6, 1452, ReasonTxGUE, 0},
		{"ipv4 without df is forwarded", noDF, 1500, ReasonTxIPIP, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := vfgueSized(t, tc.p, tc.l3Len)
			before := h.counters()[tc.reason].Packets
			verdict, out := h.run(p.frame(t))
			if verdict != VerdictTx {
				t.Fatalf("verdict %v, want %v", verdict, VerdictTx)
			}
			if got := h.counters()[tc.reason].Packets - before; got != 1 {
				t.Fatalf("%v moved by %d, want 1", tc.reason, got)
			}
			if tc.mtu == 0 {
				return // forwarded: TestForwarding and TestGUEEncapsulation check the frames
			}
			if want := tooBigReference(t, p, tc.mtu); !bytes.Equal(out, want) {
				t.Fatalf("answer differs\n got  %x\n want %x", out, want)
			}
		})
	}

	// A frame with bytes after its IP packet, here long enough that
	// BPF_PROG_TEST_RUN puts them in a fragment of a multi-buffer frame,
	// is forwarded: the cut to the quote would be measured wrong.
	t.Run("bytes after the packet", func(t *testing.T) {
		p := vfgueSized(t, gue6, 1460)
		in := append(p.frame(t), bytes.Repeat([]byte{0x28}, 2500)...)
		before := h.counters()[ReasonTxGUE].Packets
		if verdict, _ := h.run(in); verdict != VerdictTx {
			t.Fatalf("verdict %v, want %v", verdict, VerdictTx)
		}
		if got := h.counters()[ReasonTxGUE].Packets - before; got != 1 {
			t.Fatalf("tx_gue moved by %d, want 1 (forwarded, not answered)", got)
		}
	})

	t.Run("switched off", func(t *testing.T) {
		s.ICMPTooBig = false
		h.must(h.dp.SetSettings(s))
		p := vfgueSized(t, ipip4, 1500)
		before := h.counters()[ReasonTxIPIP].Packets
		if verdict, out := h.run(p.frame(t)); verdict != VerdictTx || len(out) != len(p.frame(t))+20 {
			t.Fatalf("verdict %v, %d bytes out; want the packet forwarded in IPIP", verdict, len(out))
		}
		if got := h.counters()[ReasonTxIPIP].Packets - before; got != 1 {
			t.Fatalf("tx_ipip moved by %d, want 1", got)
		}
	})
}

// TestICMPTooBigNotForICMPErrors: an ICMP error about a VIP's flow that is
// too big to encapsulate is forwarded, never answered with another ICMP
// error (RFC 1122 3.2.2).
func TestICMPTooBigNotForICMPErrors(t *testing.T) {
	h := standardHarness(t)
	s, err := h.dp.Settings()
	h.must(err)
	s.ICMPTooBig = true
	h.must(h.dp.SetSettings(s))
	// A "fragmentation needed" to the ipip VIP, quoting a packet it sent,
	// padded past the MTU with the quote's payload.
	l3 := icmpFragNeeded(t, vip4, client4, 8080, 46000, layers.IPProtocolTCP)[14:]
	ip := &layers.IPv4{}
	h.must(ip.DecodeFromBytes(l3, gopacket.NilDecodeFeedback))
	ip.Flags = layers.IPv4DontFragment
	big := serialize(t, ip, gopacket.Payload(append(append([]byte(nil), ip.Payload...), make([]byte, 1500)...)))
	before := h.counters()[ReasonTxIPIP].Packets
	if verdict, _ := h.run(frame(t, big, 0)); verdict != VerdictTx {
		t.Fatalf("verdict %v, want %v", verdict, VerdictTx)
	}
	if got := h.counters()[ReasonTxIPIP].Packets - before; got != 1 {
		t.Fatalf("tx_ipip moved by %d, want 1 (forwarded, not answered)", got)
	}
}
