package config

import (
	"slices"
	"strings"
	"testing"
)

// A nat VIP is accepted with and without its own SNAT address and with its
// backends on different ports, and every rule the data path's translation
// depends on is refused with its path.
func TestNATValidation(t *testing.T) {
	good := `
dataplane:
  interfaces: [eth0]
pools:
  - name: web
    backends:
      - {address: 10.0.0.1, port: 8080}
      - {address: 10.0.0.2, port: 9090}
vips:
  - {address: 10.0.0.100, port: 80, protocol: tcp, mode: nat, pool: web}
  - {address: 10.0.0.100, port: 53, protocol: udp, mode: nat, pool: web, snat_address: 10.0.0.5}
`
	c, err := Parse([]byte(good))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if c.VIPs[0].Mode != VIPModeNAT || c.VIPs[1].SNATAddress != "10.0.0.5" {
		t.Fatalf("parsed %+v", c.VIPs)
	}
	if n := c.Dataplane.NAT; n.PortMin != 16384 || n.PortMax != 32767 || n.ClosingTimeout.Std() <= 0 || n.TableSize != 262144 {
		t.Fatalf("nat defaults %+v", n)
	}

	bad := `
dataplane:
  interfaces: [eth0]
  nat: {port_min: 0, port_max: 70000, closing_timeout: 0s, table_size: 10}
pools:
  - name: web
    backends:
      - {address: 10.0.0.1, port: 8080}
      - {address: 10.0.0.2, port: 9090}
      - {address: "fd00::2", port: 8080}
      - {address: 10.0.0.1, port: 9090}
vips:
  - {address: 10.0.0.100, port: 0, protocol: tcp, mode: nat, pool: web, snat_address: "fd00::5"}
  - {address: 10.0.0.101, port: 80, protocol: tcp, mode: dsr, pool: web, snat_address: 10.0.0.5}
`
	_, err = Parse([]byte(bad))
	if err == nil {
		t.Fatal("Parse accepted a broken nat configuration")
	}
	want := []string{
		"dataplane.nat.port_min: must be between 1 and 65535, got 0",
		"dataplane.nat.port_max: must be between 1 and 65535, got 70000",
		"dataplane.nat.closing_timeout: must be positive, got 0s",
		"dataplane.nat.table_size: must be between 1024 and 16777216, got 10",
		"vips[0].port: mode nat needs a port: it rewrites the destination to the backends' port",
		"vips[0].snat_address: VIP 10.0.0.100 is IPv4 but snat_address fd00::5 is IPv6 (no NAT46/64)",
		"vips[0].pool: nat VIP 10.0.0.100: address 10.0.0.1 is in pools[0] twice (backends[0] and backends[3]); a nat VIP reaches each backend address on one port",
		`vips[1].snat_address: only valid for mode nat (mode is "dsr")`,
	}
	got := fieldErrors(t, err)
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("missing error %q in:\n  %s", w, strings.Join(got, "\n  "))
		}
	}
}

// The nat tables are pinned: their size changes only with a detach.
func TestNATTableSizeNeedsRestart(t *testing.T) {
	cur, next := Default(), Default()
	next.Dataplane.NAT.TableSize *= 2
	if err := RestartOnlyChanges(cur, next); err == nil || !strings.Contains(err.Error(), "dataplane.nat.table_size") {
		t.Fatalf("RestartOnlyChanges = %v, want the nat table size named", err)
	}
	next = Default()
	next.Dataplane.NAT.PortMax = 20000
	if err := RestartOnlyChanges(cur, next); err != nil {
		t.Fatalf("a new port range needs no restart, got %v", err)
	}
}
