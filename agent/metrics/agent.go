package metrics

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// XDPAttachment is the kernel's answer, at one moment, to "is the balancer's
// program on this configured interface?".
type XDPAttachment struct {
	Interface string
	// Mode is the mode the program is attached in ("native", "generic",
	// "offload"; "multi" when programs are attached in several modes at
	// once), or the configured xdp_mode when it is not attached, so the
	// series of an interface keeps its identity when the program goes.
	Mode     string
	Attached bool
}

// ProxyListener is one listener the L7 proxy's configuration asks for.
type ProxyListener struct {
	Role    string // "http" or "https"
	Serving bool   // open and accepting connections
}

// ProxyState is what veloflux_proxy_listener_up and veloflux_proxy_draining
// report.
type ProxyState struct {
	Listeners []ProxyListener
	// Draining is set once the proxy was told to drain: its listeners are
	// closed on purpose.
	Draining bool
}

// stateCollector reports the agent's own health at scrape time: whether XDP
// is on every configured interface and whether the L7 proxy's listeners
// serve. Like the data-plane counters, these are asked for at each scrape
// rather than mirrored, so that a program detached or a listener lost behind
// the agent's back shows on the next scrape.
type stateCollector struct {
	xdp func() ([]XDPAttachment, error)
	// proxy is swapped atomically because the proxy starts after the
	// metrics and SetProxy may race with a scrape; nil means no proxy.
	proxy atomic.Pointer[func() ProxyState]

	xdpAttached, listenerUp, draining *prometheus.Desc
}

func newStateCollector(xdp func() ([]XDPAttachment, error)) *stateCollector {
	return &stateCollector{
		xdp: xdp,
		xdpAttached: prometheus.NewDesc("veloflux_xdp_attached",
			"Whether the balancer's XDP program is attached to the configured interface (1) or not (0), as the kernel reports it at scrape time. mode is the mode it is attached in, or the configured xdp_mode when it is not attached.",
			[]string{"interface", "mode"}, nil),
		listenerUp: prometheus.NewDesc("veloflux_proxy_listener_up",
			"Whether the L7 proxy's listener is open and accepting connections (1) or not (0: it could not be opened, failed, or the proxy drained). Present only when the proxy is enabled.",
			[]string{"role"}, nil),
		draining: prometheus.NewDesc("veloflux_proxy_draining",
			"1 once the L7 proxy was told to drain (POST /api/system/drain), which closes its listeners on purpose; else 0. Present only when the proxy is enabled.",
			nil, nil),
	}
}

func (c *stateCollector) setProxy(f func() ProxyState) {
	if f == nil {
		c.proxy.Store(nil)
		return
	}
	c.proxy.Store(&f)
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.xdpAttached
	ch <- c.listenerUp
	ch <- c.draining
}

// Collect asks for the attachments and the proxy's state once each. A failed
// read of the attachments becomes an invalid metric, which promhttp reports
// (promhttp_metric_handler_errors_total) while serving the rest: an unknown
// attachment must read neither as attached nor as detached.
func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	if c.xdp != nil {
		atts, err := c.xdp()
		for _, a := range atts {
			emit(ch, c.xdpAttached, prometheus.GaugeValue, boolValue(a.Attached), a.Interface, a.Mode)
		}
		if err != nil {
			ch <- prometheus.NewInvalidMetric(c.xdpAttached, err)
		}
	}
	if f := c.proxy.Load(); f != nil {
		st := (*f)()
		for _, l := range st.Listeners {
			emit(ch, c.listenerUp, prometheus.GaugeValue, boolValue(l.Serving), l.Role)
		}
		emit(ch, c.draining, prometheus.GaugeValue, boolValue(st.Draining))
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// reconcileMetrics counts reconciles. The last success is kept as an atomic
// (Unix nanoseconds) behind a GaugeFunc rather than in a Gauge, so that it
// only moves forward when two reconciles (the loop's and an API write's)
// report out of order.
type reconcileMetrics struct {
	total       *prometheus.CounterVec
	warnings    prometheus.Counter
	lastSuccess atomic.Int64
	lastGauge   prometheus.Collector
}

func newReconcileMetrics() *reconcileMetrics {
	r := &reconcileMetrics{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veloflux_reconcile_total",
			Help: "Reconciles of the BPF maps with the desired state, by result. The agent reconciles at least every 30s, and on every health verdict, configuration change and link-up.",
		}, []string{"result"}),
		warnings: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "veloflux_reconcile_warnings_total",
			Help: "Problems reconciles reported without failing (e.g. a dsr backend's MAC not resolved); a problem that persists is counted again at every reconcile.",
		}),
	}
	r.lastGauge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "veloflux_reconcile_last_success_timestamp_seconds",
		Help: "Unix time at which the last successful reconcile ended; 0 if none has succeeded since the agent started.",
	}, func() float64 { return float64(r.lastSuccess.Load()) / float64(time.Second) })
	// Both results exist from the start, as for config reloads.
	r.total.WithLabelValues(ResultSuccess)
	r.total.WithLabelValues(ResultFailure)
	return r
}

func (r *reconcileMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{r.total, r.warnings, r.lastGauge}
}

func (r *reconcileMetrics) observe(ok bool, warnings int, end time.Time) {
	result := ResultFailure
	if ok {
		result = ResultSuccess
	}
	r.total.WithLabelValues(result).Inc()
	if warnings > 0 {
		r.warnings.Add(float64(warnings))
	}
	if !ok {
		return
	}
	ns := end.UnixNano()
	for {
		cur := r.lastSuccess.Load()
		if ns <= cur || r.lastSuccess.CompareAndSwap(cur, ns) {
			return
		}
	}
}
