package dataplane

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// A --pin-path that is not on a BPF filesystem (a typo, /etc/veloflux) is
// refused before anything in it is touched, whatever the entries are called.
func TestRemovePinsRefusesOtherFilesystems(t *testing.T) {
	dir := t.TempDir()
	names := []string{"vf_vips", "link_xdp_eth0", "veloflux.yaml"}
	for _, name := range names {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("keep me\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	err := RemovePins(dir)
	if !errors.Is(err, errNotBPFFS) || !strings.Contains(err.Error(), "not on a BPF filesystem") {
		t.Fatalf("RemovePins(%s) = %v, want a refusal naming the BPF filesystem", dir, err)
	}
	for _, name := range names {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s after the refused detach: %v", name, err)
		}
	}
}

// On a BPF filesystem, RemovePins removes the balancer's vf_* maps and its
// link_xdp_* links, and leaves (and names) what someone else pinned there.
func TestRemovePinsLeavesForeignPins(t *testing.T) {
	requirePrivileged(t)
	pin := testPinPath(t)
	inNewNetns(t, func() {
		dp, err := Load(Options{PinPath: pin, RingSize: testRingSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64})
		if err != nil {
			t.Fatal(err)
		}
		defer dp.Close()
		if err := dp.Attach("lo", XDPGeneric); err != nil {
			t.Fatal(err)
		}
		other, err := ebpf.NewMap(&ebpf.MapSpec{Name: "other_map", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		if err := other.Pin(filepath.Join(pin, "other_map")); err != nil {
			t.Fatal(err)
		}
		// A directory is never a pin, whatever its name.
		if err := os.Mkdir(filepath.Join(pin, "vf_dir"), 0o700); err != nil {
			t.Fatal(err)
		}

		err = RemovePins(pin)
		var foreign *ForeignPinsError
		if !errors.As(err, &foreign) {
			t.Fatalf("RemovePins = %v, want a *ForeignPinsError", err)
		}
		if slices.Sort(foreign.Names); !slices.Equal(foreign.Names, []string{"other_map", "vf_dir"}) {
			t.Errorf("left in place: %v, want other_map and vf_dir", foreign.Names)
		}
		entries, err := os.ReadDir(pin)
		if err != nil {
			t.Fatal(err)
		}
		var left []string
		for _, e := range entries {
			left = append(left, e.Name())
		}
		if !slices.Equal(left, []string{"other_map", "vf_dir"}) {
			t.Errorf("entries under the pin path after detach: %v, want only other_map and vf_dir", left)
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "other_map"), nil)
		if err != nil {
			t.Fatalf("the unrelated pinned map did not survive: %v", err)
		}
		m.Close()
	})
}
