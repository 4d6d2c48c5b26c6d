package main

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// Bad settings, from flags or from a file, are refused before anything is
// loaded, each problem on its own line, located by its flag or its path.
func TestDecapRefusesBadSettings(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bad := write("bad.yaml", "decap:\n  interfaces: [eth0, eth0]\n  local: [10.0.0.11, nope]\n  gue_port: 70000\n  mode: x\n")
	noSection := write("balancer.yaml", "node: {name: lb}\nvips: []\n")
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"nothing to do", nil, []string{"--interface: at least one interface", "--local: at least one address"}},
		{"flags", []string{"--interface", "eth0,eth0", "--local", "10.0.0.1,bad", "--local", "::1", "--gue-port", "x", "--xdp-mode", "y"},
			[]string{`--gue-port: want a port number, got "x"`, `--interface: duplicate interface "eth0"`,
				`--local: invalid IP address "bad"`, "--local: ::1 is a loopback address", `--xdp-mode: must be one of`}},
		{"port out of range", []string{"--interface", "eth0", "--local", "10.0.0.1", "--gue-port", "65536"},
			[]string{"--gue-port: must be a UDP port between 1 and 65535, or 0"}},
		{"file", []string{"--config", bad},
			[]string{bad + `: decap.mode: unknown field`, bad + `: decap.interfaces[1]: duplicate interface "eth0"`,
				bad + `: decap.local[1]: invalid IP address "nope"`, bad + ": decap.gue_port: must be a UDP port"}},
		{"file without the section", []string{"--config", noSection}, []string{noSection + " has no decap: section"}},
		{"file and flags", []string{"--config", bad, "--local", "10.0.0.1", "--gue-port", "1"},
			[]string{"--config and --gue-port, --local exclude each other"}},
		{"stray argument", []string{"--interface", "eth0", "--local", "10.0.0.1", "eth1"}, []string{`unexpected argument "eth1"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			pin := filepath.Join(dir, "never-created")
			code := run(append([]string{"decap", "--pin-path", pin}, tc.args...), &stdout, &stderr)
			if code != exitConfig {
				t.Errorf("exit code %d, want %d; stderr:\n%s", code, exitConfig, stderr.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
			if _, err := os.Stat(pin); !os.IsNotExist(err) {
				t.Errorf("refused settings created the pin path: %v", err)
			}
		})
	}
}

// --interface and --local take comma-separated lists and repeat.
func TestDecapListsFromFlags(t *testing.T) {
	s, err := decapFromFlags(listFlag{"eth0", "eth1"}, listFlag{"10.0.0.11", "fd00::11", "10.0.0.12"}, "0", "native")
	if err != nil {
		t.Fatal(err)
	}
	var l listFlag
	for _, v := range []string{"10.0.0.11, fd00::11", "10.0.0.12"} {
		if err := l.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(l, listFlag{"10.0.0.11", "fd00::11", "10.0.0.12"}) {
		t.Errorf("repeated comma-separated --local: %v", l)
	}
	if err := l.Set(" , "); err == nil {
		t.Error("an empty --local was accepted")
	}
	want := []netip.Addr{netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("fd00::11"), netip.MustParseAddr("10.0.0.12")}
	if !slices.Equal(s.Local, want) || !slices.Equal(s.Interfaces, []string{"eth0", "eth1"}) ||
		s.GUEPort != 0 || s.XDPMode != dataplane.XDPNative {
		t.Errorf("settings %+v", s)
	}
}

// The decap section of a file gives the same settings, with the defaults.
func TestDecapFromFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "backend.yaml")
	if err := os.WriteFile(p, []byte("decap:\n  interfaces: [eth0]\n  local: [\"2001:db8:0::11\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := decapFromFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(s.Local, []netip.Addr{netip.MustParseAddr("2001:db8::11")}) || s.GUEPort != 6080 || s.XDPMode != dataplane.XDPAuto {
		t.Errorf("settings %+v", s)
	}
}
