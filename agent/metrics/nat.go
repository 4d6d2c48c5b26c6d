package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// NATState is the nat tables' occupancy at scrape time. Allocation
// failures are a reason counter like every drop:
// veloflux_drops_total{reason="drop_nat_no_port"}.
type NATState struct {
	Flows    int // live nat flows (entries in use)
	Capacity int // flows each nat table holds
}

// natCollector reports veloflux_nat_flows and veloflux_nat_flows_capacity.
type natCollector struct {
	read         func() (NATState, error)
	errors       atomic.Uint64
	flows, limit *prometheus.Desc
	errorsDesc   *prometheus.Desc
}

func newNATCollector(read func() (NATState, error)) *natCollector {
	return &natCollector{
		read: read,
		flows: prometheus.NewDesc("veloflux_nat_flows",
			"Live flows in the nat tables (entries in use): flows of nat VIPs whose idle timeout has not run out.", nil, nil),
		limit: prometheus.NewDesc("veloflux_nat_flows_capacity",
			"Flows each nat table holds (dataplane.nat.table_size); beyond it the least recently used flow is evicted.", nil, nil),
		errorsDesc: prometheus.NewDesc("veloflux_nat_scrape_errors_total",
			"Scrapes in which reading the nat tables failed; veloflux_nat_flows is absent from those scrapes.", nil, nil),
	}
}

func (c *natCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.flows
	ch <- c.limit
	ch <- c.errorsDesc
}

func (c *natCollector) Collect(ch chan<- prometheus.Metric) {
	if c.read == nil {
		return
	}
	st, err := c.read()
	if err != nil {
		c.errors.Add(1)
	}
	emit(ch, c.errorsDesc, prometheus.CounterValue, float64(c.errors.Load()))
	if err != nil {
		return
	}
	emit(ch, c.flows, prometheus.GaugeValue, float64(st.Flows))
	emit(ch, c.limit, prometheus.GaugeValue, float64(st.Capacity))
}
