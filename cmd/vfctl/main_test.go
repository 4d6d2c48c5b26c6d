package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/dataplane"

	"github.com/veloflux/veloflux/tests/testenv"
)

// fakeSource is a data path held in memory.
type fakeSource struct {
	links    []dataplane.AttachedLink
	vips     map[dataplane.VIP]dataplane.VIPMeta
	reals    map[uint32]dataplane.Real
	rings    map[uint32][]uint32
	counters []dataplane.Counter
	flows    []dataplane.Flow
	natFlows []dataplane.NATFlow
	deny     []netip.Prefix
	ringErr  error // returned by Ring when set
}

func (f *fakeSource) PinnedLinks() ([]dataplane.AttachedLink, error) { return f.links, nil }
func (f *fakeSource) RingSize() uint32                               { return 7 }
func (f *fakeSource) MaxVIPs() uint32                                { return 64 }
func (f *fakeSource) MaxReals() uint32                               { return 128 }
func (f *fakeSource) ConntrackSize() uint32                          { return 4096 }
func (f *fakeSource) Settings() (dataplane.Settings, error) {
	return dataplane.Settings{TCPIdleTimeoutNs: uint64(5 * time.Minute), UDPIdleTimeoutNs: uint64(30 * time.Second)}, nil
}
func (f *fakeSource) VIPs() (map[dataplane.VIP]dataplane.VIPMeta, error) { return f.vips, nil }
func (f *fakeSource) Reals() (map[uint32]dataplane.Real, error)          { return f.reals, nil }
func (f *fakeSource) VIPStats(id uint32) (dataplane.VIPStats, error) {
	return dataplane.VIPStats{Packets: uint64(id) * 10, Bytes: uint64(id) * 1000, NewFlows: uint64(id)}, nil
}
func (f *fakeSource) RealStats(id uint32) (dataplane.RealStats, error) {
	return dataplane.RealStats{Packets: uint64(id), Bytes: uint64(id) * 100}, nil
}
func (f *fakeSource) Ring(id uint32) ([]uint32, error) {
	if f.ringErr != nil {
		return nil, f.ringErr
	}
	return f.rings[id], nil
}
func (f *fakeSource) Counters() ([]dataplane.Counter, error)    { return f.counters, nil }
func (f *fakeSource) Flows(limit int) ([]dataplane.Flow, error) { return f.flows, nil }
func (f *fakeSource) NATFlows(limit int) ([]dataplane.NATFlow, error) {
	return f.natFlows, nil
}
func (f *fakeSource) DenyList() ([]netip.Prefix, error) { return f.deny, nil }

func newFake() *fakeSource {
	vip := func(a string, port uint16, p dataplane.Protocol) dataplane.VIP {
		return dataplane.VIP{Addr: netip.MustParseAddr(a), Port: port, Proto: p}
	}
	counters := make([]dataplane.Counter, len(dataplane.Reasons()))
	counters[dataplane.ReasonPassNotVIP] = dataplane.Counter{Packets: 5, Bytes: 500}
	counters[dataplane.ReasonDropDenylist] = dataplane.Counter{Packets: 2, Bytes: 120}
	counters[dataplane.ReasonTxDSR] = dataplane.Counter{Packets: 40, Bytes: 4000}
	return &fakeSource{
		links: []dataplane.AttachedLink{{Interface: "eth1", Ifindex: 3, ProgramID: 42, LinkID: 7},
			{Interface: "eth0", ProgramID: 41, LinkID: 6, Detached: true}},
		vips: map[dataplane.VIP]dataplane.VIPMeta{
			vip("10.0.0.2", 443, dataplane.ProtoTCP):   {ID: 2, Mode: dataplane.ModeIPIP},
			vip("10.0.0.1", 0, dataplane.ProtoUDP):     {ID: 1, Mode: dataplane.ModeDSR, SourceAffinity: true},
			vip("10.0.0.1", 80, dataplane.ProtoTCP):    {ID: 3, Mode: dataplane.ModeDSR},
			vip("2001:db8::1", 80, dataplane.ProtoTCP): {ID: 4, Mode: dataplane.ModeIPIP},
		},
		reals: map[uint32]dataplane.Real{
			3: {Addr: netip.MustParseAddr("192.0.2.3"), State: dataplane.RealDown},
			1: {Addr: netip.MustParseAddr("192.0.2.1"), State: dataplane.RealUp,
				MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}},
			2: {Addr: netip.MustParseAddr("192.0.2.2"), State: dataplane.RealDraining},
		},
		// Id 9 has no real: it counts as down.
		rings:    map[uint32][]uint32{1: {1, 2, 1, 3, 9, 2, 1}},
		counters: counters,
		flows: []dataplane.Flow{{Src: netip.MustParseAddr("198.51.100.7"), SrcPort: 40000,
			Dst: netip.MustParseAddr("10.0.0.1"), DstPort: 53, Proto: dataplane.ProtoUDP,
			RealID: 2, VIPID: 1, Idle: 1500 * time.Millisecond}},
		natFlows: []dataplane.NATFlow{{Client: netip.MustParseAddrPort("198.51.100.8:41000"),
			VIP: netip.MustParseAddrPort("10.0.0.5:80"), SNAT: netip.MustParseAddrPort("192.0.2.254:20001"),
			Real: netip.MustParseAddrPort("192.0.2.1:8080"), Proto: dataplane.ProtoTCP, RealID: 1, VIPID: 5,
			Closing: true, Idle: 20 * time.Millisecond}},
		deny: []netip.Prefix{netip.MustParsePrefix("2001:db8:bad::/48"), netip.MustParsePrefix("203.0.113.0/24")},
	}
}

func renderString(t *testing.T, v view, format string) string {
	t.Helper()
	var b bytes.Buffer
	if err := render(&b, v, format); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestVIPs(t *testing.T) {
	v, err := gatherVIPs(newFake())
	if err != nil {
		t.Fatal(err)
	}
	var rows []map[string]any
	if err := json.Unmarshal([]byte(renderString(t, v, "json")), &rows); err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, r := range rows {
		order = append(order, r["address"].(string))
	}
	if got := strings.Join(order, " "); got != "10.0.0.1 10.0.0.1 10.0.0.2 2001:db8::1" {
		t.Fatalf("VIP order %s", got)
	}
	first := rows[0]
	want := map[string]any{"port": 0.0, "proto": "udp", "mode": "dsr", "id": 1.0, "source_affinity": true,
		"packets": 10.0, "bytes": 1000.0, "new_flows": 1.0,
		"reals": 4.0, "reals_up": 1.0, "reals_draining": 1.0, "reals_down": 2.0}
	for k, w := range want {
		if first[k] != w {
			t.Errorf("first VIP %s = %v, want %v (row %v)", k, first[k], w, first)
		}
	}
	table := renderString(t, v, "table")
	if !regexp.MustCompile(`(?m)^ADDRESS +PORT +PROTO`).MatchString(table) {
		t.Errorf("no header:\n%s", table)
	}
	if !regexp.MustCompile(`(?m)^10\.0\.0\.1 +\* +udp +dsr +1 +source`).MatchString(table) {
		t.Errorf("port 0 not shown as *:\n%s", table)
	}
}

// Without CAP_SYS_ADMIN (a container given CAP_BPF) the rings cannot be
// opened: the VIPs are still listed, their ring columns marked unknown.
func TestVIPsWithUnreadableRings(t *testing.T) {
	f := newFake()
	f.ringErr = fmt.Errorf("open ring of VIP 1: %w (%w)", dataplane.ErrRingUnreadable, unix.EPERM)
	v, err := gatherVIPs(f)
	if err != nil {
		t.Fatalf("gatherVIPs: %v", err)
	}
	if len(v) != len(f.vips) {
		t.Fatalf("%d rows, want %d", len(v), len(f.vips))
	}
	for _, r := range v {
		if !strings.Contains(r.RingError, "CAP_SYS_ADMIN") {
			t.Errorf("row %s: ring_error = %q", r.Address, r.RingError)
		}
	}
	table := renderString(t, v, "table")
	if !regexp.MustCompile(`(?m)^10\.0\.0\.1 +\* +udp +dsr +1 +source +10 +1000 +1 +\? +\? +\? +\?`).MatchString(table) {
		t.Errorf("unknown ring columns not shown as ?:\n%s", table)
	}
	if !strings.Contains(table, "CAP_SYS_ADMIN") {
		t.Errorf("the table does not say why:\n%s", table)
	}

	// Other errors still fail the command.
	f.ringErr = errors.New("read ring: bad address")
	if _, err := gatherVIPs(f); err == nil {
		t.Error("a ring read error other than a permission error was ignored")
	}
}

func TestReals(t *testing.T) {
	v, err := gatherReals(newFake())
	if err != nil {
		t.Fatal(err)
	}
	var rows []realRow
	if err := json.Unmarshal([]byte(renderString(t, v, "json")), &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 3 || rows[0].ID != 1 || rows[1].ID != 2 || rows[2].ID != 3 {
		t.Fatalf("reals not sorted by id: %+v", rows)
	}
	if rows[0].MAC != "02:00:00:00:00:01" || rows[1].State != "draining" || rows[2].State != "down" {
		t.Fatalf("reals %+v", rows)
	}
	js := renderString(t, v, "json")
	for _, k := range []string{`"id"`, `"address"`, `"state"`, `"mac"`, `"packets"`, `"bytes"`} {
		if !strings.Contains(js, k) {
			t.Errorf("JSON lacks %s:\n%s", k, js)
		}
	}
	if table := renderString(t, v, "table"); !regexp.MustCompile(`(?m)^2 +192\.0\.2\.2 +draining +- +2 +200$`).MatchString(table) {
		t.Errorf("table:\n%s", table)
	}
}

func TestCountersIncludeZeros(t *testing.T) {
	v, err := gatherCounters(newFake())
	if err != nil {
		t.Fatal(err)
	}
	var rows []counterRow
	if err := json.Unmarshal([]byte(renderString(t, v, "json")), &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(dataplane.Reasons()) {
		t.Fatalf("%d counters, want %d", len(rows), len(dataplane.Reasons()))
	}
	for i, r := range dataplane.Reasons() {
		if rows[i].Reason != r.String() || rows[i].Verdict != r.Verdict().String() {
			t.Errorf("row %d = %+v, want %v/%v", i, rows[i], r, r.Verdict())
		}
	}
	if rows[0].Packets != 0 || rows[dataplane.ReasonTxDSR].Packets != 40 {
		t.Errorf("counters %+v", rows)
	}
	table := renderString(t, v, "table")
	if !regexp.MustCompile(`(?m)^pass_not_ip +pass +0 +0$`).MatchString(table) {
		t.Errorf("zero counter missing:\n%s", table)
	}
}

func TestStatus(t *testing.T) {
	v, err := gatherStatus(newFake())
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal([]byte(renderString(t, v, "json")), &doc); err != nil {
		t.Fatal(err)
	}
	for k, w := range map[string]any{"ring_size": 7.0, "conntrack_size_per_family": 4096.0, "max_vips": 64.0, "vip_capacity": 63.0,
		"max_reals": 128.0, "tcp_idle_timeout_ms": 300000.0, "udp_idle_timeout_ms": 30000.0,
		"vips": 4.0, "reals": 3.0, "flows_sampled": 1.0, "deny_prefixes": 2.0} {
		if doc[k] != w {
			t.Errorf("%s = %v, want %v", k, doc[k], w)
		}
	}
	links := doc["links"].([]any)
	if len(links) != 2 || links[0].(map[string]any)["interface"] != "eth0" ||
		links[0].(map[string]any)["detached"] != true || links[1].(map[string]any)["program_id"] != 42.0 {
		t.Errorf("links %v", links)
	}
	pk, _ := json.Marshal(doc["packets_by_verdict"])
	if string(pk) != `[{"packets":5,"verdict":"pass"},{"packets":2,"verdict":"drop"},{"packets":40,"verdict":"tx"}]` {
		t.Errorf("packets by verdict %s", pk)
	}
	table := renderString(t, v, "table")
	for _, want := range []string{"4096 per family", "tcp 5m0s, udp 30s", "pass 5, drop 2, tx 40", "detached (interface gone)"} {
		if !strings.Contains(table, want) {
			t.Errorf("status lacks %q:\n%s", want, table)
		}
	}
}

func TestFlowsAndDeny(t *testing.T) {
	f, err := gatherFlows(newFake(), 50)
	if err != nil {
		t.Fatal(err)
	}
	js := renderString(t, f, "json")
	for _, want := range []string{`"client": "198.51.100.7:40000"`, `"vip": "10.0.0.1:53"`, `"real_id": 2`,
		`"real_address": "192.0.2.2"`, `"idle_ms": 1500`} {
		if !strings.Contains(js, want) {
			t.Errorf("flows JSON lacks %s:\n%s", want, js)
		}
	}
	if table := renderString(t, f, "table"); !strings.Contains(table, "198.51.100.7:40000  ->  10.0.0.1:53") {
		t.Errorf("flows table:\n%s", table)
	}
	// A nat flow shows its translation; the others show none.
	for _, want := range []string{`"snat": "192.0.2.254:20001"`, `"real_port": 8080`, `"closing": true`} {
		if !strings.Contains(js, want) {
			t.Errorf("flows JSON lacks %s:\n%s", want, js)
		}
	}
	if strings.Count(js, `"snat"`) != 1 {
		t.Errorf("flows JSON gives a translation to a flow that has none:\n%s", js)
	}
	if table := renderString(t, f, "table"); !strings.Contains(table, "192.0.2.254:20001 -> 192.0.2.1:8080 (closing)") {
		t.Errorf("flows table lacks the nat translation:\n%s", table)
	}
	d, err := gatherDeny(newFake())
	if err != nil {
		t.Fatal(err)
	}
	if js := renderString(t, d, "json"); strings.Join(strings.Fields(js), "") != `["203.0.113.0/24","2001:db8:bad::/48"]` {
		t.Errorf("deny JSON %s", js)
	}
	empty, _ := gatherDeny(&fakeSource{})
	if js := strings.TrimSpace(renderString(t, empty, "json")); js != "[]" {
		t.Errorf("empty deny list renders %s, want []", js)
	}
}

func TestUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"bogus"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "usage: vfctl") {
		t.Fatalf("unknown command: exit %d, stderr %q", code, errb.String())
	}
	if code := run(nil, &out, &errb); code != 2 {
		t.Fatalf("no command: exit %d", code)
	}
	if code := run([]string{"-o", "yaml", "vips"}, &out, &errb); code != 2 {
		t.Fatalf("bad format: exit %d", code)
	}
	errb.Reset()
	if code := run([]string{"--pin-path", t.TempDir(), "vips"}, &out, &errb); code != 1 ||
		!strings.Contains(errb.String(), "is the agent installed with this pin path?") {
		t.Fatalf("missing pins: exit %d, stderr %q", code, errb.String())
	}
}

// TestPinned fills real pinned maps, lets the loader go, and reads them back
// through the command as a user would.
func TestPinned(t *testing.T) {
	testenv.RequireRoot(t, "create BPF maps")
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	pin := filepath.Join(dir, "vf")
	const ringSize = 251
	dp, err := dataplane.Load(dataplane.Options{PinPath: pin, RingSize: ringSize, ConntrackSize: 4096, MaxVIPs: 64, MaxReals: 64})
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			dp.Close()
			t.Fatal(err)
		}
	}
	must(dp.SetReal(1, dataplane.Real{Addr: netip.MustParseAddr("192.0.2.11"), State: dataplane.RealUp,
		MAC: net.HardwareAddr{2, 0, 0, 0, 0, 11}}))
	must(dp.SetReal(2, dataplane.Real{Addr: netip.MustParseAddr("192.0.2.12"), State: dataplane.RealDraining}))
	ring := make([]uint32, ringSize)
	for i := range ring {
		ring[i] = uint32(i%2 + 1)
	}
	must(dp.SetRing(5, ring))
	must(dp.SetVIP(dataplane.VIP{Addr: netip.MustParseAddr("10.9.9.9"), Port: 0, Proto: dataplane.ProtoTCP},
		dataplane.VIPMeta{ID: 5, Mode: dataplane.ModeDSR}))
	must(dp.AddDeny(netip.MustParsePrefix("203.0.113.0/24")))
	must(dp.Close())

	cmd := func(args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		if code := run(append([]string{"--pin-path", pin}, args...), &out, &errb); code != 0 {
			t.Fatalf("vfctl %v: exit %d: %s", args, code, errb.String())
		}
		t.Logf("vfctl %s\n%s", strings.Join(args, " "), out.String())
		return out.String()
	}
	expect := func(out string, patterns ...string) {
		t.Helper()
		for _, p := range patterns {
			if !regexp.MustCompile(p).MatchString(out) {
				t.Errorf("output lacks %s:\n%s", p, out)
			}
		}
	}
	expect(cmd("status"), `(?m)^ring size: +251$`, `(?m)^VIPs: +1$`, `(?m)^reals: +2$`, `(?m)^deny prefixes: +1$`,
		`capacity: +63 VIPs, 63 reals`, `no XDP links pinned`)
	expect(cmd("vips"), `(?m)^10\.9\.9\.9 +\* +tcp +dsr +5 +flow +0 +0 +0 +2 +1 +1 +0 +[0-9a-f]{13}$`)
	expect(cmd("reals"), `(?m)^1 +192\.0\.2\.11 +up +02:00:00:00:00:0b`, `(?m)^2 +192\.0\.2\.12 +draining +-`)
	expect(cmd("flows", "-n", "10"), `(?m)^CLIENT`)
	expect(cmd("deny"), `(?m)^203\.0\.113\.0/24$`)
	counters := cmd("counters")
	for _, r := range dataplane.Reasons() {
		expect(counters, `(?m)^`+r.String()+` +`+r.Verdict().String()+` +0 +0$`)
	}
	for _, c := range []string{"status", "vips", "reals", "flows", "counters", "deny"} {
		out := cmd(c, "-o", "json")
		if !json.Valid([]byte(out)) {
			t.Errorf("vfctl %s -o json is not JSON:\n%s", c, out)
		}
	}
	var vips []vipRow
	if err := json.Unmarshal([]byte(cmd("-o", "json", "vips")), &vips); err != nil || len(vips) != 1 || vips[0].Reals != 2 {
		t.Errorf("vips JSON: %+v, %v", vips, err)
	}
}

func TestBGPAsksTheAgent(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/bgp" || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		json.NewEncoder(w).Encode(api.BGPView{Enabled: true, ASN: 65001, RouterID: "192.0.2.11", NodeDrained: true,
			Peers: []api.BGPPeerView{{Address: "192.0.2.1", ASN: 65000, State: "established", Up: true,
				UptimeSeconds: 90, Transitions: 1, RoutesSent: []string{"10.0.0.1/32"}}},
			VIPs: []api.BGPAnnounceView{{Address: "10.0.0.1", Announced: false}}})
	}))
	defer srv.Close()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"bgp", "--api", srv.URL, "--token-file", tokenFile}, &out, &errOut); code != 0 {
		t.Fatalf("vfctl bgp = %d: %s", code, errOut.String())
	}
	for _, want := range []string{`(?m)^192\.0\.2\.1 +65000 +established +1m30s +1 +10\.0\.0\.1/32 +-$`,
		`(?m)^node drained: +yes`, `(?m)^10\.0\.0\.1 +false$`} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("output lacks %s:\n%s", want, out.String())
		}
	}
	out.Reset()
	if code := run([]string{"bgp", "--api", srv.URL}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "401") {
		t.Errorf("without the token: exit %d, stderr %q; want 1 naming the 401", code, errOut.String())
	}
}
