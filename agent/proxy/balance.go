package proxy

import (
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/maglev"
)

// upstream is the runtime state of one backend of one pool. It outlives
// configuration changes: Apply hands the same *upstream to the new pool when
// the backend (same pool, address and port) is still configured, so in-flight
// counts, latency estimates and passive ejections survive a reload, and
// requests started before the reload release the object the new pool counts.
type upstream struct {
	key      string  // config.Backend.Key: "pool/addr:port"
	addr     string  // "addr:port": the dial address and the metric label
	stickyID [8]byte // opaque id carried by sticky cookies

	inflight     atomic.Int64
	fails        atomic.Int32 // consecutive failures (passive health)
	ejectedUntil atomic.Int64 // unix nanoseconds; passively ejected until then

	mu    sync.Mutex
	ewma  float64 // peak EWMA of response latency, nanoseconds
	stamp int64   // unix nanoseconds of the last ewma update

	// client is the HTTP/1.1 engine's connection pool to the backend,
	// built with clientKey; replaced (by Apply, under Proxy.mu) when the
	// timeouts it was built with change.
	client    *fasthttp.HostClient
	clientKey transportKey
}

// hostClient returns the backend's connection pool for the timeouts of k,
// keeping the current one (and its warm connections) when they are
// unchanged; follow wraps each connection it dials. Called with Proxy.mu
// held.
func (u *upstream) hostClient(k transportKey, follow func(net.Conn) net.Conn) *fasthttp.HostClient {
	if u.client == nil || u.clientKey != k {
		if old := u.client; old != nil {
			// Idle connections close now; busy ones when their
			// exchanges end.
			go old.CloseIdleConnections()
		}
		u.client, u.clientKey = newHostClient(u.addr, k, follow), k
	}
	return u.client
}

// Peak EWMA parameters, as in Finagle and linkerd: latencies decay with a
// 10 s time constant, a slower response raises the estimate at once, and a
// backend without any observation but with requests pending costs a large
// penalty so that a new backend is not flooded before its first answer.
const (
	ewmaTau     = float64(10 * time.Second)
	ewmaPenalty = float64(time.Second)
)

// observe feeds one latency sample (nanoseconds) into the peak EWMA.
func (u *upstream) observe(now int64, rtt float64) {
	u.mu.Lock()
	w := u.decay(now)
	if rtt > u.ewma {
		u.ewma = rtt
	} else {
		u.ewma = u.ewma*w + rtt*(1-w)
	}
	u.mu.Unlock()
}

// decay returns the weight the current estimate keeps after the time since
// its last update, and moves the update time to now. Called with u.mu held.
func (u *upstream) decay(now int64) float64 {
	td := now - u.stamp
	u.stamp = now
	if td <= 0 {
		return 1
	}
	return math.Exp(-float64(td) / ewmaTau)
}

// cost is the p2c_ewma load estimate: latency times pending requests. Reading
// it decays the estimate toward zero (Finagle's observe(0)), so a backend that
// was slow long ago and has since taken no traffic is eventually probed again.
func (u *upstream) cost(now int64) float64 {
	pending := float64(u.inflight.Load())
	u.mu.Lock()
	u.ewma *= u.decay(now)
	e := u.ewma
	u.mu.Unlock()
	if e == 0 && pending != 0 {
		return ewmaPenalty + pending
	}
	return e * (pending + 1)
}

// ejected reports whether passive health has taken the backend out.
func (u *upstream) ejected(now int64) bool {
	return now < u.ejectedUntil.Load()
}

// passiveSuccess resets the consecutive failure count.
func (u *upstream) passiveSuccess() {
	if u.fails.Load() != 0 {
		u.fails.Store(0)
	}
}

// passiveFailure counts a failure and ejects the backend for ejection once
// threshold consecutive failures are reached; it reports an ejection.
func (u *upstream) passiveFailure(now int64, threshold int, ejection time.Duration) bool {
	if threshold <= 0 {
		return false
	}
	n := u.fails.Add(1)
	if int(n) < threshold || !u.fails.CompareAndSwap(n, 0) {
		return false
	}
	u.ejectedUntil.Store(now + int64(ejection))
	return true
}

// member is a backend as one pool of one configuration sees it.
type member struct {
	*upstream
	idx    int    // position in pool.members
	weight int64  // effective weight; 0 takes no new requests
	cookie string // sticky cookie value naming it, when the pool is sticky
	client *fasthttp.HostClient
}

// liveness answers whether a backend may take new requests, besides its
// weight and passive ejection.
type liveness struct {
	healthy func(key string) (healthy, known bool)
	drained func(key string) bool
}

func (l *liveness) up(u *upstream) bool {
	if l.drained != nil && l.drained(u.key) {
		return false
	}
	if l.healthy == nil {
		return true
	}
	ok, known := l.healthy(u.key)
	return ok && known
}

// pool is one configuration's view of a pool: its members and the state of
// its algorithm.
type pool struct {
	name    string
	algo    config.Algorithm
	members []member
	sticky  string             // cookie name; "" when off
	cookies map[string]*member // signed cookie value -> member

	rr  atomic.Uint64 // round robin position, also the least_conn tie breaker
	mu  sync.Mutex    // guards cur and rng
	cur []int64       // smooth weighted round robin current weights
	rng *rand.Rand    // nil: the lock-free global source

	ringMu sync.Mutex
	ring   atomic.Pointer[hashRing] // ip_hash table for the latest candidate set
}

// hashRing is a Maglev table over one set of candidates.
type hashRing struct {
	sig   uint64 // which members it was built from
	table []uint32
}

// maxCandidates is the size of the stack buffer candidate lists start in;
// larger pools spill to the heap.
const maxCandidates = 32

// candidates appends to buf the members that may take a new request: weight
// above zero, active-healthy, not drained, not in exclude, and not passively
// ejected. If every otherwise eligible member is ejected, ejection is ignored
// ("panic mode", as Envoy does): passive health is a heuristic and active
// health checks are the authority, so it must not turn a degraded pool into a
// dead one.
func (p *pool) candidates(now int64, lv *liveness, exclude []*upstream, buf []*member) []*member {
	c := buf[:0]
	ejected := 0
	for i := range p.members {
		m := &p.members[i]
		if m.weight <= 0 || excluded(m.upstream, exclude) || !lv.up(m.upstream) {
			continue
		}
		if m.ejected(now) {
			ejected++
			continue
		}
		c = append(c, m)
	}
	if len(c) > 0 || ejected == 0 {
		return c
	}
	for i := range p.members {
		m := &p.members[i]
		if m.weight > 0 && !excluded(m.upstream, exclude) && lv.up(m.upstream) {
			c = append(c, m)
		}
	}
	return c
}

func excluded(u *upstream, exclude []*upstream) bool {
	for _, x := range exclude {
		if x == u {
			return true
		}
	}
	return false
}

// choose applies the pool's algorithm to a non-empty candidate list. retry is
// true for a second attempt, for which ip_hash falls back to round robin: the
// client's hashed backend has just failed.
func (p *pool) choose(c []*member, client netip.Addr, now int64, retry bool) *member {
	if len(c) == 1 {
		if p.algo == config.AlgorithmWeightedRoundRobin {
			// Keep the smooth state moving so shares stay exact when the
			// other members come back.
			return p.smoothWRR(c)
		}
		return c[0]
	}
	switch p.algo {
	case config.AlgorithmWeightedRoundRobin:
		return p.smoothWRR(c)
	case config.AlgorithmLeastConn:
		return p.leastConn(c)
	case config.AlgorithmIPHash:
		if retry || !client.IsValid() {
			return p.roundRobin(c)
		}
		return p.ipHash(c, client)
	case config.AlgorithmP2CEWMA:
		return p.p2c(c, now)
	default:
		return p.roundRobin(c)
	}
}

// roundRobin rotates over the candidates. Like LVS's rr (and unlike its wrr)
// it ignores weights beyond excluding weight 0; weighted_round_robin is the
// weighted variant.
func (p *pool) roundRobin(c []*member) *member {
	return c[(p.rr.Add(1)-1)%uint64(len(c))]
}

// smoothWRR is nginx's smooth weighted round robin: every candidate's current
// weight grows by its weight, the largest is picked and lowered by the total.
// Over any window of sum(weights) picks each backend is chosen exactly weight
// times, interleaved rather than in bursts.
func (p *pool) smoothWRR(c []*member) *member {
	p.mu.Lock()
	var best *member
	var total int64
	for _, m := range c {
		p.cur[m.idx] += m.weight
		total += m.weight
		if best == nil || p.cur[m.idx] > p.cur[best.idx] {
			best = m
		}
	}
	p.cur[best.idx] -= total
	p.mu.Unlock()
	return best
}

// leastConn picks the candidate with the fewest in-flight requests relative
// to its weight (as nginx and HAProxy do), scanning from a rotating start so
// that ties are broken round robin.
func (p *pool) leastConn(c []*member) *member {
	n := uint64(len(c))
	start := p.rr.Add(1) - 1
	var best *member
	var bestIn int64
	for k := uint64(0); k < n; k++ {
		m := c[(start+k)%n]
		in := m.inflight.Load()
		if best == nil || in*best.weight < bestIn*m.weight {
			best, bestIn = m, in
		}
	}
	return best
}

// p2c is the power of two random choices over the peak-EWMA cost (latency ×
// (pending+1), divided by weight), as Finagle and linkerd balance.
func (p *pool) p2c(c []*member, now int64) *member {
	n := len(c)
	var i, j int
	if p.rng != nil {
		p.mu.Lock()
		i, j = p.rng.IntN(n), p.rng.IntN(n-1)
		p.mu.Unlock()
	} else {
		i, j = rand.IntN(n), rand.IntN(n-1)
	}
	if j >= i {
		j++
	}
	a, b := c[i], c[j]
	if a.cost(now)*float64(b.weight) <= b.cost(now)*float64(a.weight) {
		return a
	}
	return b
}

// ipHash maps the client address through a Maglev table built over the
// current candidates, so that a backend leaving or returning moves only about
// its share of clients. The table is cached until the candidate set changes.
func (p *pool) ipHash(c []*member, client netip.Addr) *member {
	// The candidate set's fingerprint: FNV-1a over the members' indices.
	sig := uint64(0xcbf29ce484222325)
	for _, m := range c {
		sig ^= uint64(m.idx) + 1
		sig *= 0x100000001b3
	}
	r := p.ring.Load()
	if r == nil || r.sig != sig {
		r = p.buildRing(c, sig)
		if r == nil {
			return p.roundRobin(c)
		}
	}
	id := r.table[maglev.HashAddr(client)%uint64(len(r.table))]
	if id == 0 {
		return p.roundRobin(c)
	}
	// Member ids are idx+1, and every id in the table is one of c.
	for _, m := range c {
		if uint32(m.idx)+1 == id {
			return m
		}
	}
	return p.roundRobin(c)
}

func (p *pool) buildRing(c []*member, sig uint64) *hashRing {
	p.ringMu.Lock()
	defer p.ringMu.Unlock()
	if r := p.ring.Load(); r != nil && r.sig == sig {
		return r
	}
	bs := make([]maglev.Backend, len(c))
	for i, m := range c {
		w := uint32(min(m.weight, math.MaxUint32))
		bs[i] = maglev.Backend{ID: uint32(m.idx) + 1, Key: m.addr, Weight: w}
	}
	table, err := maglev.Build(bs, ringSize(len(c)))
	if err != nil {
		return nil
	}
	r := &hashRing{sig: sig, table: table}
	p.ring.Store(r)
	return r
}

// ringSize is a prime at least ~100 times the backend count (up to 65537),
// which keeps the clients moved by a change close to the 1/N minimum while
// keeping rebuilds cheap for the usual small pools.
func ringSize(n int) uint32 {
	switch {
	case n <= 40:
		return 4093
	case n <= 160:
		return 16381
	default:
		return maglev.DefaultTableSize
	}
}

// pick chooses a backend for a request: the sticky member when it is still a
// candidate, otherwise the algorithm's choice. It returns nil when no backend
// may take the request.
func (p *pool) pick(now int64, lv *liveness, client netip.Addr, exclude []*upstream, sticky *member) *member {
	var buf [maxCandidates]*member
	c := p.candidates(now, lv, exclude, buf[:])
	if len(c) == 0 {
		return nil
	}
	if sticky != nil {
		for _, m := range c {
			if m == sticky {
				return m
			}
		}
	}
	return p.choose(c, client, now, len(exclude) > 0)
}
