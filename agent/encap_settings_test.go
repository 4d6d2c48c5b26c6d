package agent

import (
	"testing"

	"github.com/veloflux/veloflux/agent/config"
)

// The GUE port and the packet-too-big switch reach the data path as
// configured, with their defaults (6080, on) when the file says nothing.
func TestSettingsFromGUEAndTooBig(t *testing.T) {
	cfg, err := config.Parse([]byte("node: {name: lb}\ndataplane:\n  interfaces: [eth0]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s := settingsFrom(cfg); s.GUEPort != 6080 || !s.ICMPTooBig {
		t.Fatalf("defaults: GUE port %d, ICMP too big %v; want 6080 and true", s.GUEPort, s.ICMPTooBig)
	}
	cfg, err = config.Parse([]byte("node: {name: lb}\ndataplane:\n  interfaces: [eth0]\n  gue_port: 7000\n  icmp_too_big: false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s := settingsFrom(cfg); s.GUEPort != 7000 || s.ICMPTooBig {
		t.Fatalf("configured: GUE port %d, ICMP too big %v; want 7000 and false", s.GUEPort, s.ICMPTooBig)
	}
}
