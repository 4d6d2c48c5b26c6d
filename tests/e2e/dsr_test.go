package e2e

import (
	"math"
	"testing"
	"time"
)

// webConfig is one pool "web" of the given backends on :80 behind vip:80
// (dsr), plus vip:7000 for the TCP echo when echo is set.
func (e *env) webConfig(echo bool, idx ...int) string {
	c := cfgSpec{
		pools: []poolSpec{{name: "web", addrs: e.addrs4(idx...), port: 80}},
		vips:  []vipSpec{{addr: vip4, port: 80, proto: "tcp", mode: "dsr", pool: "web"}},
	}
	if echo {
		c.vips = append(c.vips, vipSpec{addr: vip4, port: 7000, proto: "tcp", mode: "dsr", pool: "web"})
	}
	return e.render(c)
}

// TestDSRSpreadsOverBackends: 300 HTTP requests to a dsr VIP, each over its
// own connection, all succeed and reach every backend with a share within
// 10 points of a third.
func TestDSRSpreadsOverBackends(t *testing.T) {
	e := newEnv(t, 3, vip4)
	e.writeConfig(e.webConfig(false))
	e.startAgent()
	ready := e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
	t.Logf("all 3 backends served through the VIP %s after the agent started", ready.Round(time.Millisecond))

	tl := load(t.Context(), e.http, vipURL(vip4), 300, 0, 60*time.Second, nil)
	t.Logf("dsr load: %s", tl)
	if tl.n != 300 || tl.fails != 0 {
		t.Fatalf("want 300 successful requests, got %s", tl)
	}
	for _, b := range e.lab.Backends {
		share := tl.share(b.Name)
		if math.Abs(share-1.0/3) > 0.10 {
			t.Errorf("%s got %.1f%% of the requests, want 33.3%% ± 10", b.Name, 100*share)
		}
	}
	c := e.counters()
	t.Logf("data plane counters: %v", c)
	if c["tx_dsr"] == 0 {
		t.Errorf("tx_dsr counter is 0 after 300 requests through a dsr VIP")
	}
}
