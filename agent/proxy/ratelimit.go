package proxy

import (
	"container/list"
	"hash/maphash"
	"math"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// rateLimiter is a token bucket per client, with bounded memory.
//
// Clients are IPv4 addresses and IPv6 /64 prefixes (a single IPv6 host
// usually owns a whole /64, so limiting single addresses would be trivial
// to evade). Each shard keeps its clients in LRU order; a bucket idle for
// longer than it takes to refill completely is dropped, which changes
// nothing (a new bucket starts full too), and when a shard is full its least
// recently seen client is dropped, which at worst lets that client start
// over with a full bucket.
type rateLimiter struct {
	limit  rate.Limit
	burst  int
	refill int64 // nanoseconds for an empty bucket to fill up
	seed   maphash.Seed
	shards [rlShards]rlShard
}

const (
	rlShards = 16
	// rlMaxClients bounds the clients tracked at once (about 200 bytes each).
	rlMaxClients = 1 << 16
	// rlEventEvery bounds SecurityEvent calls to one per client per period.
	rlEventEvery = int64(time.Second)
)

type rlShard struct {
	mu  sync.Mutex
	m   map[netip.Addr]*list.Element
	lru list.List // of *rlEntry, most recent first
}

type rlEntry struct {
	key        netip.Addr
	lim        *rate.Limiter
	last       int64 // unix nanoseconds of the latest request
	lastEvent  int64 // unix nanoseconds of the latest SecurityEvent
	suppressed int   // rejections since then without an event
}

func newRateLimiter(rps float64, burst int) *rateLimiter {
	l := &rateLimiter{
		limit:  rate.Limit(rps),
		burst:  burst,
		refill: int64(math.Min(float64(burst)/rps*float64(time.Second), float64(24*time.Hour))),
		seed:   maphash.MakeSeed(),
	}
	for i := range l.shards {
		l.shards[i].m = make(map[netip.Addr]*list.Element)
	}
	return l
}

func (l *rateLimiter) same(rps float64, burst int) bool {
	return l != nil && l.limit == rate.Limit(rps) && l.burst == burst
}

// rlKey is the limited unit for a client address.
func rlKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// rlVerdict is the outcome of allow.
type rlVerdict struct {
	ok         bool
	retryAfter time.Duration
	// event is set when the rejection should be reported; suppressed is
	// the number of rejections of the same client not reported before it.
	event      bool
	suppressed int
}

func (l *rateLimiter) allow(client netip.Addr, now time.Time) rlVerdict {
	key := rlKey(client)
	s := &l.shards[maphash.Comparable(l.seed, key)%rlShards]
	ns := now.UnixNano()

	s.mu.Lock()
	defer s.mu.Unlock()
	var e *rlEntry
	if el, ok := s.m[key]; ok {
		e = el.Value.(*rlEntry)
		e.last = ns
		s.lru.MoveToFront(el)
	} else {
		s.expire(ns, l.refill)
		e = &rlEntry{key: key, lim: rate.NewLimiter(l.limit, l.burst), last: ns}
		s.m[key] = s.lru.PushFront(e)
	}

	r := e.lim.ReserveN(now, 1)
	if !r.OK() {
		return rlVerdict{retryAfter: time.Second, event: e.report(ns)}
	}
	d := r.DelayFrom(now)
	if d <= 0 {
		return rlVerdict{ok: true}
	}
	r.CancelAt(now)
	v := rlVerdict{retryAfter: d}
	if e.report(ns) {
		v.event, v.suppressed = true, e.suppressed
		e.suppressed = 0
	}
	return v
}

// report decides whether a rejection is reported, counting it otherwise.
func (e *rlEntry) report(ns int64) bool {
	if ns-e.lastEvent >= rlEventEvery {
		e.lastEvent = ns
		return true
	}
	e.suppressed++
	return false
}

// expire drops buckets idle long enough to be full again, and the least
// recently seen clients while the shard is at capacity. Called with s.mu
// held, before adding a client.
func (s *rlShard) expire(now, refill int64) {
	for i := 0; i < 8; i++ { // bounded work per call; the rest goes later
		el := s.lru.Back()
		if el == nil {
			return
		}
		e := el.Value.(*rlEntry)
		if now-e.last < refill && s.lru.Len() < rlMaxClients/rlShards {
			return
		}
		s.lru.Remove(el)
		delete(s.m, e.key)
	}
}

// clients is the number of tracked clients (for tests).
func (l *rateLimiter) clients() int {
	n := 0
	for i := range l.shards {
		l.shards[i].mu.Lock()
		n += l.shards[i].lru.Len()
		l.shards[i].mu.Unlock()
	}
	return n
}
