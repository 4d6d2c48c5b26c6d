package deploy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

// seriesLabels maps every series name a scrape exposes to the label names
// its series carry. A histogram contributes name_bucket (with le),
// name_sum and name_count; a summary name (with quantile), name_sum and
// name_count: the names a PromQL expression can select.
type seriesLabels map[string]map[string]bool

func (s seriesLabels) add(name string, labels []string) {
	if s[name] == nil {
		s[name] = map[string]bool{}
	}
	for _, l := range labels {
		s[name][l] = true
	}
}

func indexScrape(families map[string]*dto.MetricFamily) seriesLabels {
	s := seriesLabels{}
	for name, mf := range families {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, lp := range m.GetLabel() {
				labels = append(labels, lp.GetName())
			}
			switch mf.GetType() {
			case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
				s.add(name+"_bucket", append(slices.Clone(labels), "le"))
				s.add(name+"_sum", labels)
				s.add(name+"_count", labels)
			case dto.MetricType_SUMMARY:
				s.add(name, append(slices.Clone(labels), "quantile"))
				s.add(name+"_sum", labels)
				s.add(name+"_count", labels)
			default:
				s.add(name, labels)
			}
		}
	}
	return s
}

// Series and labels Prometheus adds to every scrape itself.
var (
	prometheusSeries = []string{"up", "scrape_duration_seconds", "scrape_samples_scraped",
		"scrape_samples_post_metric_relabeling", "scrape_series_added"}
	targetLabels = []string{"job", "instance"}
)

// ruleProblems lists every metric and label rule r uses that the scrape
// lacks. recorded names the recording rules' outputs, whose labels are not
// known here.
func ruleProblems(r rule, s seriesLabels, recorded map[string]bool) []string {
	name := r.Alert + r.Record
	u, err := analyze(r.Expr)
	if err != nil {
		return []string{fmt.Sprintf("%s: expression: %v", name, err)}
	}
	var problems []string
	report := func(format string, args ...any) {
		problems = append(problems, name+": "+fmt.Sprintf(format, args...))
	}
	// labelsOf returns the labels a selector's series carry, or nil when
	// they are not known here (a recording rule's output).
	labelsOf := func(sel selector) map[string]bool {
		out := map[string]bool{"__name__": true}
		for _, l := range targetLabels {
			out[l] = true
		}
		switch {
		case recorded[sel.name]:
			return nil
		case slices.Contains(prometheusSeries, sel.name):
		default:
			for l := range s[sel.name] {
				out[l] = true
			}
		}
		return out
	}
	all := map[string]bool{}
	for _, l := range targetLabels {
		all[l] = true
	}
	unknownLabels := false
	for _, sel := range u.selectors {
		switch {
		case sel.name == "":
			report("a selector without a metric name")
			continue
		case recorded[sel.name] || slices.Contains(prometheusSeries, sel.name):
		case s[sel.name] == nil:
			report("metric %s is not in the agent's scrape", sel.name)
			continue
		}
		have := labelsOf(sel)
		if have == nil {
			unknownLabels = true
			continue
		}
		for l := range have {
			all[l] = true
		}
		for _, l := range sel.labels {
			if !have[l] {
				report("%s has no label %q (it has %v)", sel.name, l, sortedKeys(have))
			}
		}
	}
	for _, g := range u.groupings {
		scope := u.selectorsIn(g.start, g.end)
		for _, l := range g.labels {
			if g.end >= 0 {
				for _, sel := range scope {
					if have := labelsOf(sel); have != nil && s[sel.name] != nil && !have[l] {
						report("%s (%s): %s has no label %q", g.keyword, strings.Join(g.labels, ", "), sel.name, l)
					}
				}
			} else if !all[l] && !unknownLabels {
				report("%s (%s): no metric of the expression has label %q", g.keyword, strings.Join(g.labels, ", "), l)
			}
		}
	}
	if !unknownLabels {
		var texts []string
		for _, m := range []map[string]string{r.Labels, r.Annotations} {
			for _, v := range m {
				texts = append(texts, v)
			}
		}
		for _, text := range texts {
			for _, l := range templateLabels(text) {
				if !all[l] {
					report("a template prints $labels.%s, which no metric of the expression has", l)
				}
			}
		}
	}
	return problems
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestRuleProblems checks the checker: a scrape index and rules that use
// metrics and labels it has, and does not have.
func TestRuleProblems(t *testing.T) {
	s := seriesLabels{}
	s.add("veloflux_backend_up", []string{"pool", "backend"})
	s.add("req_seconds_bucket", []string{"route", "le"})
	for _, tc := range []struct {
		expr, annotation string
		want             []string // substrings of the problems, in order
	}{
		{expr: `max by (job, instance, pool) (veloflux_backend_up{backend!=""}) == 0 or up == 0`,
			annotation: "{{ $labels.pool }} on {{ $labels.instance }}"},
		{expr: `histogram_quantile(0.9, sum by (route, le) (rate(req_seconds_bucket[5m])))`},
		{expr: `veloflux_nope_total > 0`, want: []string{"metric veloflux_nope_total is not in the agent's scrape"}},
		{expr: `veloflux_backend_up{vip="x"}`, want: []string{`veloflux_backend_up has no label "vip"`}},
		{expr: `sum by (route) (veloflux_backend_up)`, want: []string{`by (route): veloflux_backend_up has no label "route"`}},
		{expr: `veloflux_backend_up * on (vip) group_left req_seconds_bucket`, want: []string{`no metric of the expression has label "vip"`}},
		{expr: `veloflux_backend_up == 0`, annotation: "{{ $labels.vip }}", want: []string{"$labels.vip"}},
		{expr: `{__name__="veloflux_backend_up"}`, want: []string{"without a metric name"}},
		{expr: `max by (pool) (recorded:up) == 0`, annotation: "{{ $labels.anything }}"},
	} {
		r := rule{Alert: "T", Expr: tc.expr, Annotations: map[string]string{"summary": tc.annotation}}
		got := ruleProblems(r, s, map[string]bool{"recorded:up": true})
		ok := len(got) == len(tc.want)
		for i := 0; ok && i < len(got); i++ {
			ok = strings.Contains(got[i], tc.want[i])
		}
		if !ok {
			t.Errorf("ruleProblems(%q, %q):\n got %q\nwant problems containing %q", tc.expr, tc.annotation, got, tc.want)
		}
	}
}

// metricsVIP is the VIP of TestAlertMetricsExist's lab.
var metricsVIP = netip.MustParseAddr("198.51.100.20")

// TestAlertMetricsExist runs a real agent in a namespace lab, with a VIP,
// a health-checked pool and the L7 proxy, sends requests through the proxy
// so the HTTP families have series, and checks every rule of alerts.yml
// against its /metrics scrape.
func TestAlertMetricsExist(t *testing.T) {
	rs := rules(t)
	l := lab.ForTest(t, lab.Options{Backends: 2, VIPs: []netip.Addr{metricsVIP}})
	bin := agenttest.BuildAgent(t, binaryEnv)
	if err := l.StartBackendServers(t.Context()); err != nil {
		t.Fatalf("start backend servers: %v", err)
	}
	dir := t.TempDir()
	pin := agenttest.MountBPFFS(t, dir)

	// Free ports in the balancer's namespace, where the agent listens.
	ports := make([]int, 3)
	for i := range ports {
		ports[i] = freePortIn(t, l.Balancer)
	}
	apiAddr := fmt.Sprintf("127.0.0.1:%d", ports[0])
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", ports[1])
	proxyAddr := fmt.Sprintf("127.0.0.1:%d", ports[2])

	cfg := agentConfig(agentSpec{name: "deploy-" + l.Prefix, lab: l, vip: metricsVIP,
		api: apiAddr, metrics: metricsAddr, proxy: proxyAddr, tokenFile: filepath.Join(dir, "state", "api.token")})
	cfgPath := filepath.Join(dir, "veloflux.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}

	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: l.Balancer.DialContext}}
	t.Cleanup(hc.CloseIdleConnections) // idle sockets would keep the namespace alive
	startAgentIn(t, l.Balancer, bin, "--config", cfgPath, "--pin-path", pin,
		"--state-dir", filepath.Join(dir, "state"), "--log-format", "text")
	waitHTTP(t, hc, "http://"+apiAddr+"/health", 30*time.Second, func(code int, _ []byte) bool { return code == http.StatusOK })

	// Requests through the proxy, once the backends' checks have risen.
	answered := 0
	waitHTTP(t, hc, "http://"+proxyAddr+"/", 20*time.Second, func(code int, body []byte) bool {
		if code == http.StatusOK && bytes.HasPrefix(body, []byte("backend-")) {
			answered++
		}
		return answered >= 5
	})

	// Wait for a scrape with every family the rules use: the health-check
	// histogram and latency gauge need completed probes.
	var used []string
	for _, r := range rs {
		u, err := analyze(r.Expr)
		if err != nil {
			t.Fatalf("%s: %v", r.Alert, err)
		}
		for _, s := range u.selectors {
			if !slices.Contains(used, s.name) && !slices.Contains(prometheusSeries, s.name) {
				used = append(used, s.name)
			}
		}
	}
	slices.Sort(used)
	var s seriesLabels
	var families map[string]*dto.MetricFamily
	deadline := time.Now().Add(20 * time.Second)
	for {
		families = scrape(t, hc, "http://"+metricsAddr+"/metrics")
		s = indexScrape(families)
		missing := slices.DeleteFunc(slices.Clone(used), func(n string) bool { return s[n] != nil })
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Logf("still missing after 20s: %v", missing)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("the rules select %d series names: %v", len(used), used)

	recorded := map[string]bool{}
	for _, r := range rs {
		if r.Record != "" {
			recorded[r.Record] = true
		}
	}
	for _, r := range rs {
		for _, p := range ruleProblems(r, s, recorded) {
			t.Error(p)
		}
	}

	// The agent's own health, which the rules read: XDP on the lab's
	// interface in the mode asked for, the proxy serving, a reconcile done.
	wantGauge(t, families, 1, "veloflux_xdp_attached", map[string]string{"interface": l.Balancer.IfName, "mode": "native"})
	wantGauge(t, families, 1, "veloflux_proxy_listener_up", map[string]string{"role": "http"})
	wantGauge(t, families, 0, "veloflux_proxy_draining", nil)
	if ts, _ := gauge(families, "veloflux_reconcile_last_success_timestamp_seconds", nil); time.Since(time.Unix(int64(ts), 0)) > time.Minute {
		t.Errorf("veloflux_reconcile_last_success_timestamp_seconds = %v, want within the last minute", ts)
	}

	// For the reader of the log: what the agent exports that no rule uses.
	var unused []string
	for name := range s {
		if strings.HasPrefix(name, "veloflux_") && !slices.Contains(used, name) {
			unused = append(unused, name)
		}
	}
	slices.Sort(unused)
	t.Logf("exported but used by no rule: %v", unused)
}

// freePortIn returns a TCP port nothing listens on in h's namespace.
func freePortIn(t testing.TB, h *lab.Host) int {
	t.Helper()
	ln, err := h.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port in %s: %v", h.Name, err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startAgentIn runs the agent in h's namespace; it must exit cleanly on the
// SIGTERM of the test's cleanup.
func startAgentIn(t *testing.T, h *lab.Host, bin string, args ...string) {
	t.Helper()
	p, err := agenttest.Start(t, "agent", h.Command(context.Background(), bin, args...))
	if err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() {
		if code := p.Stop(); code != 0 {
			t.Errorf("agent exited with %d after SIGTERM (%v)", code, p.Err())
		}
	})
}

// waitHTTP GETs url until done accepts the answer, failing the test after
// timeout with the last answer or error.
func waitHTTP(t testing.TB, hc *http.Client, url string, timeout time.Duration, done func(code int, body []byte) bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		resp, err := hc.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			if rerr == nil && done(resp.StatusCode, body) {
				return
			}
			last = fmt.Sprintf("%d %s %v", resp.StatusCode, bytes.TrimSpace(body), rerr)
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("GET %s: no expected answer within %s (last: %s)", url, timeout, last)
}

// scrape GETs a /metrics URL and parses it.
func scrape(t testing.TB, hc *http.Client, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d", url, resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse %s: %v", url, err)
	}
	return families
}

// gauge returns the value of the gauge or counter series of family name
// with exactly the given labels, and whether the scrape has it.
func gauge(families map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	for _, m := range families[name].GetMetric() {
		if len(m.GetLabel()) != len(labels) {
			continue
		}
		match := true
		for _, lp := range m.GetLabel() {
			match = match && labels[lp.GetName()] == lp.GetValue()
		}
		if !match {
			continue
		}
		if m.Counter != nil {
			return m.GetCounter().GetValue(), true
		}
		return m.GetGauge().GetValue(), true
	}
	return 0, false
}

// wantGauge checks that the scrape has the series with value want.
func wantGauge(t testing.TB, families map[string]*dto.MetricFamily, want float64, name string, labels map[string]string) {
	t.Helper()
	got, ok := gauge(families, name, labels)
	switch {
	case !ok:
		var have []string
		for _, m := range families[name].GetMetric() {
			have = append(have, fmt.Sprint(m.GetLabel()))
		}
		t.Errorf("%s%v: not in the scrape (it has %v)", name, labels, have)
	case got != want:
		t.Errorf("%s%v = %v, want %v", name, labels, got, want)
	}
}
