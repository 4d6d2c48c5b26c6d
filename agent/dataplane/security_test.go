package dataplane

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// A VIP frame the switch flooded, or sent to every port, is another host's:
// the stack gets it as it would without XDP, and nothing about it is
// remembered. Only frames to the interface's own MAC are forwarded, from
// that MAC.
func TestForwardsOnlyFramesToOurMAC(t *testing.T) {
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	foreign := net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x77}
	broadcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	multicast4 := net.HardwareAddr{0x01, 0x00, 0x5e, 0x00, 0x00, 0x01}
	multicast6 := net.HardwareAddr{0x33, 0x33, 0x00, 0x00, 0x00, 0x01}
	// Differs from lbMAC only in its last two bytes, the 2-byte half of
	// the comparison.
	nearly := net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x01, 0xfe}
	frames := map[string][]byte{
		"v4 dsr syn": pkt{src: client4, dst: vip4, sport: 53000, dport: 80, proto: tcp, tcpFlags: "S"}.frame(t),
		"v4 ipip":    pkt{src: client4, dst: vip4, sport: 53001, dport: 8080, proto: tcp, tcpFlags: "S"}.frame(t),
		"v4 udp":     pkt{src: client4, dst: vip4, sport: 53002, dport: 53, proto: udp, payload: []byte("q")}.frame(t),
		"v6 dsr syn": pkt{src: client6, dst: vip6, sport: 53003, dport: 443, proto: tcp, tcpFlags: "S"}.frame(t),
		"vlan v4":    pkt{src: client4, dst: vip4, sport: 53004, dport: 80, proto: tcp, tcpFlags: "S", vlan: 9}.frame(t),
	}
	for name, ours := range frames {
		for _, dst := range []net.HardwareAddr{foreign, broadcast, multicast4, multicast6, nearly} {
			t.Run(name+" to "+dst.String(), func(t *testing.T) {
				in := withMACs(ours, dst, clientMAC)
				flowsBefore, err := h.dp.Flows(0)
				h.must(err)
				before := h.counters()
				verdict, out := h.run(in)
				if verdict != VerdictPass || !bytes.Equal(out, in) {
					t.Fatalf("verdict %v (frame changed: %v), want an untouched pass", verdict, !bytes.Equal(out, in))
				}
				if got := h.counters()[ReasonPassNotOurMAC].Packets - before[ReasonPassNotOurMAC].Packets; got != 1 {
					t.Fatalf("%v moved by %d, want 1", ReasonPassNotOurMAC, got)
				}
				flowsAfter, err := h.dp.Flows(0)
				h.must(err)
				if len(flowsAfter) != len(flowsBefore) {
					t.Fatalf("a frame for another MAC created a conntrack entry")
				}
			})
		}
	}
	// Not another host's frames: counted for no VIP.
	for _, id := range []uint32{vipIDDSR, vipIDIP, vipIDUDP, vipID6} {
		s, err := h.dp.VIPStats(id)
		h.must(err)
		if s.Packets != 0 {
			t.Fatalf("VIP %d counted %d packets of frames for other MACs", id, s.Packets)
		}
	}

	// To our MAC: forwarded from our MAC, whatever the frame's source was.
	in := withMACs(frames["v4 dsr syn"], lbMAC, foreign)
	verdict, out := h.run(in)
	if verdict != VerdictTx {
		t.Fatalf("frame to our MAC: verdict %v, want tx", verdict)
	}
	if want := withMACs(in, realMAC(1), lbMAC); !bytes.Equal(out, want) {
		t.Fatalf("forwarded frame\n got  %x\n want %x", out, want)
	}
}

// With no MAC registered for the interface a packet came in on, the program
// cannot tell whether the frame is ours, so it leaves it to the stack.
func TestUnregisteredInterfacePasses(t *testing.T) {
	h := standardHarness(t)
	h.must(h.dp.forgetIndex("lo", testRunIfindex))
	in := pkt{src: client4, dst: vip4, sport: 53100, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
	before := h.counters()
	verdict, out := h.run(in)
	if verdict != VerdictPass || !bytes.Equal(out, in) {
		t.Fatalf("verdict %v on an unregistered interface, want an untouched pass", verdict)
	}
	if got := h.counters()[ReasonPassIfaceUnknown].Packets - before[ReasonPassIfaceUnknown].Packets; got != 1 {
		t.Fatalf("%v moved by %d, want 1", ReasonPassIfaceUnknown, got)
	}
}

// Attach registers the interface's MAC and MTU; RegisterInterface follows
// a change of them; Detach forgets them.
func TestAttachRegistersInterfaceMAC(t *testing.T) {
	h := standardHarness(t)
	inNewNetns(t, func() {
		veth := vethPair(t, "vfx13mac0")
		ifindex := uint32(veth.Attrs().Index)
		oldMAC := veth.Attrs().HardwareAddr
		base := pkt{src: client4, dst: vip4, sport: 53200, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
		run := func(dst net.HardwareAddr) (Verdict, []byte) {
			t.Helper()
			in := withMACs(base, dst, clientMAC)
			opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+64),
				Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: ifindex}}
			ret, err := h.dp.objs.VfBalancer.Run(&opts)
			h.must(err)
			return Verdict(ret), opts.DataOut
		}

		if v, _ := run(oldMAC); v != VerdictPass {
			t.Fatalf("before Attach: verdict %v, want pass", v)
		}
		h.must(h.dp.Attach("vfx13mac0", XDPNative))
		v, out := run(oldMAC)
		if v != VerdictTx || !equalMAC(out[6:12], oldMAC) {
			t.Fatalf("after Attach: verdict %v from %x, want tx from %s", v, out[6:12], oldMAC)
		}

		newMAC := net.HardwareAddr{0x02, 0x13, 0x13, 0x13, 0x13, 0x13}
		h.must(netlink.LinkSetHardwareAddr(veth, newMAC))
		if v, _ := run(newMAC); v != VerdictPass {
			t.Fatalf("new MAC before RegisterInterface: verdict %v, want pass", v)
		}
		h.must(h.dp.RegisterInterface("vfx13mac0"))
		if v, out := run(newMAC); v != VerdictTx || !equalMAC(out[6:12], newMAC) {
			t.Fatalf("new MAC after RegisterInterface: verdict %v from %x, want tx from %s", v, out[6:12], newMAC)
		}
		if v, _ := run(oldMAC); v != VerdictPass {
			t.Fatalf("the old MAC is still forwarded: verdict %v", v)
		}
		// The MTU, against which ipip and gue packets are measured, is
		// registered with the MAC and follows a change the same way.
		mtuOf := func() uint16 {
			var entry balancerVfIface
			h.must(h.dp.objs.VfIfaceSlots.Lookup(ifaceSlot(ifindex), &entry))
			return entry.Mtu
		}
		if got := mtuOf(); got != uint16(veth.Attrs().MTU) {
			t.Fatalf("registered MTU %d, want the interface's %d", got, veth.Attrs().MTU)
		}
		h.must(netlink.LinkSetMTU(veth, 1400))
		h.must(h.dp.RegisterInterface("vfx13mac0"))
		if got := mtuOf(); got != 1400 {
			t.Fatalf("registered MTU %d after the change to 1400", got)
		}

		h.must(h.dp.Detach("vfx13mac0"))
		if entry, err := h.dp.interfaceMAC(int(ifindex)); err != nil || entry != nil {
			t.Fatalf("after Detach the interface's MAC entry is %x (%v), want none", entry, err)
		}
		before := h.counters()[ReasonPassIfaceUnknown].Packets
		if v, _ := run(newMAC); v != VerdictPass || h.counters()[ReasonPassIfaceUnknown].Packets != before+1 {
			t.Fatalf("after Detach: verdict %v, want pass as an unregistered interface", v)
		}
	})
}

// A VIP packet whose source no client can have is dropped, each class under
// its own reason; the same sources to a non-VIP address are the host's.
func TestMartianSourcesDropped(t *testing.T) {
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	cases := []struct {
		src, dst string
		dport    uint16
		reason   Reason
	}{
		{vip4, vip4, 80, ReasonDropMartianVIP},
		{"0.0.0.0", vip4, 80, ReasonDropMartianUnspec},
		{"0.1.2.3", vip4, 80, ReasonDropMartianUnspec},
		{"255.255.255.255", vip4, 80, ReasonDropMartianBroadcast},
		{"224.0.0.1", vip4, 80, ReasonDropMartianMulticast},
		{"239.255.255.250", vip4, 80, ReasonDropMartianMulticast},
		{"127.0.0.1", vip4, 80, ReasonDropMartianLoopback},
		{"127.200.0.9", vip4, 80, ReasonDropMartianLoopback},
		{vip6, vip6, 443, ReasonDropMartianVIP},
		{"::", vip6, 443, ReasonDropMartianUnspec},
		{"ff02::1", vip6, 443, ReasonDropMartianMulticast},
		{"ff0e::1:3", vip6, 443, ReasonDropMartianMulticast},
		{"::1", vip6, 443, ReasonDropMartianLoopback},
	}
	for _, tc := range cases {
		t.Run(tc.reason.String()+" "+tc.src, func(t *testing.T) {
			in := pkt{src: tc.src, dst: tc.dst, sport: 54000, dport: tc.dport, proto: tcp, tcpFlags: "S"}.frame(t)
			before := h.counters()
			verdict, out := h.run(in)
			if verdict != VerdictDrop || !bytes.Equal(out, in) {
				t.Fatalf("verdict %v, want drop", verdict)
			}
			if got := h.counters()[tc.reason].Packets - before[tc.reason].Packets; got != 1 {
				t.Fatalf("%v moved by %d, want 1", tc.reason, got)
			}
		})
	}
	// Neighbours of the martian ranges are ordinary clients.
	for _, src := range []string{"1.0.0.1", "126.255.255.255", "128.0.0.1", "223.255.255.255", "240.0.0.1", "fe80::1", "::2", "fd00:100::2"} {
		dst, dport := vip4, uint16(80)
		if netip.MustParseAddr(src).Is6() {
			dst, dport = vip6, 443
		}
		if v, _ := h.run(pkt{src: src, dst: dst, sport: 54001, dport: dport, proto: tcp, tcpFlags: "S"}.frame(t)); v != VerdictTx {
			t.Fatalf("client %s: verdict %v, want tx", src, v)
		}
	}
	// DHCP from 0.0.0.0 to the broadcast address is not for a VIP.
	if v, _ := h.run(pkt{src: "0.0.0.0", dst: "255.255.255.255", sport: 68, dport: 67, proto: udp, payload: []byte("d")}.frame(t)); v != VerdictPass {
		t.Fatalf("DHCP discover: verdict %v, want pass", v)
	}
}

// pinToOneCPU keeps the test goroutine on one CPU for the rest of the test:
// the new-flow buckets are per CPU, and BPF_PROG_TEST_RUN runs the program
// on the caller's CPU. The thread is never unlocked, so it ends with the
// test instead of serving other goroutines with a narrowed affinity.
func pinToOneCPU(t *testing.T) {
	t.Helper()
	runtime.LockOSThread()
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatalf("read CPU affinity: %v", err)
	}
	cpu := -1
	for i := 0; i < len(set)*64 && cpu < 0; i++ {
		if set.IsSet(i) {
			cpu = i
		}
	}
	set.Zero()
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		t.Fatalf("pin to CPU %d: %v", cpu, err)
	}
}

func TestNewFlowRateLimit(t *testing.T) {
	pinToOneCPU(t)
	h := standardHarness(t)
	tcp, udp := layers.IPProtocolTCP, layers.IPProtocolUDP
	const burst = 3
	limited := Settings{GatewayMAC: gwMAC, EncapSource4: encapSrc4, EncapSource6: encapSrc6,
		TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9,
		// One new flow per second: the test runs well within the second,
		// so the bucket does not refill between its packets.
		NewFlowLimit: NewFlowLimit{RatePerSecond: 1, Burst: burst}}
	h.must(h.dp.SetSettings(limited))
	got, err := h.dp.Settings()
	h.must(err)
	if got.NewFlowLimit != limited.NewFlowLimit {
		t.Fatalf("settings read back %+v, want %+v", got.NewFlowLimit, limited.NewFlowLimit)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	events := make(chan Event, 64)
	done := make(chan error, 1)
	go func() { done <- h.dp.ReadEvents(ctx, func(e Event) { events <- e }) }()

	syn := func(src string, sport uint16) Verdict {
		t.Helper()
		v, _ := h.run(pkt{src: src, dst: vip4, sport: sport, dport: 80, proto: tcp, tcpFlags: "S"}.frame(t))
		return v
	}
	limitedCount := func() uint64 { return h.counters()[ReasonDropNewFlowRateLimited].Packets }

	for i := uint16(0); i < burst; i++ {
		if v := syn(client4, 55000+i); v != VerdictTx {
			t.Fatalf("SYN %d of the burst: verdict %v, want tx", i+1, v)
		}
	}
	for i := uint16(burst); i < burst+2; i++ {
		if v := syn(client4, 55000+i); v != VerdictDrop {
			t.Fatalf("SYN %d, past the burst: verdict %v, want drop", i+1, v)
		}
	}
	// A UDP flow is a new conntrack entry too.
	if v, _ := h.run(pkt{src: client4, dst: vip4, sport: 55100, dport: 53, proto: udp, payload: []byte("q")}.frame(t)); v != VerdictDrop {
		t.Fatalf("new UDP flow past the burst: verdict %v, want drop", v)
	}
	if n := limitedCount(); n != 3 {
		t.Fatalf("%v counts %d, want 3", ReasonDropNewFlowRateLimited, n)
	}
	// The flows it opened go on.
	for i := uint16(0); i < burst; i++ {
		v, _ := h.run(pkt{src: client4, dst: vip4, sport: 55000 + i, dport: 80, proto: tcp, tcpFlags: "A"}.frame(t))
		if v != VerdictTx {
			t.Fatalf("established flow %d of the limited source: verdict %v, want tx", i, v)
		}
	}
	// Another source has a budget of its own.
	for i := uint16(0); i < burst; i++ {
		if v := syn("192.168.1.11", 55000+i); v != VerdictTx {
			t.Fatalf("SYN %d from another source: verdict %v, want tx", i+1, v)
		}
	}
	// IPv6 sources share a budget per /64.
	for i, src := range []string{"fd00:1::10", "fd00:1::11", "fd00:1::ffff:1"} {
		v, _ := h.run(pkt{src: src, dst: vip6, sport: 55200, dport: 443, proto: tcp, tcpFlags: "S"}.frame(t))
		if v != VerdictTx {
			t.Fatalf("v6 SYN %d: verdict %v, want tx", i+1, v)
		}
	}
	if v, _ := h.run(pkt{src: "fd00:1::12", dst: vip6, sport: 55200, dport: 443, proto: tcp, tcpFlags: "S"}.frame(t)); v != VerdictDrop {
		t.Fatalf("v6 SYN from the same /64 past the burst: verdict %v, want drop", v)
	}
	if v, _ := h.run(pkt{src: "fd00:1:0:1::10", dst: vip6, sport: 55200, dport: 443, proto: tcp, tcpFlags: "S"}.frame(t)); v != VerdictTx {
		t.Fatalf("v6 SYN from the next /64: verdict %v, want tx", v)
	}

	select {
	case e := <-events:
		if e.Reason != ReasonDropNewFlowRateLimited || e.Src != netip.MustParseAddr(client4) || e.DstPort != 80 {
			t.Fatalf("event %+v, want a rate-limit drop from %s to port 80", e, client4)
		}
	case <-ctx.Done():
		t.Fatal("no event for a rate-limited packet")
	}
	cancel()
	<-done

	// Off: nothing is limited.
	limited.NewFlowLimit = NewFlowLimit{}
	h.must(h.dp.SetSettings(limited))
	before := limitedCount()
	for i := uint16(0); i < 10; i++ {
		if v := syn(client4, 56000+i); v != VerdictTx {
			t.Fatalf("SYN %d with the limit off: verdict %v, want tx", i+1, v)
		}
	}
	if n := limitedCount(); n != before {
		t.Fatalf("%v moved by %d with the limit off", ReasonDropNewFlowRateLimited, n-before)
	}
}

// The bucket refills with time: after an empty bucket, one interval buys one
// more flow.
func TestNewFlowRateLimitRefills(t *testing.T) {
	pinToOneCPU(t)
	h := standardHarness(t)
	h.must(h.dp.SetSettings(Settings{TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9,
		NewFlowLimit: NewFlowLimit{RatePerSecond: 4, Burst: 1}}))
	syn := func(sport uint16) Verdict {
		v, _ := h.run(pkt{src: client4, dst: vip4, sport: sport, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t))
		return v
	}
	if v := syn(57000); v != VerdictTx {
		t.Fatalf("first SYN: verdict %v, want tx", v)
	}
	time.Sleep(300 * time.Millisecond) // one interval is 250 ms
	if v := syn(57001); v != VerdictTx {
		t.Fatalf("SYN after an interval: verdict %v, want tx", v)
	}
}

func TestNewFlowLimitSettingsRejected(t *testing.T) {
	h := newHarness(t, Options{})
	for _, l := range []NewFlowLimit{
		{RatePerSecond: 10},
		{Burst: 5},
		{RatePerSecond: MaxNewFlowRate + 1, Burst: 1},
		{RatePerSecond: 10, Burst: MaxNewFlowBurst + 1},
	} {
		if err := h.dp.SetSettings(Settings{NewFlowLimit: l}); err == nil {
			t.Errorf("SetSettings accepted the new-flow limit %+v", l)
		}
	}
}

// An interface without an Ethernet MAC (loopback here) can carry the
// program, but gets no entry: its VIP packets go to the stack.
func TestAttachWithoutMACRegistersNothing(t *testing.T) {
	h := standardHarness(t) // registered lbMAC for index 1, the loopback
	inNewNetns(t, func() {
		h.must(h.dp.Attach("lo", XDPGeneric))
		if entry, err := h.dp.interfaceMAC(testRunIfindex); err != nil || entry != nil {
			t.Fatalf("the loopback's entry is %x (%v), want none", entry, err)
		}
		in := pkt{src: client4, dst: vip4, sport: 53300, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t)
		if v, _ := h.run(in); v != VerdictPass || h.counters()[ReasonPassIfaceUnknown].Packets != 1 {
			t.Fatalf("VIP frame on an interface without a MAC: verdict %v, want pass as %v", v, ReasonPassIfaceUnknown)
		}
		h.must(h.dp.Detach("lo"))
	})
}
