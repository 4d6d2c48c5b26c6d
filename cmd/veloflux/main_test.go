package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/testenv"
)

// `veloflux detach --pin-path /etc/veloflux` (or any directory that is not
// on a BPF filesystem) refuses, exits 1 and deletes nothing.
func TestDetachRefusesDirectoryOffBPFFS(t *testing.T) {
	dir := t.TempDir()
	files := []string{"veloflux.yaml", "vf_vips", "link_xdp_eth0"}
	for _, name := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("keep\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"detach", "--pin-path", dir}, &stdout, &stderr); code != 1 {
		t.Errorf("exit code %d, want 1 (stdout %q, stderr %q)", code, stdout.String(), stderr.String())
	}
	if !strings.Contains(stderr.String(), "not on a BPF filesystem") {
		t.Errorf("stderr %q does not say why detach refused", stderr.String())
	}
	if stdout.Len() != 0 {
		t.Errorf("stdout %q: a refused detach reports nothing as removed", stdout.String())
	}
	for _, name := range files {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s after the refused detach: %v", name, err)
		}
	}
}

// On a BPF filesystem, detach removes VeloFlux's pins, leaves what others
// pinned beside them, names it on stderr, and exits 0: the data path is
// down, which is what detach is for.
func TestDetachLeavesForeignPins(t *testing.T) {
	testenv.RequireRoot(t, "mount a BPF filesystem and pin maps")
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs on %s: %v", mnt, err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	pin := filepath.Join(mnt, "veloflux")
	if err := os.Mkdir(pin, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vf_vips", "other_map"} {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		err = m.Pin(filepath.Join(pin, name))
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"detach", "--pin-path", pin}, &stdout, &stderr); code != 0 {
		t.Errorf("exit code %d, want 0 (stderr %q)", code, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "detached:") || !strings.Contains(stderr.String(), "other_map") {
		t.Errorf("stdout %q, stderr %q: want the detach reported and other_map named", stdout.String(), stderr.String())
	}
	if _, err := os.Stat(filepath.Join(pin, "vf_vips")); !os.IsNotExist(err) {
		t.Errorf("vf_vips after detach: %v, want it removed", err)
	}
	if _, err := os.Stat(filepath.Join(pin, "other_map")); err != nil {
		t.Errorf("other_map after detach: %v, want it left", err)
	}
}
