package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The agent's listeners in the balancer namespace, at their defaults.
const (
	metricsURL = "http://127.0.0.1:8080/metrics"
	healthURL  = "http://127.0.0.1:9090/health"
)

// TestXDPAttachedMetric: veloflux_xdp_attached asks the kernel, not the
// agent's memory. It is 1, in the mode the kernel reports, for the
// interface the agent attached to, and 0 once the link is detached behind
// the agent's back (BPF_LINK_DETACH on the pinned link, which is what
// `bpftool link detach` does), while the agent, which nothing told, still
// holds the link. A reload (SIGHUP) attaches it again, and so does a
// restart that finds only the severed link's pin.
func TestXDPAttachedMetric(t *testing.T) {
	e := newEnv(t, 1, vip4)
	e.writeConfig(e.webConfig(false))
	a := e.startAgent()
	e.waitServing(vipURL(vip4), []int{0}, 10*time.Second)
	ifname := e.lab.Balancer.IfName
	attached := map[string]string{"interface": ifname, "mode": "native"}

	fams := e.waitGauge("veloflux_xdp_attached", attached, 1, 10*time.Second)
	if n := len(fams["veloflux_xdp_attached"].GetMetric()); n != 1 {
		t.Errorf("veloflux_xdp_attached has %d series, want 1 (one configured interface)", n)
	}
	// The start reconcile succeeded before the metrics server started.
	if v, ok := gaugeValue(fams, "veloflux_reconcile_total", map[string]string{"result": "success"}); !ok || v < 1 {
		t.Errorf("veloflux_reconcile_total{result=\"success\"} = %v (present %v), want >= 1", v, ok)
	}
	if v, ok := gaugeValue(fams, "veloflux_reconcile_last_success_timestamp_seconds", nil); !ok ||
		time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("veloflux_reconcile_last_success_timestamp_seconds = %v (present %v), want within the last minute", v, ok)
	}

	pin := filepath.Join(e.pin, "link_xdp_"+ifname)
	sever := func() {
		t.Helper()
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			t.Fatalf("open the agent's pinned link %s: %v", pin, err)
		}
		err = l.Detach()
		l.Close()
		if err != nil {
			t.Fatalf("detach the link pinned at %s: %v", pin, err)
		}
		if x, err := e.xdpOnBalancer(); err != nil || (x != nil && x.Attached) {
			t.Fatalf("after BPF_LINK_DETACH: XDP on %s %+v, %v; want none", ifname, x, err)
		}
	}
	sever()

	// Not attached any more: the configured mode labels the series.
	e.waitGauge("veloflux_xdp_attached", attached, 0, 10*time.Second)
	code, body := e.agentGet(healthURL)
	if code != http.StatusServiceUnavailable || body["dataplane_attached"] != false {
		t.Errorf("GET /health after the detach: %d %v; want 503 and dataplane_attached false", code, body)
	}
	e.checkAgent() // the agent goes on, nothing told it

	// What VelofluxXDPDetached tells the operator to do: a reload
	// replaces the severed link, and so does a restart that finds only
	// its pin. The maps, and so the flows, stay.
	a.Signal(syscall.SIGHUP)
	e.waitGauge("veloflux_xdp_attached", attached, 1, 10*time.Second)
	e.waitServing(vipURL(vip4), []int{0}, 10*time.Second)

	sever()
	if code := a.Stop(); code != 0 {
		t.Fatalf("%s exited with %d on SIGTERM, want 0", a.Name, code)
	}
	e.startAgent()
	e.waitGauge("veloflux_xdp_attached", attached, 1, 10*time.Second)
	e.waitServing(vipURL(vip4), []int{0}, 10*time.Second)
	if _, err := os.Stat(pin); err != nil {
		t.Errorf("the new link is not pinned at %s: %v", pin, err)
	}
}

// TestProxyListenerMetric: a proxy listener that cannot be opened (here an
// address the namespace does not have; in a container without
// CAP_NET_BIND_SERVICE, a privileged port) stops the L7 proxy while the
// agent goes on forwarding in XDP. veloflux_proxy_listener_up says so with
// 0, and GET /health names the listener, still with 200.
func TestProxyListenerMetric(t *testing.T) {
	e := newEnv(t, 1, vip4)
	const listen = "203.0.113.1:8081" // TEST-NET-3: on no interface of the lab
	e.writeConfig(e.webConfig(false) + fmt.Sprintf("proxy:\n  enabled: true\n  http_listen: %q\n", listen) +
		"routes:\n  - {path_prefix: /, pool: web}\n")
	a := e.startAgent()
	a.WaitLog("L7 proxy stopped", 0, 10*time.Second)
	e.waitServing(vipURL(vip4), []int{0}, 10*time.Second)

	fams := e.waitGauge("veloflux_proxy_listener_up", map[string]string{"role": "http"}, 0, 10*time.Second)
	if n := len(fams["veloflux_proxy_listener_up"].GetMetric()); n != 1 {
		t.Errorf("veloflux_proxy_listener_up has %d series, want 1 (no certificates, so no https listener)", n)
	}
	if v, ok := gaugeValue(fams, "veloflux_proxy_draining", nil); !ok || v != 0 {
		t.Errorf("veloflux_proxy_draining = %v (present %v), want 0", v, ok)
	}

	code, body := e.agentGet(healthURL)
	proxy, _ := body["proxy"].(map[string]any)
	listeners, _ := proxy["listeners"].([]any)
	if code != http.StatusOK || proxy["serving"] != false || len(listeners) != 1 {
		t.Fatalf("GET /health: %d %v; want 200 and a proxy that is not serving its one listener", code, body)
	}
	if l, _ := listeners[0].(map[string]any); l["role"] != "http" || l["address"] != listen || l["serving"] != false {
		t.Errorf("GET /health: proxy listener %v; want role http, address %s, serving false", l, listen)
	}
}

// scrapeAgent parses the agent's /metrics.
func (e *env) scrapeAgent() (map[string]*dto.MetricFamily, error) {
	resp, err := newHTTPClient(e.lab.Balancer, 5*time.Second).Get(metricsURL)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", metricsURL, resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", metricsURL, err)
	}
	return fams, nil
}

// waitGauge scrapes until the series of name with the labels in want has
// value v, and returns that scrape. It fails the test at timeout with the
// last scrape's series or error: the metrics listener may open a moment
// after the data path serves.
func (e *env) waitGauge(name string, want map[string]string, v float64, timeout time.Duration) map[string]*dto.MetricFamily {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		e.checkAgent()
		fams, err := e.scrapeAgent()
		if got, ok := gaugeValue(fams, name, want); err == nil && ok && got == v {
			return fams
		}
		if time.Now().After(deadline) {
			last := fmt.Sprint(err)
			if err == nil {
				var have []string
				for _, m := range fams[name].GetMetric() {
					have = append(have, fmt.Sprintf("%v=%v", m.GetLabel(), sampleValue(m)))
				}
				last = "series " + strings.Join(have, ", ")
			}
			e.t.Fatalf("%s%v: not %v within %s (last: %s)", name, want, v, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// agentGet GETs a URL in the balancer namespace and decodes its JSON body.
func (e *env) agentGet(url string) (int, map[string]any) {
	e.t.Helper()
	resp, err := newHTTPClient(e.lab.Balancer, 5*time.Second).Get(url)
	if err != nil {
		e.t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		e.t.Fatalf("GET %s: read body: %v", url, err)
	}
	var body map[string]any
	if err := json.Unmarshal(data, &body); err != nil {
		e.t.Fatalf("GET %s: %d, body %q: %v", url, resp.StatusCode, data, err)
	}
	return resp.StatusCode, body
}

// gaugeValue returns the value of the first series of family name whose
// labels include want, and whether there is one.
func gaugeValue(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	for _, m := range fams[name].GetMetric() {
		labels := map[string]string{}
		for _, lp := range m.GetLabel() {
			labels[lp.GetName()] = lp.GetValue()
		}
		match := true
		for k, v := range want {
			match = match && labels[k] == v
		}
		if match {
			return sampleValue(m), true
		}
	}
	return 0, false
}

func sampleValue(m *dto.Metric) float64 {
	switch {
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Untyped != nil:
		return m.GetUntyped().GetValue()
	}
	return 0
}
