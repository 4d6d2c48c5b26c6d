package config

import (
	"slices"
	"strings"
	"testing"
	"time"
)

const withBGP = minimal + `
bgp:
  asn: 65001
  peers:
    - address: 192.0.2.254
      asn: 65000
`

func TestBGPDefaults(t *testing.T) {
	c, err := Parse([]byte(withBGP))
	if err != nil {
		t.Fatal(err)
	}
	b := c.BGP
	if b == nil || b.ASN != 65001 || len(b.Peers) != 1 {
		t.Fatalf("bgp = %+v", b)
	}
	p := b.Peers[0]
	if p.HoldTime.Std() != 3*time.Second || p.Keepalive.Std() != time.Second || p.Port != 0 || p.Multihop != 0 {
		t.Errorf("peer defaults = %+v, want hold 3s, keepalive 1s, port 179, directly connected", p)
	}
	if !b.GracefulRestart.Enabled || b.GracefulRestart.RestartTime.Std() != 120*time.Second {
		t.Errorf("graceful restart = %+v, want on with 120s", b.GracefulRestart)
	}
	if c, err := Parse([]byte(minimal)); err != nil || c.BGP != nil {
		t.Errorf("without a bgp section: bgp = %+v, err %v; want nil", c.BGP, err)
	}
}

func TestBGPFullSection(t *testing.T) {
	c, err := Parse([]byte(minimal + `
bgp:
  asn: 4200000001
  router_id: 192.0.2.1
  next_hop: 192.0.2.1
  next_hop_v6: 2001:db8::0:1
  communities: ["65000:100"]
  local_preference: 200
  med: 10
  vips:
    - address: 10.200.0.100
      communities: ["65000:200", "0:65535"]
      med: 0
  graceful_restart: {enabled: false}
  peers:
    - address: 2001:db8::fe
      asn: 65000
      port: 1179
      hold_time: 9s
      keepalive: 3s
      password: secret
      multihop: 4
`))
	if err != nil {
		t.Fatal(err)
	}
	b := c.BGP
	if b.NextHopV6 != "2001:db8::1" || *b.LocalPreference != 200 || *b.MED != 10 || b.GracefulRestart.Enabled {
		t.Errorf("bgp = %+v", b)
	}
	if o := b.VIPs[0]; !slices.Equal(o.Communities, []string{"65000:200", "0:65535"}) || o.MED == nil || *o.MED != 0 || o.LocalPreference != nil {
		t.Errorf("vip override = %+v", o)
	}
	if p := b.Peers[0]; p.Port != 1179 || p.Password != "secret" || p.Multihop != 4 || p.HoldTime.Std() != 9*time.Second {
		t.Errorf("peer = %+v", p)
	}
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Parse(out); err != nil {
		t.Errorf("Parse(Marshal()) = %v\n%s", err, out)
	}
}

func TestBGPValidation(t *testing.T) {
	_, err := Parse([]byte(minimal + `
bgp:
  asn: 0
  router_id: 2001:db8::1
  next_hop: 2001:db8::1
  next_hop_v6: 192.0.2.1
  communities: ["65536:1", "x"]
  vips:
    - address: 10.9.9.9
  graceful_restart: {restart_time: 5000s}
  peers:
    - address: 192.0.2.254
      asn: 65000
      hold_time: 2s
      multihop: 256
    - address: 192.0.2.254
      port: 70000
      hold_time: 3s
      keepalive: 2s
      password: ` + string(make([]byte, 0)) + `"` + string(slices.Repeat([]byte("k"), 81)) + `"
    - address: 192.0.2.253
      asn: 1
      hold_time: 1500ms
      bogus: 1
`))
	got := fieldErrors(t, err)
	want := []string{
		"bgp.peers[2].bogus: unknown field",
		"bgp.asn: required: this node's AS number (1..4294967295)",
		`bgp.router_id: must be an IPv4 address, got "2001:db8::1"`,
		`bgp.next_hop: must be an IPv4 address, got "2001:db8::1"`,
		`bgp.next_hop_v6: must be an IPv6 address, got "192.0.2.1"`,
		"bgp.peers[0].hold_time: must be whole seconds between 3s and 18h12m15s, got 2s",
		"bgp.peers[0].multihop: must be a TTL between 1 and 255 (or 0 for a directly connected peer), got 256",
		"bgp.peers[1].address: duplicate peer 192.0.2.254 (also peers[0])",
		"bgp.peers[1].asn: required: the peer's AS number (1..4294967295)",
		"bgp.peers[1].port: must be between 1 and 65535 (or omitted for 179), got 70000",
		"bgp.peers[1].keepalive: must be whole seconds, at least 1s and at most a third of hold_time (3s), got 2s",
		"bgp.peers[1].password: must be at most 80 bytes (the TCP MD5 key limit), got 81",
		"bgp.peers[2].hold_time: must be whole seconds between 3s and 18h12m15s, got 1.5s",
		`bgp.communities[0]: invalid community "65536:1" (want "asn:value", each 0..65535, e.g. "65000:100")`,
		`bgp.communities[1]: invalid community "x" (want "asn:value", each 0..65535, e.g. "65000:100")`,
		`bgp.vips[0].address: "10.9.9.9" is not the address of any entry of vips`,
		"bgp.graceful_restart.restart_time: must be whole seconds between 1s and 1h8m15s, got 1h23m20s",
	}
	if !slices.Equal(got, want) {
		t.Errorf("errors:\n%s\nwant:\n%s", join(got), join(want))
	}

	_, err = Parse([]byte(minimal + "bgp:\n  asn: 1\n"))
	if got := fieldErrors(t, err); !slices.Equal(got, []string{"bgp.peers: at least one peer is required (remove the bgp section to announce nothing)"}) {
		t.Errorf("no peers: %q", got)
	}
}

func join(lines []string) string {
	out := ""
	for _, l := range lines {
		out += "  " + l + "\n"
	}
	return out
}

func TestParseCommunity(t *testing.T) {
	if c, err := ParseCommunity("65000:100"); err != nil || c != 65000<<16|100 {
		t.Errorf("ParseCommunity(65000:100) = %d, %v", c, err)
	}
	for _, bad := range []string{"", "1", "1:", ":1", "-1:1", "1:65536", "a:b"} {
		if _, err := ParseCommunity(bad); err == nil {
			t.Errorf("ParseCommunity(%q) succeeded", bad)
		}
	}
}

// GET /api/config shows Redacted: the BGP peers' passwords are replaced,
// and the configuration in force keeps them.
func TestRedactedHidesBGPPasswords(t *testing.T) {
	c, err := Parse([]byte(minimal + "bgp:\n  asn: 65001\n  router_id: 10.0.0.1\n  peers:\n" +
		"    - {address: 10.0.0.254, asn: 65000, password: s3cret}\n    - {address: 10.0.0.253, asn: 65000}\n"))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Redacted()
	if got := r.BGP.Peers[0].Password; got != redactedSecret {
		t.Errorf("redacted password = %q", got)
	}
	if got := r.BGP.Peers[1].Password; got != "" {
		t.Errorf("a peer without a password shows %q", got)
	}
	if c.BGP.Peers[0].Password != "s3cret" {
		t.Error("Redacted changed the configuration it copied")
	}
	data, err := r.Marshal()
	if err != nil || strings.Contains(string(data), "s3cret") {
		t.Errorf("the redacted configuration still shows the password (%v):\n%s", err, data)
	}
}
