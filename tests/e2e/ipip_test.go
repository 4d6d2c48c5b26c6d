package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// TestIPIPWithFIBNexthop: an ipip VIP with `nexthop: fib` and the balancer's
// address as the outer source. The balancer namespace forwards (the FIB
// helper answers only where forwarding is on) and reaches the backends
// on-link; each backend strips the tunnel with the XDP decapsulator (this
// kernel has no ipip module) and answers the client directly.
//   - HTTP requests to the VIP all succeed and reach every backend;
//   - every backend's decapsulator counted tunnel packets, and the balancer
//     counted tx_ipip and no encap/route drops.
func TestIPIPWithFIBNexthop(t *testing.T) {
	e := newEnv(t, 3, vip4)
	if err := setSysctl(e.lab.Balancer, "net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}

	decaps := make([]*dataplane.Decap, len(e.lab.Backends))
	for i, b := range e.lab.Backends {
		d, err := dataplane.LoadDecap(dataplane.DecapOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := d.Close(); err != nil {
				t.Errorf("close decap on %s: %v", b.Name, err)
			}
		})
		if err := d.SetLocals([]netip.Addr{b.Addr4}); err != nil {
			t.Fatal(err)
		}
		if err := b.Do(func() error { _, err := d.Attach(b.IfName, dataplane.XDPAuto); return err }); err != nil {
			t.Fatal(err)
		}
		decaps[i] = d
	}

	e.writeConfig(e.render(cfgSpec{
		dataplane: []string{"nexthop: fib", "encap_source_v4: " + e.lab.Balancer.Addr4.String()},
		pools:     []poolSpec{{name: "web", addrs: e.addrs4(), port: 80}},
		vips:      []vipSpec{{addr: vip4, port: 80, proto: "tcp", mode: "ipip", pool: "web"}},
	}))
	e.startAgent()
	ready := e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
	t.Logf("all 3 backends served through the ipip VIP %s after the agent started", ready.Round(time.Millisecond))

	tl := load(t.Context(), e.http, vipURL(vip4), 150, 0, 30*time.Second, nil)
	t.Logf("ipip load: %s", tl)
	if tl.n != 150 || tl.fails != 0 || len(tl.counts) != 3 {
		t.Errorf("want 150 successful requests over all 3 backends, got %s", tl)
	}
	for i, d := range decaps {
		st, err := d.Stats()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s decap: %+v", e.lab.Backends[i].Name, st)
		if st.IPIP4Packets == 0 {
			t.Errorf("%s: the decapsulator saw no tunnel packet", e.lab.Backends[i].Name)
		}
		if st.Dropped() != 0 {
			t.Errorf("%s: the decapsulator dropped %d tunnel packets", e.lab.Backends[i].Name, st.Dropped())
		}
	}
	c := e.counters()
	t.Logf("data plane counters: %v", c)
	if c["tx_ipip"] == 0 {
		t.Errorf("tx_ipip is 0 after requests through an ipip VIP")
	}
	if c["tx_dsr"] != 0 {
		t.Errorf("tx_dsr is %d with only an ipip VIP", c["tx_dsr"])
	}
	for _, r := range []string{"drop_encap", "drop_no_route"} {
		if c[r] != 0 {
			t.Errorf("%s is %d", r, c[r])
		}
	}
}
