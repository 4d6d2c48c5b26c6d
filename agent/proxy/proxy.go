// Package proxy is VeloFlux's L7 reverse proxy. It serves HTTP and HTTPS
// (HTTP/1.1, HTTP/2 over TLS by ALPN, optionally h2c) and sends requests to
// the same pools the XDP VIPs use, judged by the same active health checks.
//
// One engine-neutral core decides what happens to a request: routing by
// host and longest path prefix, per-client rate limiting, the choice of a
// backend with the pool's algorithm (round_robin, weighted_round_robin,
// least_conn, ip_hash through Maglev, or p2c_ewma) and sticky cookies,
// retries of idempotent requests whose connection could not be
// established, passive outlier ejection (with the backend's failures
// only: a client's broken or slow body is answered 400 or 408 and counts
// against no backend), drain, and the accounting (metrics, statistics,
// usage, the access log). Two engines carry requests through it:
//
//   - HTTP/1.1, plain and over TLS, is valyala/fasthttp's server. The proxy
//     writes each request toward the backend itself, from the raw header
//     block fasthttp has parsed and validated, over connections from one
//     fasthttp.HostClient pool per backend: header names, order, duplicates
//     and values pass as sent, hop-by-hop headers are removed, and the body
//     is always framed anew. Bodies stream both ways. Requests with both
//     Content-Length and Transfer-Encoding, or with obsolete line folding,
//     are refused (400, connection closed) before they reach a backend.
//   - HTTP/2 is golang.org/x/net/http2's server with httputil.ReverseProxy,
//     handed its connections by the HTTP/1.1 engine: h2 by ALPN through
//     fasthttp's NextProto hook, h2c by the client preface, sniffed in front
//     of the plain listener. Each HTTP/2 connection reads through a guard
//     that enforces a budget of stream resets (rapid reset floods end with
//     GOAWAY).
//
// Everything a configuration decides is compiled into an immutable state
// published with an atomic pointer, so Apply never disturbs requests in
// flight.
//
// Typical use:
//
//	p, err := proxy.New(proxy.Options{Logger: log, Healthy: checker.Healthy, ...})
//	if err := p.Apply(cfg); err != nil { ... }
//	go p.Serve(ctx)
//	...
//	p.Drain(ctx) // on SIGTERM: stop accepting, finish in-flight requests
package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/veloflux/veloflux/agent/config"
)

// Options are the proxy's dependencies. All are optional.
type Options struct {
	// Logger receives the JSON access log (one Info record per request,
	// message "http request") and operational messages. Default:
	// slog.Default().
	Logger *slog.Logger
	// Healthy returns the active health verdict of a backend, by
	// config.Backend.Key; an unknown backend is down. Nil: every backend
	// is healthy.
	Healthy func(key string) (healthy, known bool)
	// Drained reports backends that take no new requests (requests already
	// sent to them finish). Nil: none.
	Drained func(key string) bool
	// Registerer is where the veloflux_http_* collectors are registered.
	// Nil: a private registry.
	Registerer prometheus.Registerer
	// SecurityEvent is told about abuse: "rate_limited" (with client_ip,
	// path, host, and suppressed: rejections of the same client not
	// reported, at most one event per client per second), and the
	// Violation kinds (with client_ip, the connection's peer).
	SecurityEvent func(kind string, data map[string]any)
	// Usage is called once per completed request with its pool, for
	// billing: 1 request and its body bytes in and out.
	Usage func(pool string, requests, bytesIn, bytesOut uint64)
	// StickyKey is the HMAC key of sticky cookies. The agent persists it so
	// cookies survive restarts and are valid on every node sharing it.
	// Empty: a random key (cookies last as long as the process).
	StickyKey []byte
}

// Proxy is the L7 reverse proxy. Its methods are safe for concurrent use.
type Proxy struct {
	log           *slog.Logger
	live          liveness
	securityEvent func(kind string, data map[string]any)
	usage         func(pool string, requests, bytesIn, bytesOut uint64)
	stickyKey     []byte

	state atomic.Pointer[state]
	rp    *httputil.ReverseProxy
	certs *certStore
	prom  *promMetrics
	count counters
	lat   latencyWindow

	inflight atomic.Int64

	// Request ids: a random prefix per process and a counter.
	idPrefix  [16]byte
	idCounter atomic.Uint64

	// mu serializes Apply, Serve and Drain, and guards what follows.
	mu        sync.Mutex
	upstreams map[string]*upstream // by backend key, for the current state
	servers   [2]*server           // http, https; nil when not open
	serving   bool
	fatal     chan error    // a current server failed
	drained   chan struct{} // closed when Drain ends
	drainOnce sync.Once

	draining atomic.Bool
	hijacked hijackedSet

	// watch is the arrival watch of the running Serve (arrival.go), nil
	// when not serving or when none could be made.
	watch atomic.Pointer[arrivalWatch]

	// Test hooks.
	keepBuffers bool          // HTTP/1.1 connections keep their buffers while idle
	seed        uint64        // nonzero: seeded p2c random sources
	certPoll    time.Duration // certificate file polling period
	now         func() time.Time
	drainPoll   time.Duration
}

// New returns a proxy with no configuration; call Apply before serving.
func New(opts Options) (*Proxy, error) {
	p := &Proxy{
		log:           opts.Logger,
		live:          liveness{healthy: opts.Healthy, drained: opts.Drained},
		securityEvent: opts.SecurityEvent,
		usage:         opts.Usage,
		stickyKey:     opts.StickyKey,
		upstreams:     map[string]*upstream{},
		fatal:         make(chan error, 2),
		drained:       make(chan struct{}),
		certPoll:      2 * time.Second,
		now:           time.Now,
		drainPoll:     10 * time.Millisecond,
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	var pfx [8]byte
	rand.Read(pfx[:])
	hex.Encode(p.idPrefix[:], pfx[:])
	if len(p.stickyKey) == 0 {
		p.stickyKey = make([]byte, 32)
		rand.Read(p.stickyKey)
	}
	reg := opts.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	var err error
	if p.prom, err = newPromMetrics(reg); err != nil {
		return nil, fmt.Errorf("proxy: register metrics: %w", err)
	}
	p.certs = &certStore{log: p.log}
	p.rp = &httputil.ReverseProxy{
		Rewrite:        p.rewrite,
		Transport:      roundTripper{p},
		FlushInterval:  0, // ReverseProxy flushes event streams and unknown-length bodies at once
		BufferPool:     bufferPool{},
		ErrorLog:       slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.errorHandler,
	}
	return p, nil
}

// Apply makes cfg the proxy's configuration: routes, pools and algorithms,
// certificates, timeouts, limits. The new configuration is compiled in full
// first and published with one atomic swap; on error nothing changes.
// Requests in flight finish with the configuration they started with.
//
// While Serve runs, listeners follow the configuration too: a listener
// whose address or server settings (h2c, idle and header timeouts, HTTP/2
// limits) change is replaced by a new one (opened before the old one
// closes, which finishes its requests in the background), and the HTTPS
// listener opens and closes as certificates are configured and removed.
func (p *Proxy) Apply(cfg *config.Config) error {
	if cfg == nil {
		return errors.New("proxy: nil config")
	}
	p.mu.Lock()
	defer p.mu.Unlock()

	prev := p.state.Load()
	st, ups, err := p.build(cfg, prev)
	if err != nil {
		return err
	}
	pairs, err := p.certs.prepare(cfg.Proxy.TLS)
	if err != nil {
		return err
	}

	var opened [2]net.Listener
	specs := serverSpecs(&st.cfg, len(pairs) > 0)
	if p.serving {
		for i := range specs {
			if !p.needsRestart(i, specs[i]) || specs[i].addr == "" {
				continue
			}
			ln, err := listen(specs[i].addr)
			if err != nil {
				for _, l := range opened {
					if l != nil {
						l.Close()
					}
				}
				return fmt.Errorf("proxy: %s listener: %w", roleName[i], err)
			}
			opened[i] = ln
		}
	}

	p.certs.commit(pairs)
	p.state.Store(st)
	p.forgetRemoved(prev, st, ups)
	p.upstreams = ups
	if prev != nil && prev.transport != st.transport {
		// Idle connections of the old transport are closed now; busy ones
		// are closed when their requests finish and come back idle.
		go func(t *http.Transport) {
			t.CloseIdleConnections()
		}(prev.transport)
	}
	if p.serving {
		for i := range specs {
			if p.needsRestart(i, specs[i]) {
				p.replaceServer(i, specs[i], opened[i])
			}
		}
	}
	p.log.Info("proxy: configuration applied", "routes", len(cfg.Routes), "pools", len(cfg.Pools), "certificates", len(pairs))
	return nil
}

// forgetRemoved drops the metric series of backends and routes the new
// configuration no longer has, so dashboards do not keep dead series.
func (p *Proxy) forgetRemoved(prev, st *state, ups map[string]*upstream) {
	if prev == nil {
		return
	}
	for _, pl := range prev.pools {
		for i := range pl.members {
			m := &pl.members[i]
			if _, ok := ups[m.key]; !ok {
				p.prom.requests.DeletePartialMatch(prometheus.Labels{"pool": pl.name, "backend": m.addr})
				if m.client != nil {
					go m.client.CloseIdleConnections()
				}
			}
		}
	}
	ids := map[string]bool{}
	st.routes.each(func(r *route) { ids[r.id+"\x00"+r.pool.name] = true })
	prev.routes.each(func(r *route) {
		if !ids[r.id+"\x00"+r.pool.name] {
			l := prometheus.Labels{"route": r.id, "pool": r.pool.name}
			p.prom.requests.DeletePartialMatch(l)
			p.prom.duration.DeletePartialMatch(l)
		}
	})
}

func (t *routeTable) each(f func(*route)) {
	for _, rs := range t.exact {
		for _, r := range rs {
			f(r)
		}
	}
	for _, g := range t.wildcard {
		for _, r := range g.routes {
			f(r)
		}
	}
	for _, r := range t.any {
		f(r)
	}
}

// Handler returns the HTTP/2 engine's request handler (net/http), without
// listeners: routing, limits and proxying as Serve's listeners do
// (requests without r.TLS count as plain HTTP, so redirect_https applies to
// them). Serve's HTTP/1.1 requests go through the fasthttp engine instead.
func (p *Proxy) Handler() http.Handler { return http.HandlerFunc(p.serveHTTP) }

// Draining reports whether Drain has been called: the proxy no longer
// accepts connections, and /health should say so.
func (p *Proxy) Draining() bool { return p.draining.Load() }

// Stats returns the cumulative counters, the in-flight count and the latency
// quantiles of the last LatencyWindow.
func (p *Proxy) Stats() Stats {
	now := p.now()
	s := Stats{
		Requests:         p.count.requests.Load(),
		Status:           make(map[string]uint64, 5),
		UpstreamErrors:   make(map[string]uint64, len(reasons)),
		RateLimited:      p.count.rateLimited.Load(),
		H2ResetFloods:    p.count.resetFloods.Load(),
		AmbiguousFraming: p.count.ambiguous.Load(),
		Retries:          p.count.retries.Load(),
		Ejections:        p.count.ejections.Load(),
		BytesIn:          p.count.bytesIn.Load(),
		BytesOut:         p.count.bytesOut.Load(),
		InFlight:         p.inflight.Load(),
		Draining:         p.draining.Load(),
	}
	for c := 1; c <= 5; c++ {
		s.Status[fmt.Sprintf("%dxx", c)] = p.count.class[c].Load()
	}
	for i, r := range reasons {
		s.UpstreamErrors[r] = p.count.upstream[i].Load()
	}
	q := p.lat.quantiles(now, 0.5, 0.99)
	s.LatencyP50, s.LatencyP99 = q[0], q[1]
	if st := p.state.Load(); st != nil {
		ns := now.UnixNano()
		for _, pl := range st.pools {
			for i := range pl.members {
				if pl.members[i].ejected(ns) {
					s.Ejected = append(s.Ejected, pl.members[i].key)
				}
			}
		}
	}
	return s
}

// bufferPool is ReverseProxy's copy buffer pool: 32 KiB buffers, reused.
type bufferPool struct{}

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *copyBuffers.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { copyBuffers.Put(&b) }

// sleepCtx waits d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
