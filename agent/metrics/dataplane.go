package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/veloflux/veloflux/agent/snapshot"
)

// Data-plane state and XDP verdict values as snapshot.Counters reports them.
const (
	stateUp       = "up"
	stateDraining = "draining"
	verdictDrop   = "drop"
)

// dataplaneCollector turns one read of the BPF maps into const metrics. It
// holds no copy of the counters: each Collect reads the Source afresh, so
// the values are as current as the maps and series of removed VIPs and
// backends vanish with them.
type dataplaneCollector struct {
	source snapshot.CounterSource
	health func() []snapshot.BackendHealth

	// scrapeErrors is the agent's own count of failed reads. It is a
	// plain atomic emitted by Collect, rather than a registered Counter,
	// so that the scrape in which a read fails already shows the
	// increment: the registry collects collectors concurrently and a
	// separate Counter could be gathered before the failure was counted.
	scrapeErrors atomic.Uint64

	vipPackets, vipBytes, vipNewFlows, vipDrops, vipInfo    *prometheus.Desc
	backendPackets, backendBytes, backendUp, backendLatency *prometheus.Desc
	verdicts, packets, drops, scrapeErrorsDesc              *prometheus.Desc
}

func newDataplaneCollector(source snapshot.CounterSource, health func() []snapshot.BackendHealth) *dataplaneCollector {
	vip := []string{"vip"}
	backend := []string{"pool", "backend"}
	// Help texts state the quirks an operator would otherwise trip over
	// in a query, e.g. summing backend counters across pools.
	return &dataplaneCollector{
		source: source,
		health: health,

		vipPackets: prometheus.NewDesc("veloflux_vip_packets_total",
			"Packets the data plane matched to the VIP.", vip, nil),
		vipBytes: prometheus.NewDesc("veloflux_vip_bytes_total",
			"Bytes the data plane matched to the VIP.", vip, nil),
		vipNewFlows: prometheus.NewDesc("veloflux_vip_new_flows_total",
			"Flows the data plane scheduled to a backend for the VIP for the first time.", vip, nil),
		vipDrops: prometheus.NewDesc("veloflux_vip_drops_total",
			"Packets to the VIP that the data plane dropped.", vip, nil),
		vipInfo: prometheus.NewDesc("veloflux_vip_info",
			"Always 1; maps each vip label to its pool and forwarding mode for joins.",
			[]string{"vip", "pool", "mode"}, nil),

		backendPackets: prometheus.NewDesc("veloflux_backend_packets_total",
			"Packets the data plane forwarded to the backend. Counted per real address, so a real in several pools shows the same value in each.",
			backend, nil),
		backendBytes: prometheus.NewDesc("veloflux_backend_bytes_total",
			"Bytes the data plane forwarded to the backend. Counted per real address, so a real in several pools shows the same value in each.",
			backend, nil),
		backendUp: prometheus.NewDesc("veloflux_backend_up",
			"Whether the backend may take traffic (1) or not (0), from the active health check when one runs, else from the data-plane state (up and draining count as 1).",
			backend, nil),
		backendLatency: prometheus.NewDesc("veloflux_backend_check_latency_seconds",
			"Duration of the backend's most recent completed health-check probe.",
			backend, nil),

		verdicts: prometheus.NewDesc("veloflux_xdp_verdicts_total",
			"Packets the XDP program returned with each verdict.",
			[]string{"verdict"}, nil),
		packets: prometheus.NewDesc("veloflux_packets_total",
			"Packets the XDP program handled, by the reason for its verdict.",
			[]string{"reason", "verdict"}, nil),
		drops: prometheus.NewDesc("veloflux_drops_total",
			"Packets the XDP program dropped, by reason.",
			[]string{"reason"}, nil),
		scrapeErrorsDesc: prometheus.NewDesc("veloflux_scrape_errors_total",
			"Scrapes in which reading the data-plane counters failed; the data-plane counter families are absent from those scrapes.",
			nil, nil),
	}
}

// Describe sends every Desc, including those that a given scrape may not
// emit (latency without Health, all counters after a failed read), so the
// registry can check the collector against the other collectors up front.
func (c *dataplaneCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.vipPackets, c.vipBytes, c.vipNewFlows, c.vipDrops, c.vipInfo,
		c.backendPackets, c.backendBytes, c.backendUp, c.backendLatency,
		c.verdicts, c.packets, c.drops, c.scrapeErrorsDesc,
	} {
		ch <- d
	}
}

// Collect reads the Source exactly once. On a failed read it emits the
// error count and whatever does not depend on the maps (the health view),
// and leaves the counter families out: emitting zeros would look like a
// counter reset to Prometheus, while absent series are simply a gap.
func (c *dataplaneCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := c.source.Counters()
	if err != nil {
		c.scrapeErrors.Add(1)
	}
	emit(ch, c.scrapeErrorsDesc, prometheus.CounterValue, float64(c.scrapeErrors.Load()))

	if c.health != nil {
		c.collectHealth(ch, c.health())
	}
	if err != nil {
		return
	}
	c.collectVIPs(ch, counters.VIPs)
	c.collectBackends(ch, counters.Backends)
	c.collectReasons(ch, counters.Reasons)
}

func (c *dataplaneCollector) collectVIPs(ch chan<- prometheus.Metric, vips []snapshot.VIPCounters) {
	for i := range vips {
		v := &vips[i]
		emit(ch, c.vipPackets, prometheus.CounterValue, float64(v.Packets), v.VIP)
		emit(ch, c.vipBytes, prometheus.CounterValue, float64(v.Bytes), v.VIP)
		emit(ch, c.vipNewFlows, prometheus.CounterValue, float64(v.NewFlows), v.VIP)
		emit(ch, c.vipDrops, prometheus.CounterValue, float64(v.Drops), v.VIP)
		emit(ch, c.vipInfo, prometheus.GaugeValue, 1, v.VIP, v.Pool, v.Mode)
	}
}

func (c *dataplaneCollector) collectBackends(ch chan<- prometheus.Metric, backends []snapshot.BackendCounters) {
	for i := range backends {
		b := &backends[i]
		emit(ch, c.backendPackets, prometheus.CounterValue, float64(b.Packets), b.Pool, b.Backend)
		emit(ch, c.backendBytes, prometheus.CounterValue, float64(b.Bytes), b.Pool, b.Backend)
		// With a health checker its verdict is authoritative (the data
		// plane only follows it after a reconcile), so the data-plane
		// state is used only when there is no checker.
		if c.health == nil {
			emit(ch, c.backendUp, prometheus.GaugeValue, stateValue(b.State), b.Pool, b.Backend)
		}
	}
}

// stateValue maps a data-plane backend state to veloflux_backend_up. A
// draining backend still serves its established flows, so it counts as up;
// any state this package does not know counts as down.
func stateValue(state string) float64 {
	if state == stateUp || state == stateDraining {
		return 1
	}
	return 0
}

func (c *dataplaneCollector) collectHealth(ch chan<- prometheus.Metric, health []snapshot.BackendHealth) {
	for i := range health {
		h := &health[i]
		up := 0.0
		if h.Healthy {
			up = 1
		}
		emit(ch, c.backendUp, prometheus.GaugeValue, up, h.Pool, h.Backend)
		// A backend that was never probed (check type none, or just
		// added) has no latency; reporting 0 would read as "very fast".
		if !h.LastCheck.IsZero() {
			emit(ch, c.backendLatency, prometheus.GaugeValue, h.Latency.Seconds(), h.Pool, h.Backend)
		}
	}
}

func (c *dataplaneCollector) collectReasons(ch chan<- prometheus.Metric, reasons []snapshot.ReasonCounters) {
	// Verdicts are summed here rather than left to PromQL so dashboards
	// and alerts on pass/drop/tx need no knowledge of the reason names,
	// which grow with the data plane. Only verdicts that occur in the read
	// are emitted: there are a handful, so a slice beats a map.
	type verdictSum struct {
		verdict string
		packets uint64
	}
	sums := make([]verdictSum, 0, 4)
	for i := range reasons {
		r := &reasons[i]
		emit(ch, c.packets, prometheus.CounterValue, float64(r.Packets), r.Reason, r.Verdict)
		if r.Verdict == verdictDrop {
			emit(ch, c.drops, prometheus.CounterValue, float64(r.Packets), r.Reason)
		}
		j := 0
		for j < len(sums) && sums[j].verdict != r.Verdict {
			j++
		}
		if j == len(sums) {
			sums = append(sums, verdictSum{verdict: r.Verdict})
		}
		sums[j].packets += r.Packets
	}
	for _, s := range sums {
		emit(ch, c.verdicts, prometheus.CounterValue, float64(s.packets), s.verdict)
	}
}
