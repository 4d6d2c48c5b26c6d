package proxy

import (
	"math"
	"math/bits"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Upstream error reasons, the values of veloflux_http_upstream_errors_total's
// reason label and the keys of Stats.UpstreamErrors.
const (
	ReasonDial      = "dial"       // connecting to the backend failed (refused, unreachable, dial timeout)
	ReasonTimeout   = "timeout"    // response header timeout or the request deadline
	ReasonReset     = "reset"      // the backend closed or reset the connection mid-exchange
	Reason5xx       = "5xx"        // the backend answered with a 5xx status
	ReasonNoBackend = "no_backend" // no backend of the pool could take the request
	ReasonOther     = "other"
)

// Client violations, the values of veloflux_http_client_violations_total's
// kind label and the kinds of the security events reporting them.
const (
	// ViolationResetFlood: an HTTP/2 connection ended (GOAWAY) for
	// cancelling streams beyond proxy.http2.max_client_resets.
	ViolationResetFlood = "http2_reset_flood"
	// ViolationAmbiguousFraming: an HTTP/1 request with both
	// Content-Length and Transfer-Encoding, refused (400) with its
	// connection closed.
	ViolationAmbiguousFraming = "ambiguous_framing"
)

var reasons = [...]string{ReasonDial, ReasonTimeout, ReasonReset, Reason5xx, ReasonNoBackend, ReasonOther}

func reasonIndex(r string) int {
	for i, x := range reasons {
		if x == r {
			return i
		}
	}
	return len(reasons) - 1
}

// Stats is a snapshot of the proxy's cumulative counters, for the agent to
// turn into per-second rates, plus the current in-flight count and recent
// latency quantiles.
type Stats struct {
	// Requests counts completed requests, Status the same by status class
	// ("1xx" .. "5xx"; 499 for a client that went away counts as 4xx).
	Requests uint64            `json:"requests"`
	Status   map[string]uint64 `json:"status"`
	// UpstreamErrors counts failed upstream exchanges by reason (see the
	// Reason constants); a retried request may count more than once.
	UpstreamErrors map[string]uint64 `json:"upstream_errors"`
	RateLimited    uint64            `json:"rate_limited"`
	// H2ResetFloods counts HTTP/2 connections ended for cancelling
	// streams beyond their reset budget; AmbiguousFraming counts requests
	// refused for having both Content-Length and Transfer-Encoding.
	H2ResetFloods    uint64 `json:"http2_reset_floods"`
	AmbiguousFraming uint64 `json:"ambiguous_framing"`
	Retries          uint64 `json:"retries"`
	Ejections        uint64 `json:"ejections"`
	// BytesIn and BytesOut are request and response body bytes (and, for
	// upgraded connections such as WebSockets, the bytes relayed after the
	// upgrade), as reported to Options.Usage.
	BytesIn  uint64 `json:"bytes_in"`
	BytesOut uint64 `json:"bytes_out"`
	InFlight int64  `json:"in_flight"`
	// LatencyP50 and LatencyP99 are seconds, over requests completed in
	// the last LatencyWindow; 0 when there were none.
	LatencyP50 float64 `json:"latency_p50_seconds"`
	LatencyP99 float64 `json:"latency_p99_seconds"`
	// Ejected lists the backends (config.Backend.Key) passive health
	// currently keeps out.
	Ejected  []string `json:"ejected,omitempty"`
	Draining bool     `json:"draining"`
}

// LatencyWindow is the period Stats' latency quantiles cover.
const LatencyWindow = 10 * time.Second

// counters are the cumulative totals behind Stats.
type counters struct {
	requests    atomic.Uint64
	class       [6]atomic.Uint64 // index status/100; 0 for anything odd
	upstream    [len(reasons)]atomic.Uint64
	rateLimited atomic.Uint64
	resetFloods atomic.Uint64
	ambiguous   atomic.Uint64
	retries     atomic.Uint64
	ejections   atomic.Uint64
	bytesIn     atomic.Uint64
	bytesOut    atomic.Uint64
}

// promMetrics are the Prometheus collectors.
type promMetrics struct {
	requests       *prometheus.CounterVec
	duration       *prometheus.HistogramVec
	inflight       prometheus.Gauge
	upstreamErrors *prometheus.CounterVec
	upstreamByIdx  [len(reasons)]prometheus.Counter
	violations     *prometheus.CounterVec
}

func newPromMetrics(reg prometheus.Registerer) (*promMetrics, error) {
	m := &promMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veloflux_http_requests_total",
			Help: "HTTP requests completed by the L7 proxy, by route, pool, backend and status code.",
		}, []string{"route", "pool", "backend", "code"}),
		// backend is deliberately not a label here: a histogram multiplies
		// its series by every label value, and route × pool is what
		// dashboards slice latency by.
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "veloflux_http_request_duration_seconds",
			Help:    "Time from receiving a request's headers to the end of its response, by route and pool.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"route", "pool"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "veloflux_http_inflight_requests",
			Help: "HTTP requests the L7 proxy is currently handling (including upgraded connections).",
		}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veloflux_http_upstream_errors_total",
			Help: "Failed upstream exchanges by reason: dial, timeout, reset, 5xx, no_backend, other.",
		}, []string{"reason"}),
		violations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veloflux_http_client_violations_total",
			Help: "Client protocol abuse the L7 proxy cut short, by kind: http2_reset_flood (an HTTP/2 connection ended for cancelling too many streams), ambiguous_framing (a request with both Content-Length and Transfer-Encoding).",
		}, []string{"kind"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.inflight, m.upstreamErrors, m.violations} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for i, r := range reasons {
		m.upstreamByIdx[i] = m.upstreamErrors.WithLabelValues(r)
	}
	return m, nil
}

// codeLabels avoids formatting the status code of every request.
var codeLabels = func() (s [600]string) {
	for i := range s {
		s[i] = strconv.Itoa(i)
	}
	return s
}()

func codeLabel(code int) string {
	if code >= 0 && code < len(codeLabels) {
		return codeLabels[code]
	}
	return strconv.Itoa(code)
}

// latencyWindow is an in-process histogram of request durations over the
// last LatencyWindow, in one-second slots of log-linear buckets (16 per
// power of two, so a quantile is within about 3% of the true value). Slots
// are reused round robin; a slot from an older second is zeroed by the first
// request that lands in it.
type latencyWindow struct {
	rotate sync.Mutex
	slots  [latSlots]latSlot
}

const (
	latSlots   = int(LatencyWindow/time.Second) + 1
	latSub     = 16 // buckets per power of two
	latSubBits = 4
	latMaxExp  = 40 // 2^40 µs ≈ 12 days: anything longer lands in the last bucket
	latBuckets = (latMaxExp - latSubBits + 2) * latSub
)

type latSlot struct {
	sec atomic.Int64
	n   [latBuckets]atomic.Uint64
}

// latBucket maps microseconds to a bucket: exact below 16 µs, then 16
// buckets per power of two.
func latBucket(us uint64) int {
	if us < latSub {
		return int(us)
	}
	e := bits.Len64(us) - 1
	if e > latMaxExp {
		return latBuckets - 1
	}
	sub := (us >> (e - latSubBits)) & (latSub - 1)
	return (e-latSubBits+1)*latSub + int(sub)
}

// latMid is the middle of bucket i, in microseconds.
func latMid(i int) float64 {
	if i < latSub {
		return float64(i)
	}
	e := i/latSub + latSubBits - 1
	sub := uint64(i % latSub)
	lo := (latSub + sub) << (e - latSubBits)
	width := uint64(1) << (e - latSubBits)
	return float64(lo) + float64(width)/2
}

func (w *latencyWindow) record(now time.Time, d time.Duration) {
	sec := now.Unix()
	s := &w.slots[uint64(sec)%uint64(latSlots)]
	if s.sec.Load() != sec {
		w.rotate.Lock()
		if s.sec.Load() != sec {
			for i := range s.n {
				s.n[i].Store(0)
			}
			s.sec.Store(sec)
		}
		w.rotate.Unlock()
	}
	s.n[latBucket(uint64(max(d, 0)/time.Microsecond))].Add(1)
}

// quantiles returns the given quantiles (0..1, ascending) of the durations
// recorded in the last LatencyWindow, in seconds.
func (w *latencyWindow) quantiles(now time.Time, qs ...float64) []float64 {
	var sum [latBuckets]uint64
	var total uint64
	sec := now.Unix()
	for i := range w.slots {
		s := &w.slots[i]
		if at := s.sec.Load(); at > sec-int64(latSlots-1) && at <= sec {
			for b := range s.n {
				v := s.n[b].Load()
				sum[b] += v
				total += v
			}
		}
	}
	out := make([]float64, len(qs))
	if total == 0 {
		return out
	}
	var seen uint64
	b := 0
	for qi, q := range qs {
		rank := max(uint64(math.Ceil(q*float64(total))), 1)
		for b < latBuckets && seen+sum[b] < rank {
			seen += sum[b]
			b++
		}
		out[qi] = latMid(min(b, latBuckets-1)) / 1e6
	}
	return out
}

// routeMetrics are a route's Prometheus children, looked up once per route
// (and once per backend and status code) rather than on every request.
type routeMetrics struct {
	duration prometheus.Observer
	mu       sync.Mutex                                         // serializes additions to requests
	requests atomic.Pointer[map[requestsKey]prometheus.Counter] // copied on write
}

type requestsKey struct {
	backend *member
	code    int
}

func newRouteMetrics(pm *promMetrics, routeID, pool string) *routeMetrics {
	rm := &routeMetrics{duration: pm.duration.WithLabelValues(routeID, pool)}
	m := map[requestsKey]prometheus.Counter{}
	rm.requests.Store(&m)
	return rm
}

// requestsCounter is veloflux_http_requests_total's child for a request of
// route r answered by backend m (nil: none) with code.
func (rm *routeMetrics) requestsCounter(pm *promMetrics, r *route, m *member, code int) prometheus.Counter {
	k := requestsKey{m, code}
	if c, ok := (*rm.requests.Load())[k]; ok {
		return c
	}
	rm.mu.Lock()
	defer rm.mu.Unlock()
	cur := *rm.requests.Load()
	if c, ok := cur[k]; ok {
		return c
	}
	backend := ""
	if m != nil {
		backend = m.addr
	}
	c := pm.requests.WithLabelValues(r.id, r.pool.name, backend, codeLabel(code))
	next := make(map[requestsKey]prometheus.Counter, len(cur)+1)
	for key, v := range cur {
		next[key] = v
	}
	next[k] = c
	rm.requests.Store(&next)
	return c
}
