package proxy

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// testPool builds a pool directly, one member per weight, named b0, b1, ...
func testPool(algo config.Algorithm, weights ...int64) *pool {
	pl := &pool{name: "p", algo: algo, members: make([]member, len(weights)), cur: make([]int64, len(weights)),
		rng: rand.New(rand.NewPCG(1, 2))}
	for i, w := range weights {
		addr := fmt.Sprintf("10.0.0.%d:80", i+1)
		pl.members[i] = member{upstream: &upstream{key: "p/" + addr, addr: addr}, idx: i, weight: w}
	}
	return pl
}

func allUp() *liveness { return &liveness{} }

// shares picks n times and returns each member's share.
func shares(t *testing.T, pl *pool, lv *liveness, n int) []float64 {
	t.Helper()
	counts := make([]int, len(pl.members))
	now := time.Now().UnixNano()
	for i := 0; i < n; i++ {
		m := pl.pick(now, lv, netip.Addr{}, nil, nil)
		if m == nil {
			t.Fatal("no pick")
		}
		counts[m.idx]++
	}
	out := make([]float64, len(counts))
	for i, c := range counts {
		out[i] = float64(c) / float64(n)
	}
	return out
}

func within(t *testing.T, what string, got, want, tol float64) {
	t.Helper()
	if math.Abs(got-want) > tol {
		t.Errorf("%s: share %.4f, want %.4f ± %.2f", what, got, want, tol)
	}
}

func TestRoundRobinEqualSharesIgnoringWeights(t *testing.T) {
	pl := testPool(config.AlgorithmRoundRobin, 1, 2, 3, 0)
	s := shares(t, pl, allUp(), 10000)
	for i := 0; i < 3; i++ {
		within(t, fmt.Sprintf("b%d", i), s[i], 1.0/3, 0.02)
	}
	if s[3] != 0 {
		t.Errorf("weight 0 backend got share %.3f", s[3])
	}
}

func TestSmoothWeightedRoundRobin(t *testing.T) {
	pl := testPool(config.AlgorithmWeightedRoundRobin, 5, 3, 2, 0)
	s := shares(t, pl, allUp(), 10000)
	for i, w := range []float64{0.5, 0.3, 0.2, 0} {
		within(t, fmt.Sprintf("b%d", i), s[i], w, 0.02)
	}

	// nginx's documented sequence for weights {5, 1, 1}: a a b a c a a.
	pl = testPool(config.AlgorithmWeightedRoundRobin, 5, 1, 1)
	var seq strings.Builder
	for i := 0; i < 14; i++ {
		seq.WriteByte(byte('a' + pl.pick(0, allUp(), netip.Addr{}, nil, nil).idx))
	}
	if got, want := seq.String(), "aabacaaaabacaa"; got != want {
		t.Errorf("smooth sequence %q, want %q", got, want)
	}
}

func TestWeightedRoundRobinSkipsDownBackends(t *testing.T) {
	pl := testPool(config.AlgorithmWeightedRoundRobin, 1, 1, 2)
	down := pl.members[2].key
	lv := &liveness{healthy: func(k string) (bool, bool) { return k != down, true }}
	s := shares(t, pl, lv, 10000)
	within(t, "b0", s[0], 0.5, 0.02)
	within(t, "b1", s[1], 0.5, 0.02)
	if s[2] != 0 {
		t.Errorf("down backend got %.3f", s[2])
	}
}

func TestLeastConnFollowsInflight(t *testing.T) {
	pl := testPool(config.AlgorithmLeastConn, 1, 1, 1)
	pl.members[0].inflight.Store(5)
	pl.members[1].inflight.Store(2)
	pl.members[2].inflight.Store(7)
	for i := 0; i < 10; i++ {
		if m := pl.pick(0, allUp(), netip.Addr{}, nil, nil); m.idx != 1 {
			t.Fatalf("picked b%d with %d in flight, want b1", m.idx, m.inflight.Load())
		}
	}
	// Simulate requests that stay in flight: picks fill the least loaded
	// first and keep the counts level.
	for i := 0; i < 13; i++ {
		m := pl.pick(0, allUp(), netip.Addr{}, nil, nil)
		m.inflight.Add(1)
	}
	for i := range pl.members {
		if got := pl.members[i].inflight.Load(); got != 9 {
			t.Errorf("b%d has %d in flight, want 9 (levelled)", i, got)
		}
	}
	// Ties are broken round robin.
	seen := map[int]int{}
	for i := 0; i < 300; i++ {
		seen[pl.pick(0, allUp(), netip.Addr{}, nil, nil).idx]++
	}
	for i := 0; i < 3; i++ {
		if seen[i] != 100 {
			t.Errorf("tie: b%d picked %d/300 times, want 100", i, seen[i])
		}
	}
	// Weighted: in-flight relative to weight.
	pl = testPool(config.AlgorithmLeastConn, 1, 4)
	pl.members[0].inflight.Store(2)
	pl.members[1].inflight.Store(6) // 6/4 < 2/1
	if m := pl.pick(0, allUp(), netip.Addr{}, nil, nil); m.idx != 1 {
		t.Errorf("weighted least_conn picked b%d, want b1", m.idx)
	}
}

// TestP2CEWMAAvoidsSlowBackend runs a deterministic simulation: a seeded
// source, a virtual clock, 8 concurrent clients; b0 answers in 50 ms, the
// others in 1 ms.
func TestP2CEWMAAvoidsSlowBackend(t *testing.T) {
	pl := testPool(config.AlgorithmP2CEWMA, 1, 1, 1, 1)
	lat := []time.Duration{50 * time.Millisecond, time.Millisecond, time.Millisecond, time.Millisecond}
	type pending struct {
		m    *member
		done int64
	}
	now := int64(1)
	var inflight []pending
	counts := make([]int, 4)
	const total = 10000
	for sent := 0; sent < total; {
		for len(inflight) < 8 && sent < total {
			m := pl.pick(now, allUp(), netip.Addr{}, nil, nil)
			m.inflight.Add(1)
			counts[m.idx]++
			sent++
			inflight = append(inflight, pending{m, now + int64(lat[m.idx])})
		}
		// Advance to the next completion.
		next := 0
		for i := range inflight {
			if inflight[i].done < inflight[next].done {
				next = i
			}
		}
		c := inflight[next]
		inflight = append(inflight[:next], inflight[next+1:]...)
		now = c.done
		c.m.inflight.Add(-1)
		c.m.observe(now, float64(lat[c.m.idx]))
	}
	slow := float64(counts[0]) / total
	t.Logf("shares: %v", counts)
	if slow > 0.02 {
		t.Errorf("slow backend got %.3f of requests, want < 0.02", slow)
	}
	for i := 1; i < 4; i++ {
		within(t, fmt.Sprintf("fast b%d", i), float64(counts[i])/total, (1-slow)/3, 0.05)
	}
}

func TestP2CNewBackendPenalty(t *testing.T) {
	u := &upstream{}
	if c := u.cost(time.Now().UnixNano()); c != 0 {
		t.Errorf("idle new backend cost %v, want 0", c)
	}
	u.inflight.Store(2)
	if c := u.cost(time.Now().UnixNano()); c < ewmaPenalty {
		t.Errorf("new backend with pending requests cost %v, want the penalty", c)
	}
	// Peak sensitivity and decay.
	u.inflight.Store(0)
	now := time.Now().UnixNano()
	u.observe(now, float64(100*time.Millisecond))
	u.observe(now, float64(time.Millisecond))
	if c := u.cost(now); c < float64(99*time.Millisecond) {
		t.Errorf("cost right after a slow response %v, want ~100ms", time.Duration(c))
	}
	if c := u.cost(now + int64(30*time.Second)); c > float64(10*time.Millisecond) {
		t.Errorf("cost 30s later %v, want decayed below 10ms", time.Duration(c))
	}
}

func clientAddrs(n int) []netip.Addr {
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
	}
	return out
}

func TestIPHashConsistent(t *testing.T) {
	const n = 10
	pl := testPool(config.AlgorithmIPHash, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
	clients := clientAddrs(20000)
	assign := func(lv *liveness) []int {
		out := make([]int, len(clients))
		for i, c := range clients {
			out[i] = pl.pick(0, lv, c, nil, nil).idx
		}
		return out
	}
	before := assign(allUp())
	// Stable for a client, and roughly even.
	again := assign(allUp())
	counts := make([]int, n)
	for i := range before {
		if before[i] != again[i] {
			t.Fatalf("client %v moved from b%d to b%d without any change", clients[i], before[i], again[i])
		}
		counts[before[i]]++
	}
	for i, c := range counts {
		within(t, fmt.Sprintf("b%d", i), float64(c)/float64(len(clients)), 1.0/n, 0.02)
	}

	// One backend goes down: its clients move, and few others do.
	gone := pl.members[3].key
	after := assign(&liveness{healthy: func(k string) (bool, bool) { return k != gone, true }})
	moved := 0
	for i := range before {
		if after[i] == 3 {
			t.Fatalf("client %v still sent to the down backend", clients[i])
		}
		if before[i] != after[i] {
			moved++
		}
	}
	frac := float64(moved) / float64(len(clients))
	t.Logf("moved %.4f of clients (1/N = %.4f)", frac, 1.0/n)
	if frac > 1.5/n {
		t.Errorf("moved %.4f of clients, want at most 1.5/N = %.4f", frac, 1.5/n)
	}
	// It comes back: everyone returns home.
	if back := assign(allUp()); fmt.Sprint(back) != fmt.Sprint(before) {
		t.Error("assignment differs after the backend came back")
	}

	// Removing the backend from the configuration moves the same clients:
	// the table depends only on the backend addresses.
	pl2 := testPool(config.AlgorithmIPHash, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
	pl2.members = append(pl2.members[:3:3], pl2.members[4:]...)
	for i := range pl2.members {
		pl2.members[i].idx = i
	}
	for i, c := range clients {
		if got, want := pl2.pick(0, allUp(), c, nil, nil).addr, pl.members[after[i]].addr; got != want {
			t.Fatalf("client %v: removed-from-config gives %s, marked-down gives %s", c, got, want)
		}
	}
}

func TestPassiveEjectionPanicMode(t *testing.T) {
	pl := testPool(config.AlgorithmRoundRobin, 1, 1)
	now := time.Now().UnixNano()
	for i := 0; i < 3; i++ {
		pl.members[0].passiveFailure(now, 3, time.Second)
	}
	if !pl.members[0].ejected(now) {
		t.Fatal("b0 not ejected after 3 failures")
	}
	for i := 0; i < 10; i++ {
		if m := pl.pick(now, allUp(), netip.Addr{}, nil, nil); m.idx != 0+1 {
			t.Fatalf("picked ejected b%d", m.idx)
		}
	}
	// Both ejected: ejection is ignored rather than failing everything.
	for i := 0; i < 3; i++ {
		pl.members[1].passiveFailure(now, 3, time.Second)
	}
	if m := pl.pick(now, allUp(), netip.Addr{}, nil, nil); m == nil {
		t.Fatal("no backend when every backend is ejected (panic mode)")
	}
	// Returns after the ejection period.
	if pl.members[0].ejected(now + int64(time.Second)) {
		t.Error("still ejected after the period")
	}
}

func TestLatencyWindowQuantiles(t *testing.T) {
	var w latencyWindow
	now := time.Unix(1000, 0)
	for i := 1; i <= 1000; i++ {
		w.record(now, time.Duration(i)*time.Millisecond)
	}
	q := w.quantiles(now, 0.5, 0.99)
	if math.Abs(q[0]-0.5) > 0.5*0.04 || math.Abs(q[1]-0.99) > 0.99*0.04 {
		t.Errorf("p50 %.4f p99 %.4f, want ~0.5 and ~0.99", q[0], q[1])
	}
	// Samples older than the window are forgotten.
	if q := w.quantiles(now.Add(LatencyWindow+time.Second), 0.5); q[0] != 0 {
		t.Errorf("p50 after the window %.4f, want 0", q[0])
	}
	for us := uint64(0); us < 1<<20; us += 7 {
		b := latBucket(us)
		if mid := latMid(b); math.Abs(mid-float64(us)) > float64(us)*0.035+0.5 {
			t.Fatalf("bucket of %dµs has middle %.1f", us, mid)
		}
	}
}

func TestRateLimiterBoundedAndExpiring(t *testing.T) {
	l := newRateLimiter(1, 2)
	now := time.Now()
	c := netip.MustParseAddr("192.0.2.1")
	first, second := l.allow(c, now), l.allow(c, now)
	if !first.ok || !second.ok {
		t.Fatal("burst of 2 not allowed")
	}
	v := l.allow(c, now)
	if v.ok || v.retryAfter <= 0 || v.retryAfter > time.Second || !v.event {
		t.Fatalf("third request: %+v, want rejected with retry ≤ 1s and an event", v)
	}
	if v := l.allow(c, now); v.event {
		t.Error("second rejection within a second reported again")
	}
	// IPv6 clients are limited per /64.
	a, b := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
	l.allow(a, now)
	l.allow(a, now)
	if l.allow(b, now).ok {
		t.Error("another address of the same /64 was not limited")
	}
	// Memory is bounded.
	for i := 0; i < 3*rlMaxClients; i++ {
		l.allow(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), now)
	}
	if n := l.clients(); n > rlMaxClients {
		t.Errorf("%d clients tracked, want at most %d", n, rlMaxClients)
	}
	// Full buckets expire: after the refill time, new clients push idle ones out.
	later := now.Add(3 * time.Second)
	for i := 0; i < 2000; i++ {
		l.allow(netip.AddrFrom4([4]byte{11, 0, byte(i >> 8), byte(i)}), later)
	}
	if n := l.clients(); n > rlMaxClients-1000 {
		t.Errorf("%d clients tracked after idle expiry, want idle ones dropped", n)
	}
}
