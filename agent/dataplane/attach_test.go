package dataplane

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// inNewNetns runs fn on the test goroutine, locked to its thread, inside a
// fresh network namespace that disappears (with its links) afterwards.
func inNewNetns(t *testing.T, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("current netns: %v", err)
	}
	ns, err := netns.New()
	if err != nil {
		netns.Set(orig)
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("new netns: %v", err)
	}
	defer func() {
		ns.Close()
		// If the thread cannot go back, it stays locked and dies with the
		// goroutine rather than serving other goroutines from the wrong netns.
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		orig.Close()
	}()
	fn()
}

func vethPair(t *testing.T, name string) netlink.Link {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	for _, n := range []string{name, name + "p"} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// testPinPath gives a pin directory on a BPF filesystem instance of the
// test's own, so no pin can outlive the test.
func testPinPath(t *testing.T) string {
	t.Helper()
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs on %s: %v", mnt, err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return filepath.Join(mnt, "veloflux")
}

// A second agent adopts the pinned maps and swaps its program onto the live
// link: the VIP, the flows and the counters survive, and the link never goes.
func TestPinnedUpgradeKeepsState(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	inNewNetns(t, func() {
		veth := vethPair(t, "vfup0")
		opts := Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64}
		first, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		h := &harness{tb: t, dp: first}
		h.must(first.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
		h.must(first.SetSettings(Settings{TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9}))
		h.real(1, real4a)
		h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
		h.must(first.Attach("vfup0", XDPNative))
		flow := pkt{src: client4, dst: vip4, sport: 51000, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}
		if got := flowReal(t, h, flow); got != 1 {
			t.Fatalf("flow went to %d", got)
		}
		oldID, err := first.ProgramID()
		h.must(err)
		h.must(first.Close()) // SIGTERM: handles go, pins stay

		xdp := linkXDP(t, veth)
		if xdp == nil || xdp.ProgId != oldID {
			t.Fatalf("after the agent closed, XDP on the link is %+v, want program %d still attached", xdp, oldID)
		}

		second, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		defer second.Close()
		h = &harness{tb: t, dp: second}
		adopted, err := second.AdoptPinnedLinks()
		h.must(err)
		if len(adopted) != 1 || adopted[0] != "vfup0" {
			t.Fatalf("adopted links %v, want [vfup0]", adopted)
		}
		h.must(second.Attach("vfup0", XDPNative))
		// Interface MACs are not pinned: each agent registers its own.
		h.must(second.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU))
		newID, err := second.ProgramID()
		h.must(err)
		if xdp := linkXDP(t, veth); xdp == nil || xdp.ProgId != newID || newID == oldID {
			t.Fatalf("XDP on the link is %+v, want the new program %d (old %d)", xdp, newID, oldID)
		}
		vips, err := second.VIPs()
		h.must(err)
		if len(vips) != 1 {
			t.Fatalf("VIPs after adoption: %v", vips)
		}
		h.ring(1, 2) // the flow must be kept by the adopted conntrack, not by the ring
		h.real(2, real4b)
		flow.tcpFlags = "A"
		if got := flowReal(t, h, flow); got != 1 {
			t.Fatalf("after the upgrade the flow went to %d, want 1", got)
		}
		stats, err := second.VIPStats(1)
		h.must(err)
		if stats.Packets != 2 {
			t.Fatalf("VIP counters after the upgrade: %+v, want 2 packets (they continue)", stats)
		}
		flows, err := second.Flows(0)
		h.must(err)
		if len(flows) != 1 || flows[0].RealID != 1 || flows[0].Idle > 5e9 {
			t.Fatalf("flows %+v, want one recent flow on real 1", flows)
		}

		// Tools read the pins without loading a program.
		ro, err := OpenPinned(pin)
		h.must(err)
		defer ro.Close()
		links, err := ro.PinnedLinks()
		h.must(err)
		if len(links) != 1 || links[0].Interface != "vfup0" || links[0].ProgramID != newID || links[0].Detached {
			t.Fatalf("pinned links %+v, want vfup0 running program %d", links, newID)
		}
		if roFlows, err := ro.Flows(0); err != nil || len(roFlows) != 1 {
			t.Fatalf("flows through the read-only view: %v, %v", roFlows, err)
		}

		// Other sizes than the pinned ones are refused, not silently reused.
		bigger := opts
		bigger.ConntrackSize = 8192
		if _, err := Load(bigger); !errors.Is(err, ebpf.ErrMapIncompatible) {
			t.Fatalf("loading over pins of another conntrack size: %v, want ErrMapIncompatible", err)
		}
		otherRing := opts
		otherRing.RingSize = 257
		if _, err := Load(otherRing); err == nil {
			t.Fatal("loading over pins of another ring size succeeded")
		}

		h.must(second.Detach("vfup0"))
		if xdp := linkXDP(t, veth); xdp != nil && xdp.Attached {
			t.Fatalf("XDP still attached after Detach: %+v", xdp)
		}
	})
	if err := RemovePins(pin); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Fatalf("pin directory still there: %v", err)
	}
}

// A link severed behind the agent's back (bpftool link detach, or its
// interface deleted and made again) is replaced by the next Attach: by the
// agent that holds it (a SIGHUP) and by a new agent that finds only its
// stale pin (a restart), which would otherwise fail to start.
func TestAttachReplacesSeveredLink(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	inNewNetns(t, func() {
		veth := vethPair(t, "vfsev0")
		opts := Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64}
		sever := func() {
			t.Helper()
			l, err := link.LoadPinnedLink(filepath.Join(pin, linkPinPrefix+"vfsev0"), nil)
			if err != nil {
				t.Fatalf("open the pinned link: %v", err)
			}
			defer l.Close()
			if err := l.Detach(); err != nil {
				t.Fatalf("detach the pinned link: %v", err)
			}
			if xdp := linkXDP(t, veth); xdp != nil && xdp.Attached {
				t.Fatalf("XDP still attached after the link was detached: %+v", xdp)
			}
		}
		wantAttached := func(dp *Dataplane, when string) {
			t.Helper()
			id, err := dp.ProgramID()
			if err != nil {
				t.Fatal(err)
			}
			if xdp := linkXDP(t, veth); xdp == nil || !xdp.Attached || xdp.ProgId != id {
				t.Fatalf("%s: XDP on the interface is %+v, want program %d", when, xdp, id)
			}
		}

		first, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := first.Attach("vfsev0", XDPNative); err != nil {
			t.Fatal(err)
		}
		sever()
		if err := first.Attach("vfsev0", XDPNative); err != nil {
			t.Fatalf("attach over a severed link this agent holds: %v", err)
		}
		wantAttached(first, "after re-attaching in the same agent")

		sever()
		if err := first.Close(); err != nil {
			t.Fatal(err)
		}
		second, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		defer second.Close()
		if err := second.Attach("vfsev0", XDPNative); err != nil {
			t.Fatalf("attach over a stale pin of a severed link: %v", err)
		}
		wantAttached(second, "after a new agent attached")
		// The pin names the live link again, so the next agent adopts it.
		l, err := link.LoadPinnedLink(filepath.Join(pin, linkPinPrefix+"vfsev0"), nil)
		if err != nil {
			t.Fatalf("the new link is not pinned: %v", err)
		}
		defer l.Close()
		if err := l.Update(second.objs.VfBalancer); err != nil {
			t.Errorf("the pinned link is not live: %v", err)
		}
	})
}

// An interface deleted and made again under the same name leaves the
// agent's link severed; the next Attach (the agent's answer to the new
// interface index) replaces it.
func TestAttachAfterInterfaceRecreated(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	inNewNetns(t, func() {
		veth := vethPair(t, "vfrec0")
		dp, err := Load(Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64})
		if err != nil {
			t.Fatal(err)
		}
		defer dp.Close()
		if err := dp.Attach("vfrec0", XDPNative); err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkDel(veth); err != nil {
			t.Fatalf("delete %s: %v", veth.Attrs().Name, err)
		}
		veth = vethPair(t, "vfrec0")
		if err := dp.Attach("vfrec0", XDPNative); err != nil {
			t.Fatalf("attach to the re-created interface: %v", err)
		}
		id, err := dp.ProgramID()
		if err != nil {
			t.Fatal(err)
		}
		if xdp := linkXDP(t, veth); xdp == nil || !xdp.Attached || xdp.ProgId != id {
			t.Fatalf("XDP on the re-created interface is %+v, want program %d", xdp, id)
		}
	})
}

func linkXDP(t *testing.T, l netlink.Link) *netlink.LinkXdp {
	t.Helper()
	fresh, err := netlink.LinkByIndex(l.Attrs().Index)
	if err != nil {
		t.Fatal(err)
	}
	return fresh.Attrs().Xdp
}

// xdpMd is struct xdp_md as BPF_PROG_TEST_RUN takes it, to set the ingress
// interface that bpf_fib_lookup starts from.
type xdpMd struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// With use_fib, the next hop of an ipip packet comes from the kernel's FIB
// and neighbour table; without a neighbour it falls back to the gateway MAC.
func TestIPIPNextHopFromFIB(t *testing.T) {
	h := newHarness(t, Options{})
	h.real(1, "10.77.0.11")
	h.real(2, "10.77.0.12")
	h.vip(vip4, 8080, ProtoTCP, VIPMeta{ID: 1, Mode: ModeIPIP}, 1)
	h.vip(vip4, 8081, ProtoTCP, VIPMeta{ID: 2, Mode: ModeIPIP}, 2)
	h.must(h.dp.SetSettings(Settings{GatewayMAC: gwMAC, EncapSource4: netip.MustParseAddr("10.77.0.1"), UseFIB: true,
		TCPIdleTimeoutNs: 300e9, UDPIdleTimeoutNs: 30e9}))
	neighMAC := net.HardwareAddr{0x02, 0x77, 0, 0, 0, 0x11}

	inNewNetns(t, func() {
		veth := vethPair(t, "vffib0")
		addr, _ := netlink.ParseAddr("10.77.0.1/24")
		h.must(netlink.AddrAdd(veth, addr))
		h.must(netlink.NeighAdd(&netlink.Neigh{LinkIndex: veth.Attrs().Index, Family: netlink.FAMILY_V4,
			State: netlink.NUD_PERMANENT, IP: net.ParseIP("10.77.0.11"), HardwareAddr: neighMAC}))
		// bpf_fib_lookup answers only where the kernel would forward.
		h.must(os.WriteFile("/proc/sys/net/ipv4/conf/all/forwarding", []byte("1"), 0o644))

		h.must(h.dp.RegisterInterface("vffib0"))
		run := func(dport uint16) []byte {
			in := withMACs(pkt{src: client4, dst: vip4, sport: 52000, dport: dport, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(t),
				veth.Attrs().HardwareAddr, clientMAC)
			out := make([]byte, len(in)+64)
			opts := ebpf.RunOptions{Data: in, DataOut: out, Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: uint32(veth.Attrs().Index)}}
			ret, err := h.dp.objs.VfBalancer.Run(&opts)
			h.must(err)
			if Verdict(ret) != VerdictTx {
				t.Fatalf("verdict %v, counters %v", Verdict(ret), h.counters())
			}
			return opts.DataOut
		}
		out := run(8080)
		if !equalMAC(out[0:6], neighMAC) || !equalMAC(out[6:12], veth.Attrs().HardwareAddr) {
			t.Fatalf("resolved next hop: dst %x src %x, want %s from %s", out[0:6], out[6:12], neighMAC, veth.Attrs().HardwareAddr)
		}
		if got := binary.BigEndian.Uint32(out[14+16:]); got != 0x0a4d000b {
			t.Fatalf("outer destination %08x, want 10.77.0.11", got)
		}
		out = run(8081) // no neighbour entry for 10.77.0.12
		if !equalMAC(out[0:6], gwMAC) || !equalMAC(out[6:12], veth.Attrs().HardwareAddr) {
			t.Fatalf("unresolved next hop: dst %x src %x, want the gateway %s from %s",
				out[0:6], out[6:12], gwMAC, veth.Attrs().HardwareAddr)
		}
	})
}

func equalMAC(a []byte, b net.HardwareAddr) bool { return net.HardwareAddr(a).String() == b.String() }

// A change of xdp_mode takes effect: on the link the agent holds (a reload)
// and on a pinned link a new agent adopts (a restart), which used to keep
// the mode it was created in until `veloflux detach`. The maps are the
// same throughout, so flows stay where they were.
func TestAttachSwitchesXDPMode(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	inNewNetns(t, func() {
		veth := vethPair(t, "vfmode0")
		opts := Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64}
		wantMode := func(step string, mode uint32) {
			t.Helper()
			xdp := linkXDP(t, veth)
			if xdp == nil || !xdp.Attached || xdp.AttachMode != mode {
				t.Fatalf("%s: XDP on the link is %+v, want attach mode %d", step, xdp, mode)
			}
		}
		first, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		h := &harness{tb: t, dp: first}
		h.must(first.Attach("vfmode0", XDPGeneric))
		wantMode("generic", nl.XDP_ATTACHED_SKB)
		h.must(first.Attach("vfmode0", XDPNative)) // a reload with the new mode
		wantMode("reload to native", nl.XDP_ATTACHED_DRV)
		h.must(first.Attach("vfmode0", XDPAuto)) // auto keeps what runs
		wantMode("auto", nl.XDP_ATTACHED_DRV)
		h.must(first.Close())

		second, err := Load(opts) // a restart with the mode changed in the file
		if err != nil {
			t.Fatal(err)
		}
		defer second.Close()
		h = &harness{tb: t, dp: second}
		h.must(second.Attach("vfmode0", XDPGeneric))
		wantMode("restart to generic", nl.XDP_ATTACHED_SKB)
		links, err := second.PinnedLinks()
		h.must(err)
		if len(links) != 1 || links[0].Detached {
			t.Fatalf("pinned links after the switch: %+v, want one live link", links)
		}
		h.must(second.Detach("vfmode0"))
	})
	if err := RemovePins(pin); err != nil {
		t.Fatal(err)
	}
}
