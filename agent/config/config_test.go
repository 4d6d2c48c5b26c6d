package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// minimal is the smallest useful configuration; cases extend it.
const minimal = `
node:
  name: lb-test
dataplane:
  interfaces: [eth0]
pools:
  - name: web
    backends:
      - address: 10.200.0.11
        port: 80
vips:
  - address: 10.200.0.100
    port: 80
    protocol: tcp
    pool: web
`

// fieldErrors returns the individual errors of a *ValidationError, failing
// the test if err is something else.
func fieldErrors(t *testing.T, err error) []string {
	t.Helper()
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("error %v (%T) is not a *ValidationError", err, err)
	}
	out := make([]string, len(verr.Errors))
	for i, fe := range verr.Errors {
		out[i] = fe.Error()
	}
	return out
}

func TestParseMinimalAppliesDefaults(t *testing.T) {
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	w := uint32(1)
	want := &Config{
		Node: NodeConfig{Name: "lb-test"},
		Dataplane: DataplaneConfig{
			Interfaces:     []string{"eth0"},
			XDPMode:        XDPModeAuto,
			ConntrackSize:  1048576,
			RingSize:       65537,
			Nexthop:        NexthopFIB,
			GUEPort:        DefaultGUEPort,
			ICMPTooBig:     true,
			TCPIdleTimeout: Duration(300 * time.Second),
			UDPIdleTimeout: Duration(30 * time.Second),
			NewFlowLimit:   NewFlowLimit{TableSize: 65536},
			NAT:            NATConfig{PortMin: 16384, PortMax: 32767, ClosingTimeout: Duration(10 * time.Second), TableSize: 262144},
		},
		API:     APIConfig{Listen: ":9090", TokenFile: "/var/lib/veloflux/api.token"},
		Metrics: MetricsConfig{Listen: ":8080"},
		Proxy: ProxyConfig{HTTPListen: ":80", HTTPSListen: ":443",
			Timeouts: ProxyTimeout{Dial: Duration(2 * time.Second), TLSHandshake: Duration(5 * time.Second),
				ResponseHeader: Duration(15 * time.Second), Idle: Duration(90 * time.Second), Request: Duration(time.Minute)},
			MaxBodyBytes: 10 << 20, MaxHeaderBytes: 64 << 10, Retries: 1,
			PassiveHealth: PassiveHealth{ConsecutiveFailures: 5, Ejection: Duration(30 * time.Second)},
			DrainTimeout:  Duration(15 * time.Second),
			HTTP2:         HTTP2Limits{MaxConcurrentStreams: 100, MaxClientResets: 200, ResetWindow: Duration(10 * time.Second)}},
		Pools: []Pool{{
			Name:      "web",
			Algorithm: AlgorithmRoundRobin,
			Backends:  []Backend{{Address: "10.200.0.11", Port: 80, Weight: &w}},
			HealthCheck: HealthCheck{
				Type:     HealthCheckTCP,
				Interval: Duration(2 * time.Second),
				Timeout:  Duration(time.Second),
				Rise:     2,
				Fall:     3,
			},
		}},
		VIPs: []VIP{{Address: "10.200.0.100", Port: 80, Protocol: ProtocolTCP, Mode: VIPModeDSR, Pool: "web"}},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("Parse(minimal) =\n%+v\nwant\n%+v", c, want)
	}
}

func TestParseDefaultsNodeNameToHostname(t *testing.T) {
	host, err := os.Hostname()
	if err != nil {
		t.Skipf("no hostname: %v", err)
	}
	c, err := Parse([]byte("metrics:\n  listen: \":8081\"\n"))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if c.Node.Name != host {
		t.Errorf("node.name = %q, want hostname %q", c.Node.Name, host)
	}
}

func TestParseHTTPCheckDefaults(t *testing.T) {
	c, err := Parse([]byte(strings.Replace(minimal, "        port: 80\n",
		"        port: 80\n    health_check:\n      type: http\n", 1)))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	hc := c.Pools[0].HealthCheck
	if hc.Path != "/" || hc.ExpectedStatus != 200 {
		t.Errorf("http check path=%q status=%d, want \"/\" 200", hc.Path, hc.ExpectedStatus)
	}
}

// TestParseErrors checks that each broken input yields exactly the listed
// errors, in order.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{
			name: "unknown field path",
			yaml: `
pools:
  - name: a
    backends:
      - address: 10.0.0.1
        port: 80
  - name: b
    backends:
      - adress: 10.0.0.2
        address: 10.0.0.2
        port: 80
`,
			want: []string{"pools[1].backends[0].adress: unknown field"},
		},
		{
			name: "several errors at once",
			yaml: `
nodes: {}
dataplane:
  ring_size: 1000
  xdp_mode: turbo
pools:
  - name: web
    backends:
      - address: 10.0.0.1
        port: abc
        colour: red
vips:
  - address: 10.0.0.100
    port: 80
    protocol: sctp
    pool: web2
`,
			want: []string{
				"nodes: unknown field",
				`pools[0].backends[0].port: cannot parse "abc" as integer`,
				"pools[0].backends[0].colour: unknown field",
				`dataplane.interfaces: required when vips are configured: list the interfaces to attach XDP to`,
				`dataplane.xdp_mode: must be one of native, generic, auto, got "turbo"`,
				`dataplane.ring_size: must be a prime number between 257 and 1048573, got 1000 (nearest primes: 997, 1009)`,
				`vips[0].protocol: must be one of tcp, udp, got "sctp"`,
				`vips[0].pool: unknown pool "web2"`,
			},
		},
		{
			name: "type error path",
			yaml: strings.Replace(minimal, "    port: 80\n    protocol", "    port: abc\n    protocol", 1),
			want: []string{`vips[0].port: cannot parse "abc" as integer`},
		},
		{
			name: "quoted number and float are not integers",
			yaml: "dataplane:\n  conntrack_size: \"2048\"\n  ring_size: 257.0\n",
			want: []string{
				`dataplane.conntrack_size: cannot parse "2048" as integer`,
				`dataplane.ring_size: cannot parse "257.0" as integer`,
			},
		},
		{
			name: "wrong node kinds",
			yaml: `
pools: {name: web}
api:
  allowed_origins: https://a.example
  protect_reads: yes
dataplane:
  conntrack_size: 1.5
  ring_size: "65537"
`,
			want: []string{
				"pools: expected a sequence, got a mapping",
				`api.allowed_origins: expected a sequence, got "https://a.example"`,
				`api.protect_reads: cannot parse "yes" as boolean (want true or false)`,
				`dataplane.conntrack_size: cannot parse "1.5" as integer`,
				`dataplane.ring_size: cannot parse "65537" as integer`,
			},
		},
		{
			name: "duplicate key",
			yaml: "api:\n  listen: \":1\"\n  listen: \":2\"\n",
			want: []string{"api.listen: duplicate key (first defined on line 2)"},
		},
		{
			name: "duplicate pool names",
			yaml: `
pools:
  - name: web
    backends: [{address: 10.0.0.1, port: 80}]
  - name: api
  - name: web
    backends: [{address: 10.0.0.2, port: 80}]
`,
			want: []string{`pools[2].name: duplicate pool name "web" (also pools[0])`},
		},
		{
			name: "vip references unknown pool",
			yaml: minimal + `  - address: 10.200.0.100
    port: 443
    protocol: tcp
    pool: web
  - address: 10.200.0.100
    port: 8080
    protocol: tcp
    pool: web2
`,
			want: []string{`vips[2].pool: unknown pool "web2"`},
		},
		{
			name: "ring_size not prime",
			yaml: "dataplane:\n  ring_size: 65536\n",
			want: []string{`dataplane.ring_size: must be a prime number between 257 and 1048573, got 65536 (nearest primes: 65521, 65537)`},
		},
		{
			name: "bad IP",
			yaml: strings.Replace(strings.Replace(minimal, "10.200.0.11", "10.200.0.300", 1), "10.200.0.100", "ff02::1", 1),
			want: []string{
				`pools[0].backends[0].address: invalid IP address "10.200.0.300"`,
				`vips[0].address: IP address "ff02::1" must not be multicast`,
			},
		},
		{
			name: "bad CIDR",
			yaml: minimal + "security:\n  denylist: [10.0.0.0/8, 10.0.0.0/33, not-a-cidr, \"2001:db8::/129\"]\n",
			want: []string{
				`security.denylist[1]: invalid CIDR "10.0.0.0/33" (want e.g. "192.0.2.0/24" or "2001:db8::/32")`,
				`security.denylist[2]: invalid CIDR "not-a-cidr" (want e.g. "192.0.2.0/24" or "2001:db8::/32")`,
				`security.denylist[3]: invalid CIDR "2001:db8::/129" (want e.g. "192.0.2.0/24" or "2001:db8::/32")`,
			},
		},
		{
			name: "ipip family mismatch and missing encap source",
			yaml: `
node: {name: lb}
dataplane:
  interfaces: [eth0]
  encap_source_v4: 10.0.0.2
pools:
  - name: web
    backends:
      - {address: 10.0.0.11, port: 80}
      - {address: "2001:db8::12", port: 80}
vips:
  - {address: 10.0.0.100, port: 80, protocol: tcp, mode: ipip, pool: web}
  - {address: "2001:db8::100", port: 80, protocol: tcp, mode: ipip, pool: web}
`,
			want: []string{
				`vips[0].pool: ipip VIP 10.0.0.100 is IPv4 but pools[0].backends[1] (2001:db8::12) is IPv6; all backends of an ipip VIP must share its address family`,
				`vips[1].pool: ipip VIP 2001:db8::100 is IPv6 but pools[0].backends[0] (10.0.0.11) is IPv4; all backends of an ipip VIP must share its address family`,
				`dataplane.encap_source_v6: required because vips[1] uses ipip mode with an IPv6 address`,
			},
		},
		{
			name: "gue family mismatch, missing encap source and bad gue port",
			yaml: `
node: {name: lb}
dataplane:
  interfaces: [eth0]
  encap_source_v4: 10.0.0.2
  gue_port: 70000
pools:
  - name: web
    backends:
      - {address: 10.0.0.11, port: 80}
      - {address: "2001:db8::12", port: 80}
vips:
  - {address: 10.0.0.100, port: 80, protocol: tcp, mode: gue, pool: web}
  - {address: "2001:db8::100", port: 80, protocol: tcp, mode: gue, pool: web}
  - {address: 10.0.0.101, port: 80, protocol: tcp, mode: fou, pool: web}
`,
			want: []string{
				`dataplane.gue_port: must be a UDP port between 1 and 65535, got 70000`,
				`vips[0].pool: gue VIP 10.0.0.100 is IPv4 but pools[0].backends[1] (2001:db8::12) is IPv6; all backends of an gue VIP must share its address family`,
				`vips[1].pool: gue VIP 2001:db8::100 is IPv6 but pools[0].backends[0] (10.0.0.11) is IPv4; all backends of an gue VIP must share its address family`,
				`vips[2].mode: must be one of dsr, ipip, nat, gue, got "fou"`,
				`dataplane.encap_source_v6: required because vips[1] uses gue mode with an IPv6 address`,
			},
		},
		{
			name: "timeout not less than interval",
			yaml: strings.Replace(minimal, "        port: 80\n",
				"        port: 80\n    health_check: {interval: 1s, timeout: 1s}\n", 1),
			want: []string{`pools[0].health_check.timeout: must be less than interval (1s), got 1s`},
		},
		{
			name: "misspelt new-flow limit",
			yaml: "dataplane:\n  new_flow_limit: {rate: 5}\n",
			want: []string{
				`dataplane.new_flow_limit.rate: unknown field`,
			},
		},
		{
			name: "new-flow limit out of range",
			yaml: "dataplane:\n  new_flow_limit: {rate_per_second: 2000000, burst: 0, table_size: 10}\n",
			want: []string{
				`dataplane.new_flow_limit.rate_per_second: must be between 0 (off) and 1000000, got 2000000`,
				`dataplane.new_flow_limit.burst: must be between 1 and 1000000 when a rate is set, got 0`,
				`dataplane.new_flow_limit.table_size: must be between 1024 and 16777216, got 10`,
			},
		},
		{
			name: "new-flow limit without a burst",
			yaml: "dataplane:\n  new_flow_limit: {rate_per_second: 100}\n",
			want: []string{`dataplane.new_flow_limit.burst: must be between 1 and 1000000 when a rate is set, got 0`},
		},
		{
			name: "bad durations",
			yaml: `
dataplane:
  tcp_idle_timeout: 5
  udp_idle_timeout: -1s
pools:
  - name: web
    health_check: {interval: [1], timeout: 10 minutes}
`,
			want: []string{
				`dataplane.tcp_idle_timeout: cannot parse "5" as duration (want e.g. "2s", "500ms", "1m30s")`,
				`pools[0].health_check.interval: expected a duration such as "2s", got a sequence`,
				`pools[0].health_check.timeout: cannot parse "10 minutes" as duration (want e.g. "2s", "500ms", "1m30s")`,
				`dataplane.udp_idle_timeout: must be positive, got -1s`,
			},
		},
		{
			name: "weight out of range and negative",
			yaml: strings.Replace(minimal, "        port: 80\n",
				"        port: 80\n        weight: 1001\n      - {address: 10.200.0.12, port: 80, weight: -1}\n", 1),
			want: []string{
				`pools[0].backends[1].weight: must not be negative, got -1`,
				`pools[0].backends[0].weight: must be between 0 and 1000, got 1001`,
			},
		},
		{
			name: "http2 limits out of range",
			yaml: minimal + "proxy:\n  http2: {max_concurrent_streams: 0, max_client_resets: 0, reset_window: 0s}\n",
			want: []string{
				"proxy.http2.max_concurrent_streams: must be between 1 and 10000, got 0",
				"proxy.http2.max_client_resets: must be between 1 and 1000000, got 0",
				"proxy.http2.reset_window: must be positive, got 0s",
			},
		},
		{
			name: "header limit below its bound",
			yaml: minimal + "proxy:\n  max_header_bytes: 1024\n",
			want: []string{"proxy.max_header_bytes: must be between 4096 and 1048576, got 1024"},
		},
		{
			name: "header limit above its bound",
			yaml: minimal + "proxy:\n  max_header_bytes: 2000000\n",
			want: []string{"proxy.max_header_bytes: must be between 4096 and 1048576, got 2000000"},
		},
		{
			name: "http2 resets below concurrent streams",
			yaml: minimal + "proxy:\n  http2: {max_concurrent_streams: 250, max_client_resets: 100}\n",
			want: []string{
				"proxy.http2.max_client_resets: must be at least proxy.http2.max_concurrent_streams (250), since a client may cancel all its open streams at once, got 100",
			},
		},
		{
			name: "empty file",
			yaml: "  \n\n",
			want: []string{"config is empty: expected a YAML mapping"},
		},
		{
			name: "only comments",
			yaml: "# nothing here\n",
			want: []string{"config is empty: expected a YAML mapping"},
		},
		{
			name: "multiple documents",
			yaml: "node: {name: a}\n---\nnode: {name: b}\n",
			want: []string{"multiple YAML documents (another starts on line 2): expected exactly one"},
		},
		{
			name: "top level not a mapping",
			yaml: "- a\n- b\n",
			want: []string{"top level must be a YAML mapping, got a sequence"},
		},
		{
			// The schema is not recursive, so a self-referencing alias ends
			// in a type error rather than endless recursion.
			name: "self-referencing alias",
			yaml: "dataplane:\n  interfaces: &x [*x]\n",
			want: []string{`dataplane.interfaces[0]: expected a string, got a sequence`},
		},
		{
			name: "merge keys rejected",
			yaml: "base: &b {listen: \":1\"}\napi:\n  <<: *b\n",
			want: []string{"base: unknown field", "api.<<: merge keys are not supported"},
		},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.yaml))
			if err == nil {
				t.Fatalf("Parse succeeded, want errors %q", tt.want)
			}
			if c != nil {
				t.Errorf("Parse returned a config along with an error")
			}
			if got := fieldErrors(t, err); !slices.Equal(got, tt.want) {
				t.Errorf("errors:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestValidationErrorFormat(t *testing.T) {
	_, err := Parse([]byte("foo: 1\nbar: 2\n"))
	if err == nil {
		t.Fatal("Parse succeeded")
	}
	want := "foo: unknown field\nbar: unknown field"
	if err.Error() != want {
		t.Errorf("Error() = %q, want %q", err.Error(), want)
	}
}

func TestWeightExplicitZeroVsOmitted(t *testing.T) {
	tests := []struct {
		name    string
		backend string
		want    uint32
	}{
		{"omitted", "{address: 10.0.0.1, port: 80}", 1},
		{"null", "{address: 10.0.0.1, port: 80, weight: ~}", 1},
		{"explicit zero", "{address: 10.0.0.1, port: 80, weight: 0}", 0},
		{"explicit", "{address: 10.0.0.1, port: 80, weight: 1000}", 1000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte("pools:\n  - name: p\n    backends:\n      - " + tt.backend + "\n"))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			b := c.Pools[0].Backends[0]
			if b.Weight == nil || *b.Weight != tt.want || b.EffectiveWeight() != tt.want {
				t.Errorf("weight = %v (effective %d), want %d", b.Weight, b.EffectiveWeight(), tt.want)
			}
		})
	}
	if got := (Backend{}).EffectiveWeight(); got != 1 {
		t.Errorf("EffectiveWeight of unset weight = %d, want 1", got)
	}
}

func TestDurations(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"2s", 2 * time.Second},
		{"500ms", 500 * time.Millisecond},
		{"1m30s", 90 * time.Second},
		{"1h", time.Hour},
		{`"45s"`, 45 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			c, err := Parse([]byte("dataplane:\n  tcp_idle_timeout: " + tt.in + "\n"))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := c.Dataplane.TCPIdleTimeout.Std(); got != tt.want {
				t.Errorf("tcp_idle_timeout = %v, want %v", got, tt.want)
			}
			// The marshalled form must parse back to the same value.
			out, err := c.Marshal()
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			c2, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse(Marshal()): %v\n%s", err, out)
			}
			if c2.Dataplane.TCPIdleTimeout != c.Dataplane.TCPIdleTimeout {
				t.Errorf("round trip: %v != %v", c2.Dataplane.TCPIdleTimeout, c.Dataplane.TCPIdleTimeout)
			}
		})
	}
}

func TestParseCanonicalizes(t *testing.T) {
	c, err := Parse([]byte(`
dataplane:
  gateway_mac: AA-BB-CC-DD-EE-01
  encap_source_v6: "2001:DB8:0:0::2"
pools:
  - name: p
    backends: [{address: "2001:0db8::0011", port: 80}]
routes:
  - host: WWW.Example.COM
    pool: p
security:
  denylist: [10.1.2.3/8, 192.0.2.1, "2001:db8::1/32", 10.0.0.0/8]
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got, want := c.Security.Denylist, []string{"10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32"}; !slices.Equal(got, want) {
		t.Errorf("denylist = %q, want %q", got, want)
	}
	if got := c.Dataplane.GatewayMAC; got != "aa:bb:cc:dd:ee:01" {
		t.Errorf("gateway_mac = %q", got)
	}
	if got := c.Dataplane.EncapSourceV6; got != "2001:db8::2" {
		t.Errorf("encap_source_v6 = %q", got)
	}
	if got := c.Pools[0].Backends[0].Address; got != "2001:db8::11" {
		t.Errorf("backend address = %q", got)
	}
	if got := c.Routes[0]; got.Host != "www.example.com" || got.PathPrefix != "/" {
		t.Errorf("route = %+v", got)
	}
}

func TestValidateProgrammaticConfig(t *testing.T) {
	c := Default()
	c.Node.Name = "n"
	if err := c.Validate(); err != nil {
		t.Fatalf("Default().Validate(): %v", err)
	}
	c.Proxy.Enabled = true
	c.Proxy.HTTPListen = ":9090"
	c.Routes = []Route{{PathPrefix: "/", Pool: "nope"}}
	got := fieldErrors(t, c.Validate())
	want := []string{
		`proxy.http_listen: ":9090" conflicts with api.listen (":9090")`,
		`routes[0].pool: unknown pool "nope"`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("errors = %q, want %q", got, want)
	}
}

func TestSaveLoadRoundTrip(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "veloflux.yaml")

	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}

	// New file: mode 0600, no backup.
	if err := Save(path, c); err != nil {
		t.Fatalf("Save: %v", err)
	}
	assertMode(t, path, 0o600)
	if _, err := os.Stat(path + ".bak"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("backup exists after first save (err=%v)", err)
	}
	loaded, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if !reflect.DeepEqual(loaded, c) {
		t.Errorf("Load(Save(c)) =\n%+v\nwant\n%+v", loaded, c)
	}
	first, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	// Existing file: mode kept, previous version kept as .bak.
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	zero := uint32(0)
	loaded.Pools[0].Backends[0].Weight = &zero
	loaded.API.ProtectReads = true
	if err := Save(path, loaded); err != nil {
		t.Fatalf("second Save: %v", err)
	}
	assertMode(t, path, 0o640)
	bak, err := os.ReadFile(path + ".bak")
	if err != nil {
		t.Fatalf("backup: %v", err)
	}
	if string(bak) != string(first) {
		t.Errorf("backup content =\n%s\nwant the previous file\n%s", bak, first)
	}
	again, err := Load(path)
	if err != nil {
		t.Fatalf("Load after second save: %v", err)
	}
	if !reflect.DeepEqual(again, loaded) {
		t.Errorf("second round trip =\n%+v\nwant\n%+v", again, loaded)
	}
	if w := again.Pools[0].Backends[0].EffectiveWeight(); w != 0 {
		t.Errorf("explicit weight 0 did not survive the round trip: %d", w)
	}

	// A third save replaces the backup with the second version.
	second, _ := os.ReadFile(path)
	if err := Save(path, again); err != nil {
		t.Fatalf("third Save: %v", err)
	}
	if bak, _ := os.ReadFile(path + ".bak"); string(bak) != string(second) {
		t.Errorf("backup not rotated to the second version")
	}
	assertOnlyFiles(t, dir, "veloflux.yaml", "veloflux.yaml.bak")
}

func TestSaveLeavesNoTempFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cfg.yaml")
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if err := Save(path, c); err != nil {
		t.Fatalf("Save: %v", err)
	}
	assertOnlyFiles(t, dir, "cfg.yaml")

	// A rejected save leaves neither a temp file nor a changed file.
	before, _ := os.ReadFile(path)
	bad := *c
	bad.Dataplane.RingSize = 100
	err = Save(path, &bad)
	if err == nil {
		t.Fatal("Save of an invalid config succeeded")
	}
	if got := fieldErrors(t, err); len(got) != 1 || !strings.HasPrefix(got[0], "dataplane.ring_size:") {
		t.Errorf("Save error = %q", got)
	}
	after, _ := os.ReadFile(path)
	if string(after) != string(before) {
		t.Error("rejected Save modified the file")
	}
	assertOnlyFiles(t, dir, "cfg.yaml")

	// A failing write (missing directory) leaves nothing either.
	if err := Save(filepath.Join(dir, "missing", "cfg.yaml"), c); err == nil {
		t.Error("Save into a missing directory succeeded")
	}
	assertOnlyFiles(t, dir, "cfg.yaml")
}

func TestSaveThroughSymlink(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real.yaml")
	link := filepath.Join(dir, "link.yaml")
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if err := Save(real, c); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("real.yaml", link); err != nil {
		t.Skipf("symlinks unsupported: %v", err)
	}
	if err := Save(link, c); err != nil {
		t.Fatalf("Save via symlink: %v", err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("symlink was replaced (err=%v)", err)
	}
	assertOnlyFiles(t, dir, "link.yaml", "real.yaml", "real.yaml.bak")
}

func TestLoadErrors(t *testing.T) {
	if _, err := Load(filepath.Join(t.TempDir(), "nope.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v, want ErrNotExist", err)
	}
	path := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(path, []byte("pools: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "invalid YAML") {
		t.Errorf("Load of invalid YAML: %v", err)
	}
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Errorf("Load error is not a *ValidationError: %T", err)
	}
}

func TestExampleConfigLoads(t *testing.T) {
	c, err := Load(filepath.Join("..", "..", "deploy", "veloflux.yaml"))
	if err != nil {
		t.Fatalf("Load example: %v", err)
	}
	if len(c.Pools) != 1 || c.Pools[0].Name != "web" || len(c.Pools[0].Backends) != 3 {
		t.Fatalf("pools = %+v", c.Pools)
	}
	for i, b := range c.Pools[0].Backends {
		if want := "10.200.0.1" + string(rune('1'+i)); b.Address != want || b.Port != 80 {
			t.Errorf("backend %d = %s:%d, want %s:80", i, b.Address, b.Port, want)
		}
	}
	if c.Pools[0].HealthCheck.Type != HealthCheckHTTP {
		t.Errorf("health check type = %q, want http", c.Pools[0].HealthCheck.Type)
	}
	if len(c.VIPs) != 1 || c.VIPs[0] != (VIP{Address: "10.200.0.100", Port: 80, Protocol: ProtocolTCP, Mode: VIPModeDSR, Pool: "web"}) {
		t.Errorf("vips = %+v", c.VIPs)
	}
	if len(c.Routes) != 1 || len(c.Security.Denylist) != 0 {
		t.Errorf("routes = %+v, denylist = %q", c.Routes, c.Security.Denylist)
	}
	// The example documents the defaults, so apart from the parts it sets
	// explicitly it must equal Default().
	d := Default()
	got := *c
	got.Node, got.Pools, got.VIPs, got.Routes = d.Node, nil, nil, nil
	got.Dataplane.Interfaces = nil
	got.API.AllowedOrigins, got.Security.Denylist = nil, nil
	if !reflect.DeepEqual(&got, d) {
		t.Errorf("example defaults differ from Default():\n%+v\nwant\n%+v", got, *d)
	}
}

func TestMarshalOutputIsStrictlyParseable(t *testing.T) {
	c, err := Load(filepath.Join("..", "..", "deploy", "veloflux.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	c.Dataplane.EncapSourceV4 = "10.200.0.2"
	c.VIPs = append(c.VIPs, VIP{Address: "10.200.0.101", Protocol: ProtocolUDP, Mode: VIPModeIPIP, Pool: "web", SourceAffinity: true})
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := Parse(out)
	if err != nil {
		t.Fatalf("Parse(Marshal()): %v\n%s", err, out)
	}
	c.API.AllowedOrigins, c.Security.Denylist = nil, nil // [] marshals as omitted
	if !reflect.DeepEqual(c2, c) {
		t.Errorf("round trip mismatch:\n%+v\nwant\n%+v", c2, c)
	}
}

func TestDecodeBudget(t *testing.T) {
	// Aliases multiply: 1000 references to a pool that references one
	// backend 2000 times expand to two million backends from a ~20 KB
	// document. The decoder must stop instead of building them.
	yaml := "x: &b {address: 10.0.0.1, port: 80}\n" +
		"y: &p {name: p, backends: [" + strings.Repeat("*b, ", 1999) + "*b]}\n" +
		"pools: [" + strings.Repeat("*p, ", 999) + "*p]\n"
	_, err := Parse([]byte(yaml))
	if err == nil {
		t.Fatal("Parse of an alias bomb succeeded")
	}
	got := fieldErrors(t, err)
	want := []string{
		"x: unknown field",
		"y: unknown field",
		"document too large: more than 1048576 values after expanding aliases",
	}
	if !slices.Equal(got, want) {
		t.Errorf("errors = %q, want %q", got, want)
	}
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != want {
		t.Errorf("%s mode = %#o, want %#o", path, got, want)
	}
}

func assertOnlyFiles(t *testing.T, dir string, want ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	if !slices.Equal(got, want) {
		t.Errorf("files in %s = %q, want %q", dir, got, want)
	}
}
