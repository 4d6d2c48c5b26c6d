package metrics

import (
	"errors"
	"testing"
)

// The nat gauges follow the tables at every scrape; a failed read leaves
// them out and counts the failure.
func TestNATGauges(t *testing.T) {
	st, err := NATState{Flows: 7, Capacity: 1024}, error(nil)
	_, srv := newTest(t, Options{Source: &fakeSource{}, NAT: func() (NATState, error) { return st, err }})
	e := scrape(t, srv.URL)
	e.want(t, 7, "veloflux_nat_flows")
	e.want(t, 1024, "veloflux_nat_flows_capacity")
	e.want(t, 0, "veloflux_nat_scrape_errors_total")

	st = NATState{Flows: 3, Capacity: 1024}
	scrape(t, srv.URL).want(t, 3, "veloflux_nat_flows")

	err = errors.New("map gone")
	e = scrape(t, srv.URL)
	e.wantAbsent(t, "veloflux_nat_flows")
	e.want(t, 1, "veloflux_nat_scrape_errors_total")
}
