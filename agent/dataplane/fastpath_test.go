package dataplane

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
)

// Two interfaces whose indexes share a slot of vf_iface_slots: the second
// goes to the overflow hash, both forward from their own MAC, and each
// still forwards after the other is forgotten.
func TestInterfaceSlotOverflow(t *testing.T) {
	h := standardHarness(t)
	inNewNetns(t, func() {
		const first = 7
		second := first + int(balancerVfSizeVF_MAX_IFACES)
		macs := map[int]net.HardwareAddr{}
		for _, index := range []int{first, second} {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vfxfast" + string(rune('a'+index%26)), Index: index},
				PeerName: "vfxfastp" + string(rune('a'+index%26))}
			if err := netlink.LinkAdd(veth); err != nil {
				t.Fatalf("add veth with index %d: %v", index, err)
			}
			l, err := netlink.LinkByIndex(index)
			h.must(err)
			h.must(netlink.LinkSetUp(l))
			macs[index] = l.Attrs().HardwareAddr
			h.must(h.dp.RegisterInterface(l.Attrs().Name))
		}
		var slotHolder balancerVfIface
		h.must(h.dp.objs.VfIfaceSlots.Lookup(ifaceSlot(first), &slotHolder))
		if slotHolder.Ifindex != first {
			t.Fatalf("slot %d holds interface %d, want %d", ifaceSlot(first), slotHolder.Ifindex, first)
		}
		base := pkt{src: client4, dst: vip4, sport: 53400, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
		run := func(index int) Verdict {
			t.Helper()
			in := withMACs(base, macs[index], clientMAC)
			opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+64),
				Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: uint32(index)}}
			ret, err := h.dp.objs.VfBalancer.Run(&opts)
			h.must(err)
			if Verdict(ret) == VerdictTx && !equalMAC(opts.DataOut[6:12], macs[index]) {
				t.Fatalf("interface %d sent from %x, want its own MAC %s", index, opts.DataOut[6:12], macs[index])
			}
			return Verdict(ret)
		}
		for _, index := range []int{first, second} {
			if v := run(index); v != VerdictTx {
				t.Fatalf("interface %d: verdict %v, want tx", index, v)
			}
		}
		h.must(h.dp.forgetIndex("first", first))
		if v := run(first); v != VerdictPass {
			t.Fatalf("forgotten interface %d: verdict %v, want pass", first, v)
		}
		if v := run(second); v != VerdictTx {
			t.Fatalf("interface %d after the slot's holder left: verdict %v, want tx", second, v)
		}
		// Registered again, the overflowed interface takes the free slot
		// and leaves the hash.
		l, err := netlink.LinkByIndex(second)
		h.must(err)
		h.must(h.dp.RegisterInterface(l.Attrs().Name))
		if entry, err := h.dp.objs.VfIfaces.LookupBytes(uint32(second)); err != nil || entry != nil {
			t.Fatalf("interface %d is still in the overflow hash: %x (%v)", second, entry, err)
		}
		if v := run(second); v != VerdictTx {
			t.Fatalf("interface %d in its slot: verdict %v, want tx", second, v)
		}
	})
}

// VIPs whose addresses share a slot of vf_vip_filter: the slot counts both,
// so removing one keeps the other reachable, and removing both empties it.
// An address that only shares the slot is still no VIP.
func TestVIPFilterSharedSlot(t *testing.T) {
	h := newHarness(t, Options{})
	h.real(1, real4a)
	a := netip.MustParseAddr("10.120.0.1")
	key := func(addr netip.Addr) balancerVfVipKey {
		k, err := vipKey(VIP{Addr: addr, Port: 80, Proto: ProtoTCP})
		h.must(err)
		return k
	}
	var b, c netip.Addr
	for next := a.Next(); !c.IsValid(); next = next.Next() {
		if vipFilterSlot(key(next)) != vipFilterSlot(key(a)) {
			continue
		}
		if !b.IsValid() {
			b = next
		} else {
			c = next
		}
	}
	h.vip(a.String(), 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	h.vip(b.String(), 80, ProtoTCP, VIPMeta{ID: 2, Mode: ModeDSR}, 1)
	h.vip(b.String(), 443, ProtoTCP, VIPMeta{ID: 3, Mode: ModeDSR}, 1)
	h.vip(b.String(), 443, ProtoTCP, VIPMeta{ID: 3, Mode: ModeDSR}, 1) // an update is counted once
	slotCount := func() uint32 {
		var n uint32
		h.must(h.dp.objs.VfVipFilter.Lookup(vipFilterSlot(key(a)), &n))
		return n
	}
	if n := slotCount(); n != 3 {
		t.Fatalf("shared slot counts %d VIPs, want 3", n)
	}
	verdict := func(dst netip.Addr, port uint16) Verdict {
		in := pkt{src: client4, dst: dst.String(), sport: 53500, dport: port, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
		v, out := h.run(in)
		if v == VerdictPass && !bytes.Equal(out, in) {
			t.Fatalf("passed frame to %v was changed", dst)
		}
		return v
	}
	if v := verdict(c, 80); v != VerdictPass || h.counters()[ReasonPassNotVIP].Packets != 1 {
		t.Fatalf("address %v sharing the slot of VIPs: verdict %v, want pass as not a VIP", c, v)
	}
	h.must(h.dp.DeleteVIP(VIP{Addr: a, Port: 80, Proto: ProtoTCP}))
	h.must(h.dp.DeleteVIP(VIP{Addr: a, Port: 80, Proto: ProtoTCP})) // a missing VIP is not counted down
	if v := verdict(b, 80); v != VerdictTx {
		t.Fatalf("VIP %v after another VIP of its slot left: verdict %v, want tx", b, v)
	}
	h.must(h.dp.DeleteVIP(VIP{Addr: b, Port: 80, Proto: ProtoTCP}))
	h.must(h.dp.DeleteVIP(VIP{Addr: b, Port: 443, Proto: ProtoTCP}))
	if n := slotCount(); n != 0 {
		t.Fatalf("slot counts %d after every VIP of it left, want 0", n)
	}
}

// A reloaded data path rebuilds the filter from the pinned VIPs, so the
// VIPs an earlier agent wrote are forwarded before anyone writes them again.
func TestVIPFilterRebuiltFromPins(t *testing.T) {
	requirePrivileged(t)
	pins := testPinPath(t)
	first, err := Load(Options{PinPath: pins, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 256, RingSize: testRingSize})
	h := &harness{tb: t, dp: first}
	h.must(err)
	h.must(first.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
	h.must(first.SetSettings(Settings{GatewayMAC: gwMAC, EncapSource4: encapSrc4, TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9}))
	h.real(1, real4a)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	h.must(first.Close())

	second, err := Load(Options{PinPath: pins, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 256, RingSize: testRingSize})
	h.must(err)
	t.Cleanup(func() { second.Close() })
	h.dp = second
	h.must(second.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
	in := pkt{src: client4, dst: vip4, sport: 53600, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
	if v, _ := h.run(in); v != VerdictTx {
		t.Fatalf("pinned VIP after a reload: verdict %v, want tx", v)
	}
}

// An established flow finds its VIP through the id in its conntrack entry.
// What it finds must follow vf_vips: a new mode is used at once, a VIP that
// changed its id is still found, a removed VIP no longer forwards, and an
// exact VIP added beside an all-ports one takes its packets.
func TestEstablishedFlowFollowsVIPChanges(t *testing.T) {
	h := standardHarness(t)
	vip := VIP{Addr: netip.MustParseAddr(vip4), Port: 80, Proto: ProtoTCP}
	syn := pkt{src: client4, dst: vip4, sport: 53700, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
	ack := pkt{src: client4, dst: vip4, sport: 53700, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "A"}.frame(t)
	if v, _ := h.run(syn); v != VerdictTx {
		t.Fatalf("SYN: verdict %v, want tx", v)
	}
	reasonOf := func(frame []byte) Reason {
		t.Helper()
		before := h.counters()
		h.run(frame)
		after := h.counters()
		for r := range after {
			if after[r].Packets != before[r].Packets {
				return Reason(r)
			}
		}
		t.Fatal("no counter moved")
		return 0
	}
	if r := reasonOf(ack); r != ReasonTxDSR {
		t.Fatalf("established packet: %v, want %v", r, ReasonTxDSR)
	}
	h.must(h.dp.SetVIP(vip, VIPMeta{ID: vipIDDSR, Mode: ModeIPIP}))
	if r := reasonOf(ack); r != ReasonTxIPIP {
		t.Fatalf("after the VIP turned ipip: %v, want %v", r, ReasonTxIPIP)
	}
	const movedID = 40
	h.must(h.dp.SetVIP(vip, VIPMeta{ID: movedID, Mode: ModeDSR}))
	h.ring(movedID, 1)
	if r := reasonOf(ack); r != ReasonTxDSR {
		t.Fatalf("after the VIP changed its id: %v, want %v", r, ReasonTxDSR)
	}
	if s, err := h.dp.VIPStats(movedID); err != nil || s.Packets == 0 {
		t.Fatalf("packets of the VIP under its new id: %+v, %v; want them counted there", s, err)
	}
	// A flow opened under the new id, whose entry names it.
	newSyn := pkt{src: client4, dst: vip4, sport: 53702, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
	newAck := pkt{src: client4, dst: vip4, sport: 53702, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "A"}.frame(t)
	if v, _ := h.run(newSyn); v != VerdictTx {
		t.Fatalf("SYN under the new id: verdict %v, want tx", v)
	}
	h.must(h.dp.DeleteVIP(vip))
	for _, frame := range [][]byte{ack, newAck} {
		if r := reasonOf(frame); r != ReasonPassNotVIP {
			t.Fatalf("after the VIP was removed: %v, want %v", r, ReasonPassNotVIP)
		}
	}

	// 10.100.0.2 serves every TCP port (dsr); an established flow of it
	// moves to an exact VIP added for its port.
	anySyn := pkt{src: client4, dst: "10.100.0.2", sport: 53701, dport: 9000, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
	anyAck := pkt{src: client4, dst: "10.100.0.2", sport: 53701, dport: 9000, proto: layers.IPProtocolTCP, tcpFlags: "A"}.frame(t)
	if v, _ := h.run(anySyn); v != VerdictTx {
		t.Fatalf("SYN to the all-ports VIP: verdict %v, want tx", v)
	}
	h.vip("10.100.0.2", 9000, ProtoTCP, VIPMeta{ID: 41, Mode: ModeIPIP}, 2)
	if r := reasonOf(anyAck); r != ReasonTxIPIP {
		t.Fatalf("established flow after an exact VIP took its port: %v, want %v", r, ReasonTxIPIP)
	}
}
