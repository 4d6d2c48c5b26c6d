package config

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// A file with more VIPs or reals than the data plane holds used to
// validate; the agent then installed nothing while reporting healthy.
func TestValidateRefusesBeyondDataplaneCapacity(t *testing.T) {
	build := func(vips, backends int) string {
		var b strings.Builder
		b.WriteString("node: {name: lb}\ndataplane: {interfaces: [eth0]}\npools:\n  - name: web\n    backends:\n")
		for i := range backends {
			fmt.Fprintf(&b, "      - {address: 10.%d.%d.%d, port: 80}\n", 1+i>>16, (i>>8)&0xff, i&0xff)
		}
		b.WriteString("vips:\n")
		for i := range vips {
			fmt.Fprintf(&b, "  - {address: 10.250.%d.%d, port: 80, protocol: tcp, pool: web}\n", i>>8, i&0xff)
		}
		return b.String()
	}
	if _, err := Parse([]byte(build(VIPCapacity, 3))); err != nil {
		t.Fatalf("exactly %d VIPs: %v", VIPCapacity, err)
	}
	_, err := Parse([]byte(build(VIPCapacity+1, 3)))
	want := fmt.Sprintf("vips: %d VIPs configured; the data plane holds at most %d", VIPCapacity+1, VIPCapacity)
	if got := fieldErrors(t, err); !slices.Equal(got, []string{want}) {
		t.Errorf("one VIP too many: errors %q, want %q", got, want)
	}
	_, err = Parse([]byte(build(1, RealCapacity+1)))
	want = fmt.Sprintf("pools: %d distinct backend addresses configured; the data plane holds at most %d reals", RealCapacity+1, RealCapacity)
	if got := fieldErrors(t, err); !slices.Equal(got, []string{want}) {
		t.Errorf("one real too many: errors %q, want %q", got, want)
	}
}

// A configuration without VIPs is saved as `vips: []`, so that a reload
// can tell a file that withdraws every VIP on purpose from one cut short.
func TestMarshalStatesEmptyVIPs(t *testing.T) {
	c := Default()
	c.Node.Name = "n"
	data, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "\nvips: []\n") {
		t.Fatalf("marshalled config without VIPs does not say `vips: []`:\n%s", data)
	}
	back, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	if back.VIPs == nil {
		t.Error("`vips: []` parsed as an absent list")
	}
}

// Health verdicts, the drain set, the reconciler and the L7 proxy all key
// backends by Backend.Key; Endpoint, the Maglev key, leaves the pool out.
func TestBackendKey(t *testing.T) {
	for _, c := range []struct {
		b             Backend
		key, endpoint string
	}{
		{Backend{Address: "10.0.0.1", Port: 80}, "web/10.0.0.1:80", "10.0.0.1:80"},
		{Backend{Address: "2001:db8::1", Port: 443}, "web/[2001:db8::1]:443", "[2001:db8::1]:443"},
	} {
		if got := c.b.Key("web"); got != c.key {
			t.Errorf("Key(%s) = %q, want %q", c.b.Address, got, c.key)
		}
		if got := c.b.Endpoint(); got != c.endpoint {
			t.Errorf("Endpoint(%s) = %q, want %q", c.b.Address, got, c.endpoint)
		}
	}
}
