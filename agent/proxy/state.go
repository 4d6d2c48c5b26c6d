package proxy

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// state is everything one applied configuration decides. It is immutable
// once published (the algorithms' own counters aside): a request loads the
// current state once and uses it to the end, so Apply never affects requests
// already in flight.
type state struct {
	cfg       config.ProxyConfig
	routes    routeTable
	pools     map[string]*pool
	transport *http.Transport
	tkey      transportKey
	trusted   []netip.Prefix
	limiter   *rateLimiter // nil: off
	httpsPort string       // for redirects; "" means the default 443
}

// route is one compiled config.Route.
type route struct {
	id     string // metric label: host + path prefix, e.g. "api.example.com/v1" or "/" for any host
	host   string
	prefix string
	pool   *pool
	// metrics are its Prometheus children.
	metrics *routeMetrics
}

// routeTable finds the route for a host and path. Host groups are tried from
// the most specific (exact name, then wildcards from the longest suffix, then
// routes without a host); within a group the longest matching path prefix
// wins, and a group without a matching prefix falls through to the next, so
// a route with no host and prefix "/" is a catch-all default.
type routeTable struct {
	exact    map[string][]*route // by host; each sorted by prefix length, longest first
	wildcard []wildGroup         // longest suffix first
	any      []*route
}

type wildGroup struct {
	suffix string // ".example.com" for "*.example.com"
	routes []*route
}

func byPrefixLen(a, b *route) int { return cmp.Compare(len(b.prefix), len(a.prefix)) }

func matchPrefix(rs []*route, path string) *route {
	for _, r := range rs {
		if strings.HasPrefix(path, r.prefix) {
			return r
		}
	}
	return nil
}

func (t *routeTable) match(host, path string) *route {
	if rs, ok := t.exact[host]; ok {
		if r := matchPrefix(rs, path); r != nil {
			return r
		}
	}
	for _, g := range t.wildcard {
		// "*.example.com" matches any name below example.com, at any
		// depth (as nginx does), but not example.com itself.
		if len(host) > len(g.suffix) && strings.HasSuffix(host, g.suffix) {
			if r := matchPrefix(g.routes, path); r != nil {
				return r
			}
		}
	}
	return matchPrefix(t.any, path)
}

// routeHost is the request's host as routes see it: without port or
// trailing dot, lower case.
func routeHost(h string) string {
	if strings.HasPrefix(h, "[") {
		if i := strings.IndexByte(h, ']'); i > 0 {
			h = h[1:i]
		}
	} else if i := strings.LastIndexByte(h, ':'); i >= 0 && strings.IndexByte(h, ':') == i {
		h = h[:i]
	}
	h = strings.TrimSuffix(h, ".")
	for i := 0; i < len(h); i++ {
		if c := h[i]; 'A' <= c && c <= 'Z' {
			return strings.ToLower(h)
		}
	}
	return h
}

// routePath is the path routes match: dot segments resolved and repeated
// slashes merged, as nginx normalizes before matching locations, so that
// "/public/../admin" is routed as "/admin" (the backend would resolve it so).
// The request itself is forwarded unchanged.
func routePath(p string) string {
	if p == "" {
		return "/"
	}
	if !strings.Contains(p, "//") && !strings.Contains(p, "/.") {
		return p
	}
	c := cleanPath(p)
	return c
}

// cleanPath is path.Clean that keeps a trailing slash and a leading one.
func cleanPath(p string) string {
	trailing := strings.HasSuffix(p, "/") || strings.HasSuffix(p, "/.") || strings.HasSuffix(p, "/..")
	segs := strings.Split(p, "/")
	out := make([]string, 0, len(segs))
	for _, s := range segs {
		switch s {
		case "", ".":
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
		default:
			out = append(out, s)
		}
	}
	c := "/" + strings.Join(out, "/")
	if trailing && c != "/" {
		c += "/"
	}
	return c
}

// transportKey is what the upstream transport is built from; a new
// configuration keeps the transport (and its warm connections) when it is
// unchanged.
type transportKey struct {
	dial, tlsHandshake, responseHeader, idle time.Duration
}

const (
	maxIdleConnsPerHost = 256
	maxIdleConns        = 4096
	transportBufSize    = 32 << 10
)

func newTransport(k transportKey) *http.Transport {
	d := &net.Dialer{Timeout: k.dial, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                 nil, // never send backend traffic to an HTTP_PROXY from the environment
		DialContext:           d.DialContext,
		MaxIdleConns:          maxIdleConns,
		MaxIdleConnsPerHost:   maxIdleConnsPerHost,
		IdleConnTimeout:       k.idle,
		TLSHandshakeTimeout:   k.tlsHandshake,
		ResponseHeaderTimeout: k.responseHeader,
		ExpectContinueTimeout: time.Second,
		// HTTP/1.1 with keep-alive to backends, as HAProxy and nginx do.
		ForceAttemptHTTP2: false,
		// Pass bodies through as the backend encoded them.
		DisableCompression: true,
		ReadBufferSize:     transportBufSize,
		WriteBufferSize:    transportBufSize,
	}
}

// build compiles cfg into a new state. prev is the current state (nil on
// the first Apply), whose transport and rate limiter are reused when their
// settings did not change.
func (p *Proxy) build(cfg *config.Config, prev *state) (*state, map[string]*upstream, error) {
	pc := cfg.Proxy
	st := &state{cfg: pc, pools: make(map[string]*pool, len(cfg.Pools))}

	for i, s := range pc.TrustedProxies {
		pfx, err := config.ParsePrefix(s)
		if err != nil {
			return nil, nil, fmt.Errorf("proxy: trusted_proxies[%d]: %w", i, err)
		}
		st.trusted = append(st.trusted, pfx)
	}

	st.tkey = transportKey{
		dial:           pc.Timeouts.Dial.Std(),
		tlsHandshake:   pc.Timeouts.TLSHandshake.Std(),
		responseHeader: pc.Timeouts.ResponseHeader.Std(),
		idle:           pc.Timeouts.Idle.Std(),
	}

	ups := make(map[string]*upstream)
	for pi, cp := range cfg.Pools {
		pl := &pool{name: cp.Name, algo: cp.Algorithm, sticky: cp.StickyCookie}
		if _, dup := st.pools[cp.Name]; dup {
			return nil, nil, fmt.Errorf("proxy: duplicate pool %q", cp.Name)
		}
		if p.seed != 0 {
			pl.rng = rand.New(rand.NewPCG(p.seed, uint64(pi)))
		}
		if pl.sticky != "" {
			pl.cookies = make(map[string]*member, len(cp.Backends))
		}
		pl.members = make([]member, len(cp.Backends))
		pl.cur = make([]int64, len(cp.Backends))
		for bi, b := range cp.Backends {
			key := b.Key(cp.Name)
			if _, dup := ups[key]; dup {
				return nil, nil, fmt.Errorf("proxy: pool %q lists backend %s twice", cp.Name, key)
			}
			u := p.upstreams[key]
			if u == nil {
				u = &upstream{
					key:      key,
					addr:     net.JoinHostPort(b.Address, strconv.Itoa(b.Port)),
					stickyID: stickyID(p.stickyKey, key),
				}
			}
			ups[key] = u
			m := &pl.members[bi]
			m.upstream, m.idx, m.weight = u, bi, int64(b.EffectiveWeight())
			m.client = u.hostClient(st.tkey, p.followBackend)
			if pl.sticky != "" {
				m.cookie = stickyValue(p.stickyKey, cp.Name, u.stickyID)
				pl.cookies[m.cookie] = m
			}
		}
		st.pools[cp.Name] = pl
	}

	st.routes.exact = make(map[string][]*route)
	wild := map[string][]*route{}
	for i, cr := range cfg.Routes {
		pl := st.pools[cr.Pool]
		if pl == nil {
			return nil, nil, fmt.Errorf("proxy: routes[%d]: unknown pool %q", i, cr.Pool)
		}
		prefix := cmp.Or(cr.PathPrefix, "/")
		host := strings.TrimSuffix(strings.ToLower(cr.Host), ".")
		r := &route{id: host + prefix, host: host, prefix: prefix, pool: pl}
		r.metrics = newRouteMetrics(p.prom, r.id, pl.name)
		switch {
		case host == "":
			st.routes.any = append(st.routes.any, r)
		case strings.HasPrefix(host, "*."):
			wild[host[1:]] = append(wild[host[1:]], r)
		default:
			st.routes.exact[host] = append(st.routes.exact[host], r)
		}
	}
	for _, rs := range st.routes.exact {
		slices.SortStableFunc(rs, byPrefixLen)
	}
	for suffix, rs := range wild {
		slices.SortStableFunc(rs, byPrefixLen)
		st.routes.wildcard = append(st.routes.wildcard, wildGroup{suffix: suffix, routes: rs})
	}
	slices.SortFunc(st.routes.wildcard, func(a, b wildGroup) int {
		return cmp.Or(cmp.Compare(len(b.suffix), len(a.suffix)), strings.Compare(a.suffix, b.suffix))
	})
	slices.SortStableFunc(st.routes.any, byPrefixLen)

	if prev != nil && prev.tkey == st.tkey {
		st.transport = prev.transport
	} else {
		st.transport = newTransport(st.tkey)
	}

	if rl := pc.RateLimit; rl.RequestsPerSecond > 0 {
		if prev != nil && prev.limiter.same(rl.RequestsPerSecond, max(rl.Burst, 1)) {
			st.limiter = prev.limiter
		} else {
			st.limiter = newRateLimiter(rl.RequestsPerSecond, max(rl.Burst, 1))
		}
	}

	if _, port, err := net.SplitHostPort(pc.HTTPSListen); err == nil && port != "443" {
		st.httpsPort = port
	}
	return st, ups, nil
}

func (st *state) isTrusted(a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	a = a.Unmap()
	for _, p := range st.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
