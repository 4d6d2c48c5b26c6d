package decap

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/testenv"
)

// inNewNetns runs fn locked to its thread inside a fresh network namespace,
// which goes (with its links) afterwards.
func inNewNetns(t *testing.T, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		netns.Set(orig)
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer func() {
		ns.Close()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		orig.Close()
	}()
	fn()
}

func addLink(t *testing.T, l netlink.Link) {
	t.Helper()
	if err := netlink.LinkAdd(l); err != nil {
		t.Fatalf("add %s: %v", l.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}

// xdpMode is the kernel's XDP attach mode on an interface (nl.XDP_ATTACHED_*).
func xdpMode(t *testing.T, name string) uint32 {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Xdp == nil {
		return 0
	}
	return l.Attrs().Xdp.AttachMode
}

func xdpAttached(t *testing.T, name string) bool {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Xdp != nil && l.Attrs().Xdp.Attached
}

// An Apply that cannot attach everywhere changes nothing: the interfaces
// it attached to are left again, the previous addresses and port are put
// back, and what ran before still runs. One that succeeds leaves the
// interfaces it no longer names; removing the pins makes Run let go.
func TestApplyAllOrNothing(t *testing.T) {
	testenv.RequireRoot(t, "load BPF programs")
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	pin := filepath.Join(mnt, "decap")
	a := netip.MustParseAddr
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	inNewNetns(t, func() {
		addLink(t, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vfdc1"}, PeerName: "vfdc1p"})
		addLink(t, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vfdc2"}, PeerName: "vfdc2p"})
		// Loopback has no native XDP: attaching there fails.
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			t.Fatal(err)
		}

		first := Settings{Interfaces: []string{"vfdc1"}, Local: []netip.Addr{a("10.0.0.11")}, GUEPort: 6080, XDPMode: dataplane.XDPNative}
		svc, err := Start(log, pin, first)
		if err != nil {
			t.Fatal(err)
		}
		defer svc.Close()

		bad := Settings{Interfaces: []string{"vfdc1", "vfdc2", "lo"}, Local: []netip.Addr{a("10.0.0.12")}, GUEPort: 7000,
			XDPMode: dataplane.XDPNative}
		if err := svc.Apply(bad); err == nil {
			t.Fatal("attaching natively to loopback succeeded")
		}
		if !xdpAttached(t, "vfdc1") || xdpAttached(t, "vfdc2") || xdpAttached(t, "lo") {
			t.Fatalf("after a failed Apply: XDP on vfdc1 %v, vfdc2 %v, lo %v; want only vfdc1",
				xdpAttached(t, "vfdc1"), xdpAttached(t, "vfdc2"), xdpAttached(t, "lo"))
		}
		ro, err := dataplane.OpenPinnedDecap(pin)
		if err != nil {
			t.Fatal(err)
		}
		defer ro.Close()
		locals, _ := ro.Locals()
		port, _ := ro.GUEPort()
		if !slices.Equal(locals, first.Local) || port != 6080 {
			t.Fatalf("after a failed Apply: locals %v, GUE port %d; want %v and 6080", locals, port, first.Local)
		}
		// A mode change that fails on another interface puts the first
		// one back in the mode in force.
		generic := first
		generic.XDPMode = dataplane.XDPGeneric
		if err := svc.Apply(generic); err != nil {
			t.Fatal(err)
		}
		if err := svc.Apply(Settings{Interfaces: []string{"vfdc1", "lo"}, Local: first.Local, GUEPort: 6080,
			XDPMode: dataplane.XDPNative}); err == nil {
			t.Fatal("attaching natively to loopback succeeded")
		}
		if mode := xdpMode(t, "vfdc1"); mode != nl.XDP_ATTACHED_SKB {
			t.Fatalf("after a failed Apply: vfdc1 in XDP attach mode %d, want generic (%d)", mode, nl.XDP_ATTACHED_SKB)
		}
		if err := svc.Apply(first); err != nil {
			t.Fatal(err)
		}

		if err := svc.Apply(Settings{Interfaces: []string{"vfdc2"}, Local: []netip.Addr{a("10.0.0.12")}, GUEPort: 6080,
			XDPMode: dataplane.XDPAuto}); err != nil {
			t.Fatal(err)
		}
		if xdpAttached(t, "vfdc1") || !xdpAttached(t, "vfdc2") {
			t.Fatalf("after moving to vfdc2: XDP on vfdc1 %v, vfdc2 %v", xdpAttached(t, "vfdc1"), xdpAttached(t, "vfdc2"))
		}
		if err := svc.Apply(Settings{Interfaces: []string{"nonesuch0"}, Local: []netip.Addr{a("10.0.0.12")}}); err == nil {
			t.Fatal("an interface that does not exist was accepted")
		}

		if err := dataplane.RemovePins(pin); err != nil {
			t.Fatal(err)
		}
		if !svc.releaseUnpinned() {
			t.Fatal("with its pins removed, the service still holds a link")
		}
		if xdpAttached(t, "vfdc2") {
			t.Fatal("XDP still on vfdc2 after the pins were removed and the service let go")
		}
	})
}

// A reload applies what load returns, or, when load or the apply fails,
// keeps the settings in force; an interface deleted and made again gets
// the decapsulator back.
func TestReloadAndReattach(t *testing.T) {
	testenv.RequireRoot(t, "load BPF programs")
	a := netip.MustParseAddr
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	inNewNetns(t, func() {
		addLink(t, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vfdc3"}, PeerName: "vfdc3p"})
		first := Settings{Interfaces: []string{"vfdc3"}, Local: []netip.Addr{a("10.0.0.11")}, GUEPort: 6080, XDPMode: dataplane.XDPAuto}
		svc, err := Start(log, "", first)
		if err != nil {
			t.Fatal(err)
		}
		defer svc.Close()

		next := Settings{Interfaces: []string{"vfdc3"}, Local: []netip.Addr{a("10.0.0.12"), a("fd00::12")}, GUEPort: 7000,
			XDPMode: dataplane.XDPAuto}
		loads := []func() (Settings, error){
			func() (Settings, error) { return Settings{}, errors.New("the file does not validate") },
			func() (Settings, error) { return Settings{Interfaces: []string{"nonesuch0"}, Local: next.Local}, nil },
			func() (Settings, error) { return next, nil },
		}
		wants := []Settings{first, first, next}
		for i, load := range loads {
			svc.reload(load)
			if got := svc.Settings(); !slices.Equal(got.Local, wants[i].Local) || got.GUEPort != wants[i].GUEPort {
				t.Errorf("after reload %d: settings %+v, want %+v", i, got, wants[i])
			}
		}
		// Run ends with its context.
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if err := svc.Run(ctx, nil, nil); err != nil {
			t.Fatalf("Run ended with %v when its context did", err)
		}

		l, err := netlink.LinkByName("vfdc3")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkDel(l); err != nil {
			t.Fatal(err)
		}
		addLink(t, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vfdc3"}, PeerName: "vfdc3p"})
		svc.reattachSevered()
		if !xdpAttached(t, "vfdc3") {
			t.Fatal("the decapsulator is not back on the interface made again")
		}
	})
}
