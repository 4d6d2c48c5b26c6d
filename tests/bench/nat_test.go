package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
	"github.com/veloflux/veloflux/tests/testenv"
)

// natSNATHost is the host byte of the balancer address VeloFlux's nat VIP
// translates to (10.X.0.4): an address of its own, like nftables' 10.X.0.3,
// so that neither meets the other's TIME_WAIT sockets on the backends.
const natSNATHost = 4

// natPeers are the two full-NAT balancers: both rewrite destination and
// source, keep per-flow state and forward the replies back.
var natPeers = []peer{
	{name: "veloflux-nat", title: "VeloFlux nat (XDP)", url: func(*env) string { return "http://" + vfVIP.String() + "/" },
		start: startVeloFluxNAT},
	{name: "nftables-dnat", title: "nftables DNAT+SNAT", url: func(*env) string { return "http://" + nftVIP.String() + "/" },
		start: startNFT},
}

// BenchmarkL4NAT compares VeloFlux's mode nat with nftables DNAT+SNAT, the
// like-for-like peer (both are full NAT), on new connections per second and
// CPU time per connection: wrk with Connection: close from the client
// namespace, the same lab and backends, rounds alternating the order. The
// measurements happen once, in the parent; run it with -benchtime 1x.
func BenchmarkL4NAT(b *testing.B) {
	testenv.RequireRoot(b, "build network namespaces")
	for _, tool := range []string{"wrk", "nft", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s is not installed (deploy/install-deps.sh bench installs wrk and nftables): %v", tool, err)
		}
	}
	ctx, stopSignals := signal.NotifyContext(b.Context(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()

	dir := b.TempDir()
	agentBin := agenttest.BuildAgent(b, agentEnv)
	l := lab.ForTest(b, lab.Options{Backends: 3, VIPs: []netip.Addr{vfVIP, nftVIP}, PlainBackends: true, Prefix: "vfnatb"})
	if err := l.StartBackendServers(ctx); err != nil {
		b.Fatal(err)
	}
	e := &env{tb: b, lab: l, dir: dir, agentBin: agentBin, pinPath: agenttest.MountBPFFS(b, dir)}
	b.Logf("setup: %s; %d CPUs; wrk %s; %d rounds", kernelRelease(), runtime.NumCPU(),
		strings.Join(wrkArgs("URL", true), " "), rounds)

	// Warm the Go servers up, and a reference without a balancer.
	direct, out, err := runWrk(ctx, l.Client, fmt.Sprintf("http://%s/", l.Backends[0].Addr4), true, 0)
	if err != nil {
		b.Fatalf("direct: %v\n%s", err, out)
	}
	results := map[string][]wrkResult{directName: {direct}}
	retries := 0
	for r := range rounds {
		for i := range natPeers {
			p := natPeers[(i+r)%len(natPeers)]
			url := p.url(e)
			stop, pid, err := p.start(ctx, e, url)
			if err != nil {
				b.Fatalf("round %d: start %s: %v", r+1, p.name, err)
			}
			res, out, err := runWrk(ctx, l.Client, url, true, pid)
			for err == nil && res.CPU.share(res.CPU.Foreign) > maxForeign && retries < maxRetries {
				retries++
				b.Logf("round %d %-13s %8.0f conn/s: other processes used %.0f%% of the CPUs; repeating (%d/%d)",
					r+1, p.name, res.ReqPerSec, res.CPU.share(res.CPU.Foreign), retries, maxRetries)
				res, out, err = runWrk(ctx, l.Client, url, true, pid)
			}
			if err == nil && res.errors()*100 > res.Requests {
				err = fmt.Errorf("%d errors in %d requests", res.errors(), res.Requests)
			}
			if err != nil {
				b.Fatalf("round %d, %s: %v\n%s", r+1, p.name, errors.Join(err, stop()), out)
			}
			results[p.name] = append(results[p.name], res)
			b.Logf("round %d %-13s %8.0f conn/s  p50 %-9v p99 %-9v errors %d  CPU %5.1f µs/conn, busy %3.0f%%, foreign %2.0f%%",
				r+1, p.name, res.ReqPerSec, res.P50, res.P99, res.errors(),
				float64(res.CPU.Busy.Microseconds())/float64(res.Requests), res.CPU.share(res.CPU.Busy), res.CPU.share(res.CPU.Foreign))
			if err := stop(); err != nil {
				b.Fatalf("round %d: stop %s: %v", r+1, p.name, err)
			}
		}
	}

	vf, nft := summarizeMode(results["veloflux-nat"]), summarizeMode(results["nftables-dnat"])
	ref := summarizeMode(results[directName])
	var paired []float64
	var pairedText []string
	for i := range min(len(results["veloflux-nat"]), len(results["nftables-dnat"])) {
		paired = append(paired, results["veloflux-nat"][i].ReqPerSec/results["nftables-dnat"][i].ReqPerSec)
		pairedText = append(pairedText, fmt.Sprintf("x%.2f", paired[i]))
	}
	b.Logf("\nnew connections/s, median of %d rounds (min-max), and CPU time per connection (all CPUs):\n"+
		"  veloflux-nat  %7.0f (%6.0f-%6.0f)  p50/p99 %5.2f/%5.2f ms  %6.1f µs (wrk %5.1f, backends %5.1f, agent %4.1f, ksoftirqd %4.1f)\n"+
		"  nftables-dnat %7.0f (%6.0f-%6.0f)  p50/p99 %5.2f/%5.2f ms  %6.1f µs (wrk %5.1f, backends %5.1f, ksoftirqd %4.1f)\n"+
		"  direct        %7.0f (one run)                           %6.1f µs\n"+
		"  VeloFlux / nftables: conn/s x%.2f (ratio of the medians), same round %s (median x%.2f); CPU per connection x%.2f",
		rounds,
		vf.rps, vf.rpsMin, vf.rpsMax, ms(vf.p50), ms(vf.p99), vf.cpuPerReq, vf.wrkPerReq, vf.testPerReq, vf.balPerReq, vf.softirqdPerReq,
		nft.rps, nft.rpsMin, nft.rpsMax, ms(nft.p50), ms(nft.p99), nft.cpuPerReq, nft.wrkPerReq, nft.testPerReq, nft.softirqdPerReq,
		ref.rps, ref.cpuPerReq,
		vf.rps/nft.rps, strings.Join(pairedText, " "), median(paired), vf.cpuPerReq/nft.cpuPerReq)
	if max(vf.foreignMax, nft.foreignMax) > maxForeign {
		b.Logf("WARNING: other processes used up to %.0f%% of the CPUs during a run; the figures are disturbed",
			max(vf.foreignMax, nft.foreignMax))
	}
	for name, s := range map[string]modeSummary{"veloflux-nat": vf, "nftables-dnat": nft, directName: ref} {
		b.Run("peer="+name, func(b *testing.B) {
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(s.rps, "conn/s")
			b.ReportMetric(s.cpuPerReq, "conn-cpu-us")
		})
	}
	b.Run("ratios", func(b *testing.B) {
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(vf.rps/nft.rps, "conn-x-nft")
		b.ReportMetric(median(paired), "conn-x-nft-paired")
		b.ReportMetric(vf.cpuPerReq/nft.cpuPerReq, "cpu-per-conn-x-nft")
	})
}

// startVeloFluxNAT gives the balancer its SNAT address and runs the agent
// with a nat VIP on the 3 backends. Forwarding is on: bpf_fib_lookup
// answers only there, as for nftables.
func startVeloFluxNAT(ctx context.Context, e *env, url string) (func() error, int, error) {
	bal := e.lab.Balancer
	restore, err := setSysctls(bal, [][2]string{{"net/ipv4/ip_forward", "1"}})
	if err != nil {
		return nil, 0, err
	}
	snat := netip.AddrFrom4([4]byte{10, e.lab.Subnet4.Addr().As4()[1], 0, natSNATHost})
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: snat.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	withLink := func(fn func(netlink.Link) error) error {
		return bal.Do(func() error {
			lk, err := netlink.LinkByName(bal.IfName)
			if err != nil {
				return err
			}
			return fn(lk)
		})
	}
	if err := withLink(func(lk netlink.Link) error { return netlink.AddrAdd(lk, addr) }); err != nil {
		return nil, 0, errors.Join(fmt.Errorf("add %s to %s: %w", snat, bal.IfName, err), restore())
	}
	undo := func() error {
		err := withLink(func(lk netlink.Link) error {
			if err := netlink.AddrDel(lk, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return fmt.Errorf("remove %s from %s: %w", snat, bal.IfName, err)
			}
			return nil
		})
		return errors.Join(err, restore())
	}
	a, err := e.startAgent(agentConfig{vips: []netip.Addr{vfVIP}, weights: [3]int{1, 1, 1}, snat: snat})
	if err != nil {
		return nil, 0, errors.Join(err, undo())
	}
	stop := func() error { return errors.Join(e.stopAgent(a), undo()) }
	if err := e.waitAllBackends(ctx, url, a.process); err != nil {
		return nil, 0, errors.Join(fmt.Errorf("%w (agent log %s:\n%s)", err, a.logPath, logTail(a.logPath, 20)), stop())
	}
	return stop, a.pid(), nil
}
