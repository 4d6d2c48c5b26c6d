package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/testenv"
)

type fakeDecap struct {
	links []dataplane.AttachedLink
	stats dataplane.DecapStats
}

func (f *fakeDecap) PinPath() string          { return "/sys/fs/bpf/veloflux-decap" }
func (f *fakeDecap) GUEPort() (uint16, error) { return 6080, nil }
func (f *fakeDecap) Locals() ([]netip.Addr, error) {
	return []netip.Addr{netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("fd00::11")}, nil
}
func (f *fakeDecap) PinnedLinks() ([]dataplane.AttachedLink, error) { return f.links, nil }
func (f *fakeDecap) Stats() (dataplane.DecapStats, error)           { return f.stats, nil }

// Every counter is printed under its name, in its section.
func TestDecapTable(t *testing.T) {
	src := &fakeDecap{
		links: []dataplane.AttachedLink{{Interface: "eth0", Ifindex: 2, ProgramID: 41, LinkID: 7},
			{Interface: "eth1", ProgramID: 41, LinkID: 8, Detached: true}},
		stats: dataplane.DecapStats{IPIP4Packets: 1, IPIP6Packets: 2, GUE4Packets: 3, GUE6Packets: 4, DecapBytes: 5,
			PassNotTunnel: 6, PassNotLocal: 7, PassGUEControl: 8, DropTruncated: 9, DropBadLength: 10, DropBadInner: 11,
			DropGUEVariant: 12, DropGUEUnsupported: 13},
	}
	v, err := gatherDecap(src)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := render(&out, v, "table"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{`(?m)^gue: +UDP port 6080$`, `(?m)^local addresses: +10\.0\.0\.11, fd00::11$`,
		`(?m)^interface: +eth0 +program 41, link 7$`, `(?m)^interface: +eth1 +program 41, link 8, detached`,
		`(?m)^ipip4 \(IPIP, 6in4\) +1$`, `(?m)^ipip6 \(IP6IP6, 4in6\) +2$`, `(?m)^gue4 +3$`, `(?m)^gue6 +4$`, `(?m)^bytes +5$`,
		`(?m)^not_tunnel +6$`, `(?m)^not_local +7$`, `(?m)^gue_control +8$`, `(?m)^truncated +9$`, `(?m)^bad_length +10$`,
		`(?m)^bad_inner +11$`, `(?m)^gue_variant +12$`, `(?m)^gue_unsupported +13$`} {
		if !regexp.MustCompile(p).MatchString(out.String()) {
			t.Errorf("table lacks %s:\n%s", p, out.String())
		}
	}
}

// TestPinnedDecap reads what a decapsulator pinned, as a user would, with
// the decapsulator's default pin path taken unless --pin-path is given.
func TestPinnedDecap(t *testing.T) {
	testenv.RequireRoot(t, "create BPF maps")
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	pin := filepath.Join(dir, "decap")
	d, err := dataplane.LoadDecap(dataplane.DecapOptions{PinPath: pin})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetLocals([]netip.Addr{netip.MustParseAddr("192.0.2.11")}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetGUEPort(0); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	for _, args := range [][]string{{"--pin-path", pin, "decap"}, {"decap", "--pin-path", pin}} {
		var out, errb bytes.Buffer
		if code := run(args, &out, &errb); code != 0 {
			t.Fatalf("vfctl %v: exit %d: %s", args, code, errb.String())
		}
		for _, p := range []string{`(?m)^gue: +off`, `(?m)^local addresses: +192\.0\.2\.11$`, `(?m)^interfaces: +none pinned$`,
			`(?m)^gue4 +0$`} {
			if !regexp.MustCompile(p).MatchString(out.String()) {
				t.Errorf("vfctl %v lacks %s:\n%s", args, p, out.String())
			}
		}
	}
	var out, errb bytes.Buffer
	if code := run([]string{"decap", "--pin-path", pin, "-o", "json"}, &out, &errb); code != 0 {
		t.Fatalf("vfctl decap -o json: exit %d: %s", code, errb.String())
	}
	var v struct {
		GUEPort  uint16         `json:"gue_port"`
		Local    []string       `json:"local"`
		Counters map[string]int `json:"counters"`
	}
	if err := json.Unmarshal(out.Bytes(), &v); err != nil || v.GUEPort != 0 || len(v.Local) != 1 || len(v.Counters) != 13 {
		t.Errorf("vfctl decap -o json: %+v, %v:\n%s", v, err, out.String())
	}
	errb.Reset()
	if code := run([]string{"decap", "--pin-path", filepath.Join(dir, "none")}, &out, &errb); code != 1 ||
		!strings.Contains(errb.String(), "is `veloflux decap` running with this pin path?") {
		t.Errorf("missing pins: exit %d, stderr %q", code, errb.String())
	}
}
