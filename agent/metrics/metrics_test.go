package metrics

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/health"
	"github.com/veloflux/veloflux/agent/snapshot"
)

// ObserveHealthCheck must stay pluggable into health.WithObserver.
var _ health.Observer = (*Metrics)(nil).ObserveHealthCheck

// fakeSource returns whatever was last set; every call counts as one read
// of the maps.
type fakeSource struct {
	mu    sync.Mutex
	c     snapshot.Counters
	err   error
	reads int
}

func (f *fakeSource) Counters() (snapshot.Counters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	if f.err != nil {
		return snapshot.Counters{}, f.err
	}
	return f.c, nil
}

// set replaces the counters. Callers pass freshly built values, never ones
// a previous Counters call returned, so a concurrent scrape never sees a
// slice change under it.
func (f *fakeSource) set(c snapshot.Counters, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.c, f.err = c, err
}

func (f *fakeSource) readCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reads
}

// reasonFixture is every reason the data plane has, in counter order, with
// its verdict.
var reasonFixture = []struct{ reason, verdict string }{
	{"pass_not_ip", "pass"},
	{"pass_not_vip", "pass"},
	{"pass_fragment", "pass"},
	{"pass_unknown_l4", "pass"},
	{"pass_ipv6_ext_limit", "pass"},
	{"pass_vlan_nested", "pass"},
	{"pass_not_our_mac", "pass"},
	{"pass_iface_unknown", "pass"},
	{"drop_malformed_l2", "drop"},
	{"drop_malformed_l3", "drop"},
	{"drop_malformed_l4", "drop"},
	{"drop_denylist", "drop"},
	{"drop_no_real", "drop"},
	{"drop_no_route", "drop"},
	{"drop_encap", "drop"},
	{"drop_martian_vip", "drop"},
	{"drop_martian_unspecified", "drop"},
	{"drop_martian_broadcast", "drop"},
	{"drop_martian_multicast", "drop"},
	{"drop_martian_loopback", "drop"},
	{"drop_new_flow_rate_limited", "drop"},
	{"drop_nat_no_port", "drop"},
	{"drop_nat_unconfigured", "drop"},
	{"tx_dsr", "tx"},
	{"tx_ipip", "tx"},
	{"tx_nat", "tx"},
	{"tx_nat_reply", "tx"},
	{"tx_gue", "tx"},
	{"tx_icmp_too_big", "tx"},
}

// The fixture restates the data plane's reasons; it must not drift from
// them, or these tests stop describing what a scrape shows.
func TestReasonFixtureIsTheDataplanes(t *testing.T) {
	reasons := dataplane.Reasons()
	if len(reasons) != len(reasonFixture) {
		t.Fatalf("the data plane has %d reasons, the fixture %d", len(reasons), len(reasonFixture))
	}
	for i, r := range reasons {
		if f := reasonFixture[i]; f.reason != r.String() || f.verdict != r.Verdict().String() {
			t.Errorf("reason %d is %s (%s) in the data plane, %s (%s) in the fixture",
				i, r, r.Verdict(), f.reason, f.verdict)
		}
	}
}

// fixture is 2 VIPs, 3 backends and all 29 reasons. Reason i counts
// (i+1)*10 packets, so pass sums to 360, drop to 2400 and tx to 1590.
func fixture() snapshot.Counters {
	c := snapshot.Counters{
		At: time.Date(2026, 11, 27, 6, 0, 0, 0, time.UTC),
		VIPs: []snapshot.VIPCounters{
			{VIP: "10.0.0.1:80/tcp", Address: "10.0.0.1", Port: 80, Protocol: "tcp", Mode: "dsr", Pool: "web", ID: 1,
				Packets: 1000, Bytes: 64000, NewFlows: 100, Drops: 3},
			{VIP: "10.0.0.2:53/udp", Address: "10.0.0.2", Port: 53, Protocol: "udp", Mode: "ipip", Pool: "dns", ID: 2,
				Packets: 500, Bytes: 40000, NewFlows: 250, Drops: 0},
		},
		Backends: []snapshot.BackendCounters{
			{Pool: "web", Backend: "10.0.0.11:80", Address: "10.0.0.11", Port: 80, RealID: 1, State: "up", Packets: 600, Bytes: 38400},
			{Pool: "web", Backend: "10.0.0.12:80", Address: "10.0.0.12", Port: 80, RealID: 2, State: "draining", Packets: 397, Bytes: 25408},
			{Pool: "dns", Backend: "10.0.1.21:53", Address: "10.0.1.21", Port: 53, RealID: 3, State: "down", Packets: 500, Bytes: 40000},
		},
	}
	for i, r := range reasonFixture {
		n := uint64(i+1) * 10
		c.Reasons = append(c.Reasons, snapshot.ReasonCounters{Reason: r.reason, Verdict: r.verdict, Packets: n, Bytes: n * 64})
	}
	return c
}

// exposition is one parsed text-format scrape.
type exposition struct {
	types  map[string]string  // family name -> TYPE
	values map[string]float64 // series (see series) -> value
}

// series is the key of one sample in an exposition: name{k="v",...} with
// the labels sorted by name except le, which stays last as in the
// exposition itself.
func series(name string, labels ...string) string {
	if len(labels) == 0 {
		return name
	}
	var pairs []string
	var le string
	for i := 0; i+1 < len(labels); i += 2 {
		p := labels[i] + "=" + strconv.Quote(labels[i+1])
		if labels[i] == "le" {
			le = p
			continue
		}
		pairs = append(pairs, p)
	}
	slices.Sort(pairs)
	if le != "" {
		pairs = append(pairs, le)
	}
	return name + "{" + strings.Join(pairs, ",") + "}"
}

// canonical rewrites an exposition sample name into series form.
func canonical(t testing.TB, s string) string {
	open := strings.IndexByte(s, '{')
	if open < 0 {
		return s
	}
	body := strings.TrimSuffix(s[open+1:], "}")
	var labels []string
	for body != "" {
		eq := strings.IndexByte(body, '=')
		if eq < 0 {
			t.Fatalf("bad labels in %q", s)
		}
		name := body[:eq]
		v, err := strconv.QuotedPrefix(body[eq+1:])
		if err != nil {
			t.Fatalf("bad label value in %q: %v", s, err)
		}
		uq, _ := strconv.Unquote(v)
		labels = append(labels, name, uq)
		body = strings.TrimPrefix(body[eq+1+len(v):], ",")
	}
	return series(s[:open], labels...)
}

// scrape GETs url and parses the text exposition. It fails the test unless
// the status is 200.
func scrape(t testing.TB, url string) exposition {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, body)
	}
	e := exposition{types: map[string]string{}, values: map[string]float64{}}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			e.types[name] = typ
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			t.Fatalf("bad sample %q: %v", line, err)
		}
		key := canonical(t, line[:sp])
		if _, dup := e.values[key]; dup {
			t.Errorf("duplicate series %s", key)
		}
		e.values[key] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return e
}

// want checks that series has value v.
func (e exposition) want(t testing.TB, v float64, name string, labels ...string) {
	t.Helper()
	k := series(name, labels...)
	got, ok := e.values[k]
	switch {
	case !ok:
		t.Errorf("%s: missing", k)
	case got != v:
		t.Errorf("%s = %v, want %v", k, got, v)
	}
}

// family returns the series of one family, excluding histogram suffixes.
func (e exposition) family(name string) []string {
	var out []string
	for k := range e.values {
		if k == name || strings.HasPrefix(k, name+"{") {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

func (e exposition) wantAbsent(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if s := e.family(n); len(s) > 0 || e.types[n] != "" {
			t.Errorf("%s present, want absent: %v", n, s)
		}
	}
}

func newTest(t testing.TB, opts Options) (*Metrics, *httptest.Server) {
	t.Helper()
	m := New(opts)
	srv := httptest.NewServer(m.Handler())
	t.Cleanup(srv.Close)
	return m, srv
}

func TestScrape(t *testing.T) {
	src := &fakeSource{c: fixture()}
	_, srv := newTest(t, Options{Source: src, Version: "v1.2.3"})
	e := scrape(t, srv.URL)

	if n := src.readCount(); n != 1 {
		t.Errorf("Source read %d times in one scrape, want 1", n)
	}

	e.want(t, 1000, "veloflux_vip_packets_total", "vip", "10.0.0.1:80/tcp")
	e.want(t, 64000, "veloflux_vip_bytes_total", "vip", "10.0.0.1:80/tcp")
	e.want(t, 100, "veloflux_vip_new_flows_total", "vip", "10.0.0.1:80/tcp")
	e.want(t, 3, "veloflux_vip_drops_total", "vip", "10.0.0.1:80/tcp")
	e.want(t, 250, "veloflux_vip_new_flows_total", "vip", "10.0.0.2:53/udp")
	e.want(t, 0, "veloflux_vip_drops_total", "vip", "10.0.0.2:53/udp")
	e.want(t, 1, "veloflux_vip_info", "vip", "10.0.0.1:80/tcp", "pool", "web", "mode", "dsr")
	e.want(t, 1, "veloflux_vip_info", "vip", "10.0.0.2:53/udp", "pool", "dns", "mode", "ipip")

	e.want(t, 600, "veloflux_backend_packets_total", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 25408, "veloflux_backend_bytes_total", "pool", "web", "backend", "10.0.0.12:80")
	e.want(t, 500, "veloflux_backend_packets_total", "pool", "dns", "backend", "10.0.1.21:53")
	// No Health: up and draining are 1, down is 0.
	e.want(t, 1, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 1, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.12:80")
	e.want(t, 0, "veloflux_backend_up", "pool", "dns", "backend", "10.0.1.21:53")

	e.want(t, 360, "veloflux_xdp_verdicts_total", "verdict", "pass")
	e.want(t, 2400, "veloflux_xdp_verdicts_total", "verdict", "drop")
	e.want(t, 1590, "veloflux_xdp_verdicts_total", "verdict", "tx")
	e.want(t, 130, "veloflux_drops_total", "reason", "drop_no_real")
	e.want(t, 240, "veloflux_packets_total", "reason", "tx_dsr", "verdict", "tx")
	e.want(t, 20, "veloflux_packets_total", "reason", "pass_not_vip", "verdict", "pass")

	e.want(t, 0, "veloflux_scrape_errors_total")
	e.want(t, 0, "veloflux_config_reloads_total", "result", "success")
	e.want(t, 0, "veloflux_config_reloads_total", "result", "failure")
	e.want(t, 1, "veloflux_build_info", "version", "v1.2.3", "goversion", runtime.Version())

	// Exact label sets: one series per VIP, backend and reason, and the
	// drop family holds drop-verdict reasons only.
	for name, n := range map[string]int{
		"veloflux_vip_packets_total":     2,
		"veloflux_vip_info":              2,
		"veloflux_backend_packets_total": 3,
		"veloflux_backend_up":            3,
		"veloflux_xdp_verdicts_total":    3,
		"veloflux_packets_total":         29,
		"veloflux_drops_total":           15,
	} {
		if got := e.family(name); len(got) != n {
			t.Errorf("%s has %d series, want %d: %v", name, len(got), n, got)
		}
	}
	for _, k := range e.family("veloflux_drops_total") {
		if !strings.Contains(k, `reason="drop_`) {
			t.Errorf("non-drop reason in veloflux_drops_total: %s", k)
		}
	}

	for name, typ := range map[string]string{
		"veloflux_vip_packets_total":             "counter",
		"veloflux_vip_info":                      "gauge",
		"veloflux_backend_up":                    "gauge",
		"veloflux_packets_total":                 "counter",
		"veloflux_scrape_errors_total":           "counter",
		"veloflux_config_reloads_total":          "counter",
		"veloflux_build_info":                    "gauge",
		"veloflux_health_check_duration_seconds": "", // no observation yet
		"go_goroutines":                          "gauge",
		"promhttp_metric_handler_requests_total": "counter",
	} {
		if got := e.types[name]; got != typ {
			t.Errorf("TYPE of %s = %q, want %q", name, got, typ)
		}
	}
	if runtime.GOOS == "linux" {
		if e.types["process_start_time_seconds"] != "gauge" {
			t.Error("process collector missing")
		}
	}
	// Without Health and WSClients those families are absent.
	e.wantAbsent(t, "veloflux_backend_check_latency_seconds", "veloflux_ws_clients")
}

// TestScrapeExact pins whole families, HELP and TYPE included, with the
// library's own comparison.
func TestScrapeExact(t *testing.T) {
	_, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}})
	const want = `
# HELP veloflux_vip_info Always 1; maps each vip label to its pool and forwarding mode for joins.
# TYPE veloflux_vip_info gauge
veloflux_vip_info{mode="dsr",pool="web",vip="10.0.0.1:80/tcp"} 1
veloflux_vip_info{mode="ipip",pool="dns",vip="10.0.0.2:53/udp"} 1
# HELP veloflux_xdp_verdicts_total Packets the XDP program returned with each verdict.
# TYPE veloflux_xdp_verdicts_total counter
veloflux_xdp_verdicts_total{verdict="drop"} 2400
veloflux_xdp_verdicts_total{verdict="pass"} 360
veloflux_xdp_verdicts_total{verdict="tx"} 1590
# HELP veloflux_drops_total Packets the XDP program dropped, by reason.
# TYPE veloflux_drops_total counter
veloflux_drops_total{reason="drop_denylist"} 120
veloflux_drops_total{reason="drop_encap"} 150
veloflux_drops_total{reason="drop_malformed_l2"} 90
veloflux_drops_total{reason="drop_malformed_l3"} 100
veloflux_drops_total{reason="drop_malformed_l4"} 110
veloflux_drops_total{reason="drop_martian_broadcast"} 180
veloflux_drops_total{reason="drop_martian_loopback"} 200
veloflux_drops_total{reason="drop_martian_multicast"} 190
veloflux_drops_total{reason="drop_martian_unspecified"} 170
veloflux_drops_total{reason="drop_martian_vip"} 160
veloflux_drops_total{reason="drop_nat_no_port"} 220
veloflux_drops_total{reason="drop_nat_unconfigured"} 230
veloflux_drops_total{reason="drop_new_flow_rate_limited"} 210
veloflux_drops_total{reason="drop_no_real"} 130
veloflux_drops_total{reason="drop_no_route"} 140
`
	err := testutil.ScrapeAndCompare(srv.URL, strings.NewReader(want),
		"veloflux_vip_info", "veloflux_xdp_verdicts_total", "veloflux_drops_total")
	if err != nil {
		t.Error(err)
	}
}

// TestReadAtScrapeTime checks that each scrape reads the Source afresh:
// new values show up and removed VIPs and backends disappear.
func TestReadAtScrapeTime(t *testing.T) {
	src := &fakeSource{c: fixture()}
	_, srv := newTest(t, Options{Source: src})
	scrape(t, srv.URL).want(t, 1000, "veloflux_vip_packets_total", "vip", "10.0.0.1:80/tcp")

	c := fixture()
	c.VIPs[0].Packets = 1500
	c.VIPs = c.VIPs[:1]
	c.Backends[0].Bytes = 99999
	c.Backends[0].State = "down"
	c.Backends = c.Backends[:2]
	c.Reasons[12].Packets += 5 // drop_no_real
	src.set(c, nil)

	e := scrape(t, srv.URL)
	e.want(t, 1500, "veloflux_vip_packets_total", "vip", "10.0.0.1:80/tcp")
	e.want(t, 99999, "veloflux_backend_bytes_total", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 0, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 135, "veloflux_drops_total", "reason", "drop_no_real")
	e.want(t, 2405, "veloflux_xdp_verdicts_total", "verdict", "drop")
	if got := e.family("veloflux_vip_packets_total"); len(got) != 1 {
		t.Errorf("removed VIP still exported: %v", got)
	}
	if got := e.family("veloflux_backend_up"); len(got) != 2 {
		t.Errorf("removed backend still exported: %v", got)
	}
	if n := src.readCount(); n != 2 {
		t.Errorf("Source read %d times in two scrapes, want 2", n)
	}
}

func TestSourceError(t *testing.T) {
	src := &fakeSource{err: errors.New("map lookup: bad file descriptor")}
	m, srv := newTest(t, Options{
		Source:  src,
		Version: "v1",
		// Health does not depend on the maps, so it is still reported.
		Health: func() []snapshot.BackendHealth {
			return []snapshot.BackendHealth{{Pool: "web", Backend: "10.0.0.11:80", Healthy: true}}
		},
	})
	m.ConfigReload(ResultSuccess)

	dataplane := []string{
		"veloflux_vip_packets_total", "veloflux_vip_bytes_total", "veloflux_vip_new_flows_total",
		"veloflux_vip_drops_total", "veloflux_vip_info", "veloflux_backend_packets_total",
		"veloflux_backend_bytes_total", "veloflux_xdp_verdicts_total", "veloflux_drops_total",
		"veloflux_packets_total",
	}
	for i := 1; i <= 2; i++ {
		e := scrape(t, srv.URL) // fails unless 200
		e.want(t, float64(i), "veloflux_scrape_errors_total")
		e.wantAbsent(t, dataplane...)
		e.want(t, 1, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.11:80")
		e.want(t, 1, "veloflux_config_reloads_total", "result", "success")
		e.want(t, 1, "veloflux_build_info", "version", "v1", "goversion", runtime.Version())
		if e.types["go_goroutines"] == "" {
			t.Error("go collector missing after a failed read")
		}
	}

	// A read failure is not a collection error: the registry stays clean
	// and the error count survives recovery.
	if _, err := m.Registry().Gather(); err != nil {
		t.Errorf("Gather: %v", err)
	}
	src.set(fixture(), nil)
	e := scrape(t, srv.URL)
	e.want(t, 3, "veloflux_scrape_errors_total")
	e.want(t, 1000, "veloflux_vip_packets_total", "vip", "10.0.0.1:80/tcp")
}

func TestHealth(t *testing.T) {
	checked := time.Date(2026, 11, 27, 6, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	view := []snapshot.BackendHealth{
		// The data plane still says up, but the checker has the final word.
		{Pool: "web", Backend: "10.0.0.11:80", Healthy: false, LastCheck: checked, Latency: 1500 * time.Millisecond, LastError: "timeout"},
		{Pool: "web", Backend: "10.0.0.12:80", Healthy: true, LastCheck: checked, Latency: 250 * time.Microsecond},
		// Check type none: healthy, never probed.
		{Pool: "dns", Backend: "10.0.1.21:53", Healthy: true},
	}
	_, srv := newTest(t, Options{
		Source: &fakeSource{c: fixture()},
		Health: func() []snapshot.BackendHealth {
			mu.Lock()
			defer mu.Unlock()
			return slices.Clone(view)
		},
	})

	e := scrape(t, srv.URL)
	e.want(t, 0, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 1, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.12:80")
	e.want(t, 1, "veloflux_backend_up", "pool", "dns", "backend", "10.0.1.21:53")
	e.want(t, 1.5, "veloflux_backend_check_latency_seconds", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 0.00025, "veloflux_backend_check_latency_seconds", "pool", "web", "backend", "10.0.0.12:80")
	if got := e.family("veloflux_backend_check_latency_seconds"); len(got) != 2 {
		t.Errorf("latency for a never-probed backend: %v", got)
	}
	if got := e.family("veloflux_backend_up"); len(got) != 3 {
		t.Errorf("veloflux_backend_up: %v, want one series per backend", got)
	}

	mu.Lock()
	view[0].Healthy = true
	view[0].Latency = 2 * time.Millisecond
	mu.Unlock()
	e = scrape(t, srv.URL)
	e.want(t, 1, "veloflux_backend_up", "pool", "web", "backend", "10.0.0.11:80")
	e.want(t, 0.002, "veloflux_backend_check_latency_seconds", "pool", "web", "backend", "10.0.0.11:80")
}

func TestObserveHealthCheckAndConfigReload(t *testing.T) {
	m, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}})
	m.ObserveHealthCheck("web", "web/10.0.0.11:80", 300*time.Microsecond, true)
	m.ObserveHealthCheck("web", "web/10.0.0.12:80", 40*time.Millisecond, true)
	m.ObserveHealthCheck("web", "web/10.0.0.11:80", 5*time.Second, false)
	m.ObserveHealthCheck("dns", "dns/10.0.1.21:53", 7*time.Second, false)
	m.ConfigReload(ResultSuccess)
	m.ConfigReload(ResultSuccess)
	m.ConfigReload(ResultFailure)

	e := scrape(t, srv.URL)
	const h = "veloflux_health_check_duration_seconds"
	if e.types[h] != "histogram" {
		t.Fatalf("TYPE of %s = %q", h, e.types[h])
	}
	e.want(t, 2, h+"_count", "pool", "web", "result", "success")
	e.want(t, 0.0403, h+"_sum", "pool", "web", "result", "success")
	e.want(t, 0, h+"_bucket", "pool", "web", "result", "success", "le", "0.00025")
	e.want(t, 1, h+"_bucket", "pool", "web", "result", "success", "le", "0.0005")
	e.want(t, 2, h+"_bucket", "pool", "web", "result", "success", "le", "0.05")
	e.want(t, 1, h+"_bucket", "pool", "web", "result", "failure", "le", "5")
	e.want(t, 0, h+"_bucket", "pool", "dns", "result", "failure", "le", "5")
	e.want(t, 1, h+"_bucket", "pool", "dns", "result", "failure", "le", "+Inf")
	// The backend is not a label.
	for k := range e.values {
		if strings.HasPrefix(k, h) && strings.Contains(k, "backend=") {
			t.Fatalf("backend label on %s", k)
		}
	}
	if got := len(e.family(h + "_bucket")); got != 3*(len(healthCheckBuckets)+1) {
		t.Errorf("%d buckets over 3 pool/result pairs, want %d", got, 3*(len(healthCheckBuckets)+1))
	}

	e.want(t, 2, "veloflux_config_reloads_total", "result", "success")
	e.want(t, 1, "veloflux_config_reloads_total", "result", "failure")
}

func TestWSClients(t *testing.T) {
	var mu sync.Mutex
	clients := map[string]int{"events": 3, "health": 1}
	get := func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(clients)
	}
	m, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}, WSClients: get})

	e := scrape(t, srv.URL)
	if e.types["veloflux_ws_clients"] != "gauge" {
		t.Errorf("TYPE of veloflux_ws_clients = %q", e.types["veloflux_ws_clients"])
	}
	e.want(t, 3, "veloflux_ws_clients", "channel", "events")
	e.want(t, 1, "veloflux_ws_clients", "channel", "health")

	mu.Lock()
	clients["events"] = 0
	clients["counters"] = 7
	delete(clients, "health")
	mu.Unlock()
	e = scrape(t, srv.URL)
	e.want(t, 0, "veloflux_ws_clients", "channel", "events")
	e.want(t, 7, "veloflux_ws_clients", "channel", "counters")
	if got := e.family("veloflux_ws_clients"); len(got) != 2 {
		t.Errorf("veloflux_ws_clients: %v", got)
	}

	m.SetWSClients(nil)
	scrape(t, srv.URL).wantAbsent(t, "veloflux_ws_clients")
	m.SetWSClients(func() map[string]int { return map[string]int{"events": 9} })
	scrape(t, srv.URL).want(t, 9, "veloflux_ws_clients", "channel", "events")
}

// populated returns Metrics with every family present, for the linter.
func populated(t testing.TB) *Metrics {
	m := New(Options{
		Source:  &fakeSource{c: fixture()},
		Version: "v1.2.3",
		Health: func() []snapshot.BackendHealth {
			return []snapshot.BackendHealth{{Pool: "web", Backend: "10.0.0.11:80", Healthy: true,
				LastCheck: time.Now(), Latency: time.Millisecond}}
		},
		WSClients: func() map[string]int { return map[string]int{"events": 1} },
		XDP: func() ([]XDPAttachment, error) {
			return []XDPAttachment{{Interface: "eth0", Mode: "native", Attached: true}}, nil
		},
	})
	m.SetProxy(func() ProxyState { return ProxyState{Listeners: []ProxyListener{{Role: "http", Serving: true}}} })
	m.ObserveHealthCheck("web", "web/10.0.0.11:80", time.Millisecond, true)
	m.ConfigReload(ResultFailure)
	m.ObserveReconcile(true, 1, time.Now())
	// One scrape, so the promhttp_* handler metrics have values too.
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: %d", rec.Code)
	}
	return m
}

// TestLint applies promlint, the rules of promtool check metrics. The
// Collect*Lint calls use a pedantic registry, which also checks that every
// collected metric was described.
func TestLint(t *testing.T) {
	m := populated(t)

	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}

	// The data-plane collector alone, in a pedantic registry, which also
	// checks that everything it collects was described.
	dp := newDataplaneCollector(&fakeSource{c: fixture()}, func() []snapshot.BackendHealth {
		return []snapshot.BackendHealth{{Pool: "web", Backend: "10.0.0.11:80", LastCheck: time.Now()}}
	})
	problems, err = testutil.CollectAndLint(dp)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint (data plane): %s: %s", p.Metric, p.Text)
	}
	// 2 VIPs × 5, 3 backends × 2, 1 health entry × (up + latency), the
	// error count, 3 verdicts, 29 reasons, 15 drop reasons.
	if n, want := testutil.CollectAndCount(dp), 2*5+3*2+2+1+3+29+15; n != want {
		t.Errorf("data-plane collector emitted %d series, want %d", n, want)
	}

	problems, err = testutil.CollectAndLint(m.ws)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint (ws): %s: %s", p.Metric, p.Text)
	}
}

func TestNewRequiresSource(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("New with a nil Source did not panic")
		}
	}()
	New(Options{})
}

// TestConcurrent runs scrapes alongside the agent-side updates, for -race.
func TestConcurrent(t *testing.T) {
	src := &fakeSource{c: fixture()}
	m, srv := newTest(t, Options{Source: src, WSClients: func() map[string]int { return map[string]int{"events": 1} }})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for range 10 {
				resp, err := http.Get(srv.URL)
				if err != nil {
					t.Error(err)
					return
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK {
					t.Errorf("scrape: %v %s", err, resp.Status)
				}
			}
		})
		wg.Go(func() {
			for j := range 100 {
				m.ObserveHealthCheck(fmt.Sprint("pool", i), "", time.Duration(j)*time.Millisecond, j%2 == 0)
				m.ConfigReload(ResultSuccess)
				m.ObserveReconcile(j%3 != 0, j%2, time.Unix(int64(j), 0))
				if j%10 == 0 {
					src.set(fixture(), nil)
					m.SetWSClients(func() map[string]int { return map[string]int{"events": j} })
					m.SetProxy(func() ProxyState { return ProxyState{Listeners: []ProxyListener{{Role: "http", Serving: j%20 == 0}}} })
				}
			}
		})
	}
	wg.Wait()
	e := scrape(t, srv.URL)
	e.want(t, 400, "veloflux_config_reloads_total", "result", "success")
	e.want(t, 4*66, "veloflux_reconcile_total", "result", "success")
	e.want(t, 98, "veloflux_reconcile_last_success_timestamp_seconds") // 99 failed
}

// bigCounters is 1,000 VIPs over 1,000 pools of 3 backends each, and all
// reasons.
func bigCounters() snapshot.Counters {
	c := fixture()
	c.VIPs, c.Backends = nil, nil
	for i := range 1000 {
		pool := fmt.Sprintf("pool-%04d", i)
		c.VIPs = append(c.VIPs, snapshot.VIPCounters{
			VIP:  fmt.Sprintf("10.%d.%d.1:443/tcp", i/256, i%256),
			Pool: pool, Mode: "dsr", ID: uint32(i + 1),
			Packets: uint64(i) * 1e6, Bytes: uint64(i) * 1e9, NewFlows: uint64(i) * 1e3, Drops: uint64(i),
		})
		for j := range 3 {
			c.Backends = append(c.Backends, snapshot.BackendCounters{
				Pool: pool, Backend: fmt.Sprintf("172.16.%d.%d:443", i%256, 10+j+3*(i/256)),
				State: "up", Packets: uint64(i*3+j) * 1e5, Bytes: uint64(i*3+j) * 1e8,
			})
		}
	}
	return c
}

// BenchmarkScrape1000VIPs measures one full HTTP scrape: the Source read,
// every collector, encoding and (as Prometheus asks for it) gzip.
func BenchmarkScrape1000VIPs(b *testing.B) {
	m := New(Options{Source: &fakeSource{c: bigCounters()}, Version: "bench"})
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	req, err := http.NewRequest(http.MethodGet, srv.URL, nil)
	if err != nil {
		b.Fatal(err)
	}
	req.Header.Set("Accept-Encoding", "gzip")

	var body int64
	b.ReportAllocs()
	for b.Loop() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("scrape: %v %s", err, resp.Status)
		}
		body = n
	}
	b.ReportMetric(float64(body), "gzip-bytes/scrape")
}
