package e2e

import (
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/lab"
	"github.com/vishvananda/netlink"
)

// TestRestartKeepsFlowsAndCounters: the agent is stopped with SIGTERM and
// started again (same config, same pin path) while a TCP echo stream sends
// a line every 100 ms for 10 s.
//   - SIGTERM exits 0 and leaves the XDP link and the maps pinned; traffic
//     keeps flowing while no agent runs;
//   - the stream never errors and stays on its backend;
//   - the new agent swaps its program onto the pinned link and adopts the
//     maps as they are (VIP ids, reals, rings unchanged);
//   - the VIP's packet counter, read from the pins (opened afresh for
//     every sample), never goes back.
func TestRestartKeepsFlowsAndCounters(t *testing.T) {
	e := newEnv(t, 3, vip4)
	e.writeConfig(e.webConfig(true))
	a1 := e.startAgent()
	e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)

	echoVIP := netip.AddrPortFrom(vip4, lab.TCPEchoPort)
	echoKey := dataplane.VIP{Addr: vip4, Port: lab.TCPEchoPort, Proto: dataplane.ProtoTCP}
	const streamFor = 10 * time.Second
	begin := time.Now()
	stream := startEchoStream(t, e.lab.Client, echoVIP, 100*time.Millisecond, streamFor+10*time.Second)
	waitEchoes(t, stream, 3, 5*time.Second)
	owner, err := e.socketOwner(stream.local, echoVIP)
	if err != nil || owner < 0 {
		t.Fatalf("echo stream %s: no backend holds its connection (%v)", stream.local, err)
	}
	realID, _, err := e.flowReal(stream.local, echoVIP, dataplane.ProtoTCP)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("echo stream %s -> %s is on %s (real %d)", stream.local, echoVIP, e.lab.Backends[owner].Name, realID)

	samp := startVIPSampler(e.pin, echoKey, 100*time.Millisecond)
	t.Cleanup(samp.stop)

	// Stop the agent about 2 s into the stream.
	waitEchoes(t, stream, 20, 5*time.Second)
	x1, err := e.xdpOnBalancer()
	if err != nil {
		t.Fatal(err)
	}
	installed := e.snapshot()
	stopAt := time.Now()
	if code := a1.Stop(); code != 0 {
		t.Fatalf("agent exited with code %d on SIGTERM, want 0", code)
	}
	t.Logf("agent stopped in %s", time.Since(stopAt).Round(time.Millisecond))
	for _, pin := range []string{"link_xdp_" + e.lab.Balancer.IfName, "vf_vips", "vf_ct4", "vf_stats_vip", "vf_reals", "vf_rings"} {
		if _, err := os.Stat(filepath.Join(e.pin, pin)); err != nil {
			t.Errorf("after SIGTERM: pin %s: %v", pin, err)
		}
	}
	x, err := e.xdpOnBalancer()
	if err != nil {
		t.Fatal(err)
	}
	if x == nil || !x.Attached || x.ProgId != x1.ProgId {
		t.Fatalf("after SIGTERM the balancer's XDP program is gone or changed: before %+v, after %+v", x1, x)
	}
	// Forwarding goes on with no agent: the stream and new connections.
	down := stream.echoes.Load()
	before := samp.latest(t)
	waitEchoes(t, stream, down+5, 3*time.Second)
	idle := load(t.Context(), e.http, vipURL(vip4), 30, 0, 10*time.Second, nil)
	t.Logf("with no agent running: %s", idle)
	if idle.fails != 0 {
		t.Errorf("new connections failed while no agent ran: %s", idle)
	}
	if during := samp.latest(t); during.Packets <= before.Packets {
		t.Errorf("VIP packets did not grow while no agent ran: %d -> %d", before.Packets, during.Packets)
	}

	// The new agent has taken over once it swapped its program onto the
	// pinned link (after its first reconcile).
	e.startAgent()
	x2 := e.waitXDPSwap(x1.ProgId, 10*time.Second)
	t.Logf("agent down for %s; XDP program on %s: id %d before the restart, %d after",
		time.Since(stopAt).Round(time.Millisecond), e.lab.Balancer.IfName, x1.ProgId, x2.ProgId)
	// It adopted the maps as they were: same VIP ids, reals and rings.
	if adopted := e.snapshot(); !installed.equal(adopted) {
		t.Errorf("the restarted agent rewrote the data plane:\nbefore %v\nafter  %v", installed, adopted)
	}

	// Run the stream to its 10 s.
	for time.Since(begin) < streamFor {
		if err := stream.failed(); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	owner2, err := e.socketOwner(stream.local, echoVIP)
	if err != nil {
		t.Error(err)
	}
	realID2, _, err := e.flowReal(stream.local, echoVIP, dataplane.ProtoTCP)
	if err != nil {
		t.Error(err)
	}
	n := stream.echoes.Load()
	if err := stream.stop(); err != nil {
		t.Fatalf("echo stream failed across the restart: %v", err)
	}
	t.Logf("echo stream: %d lines in %s, on backend %d (real %d) at the end", n, time.Since(begin).Round(time.Millisecond), owner2, realID2)
	if n < 80 {
		t.Errorf("only %d lines echoed in %s at one per 100 ms", n, streamFor)
	}
	if owner2 != owner || realID2 != realID {
		t.Errorf("echo stream moved across the restart: backend %d -> %d, real %d -> %d", owner, owner2, realID, realID2)
	}

	samples, errs := samp.finish()
	for _, err := range errs {
		t.Errorf("sampling VIP counters: %v", err)
	}
	if len(samples) < 20 {
		t.Fatalf("only %d counter samples", len(samples))
	}
	for i := 1; i < len(samples); i++ {
		p, c := samples[i-1], samples[i]
		if c.Packets < p.Packets || c.Bytes < p.Bytes || c.NewFlows < p.NewFlows {
			t.Errorf("VIP %s counters went back between samples %d and %d: %+v -> %+v", echoKey, i-1, i, p.VIPStats, c.VIPStats)
		}
		if c.id != p.id {
			t.Errorf("VIP %s changed id across the restart: %d -> %d", echoKey, p.id, c.id)
		}
	}
	first, last := samples[0], samples[len(samples)-1]
	t.Logf("VIP %s packets: %d at the first sample, %d before SIGTERM, %d at the end (%d samples, monotonic)",
		echoKey, first.Packets, before.Packets, last.Packets, len(samples))
	if last.Packets <= before.Packets {
		t.Errorf("VIP packets did not grow after the restart: %d -> %d", before.Packets, last.Packets)
	}

	e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
}

// waitXDPSwap waits until the balancer interface carries an XDP program
// other than old, and returns it.
func (e *env) waitXDPSwap(old uint32, timeout time.Duration) *netlink.LinkXdp {
	e.t.Helper()
	start := time.Now()
	for {
		e.checkAgent()
		x, err := e.xdpOnBalancer()
		if err != nil {
			e.t.Fatal(err)
		}
		if x == nil || !x.Attached {
			e.t.Fatalf("no XDP program on %s during the restart: %+v", e.lab.Balancer.IfName, x)
		}
		if x.ProgId != old {
			return x
		}
		if time.Since(start) > timeout {
			e.t.Fatalf("XDP program on %s still %d %s after the restart", e.lab.Balancer.IfName, old, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type vipSample struct {
	at time.Time
	id uint32
	dataplane.VIPStats
}

// vipSampler reads a VIP's counters from the pins periodically, opening the
// pins afresh every time so that recreated maps would show as a reset.
type vipSampler struct {
	pin   string
	vip   dataplane.VIP
	stopc chan struct{}
	done  chan struct{}
	once  sync.Once

	mu      sync.Mutex
	samples []vipSample
	errs    []error
}

func startVIPSampler(pin string, vip dataplane.VIP, every time.Duration) *vipSampler {
	s := &vipSampler{pin: pin, vip: vip, stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for range 1000 { // bounded: 100 s at 100 ms
			s.mu.Lock() // sample under the lock: samples are appended in time order
			smp, err := s.sample()
			if err != nil {
				s.errs = append(s.errs, err)
			} else {
				s.samples = append(s.samples, smp)
			}
			s.mu.Unlock()
			select {
			case <-s.stopc:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *vipSampler) sample() (vipSample, error) {
	dp, err := dataplane.OpenPinned(s.pin)
	if err != nil {
		return vipSample{}, err
	}
	defer dp.Close()
	id, err := vipID(dp, s.vip)
	if err != nil {
		return vipSample{}, err
	}
	st, err := dp.VIPStats(id)
	if err != nil {
		return vipSample{}, err
	}
	return vipSample{at: time.Now(), id: id, VIPStats: st}, nil
}

// latest takes a sample now (and records it in order).
func (s *vipSampler) latest(t *testing.T) vipSample {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	smp, err := s.sample()
	if err != nil {
		t.Fatalf("read VIP counters: %v", err)
	}
	s.samples = append(s.samples, smp)
	return smp
}

func (s *vipSampler) stop() {
	s.once.Do(func() {
		close(s.stopc)
		<-s.done
	})
}

func (s *vipSampler) finish() ([]vipSample, []error) {
	s.stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.samples, s.errs
}
