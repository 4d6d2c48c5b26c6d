package metrics

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeXDP is the kernel's answer about attachments, as the test sets it;
// every call counts as one question.
type fakeXDP struct {
	mu    sync.Mutex
	atts  []XDPAttachment
	err   error
	calls int
}

func (f *fakeXDP) attachments() ([]XDPAttachment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	return slices.Clone(f.atts), f.err
}

func (f *fakeXDP) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fakeXDP) set(atts []XDPAttachment, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.atts, f.err = atts, err
}

// TestXDPAttached: veloflux_xdp_attached follows what the kernel says at
// each scrape, 1 while attached and 0 once detached, and a failed read
// leaves the unknown interface out instead of reporting it either way.
func TestXDPAttached(t *testing.T) {
	xdp := &fakeXDP{atts: []XDPAttachment{
		{Interface: "eth0", Mode: "native", Attached: true},
		{Interface: "eth1", Mode: "generic", Attached: true},
	}}
	m, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}, XDP: xdp.attachments})

	e := scrape(t, srv.URL)
	if e.types["veloflux_xdp_attached"] != "gauge" {
		t.Errorf("TYPE of veloflux_xdp_attached = %q, want gauge", e.types["veloflux_xdp_attached"])
	}
	e.want(t, 1, "veloflux_xdp_attached", "interface", "eth0", "mode", "native")
	e.want(t, 1, "veloflux_xdp_attached", "interface", "eth1", "mode", "generic")

	// eth1's link detached behind the agent's back: the configured mode
	// (auto here) replaces the kernel's, which no longer has one.
	xdp.set([]XDPAttachment{
		{Interface: "eth0", Mode: "native", Attached: true},
		{Interface: "eth1", Mode: "auto", Attached: false},
	}, nil)
	e = scrape(t, srv.URL)
	e.want(t, 1, "veloflux_xdp_attached", "interface", "eth0", "mode", "native")
	e.want(t, 0, "veloflux_xdp_attached", "interface", "eth1", "mode", "auto")
	if got := e.family("veloflux_xdp_attached"); len(got) != 2 {
		t.Errorf("veloflux_xdp_attached: %v, want one series per interface", got)
	}

	// eth1 cannot be read: the scrape still succeeds with eth0 and
	// without eth1, and the registry reports the error (promhttp counts it
	// in promhttp_metric_handler_errors_total).
	readErr := "read the XDP state of interface eth1: netlink receive: operation not permitted"
	xdp.set([]XDPAttachment{{Interface: "eth0", Mode: "native", Attached: true}}, errors.New(readErr))
	e = scrape(t, srv.URL)
	e.want(t, 1, "veloflux_xdp_attached", "interface", "eth0", "mode", "native")
	if got := e.family("veloflux_xdp_attached"); len(got) != 1 {
		t.Errorf("veloflux_xdp_attached after a failed read of eth1: %v, want eth0 only", got)
	}
	if _, err := m.Registry().Gather(); err == nil || !strings.Contains(err.Error(), readErr) {
		t.Errorf("Gather after a failed read of eth1: %v, want the read error", err)
	}

	if n := xdp.callCount(); n != 4 {
		t.Errorf("XDP asked %d times in three scrapes and a Gather, want 4", n)
	}
}

func TestXDPAttachedAbsentWithoutSource(t *testing.T) {
	_, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}})
	scrape(t, srv.URL).wantAbsent(t, "veloflux_xdp_attached", "veloflux_proxy_listener_up", "veloflux_proxy_draining")
}

// TestProxyListeners: the listener gauges exist only once a proxy is set,
// report 0 for a listener that does not serve, and go with the proxy.
func TestProxyListeners(t *testing.T) {
	m, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}})
	scrape(t, srv.URL).wantAbsent(t, "veloflux_proxy_listener_up", "veloflux_proxy_draining")

	var mu sync.Mutex
	st := ProxyState{Listeners: []ProxyListener{{Role: "http", Serving: true}, {Role: "https", Serving: true}}}
	m.SetProxy(func() ProxyState {
		mu.Lock()
		defer mu.Unlock()
		return ProxyState{Listeners: slices.Clone(st.Listeners), Draining: st.Draining}
	})
	e := scrape(t, srv.URL)
	e.want(t, 1, "veloflux_proxy_listener_up", "role", "http")
	e.want(t, 1, "veloflux_proxy_listener_up", "role", "https")
	e.want(t, 0, "veloflux_proxy_draining")

	// The https listener failed (bind: permission denied, say).
	mu.Lock()
	st.Listeners[1].Serving = false
	mu.Unlock()
	e = scrape(t, srv.URL)
	e.want(t, 1, "veloflux_proxy_listener_up", "role", "http")
	e.want(t, 0, "veloflux_proxy_listener_up", "role", "https")
	e.want(t, 0, "veloflux_proxy_draining")

	// Drained: every listener closed on purpose.
	mu.Lock()
	st = ProxyState{Listeners: []ProxyListener{{Role: "http"}, {Role: "https"}}, Draining: true}
	mu.Unlock()
	e = scrape(t, srv.URL)
	e.want(t, 0, "veloflux_proxy_listener_up", "role", "http")
	e.want(t, 0, "veloflux_proxy_listener_up", "role", "https")
	e.want(t, 1, "veloflux_proxy_draining")

	m.SetProxy(nil)
	scrape(t, srv.URL).wantAbsent(t, "veloflux_proxy_listener_up", "veloflux_proxy_draining")
}

// TestObserveReconcile: both results exist before any reconcile, the
// counters move with each outcome, and the last success's timestamp moves
// only on a success, and only forward.
func TestObserveReconcile(t *testing.T) {
	m, srv := newTest(t, Options{Source: &fakeSource{c: fixture()}})
	e := scrape(t, srv.URL)
	e.want(t, 0, "veloflux_reconcile_total", "result", "success")
	e.want(t, 0, "veloflux_reconcile_total", "result", "failure")
	e.want(t, 0, "veloflux_reconcile_warnings_total")
	e.want(t, 0, "veloflux_reconcile_last_success_timestamp_seconds")
	for name, typ := range map[string]string{
		"veloflux_reconcile_total":                          "counter",
		"veloflux_reconcile_warnings_total":                 "counter",
		"veloflux_reconcile_last_success_timestamp_seconds": "gauge",
	} {
		if e.types[name] != typ {
			t.Errorf("TYPE of %s = %q, want %s", name, e.types[name], typ)
		}
	}

	t0 := time.Date(2026, 11, 27, 6, 0, 0, 500e6, time.UTC)
	m.ObserveReconcile(true, 0, t0)
	e = scrape(t, srv.URL)
	e.want(t, 1, "veloflux_reconcile_total", "result", "success")
	e.want(t, 0, "veloflux_reconcile_total", "result", "failure")
	e.want(t, float64(t0.UnixNano())/1e9, "veloflux_reconcile_last_success_timestamp_seconds")

	// A failure with warnings: the timestamp stays.
	m.ObserveReconcile(false, 2, t0.Add(30*time.Second))
	e = scrape(t, srv.URL)
	e.want(t, 1, "veloflux_reconcile_total", "result", "success")
	e.want(t, 1, "veloflux_reconcile_total", "result", "failure")
	e.want(t, 2, "veloflux_reconcile_warnings_total")
	e.want(t, float64(t0.UnixNano())/1e9, "veloflux_reconcile_last_success_timestamp_seconds")

	// A later success moves it; one that ended earlier (it raced the
	// later one to report) does not move it back.
	t1 := t0.Add(time.Minute)
	m.ObserveReconcile(true, 1, t1)
	m.ObserveReconcile(true, 0, t1.Add(-time.Second))
	e = scrape(t, srv.URL)
	e.want(t, 3, "veloflux_reconcile_total", "result", "success")
	e.want(t, 3, "veloflux_reconcile_warnings_total")
	e.want(t, float64(t1.UnixNano())/1e9, "veloflux_reconcile_last_success_timestamp_seconds")
}

// TestStateLint lints the new families in a pedantic registry, which also
// checks that everything collected was described.
func TestStateLint(t *testing.T) {
	c := newStateCollector(func() ([]XDPAttachment, error) {
		return []XDPAttachment{{Interface: "eth0", Mode: "native", Attached: true}}, nil
	})
	c.setProxy(func() ProxyState {
		return ProxyState{Listeners: []ProxyListener{{Role: "http", Serving: true}}}
	})
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint (state): %s: %s", p.Metric, p.Text)
	}
	const want = `
# HELP veloflux_proxy_draining 1 once the L7 proxy was told to drain (POST /api/system/drain), which closes its listeners on purpose; else 0. Present only when the proxy is enabled.
# TYPE veloflux_proxy_draining gauge
veloflux_proxy_draining 0
# HELP veloflux_proxy_listener_up Whether the L7 proxy's listener is open and accepting connections (1) or not (0: it could not be opened, failed, or the proxy drained). Present only when the proxy is enabled.
# TYPE veloflux_proxy_listener_up gauge
veloflux_proxy_listener_up{role="http"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "veloflux_proxy_listener_up", "veloflux_proxy_draining"); err != nil {
		t.Error(err)
	}

	r := newReconcileMetrics()
	r.observe(true, 1, time.Now())
	for _, col := range r.collectors() {
		problems, err := testutil.CollectAndLint(col)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("lint (reconcile): %s: %s", p.Metric, p.Text)
		}
	}
}
