package e2e

import (
	"encoding/json"
	"net/netip"
	"os/exec"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

// natConfig: nat VIPs for HTTP (IPv4 and IPv6) and the TCP echo service,
// with the SNAT address left to the balancer interface's own.
func (e *env) natConfig(portMax int) string {
	return e.render(cfgSpec{
		dataplane: []string{"nexthop: fib", "nat: {port_min: 20000, port_max: " + strconv.Itoa(portMax) + "}"},
		pools: []poolSpec{
			{name: "web", addrs: e.addrs4(), port: lab.HTTPPort},
			{name: "web6", addrs: e.addrs6(), port: lab.HTTPPort},
			{name: "echo", addrs: e.addrs4(), port: lab.TCPEchoPort, checkPort: lab.HTTPPort},
		},
		vips: []vipSpec{
			{addr: vip4, port: lab.HTTPPort, proto: "tcp", mode: "nat", pool: "web"},
			{addr: vip6, port: lab.HTTPPort, proto: "tcp", mode: "nat", pool: "web6"},
			{addr: vip4, port: lab.TCPEchoPort, proto: "tcp", mode: "nat", pool: "echo"},
		},
	})
}

// TestNATPlainBackends: nat VIPs in front of backends that hold no VIP and
// run no decapsulator; they see the balancer's address as the client.
//   - 300 requests spread evenly over the three backends, IPv4; IPv6 too;
//   - a reload under load loses no request;
//   - SIGTERM and a restart leave a live TCP stream unbroken;
//   - a backend going down takes no new request and fails none.
func TestNATPlainBackends(t *testing.T) {
	base := agenttest.NewEnv(t, lab.Options{Backends: 3, VIPs: []netip.Addr{vip4, vip6}, PlainBackends: true, Prefix: "vfnate"}, BinaryEnv)
	e := &env{t: t, lab: base.Lab, bin: base.Bin, dir: base.Dir, pin: base.Pin, state: base.State, cfg: base.Cfg}
	e.http = newHTTPClient(e.lab.Client, 5*time.Second)
	// bpf_fib_lookup answers only where forwarding is on.
	for _, k := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
		if err := setSysctl(e.lab.Balancer, k, "1"); err != nil {
			t.Fatal(err)
		}
	}
	e.writeConfig(e.natConfig(29999))
	a := e.startAgent()
	ready := e.waitServing(vipURL(vip4), []int{0, 1, 2}, 15*time.Second)
	t.Logf("all 3 plain backends served through the nat VIP %s after %s", vip4, ready.Round(time.Millisecond))

	tl := load(t.Context(), e.http, vipURL(vip4), 300, 0, 60*time.Second, nil)
	t.Logf("nat load: %s", tl)
	if tl.n != 300 || tl.fails != 0 {
		t.Errorf("want 300 successful requests, got %s", tl)
	}
	for _, b := range e.lab.Backends {
		if s := tl.share(b.Name); s < 0.2 || s > 0.47 {
			t.Errorf("%s took %.1f%% of 300 requests, want about a third (20..47)", b.Name, 100*s)
		}
	}

	e.waitServing(vipURL(vip6), []int{0, 1, 2}, 10*time.Second)
	tl6 := load(t.Context(), e.http, vipURL(vip6), 60, 0, 30*time.Second, nil)
	t.Logf("nat load over IPv6: %s", tl6)
	if tl6.n != 60 || tl6.fails != 0 || len(tl6.counts) != 3 {
		t.Errorf("want 60 successful IPv6 requests over all 3 backends, got %s", tl6)
	}

	echoVIP := netip.AddrPortFrom(vip4, lab.TCPEchoPort)
	stream := startEchoStream(t, e.lab.Client, echoVIP, 100*time.Millisecond, 60*time.Second)
	waitEchoes(t, stream, 3, 5*time.Second)

	// A reload under load: a new port range, no request lost.
	var done atomic.Int64
	loadc := make(chan tally, 1)
	go func() {
		loadc <- load(t.Context(), e.http, vipURL(vip4), 150, 5*time.Millisecond, 40*time.Second, &done)
	}()
	for deadline := time.Now().Add(20 * time.Second); done.Load() < 40; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d requests done in 20s before the reload", done.Load())
		}
	}
	e.writeConfig(e.natConfig(28000))
	a.Signal(syscall.SIGHUP)
	e.waitNATPortMax(28000, 10*time.Second)
	during := <-loadc
	t.Logf("load across the reload: %s", during)
	if during.n != 150 || during.fails != 0 {
		t.Errorf("want 150 successful requests across the reload, got %s", during)
	}

	// SIGTERM and restart: the nat tables are pinned, the stream goes on.
	before := stream.echoes.Load()
	if code := a.Stop(); code != 0 {
		t.Fatalf("agent exited with code %d on SIGTERM, want 0", code)
	}
	waitEchoes(t, stream, before+5, 3*time.Second)
	x, err := e.xdpOnBalancer()
	if err != nil || x == nil {
		t.Fatalf("XDP on the balancer after SIGTERM: %+v, %v", x, err)
	}
	e.startAgent() // stopped by the env's cleanup
	e.waitXDPSwap(x.ProgId, 10*time.Second)
	waitEchoes(t, stream, stream.echoes.Load()+10, 5*time.Second)
	if err := stream.failed(); err != nil {
		t.Fatalf("echo stream broke across the restart: %v", err)
	}
	flow := e.natFlowOf(stream.local)
	e.checkNATMetrics()
	t.Logf("echo stream %s survived the restart: %d lines, translated as %s -> %s", stream.local,
		stream.echoes.Load(), flow.SNAT, flow.Real)

	// A backend goes down (not the stream's): it takes no new request and
	// none fails.
	down := (e.backendIndex(flow.Real.Addr()) + 1) % len(e.lab.Backends)
	if err := e.lab.StopBackend(down); err != nil {
		t.Fatal(err)
	}
	downAddr := e.lab.Backends[down].Addr4
	e.waitReals(e.lab.Backends[down].Name+" down", 10*time.Second, func(r map[netip.Addr]dataplane.Real) bool {
		return r[downAddr].State == dataplane.RealDown
	})
	after := load(t.Context(), e.http, vipURL(vip4), 60, 0, 30*time.Second, nil)
	t.Logf("load with %s down: %s", e.lab.Backends[down].Name, after)
	if after.n != 60 || after.fails != 0 || after.counts[e.lab.Backends[down].Name] != 0 {
		t.Errorf("want 60 successful requests, none to %s, got %s", e.lab.Backends[down].Name, after)
	}
	if err := stream.stop(); err != nil {
		t.Errorf("echo stream: %v", err)
	}
	e.checkNATDumpByName()
	c := e.counters()
	t.Logf("data plane counters: %v", c)
	for _, r := range []string{"tx_nat", "tx_nat_reply"} {
		if c[r] == 0 {
			t.Errorf("%s is 0 after requests through nat VIPs", r)
		}
	}
	for _, r := range []string{"drop_no_route", "drop_nat_no_port", "drop_nat_unconfigured", "tx_dsr", "tx_ipip"} {
		if c[r] != 0 {
			t.Errorf("%s is %d", r, c[r])
		}
	}
}

// waitNATPortMax polls the pinned settings until the nat port range ends
// at max (a reload was applied).
func (e *env) waitNATPortMax(max uint16, timeout time.Duration) {
	e.t.Helper()
	var last dataplane.Settings
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		e.checkAgent()
		dp, err := dataplane.OpenPinned(e.pin)
		if err != nil {
			continue
		}
		last, err = dp.Settings()
		dp.Close()
		if err == nil && last.NAT.PortMax == max {
			return
		}
	}
	e.t.Fatalf("nat port_max not %d within %s (settings %+v)", max, timeout, last)
}

// natFlowOf finds the nat flow of a client address and port in the pins.
func (e *env) natFlowOf(client netip.AddrPort) dataplane.NATFlow {
	e.t.Helper()
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		e.t.Fatal(err)
	}
	defer dp.Close()
	flows, err := dp.NATFlows(0)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, f := range flows {
		if f.Client == client {
			return f
		}
	}
	e.t.Fatalf("no nat flow for %s among %d", client, len(flows))
	return dataplane.NATFlow{}
}

// checkNATDumpByName: `bpftool map dump` of a pinned nat table shows every
// field by its name (the maps carry their BTF), as an operator reads it.
func (e *env) checkNATDumpByName() {
	e.t.Helper()
	for _, table := range []string{"vf_nat_fwd", "vf_nat_rev"} {
		out, err := exec.Command("bpftool", "-j", "map", "dump", "pinned", e.pin+"/"+table).Output()
		if err != nil {
			e.t.Fatalf("bpftool map dump %s: %v", table, err)
		}
		var entries []struct {
			Formatted struct {
				Key   map[string]any `json:"key"`
				Value map[string]any `json:"value"`
			} `json:"formatted"`
		}
		if err := json.Unmarshal(out, &entries); err != nil {
			e.t.Fatalf("bpftool map dump %s: %v\n%s", table, err, out)
		}
		if len(entries) == 0 {
			e.t.Fatalf("bpftool map dump %s: no entries after nat traffic", table)
		}
		f := entries[0].Formatted
		for _, k := range []string{"src", "dst", "sport", "dport", "proto", "family"} {
			if _, ok := f.Key[k]; !ok {
				e.t.Errorf("bpftool map dump %s: key without field %q: %v", table, k, f.Key)
			}
		}
		for _, k := range []string{"peer", "last_seen", "real_id", "vip_id", "closing"} {
			if _, ok := f.Value[k]; !ok {
				e.t.Errorf("bpftool map dump %s: value without field %q: %v", table, k, f.Value)
			}
		}
	}
}

// checkNATMetrics: /metrics reports the nat flows in use (the live stream's
// at least) and the tables' capacity.
func (e *env) checkNATMetrics() {
	e.t.Helper()
	var fams map[string]*dto.MetricFamily
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if fams, err = e.scrapeAgent(); err == nil {
			break
		}
	}
	if err != nil {
		e.t.Fatalf("scrape the agent: %v", err)
	}
	gauge := func(name string) float64 {
		f := fams[name]
		if f == nil || len(f.GetMetric()) != 1 {
			e.t.Fatalf("%s: not one series in the scrape: %v", name, f)
		}
		return f.GetMetric()[0].GetGauge().GetValue()
	}
	flows, capacity := gauge("veloflux_nat_flows"), gauge("veloflux_nat_flows_capacity")
	e.t.Logf("veloflux_nat_flows %v of veloflux_nat_flows_capacity %v", flows, capacity)
	if flows < 1 || capacity != 262144 {
		e.t.Errorf("veloflux_nat_flows %v (want >= 1, the stream), capacity %v (want the default 262144)", flows, capacity)
	}
}
