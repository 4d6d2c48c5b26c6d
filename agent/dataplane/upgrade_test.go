package dataplane

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// pinStale pins, under name, a map of the same type as the spec's but one
// entry shorter and with a larger value: what an older or newer version of
// the program may have left.
func pinStale(t *testing.T, pin, name string) {
	t.Helper()
	spec, err := loadBalancer()
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps[name].Copy()
	ms.Pinning = ebpf.PinNone
	ms.ValueSize += 8
	ms.Contents = nil
	if ms.Type != ebpf.RingBuf {
		ms.MaxEntries++
	} else {
		ms.MaxEntries *= 2
	}
	m, err := ebpf.NewMap(ms)
	if err != nil {
		t.Fatalf("create a stale %s: %v", name, err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(pin, name)); err != nil {
		t.Fatalf("pin a stale %s: %v", name, err)
	}
}

// An upgrade that changes the layout of the settings or the reason
// counters (a new reason, a new setting) used to refuse to start until
// `veloflux detach`. The agent rewrites those maps whole, so the new one
// replaces their pins; the maps that hold flows are kept, and a changed
// conntrack is still refused, naming the map.
func TestLoadReplacesRebuiltPinsOfAnotherLayout(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	opts := Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64}
	first, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{tb: t, dp: first}
	h.real(1, real4a)
	h.must(first.Close())

	for _, name := range []string{"vf_settings", "vf_counters"} {
		if err := removePin(pin, name); err != nil {
			t.Fatal(err)
		}
		pinStale(t, pin, name)
	}
	// The settings map's name before it was renamed to match its struct.
	old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 64, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	h.must(old.Pin(filepath.Join(pin, "vf_config")))
	old.Close()
	second, err := Load(opts)
	if err != nil {
		t.Fatalf("Load over stale settings and counters: %v", err)
	}
	defer second.Close()
	if got := second.ReplacedPins(); !slices.Equal(got, []string{"vf_config", "vf_settings", "vf_counters"}) {
		t.Errorf("ReplacedPins = %v, want [vf_config vf_settings vf_counters]", got)
	}
	if _, err := os.Stat(filepath.Join(pin, "vf_config")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the retired pin vf_config is still there: %v", err)
	}
	reals, err := second.Reals()
	if err != nil || reals[1].Addr.String() != real4a {
		t.Errorf("the reals did not survive the replacement: %v, %v", reals, err)
	}
	if _, err := second.Counters(); err != nil {
		t.Errorf("read the new counters: %v", err)
	}
	h = &harness{tb: t, dp: second}
	h.must(second.Close())

	if err := removePin(pin, "vf_ct4"); err != nil {
		t.Fatal(err)
	}
	pinStale(t, pin, "vf_ct4")
	_, err = Load(opts)
	var incompatible *IncompatiblePinError
	if !errors.As(err, &incompatible) || incompatible.Map != "vf_ct4" || !errors.Is(err, ebpf.ErrMapIncompatible) {
		t.Fatalf("Load over a conntrack of another layout: %v, want an IncompatiblePinError naming vf_ct4", err)
	}
}

func removePin(dir, name string) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
	if err != nil {
		return err
	}
	defer m.Close()
	return m.Unpin()
}

// An upgrade from an agent whose IPv4 conntrack was an LRU hash moves its
// flows into the table of sets: an established flow keeps its real
// although the ring has changed since, and the agent says how many moved.
func TestLoadMovesTheFlowsOfALegacyConntrack(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	opts := Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64}
	h := newHarness(t, opts)
	first := h.dp
	flow := flowOnReal1(t, h)
	entry, err := first.lookupFlow4(flow4Key(flow))
	h.must(err)
	h.ring(1, 2) // new flows now go to real 2

	// The same flow in a conntrack of the older layout, with flows that
	// share nothing with it around it.
	if err := removePin(pin, "vf_ct4"); err != nil {
		t.Fatal(err)
	}
	legacy, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: 16, ValueSize: 16, MaxEntries: 4096,
		Flags: unix.BPF_F_NO_COMMON_LRU})
	h.must(err)
	h.must(legacy.Put(flow4Key(flow), entry))
	for port := uint16(1); port <= 100; port++ {
		other := flow
		other.src, other.sport = "192.168.7.7", port
		h.must(legacy.Put(flow4Key(other), balancerVfCtEntry{LastSeen: entry.LastSeen, RealId: 2, VipId: 1}))
	}
	h.must(legacy.Pin(filepath.Join(pin, "vf_ct4")))
	legacy.Close()

	second, err := Load(opts)
	if err != nil {
		t.Fatalf("Load over a conntrack of the older layout: %v", err)
	}
	defer second.Close()
	h = &harness{tb: t, dp: second}
	h.must(second.setInterfaceMAC(testRunIfindex, lbMAC, testRunMTU)) // not pinned
	if moved, dropped := second.MovedFlows4(); moved != 101 || dropped != 0 {
		t.Errorf("MovedFlows4 = %d moved, %d dropped; want 101 and 0", moved, dropped)
	}
	flow.tcpFlags = "A"
	if got := flowReal(t, h, flow); got != 1 {
		t.Fatalf("after the upgrade the established flow went to real %d, want 1", got)
	}
	flows, err := second.Flows(0)
	h.must(err)
	if len(flows) != 101 {
		t.Errorf("Flows lists %d flows after the move, want 101", len(flows))
	}
}
