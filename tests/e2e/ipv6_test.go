package e2e

import (
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// TestIPv6DSR: an IPv6 dsr VIP over the backends' IPv6 addresses (their
// MACs resolved by NDP on the balancer interface). 150 HTTP requests to
// [VIP]:80 all succeed and reach every backend.
func TestIPv6DSR(t *testing.T) {
	e := newEnv(t, 3, vip6)
	e.writeConfig(e.render(cfgSpec{
		pools: []poolSpec{{name: "web6", addrs: e.addrs6(), port: 80}},
		vips:  []vipSpec{{addr: vip6, port: 80, proto: "tcp", mode: "dsr", pool: "web6"}},
	}))
	e.startAgent()
	ready := e.waitServing(vipURL(vip6), []int{0, 1, 2}, 10*time.Second)
	t.Logf("all 3 backends served through %s %s after the agent started", vipURL(vip6), ready.Round(time.Millisecond))

	tl := load(t.Context(), e.http, vipURL(vip6), 150, 0, 30*time.Second, nil)
	t.Logf("IPv6 dsr load: %s", tl)
	if tl.n != 150 || tl.fails != 0 || len(tl.counts) != 3 {
		t.Errorf("want 150 successful requests over all 3 backends, got %s", tl)
	}

	// The reals are the backends' IPv6 addresses with their MACs.
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	reals, err := dp.Reals()
	if err != nil {
		t.Fatal(err)
	}
	for id, r := range reals {
		i := e.backendIndex(r.Addr)
		if i < 0 || r.Addr != e.lab.Backends[i].Addr6 {
			t.Errorf("real %d is %v, not a backend's IPv6 address", id, r)
			continue
		}
		if r.MAC.String() != e.lab.Backends[i].MAC.String() || r.State != dataplane.RealUp {
			t.Errorf("real %d (%s): MAC %s state %s, want %s up", id, r.Addr, r.MAC, r.State, e.lab.Backends[i].MAC)
		}
	}
	if len(reals) != 3 {
		t.Errorf("%d reals installed, want 3: %v", len(reals), reals)
	}
	c := e.counters()
	t.Logf("data plane counters: %v", c)
	if c["tx_dsr"] == 0 {
		t.Errorf("tx_dsr is 0 after requests through an IPv6 dsr VIP")
	}
}
