// Package metrics exposes the agent's Prometheus metrics, served on :8080.
//
// The data-plane counters already live, cumulative, in the BPF maps, so they
// are not mirrored into client_golang Counters. Mirroring would need a poll
// loop, would lag the maps by up to one poll period and would keep a second
// copy of every series in memory. Instead a custom Collector reads the maps
// once per scrape through snapshot.CounterSource and emits const metrics: every
// scrape shows exactly what the maps held at that moment, a VIP or backend
// that was removed disappears on the next scrape instead of lingering, and an
// agent nobody scrapes does no metrics work at all.
//
// The agent's own state (XDP attachment, the L7 proxy's listeners) is asked
// for at scrape time the same way. Only events that happen in the agent
// itself (health-check probes, config reloads, reconciles) are recorded in
// ordinary client_golang metrics.
//
// Everything is registered on a private prometheus.Registry rather than the
// global default one, so two Metrics (for example in parallel tests) never
// collide and other packages contribute metrics only when they are handed
// Registry() explicitly.
//
// Families, all prefixed veloflux_:
//
//	vip_packets_total{vip}                  counter  data plane, per VIP
//	vip_bytes_total{vip}                    counter
//	vip_new_flows_total{vip}                counter
//	vip_drops_total{vip}                    counter
//	vip_info{vip,pool,mode}                 gauge=1  joins vip to its pool and mode
//	backend_packets_total{pool,backend}     counter  data plane, per pool member
//	backend_bytes_total{pool,backend}       counter
//	backend_up{pool,backend}                gauge    1 serving, 0 not
//	backend_check_latency_seconds{pool,backend} gauge last probe's latency
//	xdp_verdicts_total{verdict}             counter  packets per XDP verdict
//	packets_total{reason,verdict}           counter  packets per reason
//	drops_total{reason}                     counter  drop-verdict reasons only
//	scrape_errors_total                     counter  failed data-plane reads
//	health_check_duration_seconds{pool,result} histogram
//	config_reloads_total{result}            counter
//	reconcile_total{result}                 counter  map reconciles
//	reconcile_warnings_total                counter  problems reconciles reported
//	reconcile_last_success_timestamp_seconds gauge   0 = none since start
//	xdp_attached{interface,mode}            gauge    1 attached, 0 not (asked at scrape)
//	proxy_listener_up{role}                 gauge    1 serving, 0 not (proxy enabled)
//	proxy_draining                          gauge    1 after a drain (proxy enabled)
//	ws_clients{channel}                     gauge    WebSocket subscribers
//	bgp_peer_up{peer}                       gauge    1 session established (bgp section only)
//	bgp_peer_transitions_total{peer}        counter  session went up or down
//	bgp_announced{vip}                      gauge    1 this node announces the VIP address
//	vip_ring_fingerprint{vip}               gauge    hash of the installed Maglev table
//	build_info{version,goversion}           gauge=1
//
// plus the standard go_* and process_* collectors and the promhttp_* handler
// metrics.
//
// Typical use:
//
//	m := metrics.New(metrics.Options{Source: dp, Version: version, Health: healthView})
//	checker := health.New(logger, health.WithObserver(m.ObserveHealthCheck))
//	mux.Handle("/metrics", m.Handler())
package metrics

import (
	"net/http"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/veloflux/veloflux/agent/snapshot"
)

// Values of the result label of veloflux_health_check_duration_seconds,
// veloflux_config_reloads_total and veloflux_reconcile_total.
const (
	ResultSuccess = "success"
	ResultFailure = "failure"
)

// healthCheckBuckets cover probe durations from 100µs (a TCP connect on the
// same host) to 5s (the longest sensible check timeout) in 1-2.5-5 steps.
// Probes that time out beyond 5s still land in +Inf and are counted.
var healthCheckBuckets = []float64{
	0.0001, 0.00025, 0.0005,
	0.001, 0.0025, 0.005,
	0.01, 0.025, 0.05,
	0.1, 0.25, 0.5,
	1, 2.5, 5,
}

// Options configures New.
type Options struct {
	// Source is read once per scrape for the data-plane counter families.
	// It is required.
	Source snapshot.CounterSource
	// Version is reported by veloflux_build_info; empty becomes "unknown"
	// so the label never silently vanishes from joins.
	Version string
	// Health, if set, is called once per scrape and drives
	// veloflux_backend_up and veloflux_backend_check_latency_seconds. If
	// nil, veloflux_backend_up is derived from the data-plane state and
	// there is no latency gauge.
	Health func() []snapshot.BackendHealth
	// WSClients, if set, is called once per scrape and returns the number
	// of connected WebSocket clients per channel. If nil,
	// veloflux_ws_clients is absent until SetWSClients provides one.
	WSClients func() map[string]int
	// XDP, if set, is called once per scrape and reports every configured
	// interface for veloflux_xdp_attached. It must ask the kernel, not
	// recall what the agent attached. It may return the interfaces it
	// could read along with an error for the others. If nil,
	// veloflux_xdp_attached is absent.
	XDP func() ([]XDPAttachment, error)
	// BGP, if set, is called once per scrape; it returns false when no
	// speaker is configured, and the veloflux_bgp_* families are absent.
	BGP func() (BGPState, bool)
	// Rings, if set, is called once per scrape for
	// veloflux_vip_ring_fingerprint.
	Rings func() []VIPRing
	// NAT, if set, is called once per scrape for veloflux_nat_flows and
	// veloflux_nat_flows_capacity.
	NAT func() (NATState, error)
}

// Metrics owns the agent's private registry and the metrics the agent
// updates itself. It is safe for concurrent use.
type Metrics struct {
	reg          *prometheus.Registry
	handler      http.Handler
	healthChecks *prometheus.HistogramVec
	reloads      *prometheus.CounterVec
	reconciles   *reconcileMetrics
	ws           *wsCollector
	state        *stateCollector
}

// New builds the registry with every collector registered. It panics if
// opts.Source is nil: that is a wiring bug that should fail at startup, not
// on the first scrape.
func New(opts Options) *Metrics {
	if opts.Source == nil {
		panic("metrics: Options.Source is nil")
	}
	version := opts.Version
	if version == "" {
		version = "unknown"
	}

	reg := prometheus.NewRegistry()
	m := &Metrics{
		reg: reg,
		healthChecks: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "veloflux_health_check_duration_seconds",
			Help:    "Duration of active health-check probes, by pool and outcome.",
			Buckets: healthCheckBuckets,
		}, []string{"pool", "result"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veloflux_config_reloads_total",
			Help: "Configuration reloads attempted, by result.",
		}, []string{"result"}),
		reconciles: newReconcileMetrics(),
		ws:         newWSCollector(opts.WSClients),
		state:      newStateCollector(opts.XDP),
	}
	// Both results exist from the start, so increase() and alerts on
	// failures see a 0 → 1 step instead of a series appearing from nothing.
	m.reloads.WithLabelValues(ResultSuccess)
	m.reloads.WithLabelValues(ResultFailure)

	buildInfo := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "veloflux_build_info",
		Help: "Always 1; the labels identify the running agent build.",
		ConstLabels: prometheus.Labels{
			"version":   version,
			"goversion": runtime.Version(),
		},
	}, func() float64 { return 1 })

	reg.MustRegister(
		newDataplaneCollector(opts.Source, opts.Health),
		m.healthChecks,
		m.reloads,
		m.ws,
		m.state,
		newClusterCollector(opts.BGP, opts.Rings),
		newNATCollector(opts.NAT),
		buildInfo,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	reg.MustRegister(m.reconciles.collectors()...)

	// ContinueOnError: one bad series (say, a duplicate backend) must not
	// turn the whole scrape into a 500 and blank every dashboard. Such
	// errors are counted in promhttp_metric_handler_errors_total instead.
	// The handler is built once here, because InstrumentMetricHandler and
	// HandlerOpts.Registry register their own metrics on reg.
	m.handler = promhttp.InstrumentMetricHandler(reg, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		Registry:      reg,
	}))
	return m
}

// Handler serves the registry in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler { return m.handler }

// Registry returns the private registry, for tests and for packages that
// register their own collectors (the L7 proxy, for instance).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ObserveHealthCheck records one completed probe. Its signature matches
// health.Observer, so it can be passed to health.WithObserver directly.
//
// backend is deliberately not a label: a per-backend histogram would
// multiply its 18 series (15 buckets, +Inf, sum, count) by every backend of
// every pool. The last latency per backend is in
// veloflux_backend_check_latency_seconds instead.
func (m *Metrics) ObserveHealthCheck(pool, backend string, d time.Duration, ok bool) {
	result := ResultFailure
	if ok {
		result = ResultSuccess
	}
	m.healthChecks.WithLabelValues(pool, result).Observe(d.Seconds())
}

// ConfigReload counts one configuration reload; result is ResultSuccess or
// ResultFailure.
func (m *Metrics) ConfigReload(result string) {
	m.reloads.WithLabelValues(result).Inc()
}

// ObserveReconcile records one completed reconcile: whether it succeeded,
// how many warnings it reported, and when it ended (the last success's
// timestamp only moves forward).
func (m *Metrics) ObserveReconcile(ok bool, warnings int, end time.Time) {
	m.reconciles.observe(ok, warnings, end)
}

// SetProxy makes veloflux_proxy_listener_up and veloflux_proxy_draining
// report f's answer at every scrape, for when the L7 proxy starts after the
// metrics. nil removes both from later scrapes.
func (m *Metrics) SetProxy(f func() ProxyState) {
	m.state.setProxy(f)
}

// SetWSClients replaces the WSClients function given to New, for when the
// WebSocket hub starts after the metrics. nil removes veloflux_ws_clients
// from later scrapes.
func (m *Metrics) SetWSClients(f func() map[string]int) {
	m.ws.set(f)
}

// wsCollector reports the WebSocket client count per channel by asking the
// hub at scrape time, so the hub keeps no metrics state of its own.
type wsCollector struct {
	desc *prometheus.Desc
	// fn is swapped atomically because SetWSClients may race with a
	// scrape; a nil pointer means "no hub yet".
	fn atomic.Pointer[func() map[string]int]
}

func newWSCollector(f func() map[string]int) *wsCollector {
	c := &wsCollector{
		desc: prometheus.NewDesc("veloflux_ws_clients",
			"WebSocket clients currently connected, by channel.",
			[]string{"channel"}, nil),
	}
	c.set(f)
	return c
}

func (c *wsCollector) set(f func() map[string]int) {
	if f == nil {
		c.fn.Store(nil)
		return
	}
	c.fn.Store(&f)
}

func (c *wsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *wsCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.fn.Load()
	if f == nil {
		return
	}
	for channel, n := range (*f)() {
		emit(ch, c.desc, prometheus.GaugeValue, float64(n), channel)
	}
}

// emit sends one const metric, or an invalid metric carrying the error, so
// that a single bad label value (invalid UTF-8 from a map key, say) fails
// that series alone instead of panicking the whole collection as
// MustNewConstMetric would.
func emit(ch chan<- prometheus.Metric, desc *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) {
	m, err := prometheus.NewConstMetric(desc, t, v, labels...)
	if err != nil {
		m = prometheus.NewInvalidMetric(desc, err)
	}
	ch <- m
}
