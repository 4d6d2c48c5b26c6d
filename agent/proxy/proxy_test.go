package proxy

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/veloflux/veloflux/agent/config"
)

func TestRouting(t *testing.T) {
	names := []string{"api", "apiv2", "wild", "deepwild", "static", "default"}
	var pools []config.Pool
	for _, n := range names {
		pools = append(pools, poolOf(n, config.AlgorithmRoundRobin, newBackend(t, n, nil)))
	}
	cfg := testConfig(pools,
		config.Route{Host: "api.example.com", PathPrefix: "/", Pool: "api"},
		config.Route{Host: "api.example.com", PathPrefix: "/v2", Pool: "apiv2"},
		config.Route{Host: "*.example.com", PathPrefix: "/", Pool: "wild"},
		config.Route{Host: "*.deep.example.com", PathPrefix: "/", Pool: "deepwild"},
		config.Route{PathPrefix: "/static", Pool: "static"},
		config.Route{PathPrefix: "/", Pool: "default"},
	)
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()
	for _, tc := range []struct{ host, path, want string }{
		{"api.example.com", "/", "api"},
		{"API.Example.COM:8080", "/users", "api"}, // case and port do not matter
		{"api.example.com.", "/users", "api"},     // nor a trailing dot
		{"api.example.com", "/v2/users", "apiv2"}, // longest prefix
		{"api.example.com", "/v2", "apiv2"},
		{"www.example.com", "/v2", "wild"},
		{"a.b.example.com", "/", "wild"}, // wildcards match any depth
		{"x.deep.example.com", "/", "deepwild"},
		{"example.com", "/", "default"}, // "*.example.com" is not example.com
		{"other.org", "/static/app.js", "static"},
		{"other.org", "/static/../admin", "default"}, // dot segments resolved before matching
		{"other.org", "/.//static/x", "static"},      // "." and repeated slashes too
		{"other.org", "/", "default"},
		{"api.example.com", "/static/x", "api"}, // the host's own routes win
	} {
		req, _ := http.NewRequest(http.MethodGet, f.URL+tc.path, nil)
		req.URL.Opaque = tc.path // send the path exactly as written
		req.Host = tc.host
		r := do(t, c, req)
		if r.status != 200 || r.body != tc.want {
			t.Errorf("%s%s: got %d %q, want %q", tc.host, tc.path, r.status, r.body, tc.want)
		}
	}
}

func TestNoRouteIs404JSON(t *testing.T) {
	cfg := testConfig([]config.Pool{poolOf("api", config.AlgorithmRoundRobin, newBackend(t, "api", nil))},
		config.Route{Host: "api.example.com", PathPrefix: "/api", Pool: "api"})
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	for _, tc := range []struct{ host, path string }{{"api.example.com", "/other"}, {"www.example.com", "/api"}} {
		r := get(t, client(), f.URL+tc.path, "Host", tc.host)
		if r.status != 404 || r.header.Get("Content-Type") != "application/json" {
			t.Errorf("%s%s: %d %s, want 404 JSON", tc.host, tc.path, r.status, r.header.Get("Content-Type"))
		}
		if code := errorCode(t, r.body); code != "no_route" {
			t.Errorf("code %q, want no_route", code)
		}
	}
}

func TestUnhealthyDrainedAndNoBackend(t *testing.T) {
	a, b := newBackend(t, "a", nil), newBackend(t, "b", nil)
	hm := newHealthMap()
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, a, b)}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{Healthy: hm.healthy, Drained: hm.isDrained})
	f := front(t, p)
	c := client()

	hm.set(hm.down, keyOf("web", a), true)
	for i := 0; i < 6; i++ {
		if r := get(t, c, f.URL); r.body != "b" {
			t.Fatalf("request %d went to %q while a is down", i, r.body)
		}
	}
	hm.set(hm.down, keyOf("web", a), false)
	hm.set(hm.drained, keyOf("web", b), true)
	for i := 0; i < 6; i++ {
		if r := get(t, c, f.URL); r.body != "a" {
			t.Fatalf("request %d went to %q while b is drained", i, r.body)
		}
	}
	hm.set(hm.down, keyOf("web", a), true)
	r := get(t, c, f.URL)
	if r.status != 503 || errorCode(t, r.body) != "no_backend" {
		t.Errorf("all down: %d %q, want 503 no_backend", r.status, r.body)
	}

	// Unknown to the health checker means down.
	p2 := newProxy(t, cfg, Options{Healthy: func(string) (bool, bool) { return true, false }})
	if r := get(t, c, front(t, p2).URL); r.status != 503 {
		t.Errorf("unknown verdicts: %d, want 503", r.status)
	}
}

func TestStickyCookies(t *testing.T) {
	bs := []*backend{newBackend(t, "a", nil), newBackend(t, "b", nil), newBackend(t, "c", nil)}
	pl := poolOf("web", config.AlgorithmRoundRobin, bs...)
	pl.StickyCookie = "VFSESSION"
	hm := newHealthMap()
	p := newProxy(t, testConfig([]config.Pool{pl}, config.Route{PathPrefix: "/", Pool: "web"}), Options{Healthy: hm.healthy})
	f := front(t, p)
	c := client()

	cookieOf := func(r result) string {
		for _, sc := range r.header.Values("Set-Cookie") {
			if v, ok := strings.CutPrefix(sc, "VFSESSION="); ok {
				if !strings.Contains(sc, "HttpOnly") || !strings.Contains(sc, "SameSite=Lax") || !strings.Contains(sc, "Path=/") {
					t.Errorf("cookie attributes: %s", sc)
				}
				return strings.SplitN(v, ";", 2)[0]
			}
		}
		return ""
	}

	first := get(t, c, f.URL)
	cookie := cookieOf(first)
	if cookie == "" {
		t.Fatal("no sticky cookie issued")
	}
	raw, err := base64.RawURLEncoding.DecodeString(cookie)
	if err != nil || len(raw) != stickyIDLen+stickySigLen {
		t.Fatalf("cookie %q is not an opaque id and signature", cookie)
	}
	for _, b := range bs {
		if strings.Contains(string(raw), strconv.Itoa(b.port)) || strings.Contains(cookie, "127.0.0.1") {
			t.Fatal("cookie reveals the backend address")
		}
	}
	// Pinned.
	for i := 0; i < 10; i++ {
		r := get(t, c, f.URL, "Cookie", "VFSESSION="+cookie)
		if r.body != first.body {
			t.Fatalf("pinned request %d went to %q, want %q", i, r.body, first.body)
		}
		if cookieOf(r) != "" {
			t.Fatal("cookie re-issued for a valid pin")
		}
	}
	// Tampered: ignored, and a fresh cookie is issued.
	bad := []byte(cookie)
	bad[len(bad)-2] ^= 1
	r := get(t, c, f.URL, "Cookie", "VFSESSION="+string(bad))
	if cookieOf(r) == "" {
		t.Error("tampered cookie: no new cookie issued")
	}
	spread := map[string]bool{}
	for i := 0; i < 6; i++ {
		spread[get(t, c, f.URL, "Cookie", "VFSESSION="+string(bad)).body] = true
	}
	if len(spread) < 2 {
		t.Error("tampered cookie still pins requests")
	}
	// The pinned backend dies: fall back and re-issue for the new one.
	var pinned *backend
	for _, b := range bs {
		if b.name == first.body {
			pinned = b
		}
	}
	hm.set(hm.down, keyOf("web", pinned), true)
	r = get(t, c, f.URL, "Cookie", "VFSESSION="+cookie)
	if r.status != 200 || r.body == pinned.name {
		t.Fatalf("dead pin: %d %q", r.status, r.body)
	}
	renewed := cookieOf(r)
	if renewed == "" || renewed == cookie {
		t.Fatalf("dead pin: cookie not re-issued (%q)", renewed)
	}
	for i := 0; i < 5; i++ {
		if got := get(t, c, f.URL, "Cookie", "VFSESSION="+renewed).body; got != r.body {
			t.Fatalf("re-issued cookie pins to %q, want %q", got, r.body)
		}
	}
}

func TestPassiveEjectionAndRecovery(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	good := newBackend(t, "good", nil)
	flaky := newBackend(t, "flaky", func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
		}
		io.WriteString(w, "flaky")
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, good, flaky)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.PassiveHealth = config.PassiveHealth{ConsecutiveFailures: 3, Ejection: config.Duration(700 * time.Millisecond)}
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()

	fails := 0
	for i := 0; i < 20; i++ {
		if get(t, c, f.URL).status == 500 {
			fails++
		}
	}
	if fails != 3 {
		t.Errorf("%d 500s reached the client, want 3 before ejection", fails)
	}
	st := p.Stats()
	if len(st.Ejected) != 1 || st.Ejected[0] != keyOf("web", flaky) || st.Ejections != 1 {
		t.Errorf("stats: ejected %v, ejections %d", st.Ejected, st.Ejections)
	}
	if st.UpstreamErrors[Reason5xx] != 3 {
		t.Errorf("5xx upstream errors %d, want 3", st.UpstreamErrors[Reason5xx])
	}
	failing.Store(false)
	waitFor(t, 2*time.Second, "ejection to end", func() bool { return len(p.Stats().Ejected) == 0 })
	before := flaky.hits.Load()
	for i := 0; i < 10; i++ {
		if r := get(t, c, f.URL); r.status != 200 {
			t.Fatalf("status %d after recovery", r.status)
		}
	}
	if flaky.hits.Load()-before != 5 {
		t.Errorf("recovered backend got %d of 10 requests, want 5", flaky.hits.Load()-before)
	}
}

func TestRetriesOnlyIdempotentDialFailures(t *testing.T) {
	live := newBackend(t, "live", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "live %s %s", r.Method, b)
	})
	w := uint32(1)
	pl := poolOf("web", config.AlgorithmRoundRobin, live)
	pl.Backends = append([]config.Backend{{Address: "127.0.0.1", Port: deadPort(t), Weight: &w}}, pl.Backends...)
	cfg := testConfig([]config.Pool{pl}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.Retries = 1
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()

	for i := 0; i < 10; i++ {
		if r := get(t, c, f.URL); r.status != 200 || r.body != "live GET " {
			t.Fatalf("GET %d: %d %q", i, r.status, r.body)
		}
	}
	if st := p.Stats(); st.Retries == 0 || st.UpstreamErrors[ReasonDial] == 0 {
		t.Errorf("retries %d, dial errors %d: want both > 0", st.Retries, st.UpstreamErrors[ReasonDial])
	}

	// POST with a body is not retried: half of them meet the dead backend.
	bad, good := 0, 0
	for i := 0; i < 10; i++ {
		req, _ := http.NewRequest(http.MethodPost, f.URL, strings.NewReader("payload"))
		switch r := do(t, c, req); {
		case r.status == 502 && errorCode(t, r.body) == "bad_gateway":
			bad++
		case r.status == 200 && r.body == "live POST payload":
			good++
		default:
			t.Fatalf("POST: %d %q", r.status, r.body)
		}
	}
	if bad == 0 || good == 0 {
		t.Errorf("POST: %d bad gateway, %d ok; want both (no retry)", bad, good)
	}
	// PUT with a body cannot be replayed either (no GetBody on a server request).
	retriesBefore := p.Stats().Retries
	for i := 0; i < 4; i++ {
		req, _ := http.NewRequest(http.MethodPut, f.URL, strings.NewReader("x"))
		do(t, c, req)
	}
	if p.Stats().Retries != retriesBefore {
		t.Error("PUT with a body was retried")
	}
}

func TestResponseHeaderTimeoutIs504(t *testing.T) {
	slow := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, slow)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.Timeouts.ResponseHeader = config.Duration(150 * time.Millisecond)
	p := newProxy(t, cfg, Options{})
	start := time.Now()
	r := get(t, client(), front(t, p).URL)
	if r.status != 504 || errorCode(t, r.body) != "gateway_timeout" {
		t.Errorf("%d %q, want 504 gateway_timeout", r.status, r.body)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("took %v, want about the 150ms timeout", d)
	}
	if p.Stats().UpstreamErrors[ReasonTimeout] != 1 {
		t.Errorf("timeout upstream errors: %v", p.Stats().UpstreamErrors)
	}
}

func TestRequestDeadlineIs504(t *testing.T) {
	slow := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, slow)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.Timeouts.Request = config.Duration(150 * time.Millisecond)
	p := newProxy(t, cfg, Options{})
	start := time.Now()
	r := get(t, client(), front(t, p).URL)
	if r.status != 504 {
		t.Errorf("%d %q, want 504", r.status, r.body)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("took %v, want about the 150ms deadline", d)
	}
}

func TestBodyLimit(t *testing.T) {
	echo := newBackend(t, "echo", func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		fmt.Fprintf(w, "%d", len(b))
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, echo)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.MaxBodyBytes = 1024
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()

	req, _ := http.NewRequest(http.MethodPost, f.URL, strings.NewReader(strings.Repeat("x", 512)))
	if r := do(t, c, req); r.status != 200 || r.body != "512" {
		t.Errorf("small body: %d %q", r.status, r.body)
	}
	hits := echo.hits.Load()
	req, _ = http.NewRequest(http.MethodPost, f.URL, strings.NewReader(strings.Repeat("x", 2048)))
	if r := do(t, c, req); r.status != 413 || errorCode(t, r.body) != "body_too_large" {
		t.Errorf("large Content-Length: %d %q, want 413", r.status, r.body)
	}
	if echo.hits.Load() != hits {
		t.Error("a body over the limit by Content-Length reached the backend")
	}
	// Unknown length (chunked): caught while streaming.
	req, _ = http.NewRequest(http.MethodPost, f.URL, io.MultiReader(strings.NewReader(strings.Repeat("y", 4096))))
	req.ContentLength = -1
	if r := do(t, c, req); r.status != 413 {
		t.Errorf("large chunked body: %d %q, want 413", r.status, r.body)
	}
}

func TestForwardedHeaders(t *testing.T) {
	seen := make(chan http.Header, 1)
	b := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Clone()
		h.Set("Host", r.Host)
		seen <- h
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, b)}, config.Route{PathPrefix: "/", Pool: "web"})
	hexID := regexp.MustCompile(`^[0-9a-f]{32}$`)

	t.Run("untrusted", func(t *testing.T) {
		p := newProxy(t, cfg, Options{})
		r := get(t, client(), front(t, p).URL+"/x",
			"Host", "app.example.com",
			"X-Forwarded-For", "6.6.6.6", "X-Forwarded-Proto", "https", "X-Forwarded-Host", "evil.example",
			"Forwarded", "for=6.6.6.6", "X-Real-IP", "6.6.6.6", "Via", "1.0 upstream")
		h := <-seen
		for k, want := range map[string]string{
			"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "app.example.com",
			"X-Real-Ip": "127.0.0.1", "Host": "app.example.com", "Forwarded": "", "Via": "1.0 upstream, 1.1 veloflux",
		} {
			if got := strings.Join(h.Values(k), ","); got != want {
				t.Errorf("backend saw %s %q, want %q", k, got, want)
			}
		}
		id := h.Get("X-Request-Id")
		if !hexID.MatchString(id) {
			t.Errorf("generated X-Request-ID %q, want 32 hex digits", id)
		}
		if r.header.Get("X-Request-Id") != id {
			t.Errorf("response X-Request-ID %q, want %q", r.header.Get("X-Request-Id"), id)
		}
		if r.header.Get("Via") != "1.1 veloflux" {
			t.Errorf("response Via %q", r.header.Get("Via"))
		}
		// A client's request id is kept when sane, replaced when not.
		get(t, client(), front(t, p).URL, "X-Request-ID", "abc-123")
		if got := (<-seen).Get("X-Request-Id"); got != "abc-123" {
			t.Errorf("client request id became %q", got)
		}
		get(t, client(), front(t, p).URL, "X-Request-ID", "bad id\twith spaces")
		if got := (<-seen).Get("X-Request-Id"); !hexID.MatchString(got) {
			t.Errorf("unsafe client request id kept: %q", got)
		}
	})

	t.Run("trusted", func(t *testing.T) {
		tc := *cfg
		tc.Proxy.TrustedProxies = []string{"127.0.0.0/8", "10.0.0.0/8"}
		p := newProxy(t, &tc, Options{})
		get(t, client(), front(t, p).URL+"/x",
			"Host", "app.example.com",
			"X-Forwarded-For", "203.0.113.7, 10.1.2.3", "X-Forwarded-Proto", "https", "X-Forwarded-Host", "www.example.com",
			"Forwarded", "for=203.0.113.7")
		h := <-seen
		for k, want := range map[string]string{
			"X-Forwarded-For":   "203.0.113.7, 10.1.2.3, 127.0.0.1",
			"X-Forwarded-Proto": "https", "X-Forwarded-Host": "www.example.com",
			"X-Real-Ip": "203.0.113.7", // right-most untrusted address
			"Forwarded": "for=203.0.113.7",
		} {
			if got := strings.Join(h.Values(k), ","); got != want {
				t.Errorf("backend saw %s %q, want %q", k, got, want)
			}
		}
		// Without forwarding headers, the proxy's own view is used.
		get(t, client(), front(t, p).URL)
		if h := <-seen; h.Get("X-Forwarded-For") != "127.0.0.1" || h.Get("X-Forwarded-Proto") != "http" {
			t.Errorf("trusted peer without headers: XFF %q proto %q", h.Get("X-Forwarded-For"), h.Get("X-Forwarded-Proto"))
		}
	})
}

func TestRateLimit(t *testing.T) {
	b := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, b)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.RateLimit = config.RateLimit{RequestsPerSecond: 1, Burst: 3}
	var mu sync.Mutex
	var events []map[string]any
	p := newProxy(t, cfg, Options{SecurityEvent: func(kind string, data map[string]any) {
		mu.Lock()
		defer mu.Unlock()
		if kind == "rate_limited" {
			events = append(events, data)
		}
	}})
	f := front(t, p)
	c := client()
	for i := 0; i < 3; i++ {
		if r := get(t, c, f.URL); r.status != 200 {
			t.Fatalf("request %d within burst: %d", i, r.status)
		}
	}
	for i := 0; i < 3; i++ {
		r := get(t, c, f.URL+"/limited")
		if r.status != 429 || errorCode(t, r.body) != "rate_limited" {
			t.Fatalf("over the limit: %d %q", r.status, r.body)
		}
		if ra, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || ra < 1 {
			t.Errorf("Retry-After %q, want whole seconds ≥ 1", r.header.Get("Retry-After"))
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) != 1 {
		t.Fatalf("%d security events, want 1 (throttled per client)", len(events))
	}
	if events[0]["client_ip"] != "127.0.0.1" || events[0]["path"] != "/limited" {
		t.Errorf("event %v", events[0])
	}
	if st := p.Stats(); st.RateLimited != 3 || st.Status["4xx"] != 3 {
		t.Errorf("stats: rate limited %d, 4xx %d", st.RateLimited, st.Status["4xx"])
	}
}

func TestRedirectHTTPS(t *testing.T) {
	dir := t.TempDir()
	cf, kf, _ := writeCert(t, dir, "a", 1, "a.example.com")
	b := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, b)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
	cfg.Proxy.RedirectHTTPS = true
	cfg.Proxy.HTTPSListen = ":8443"
	cfg.Proxy.TrustedProxies = []string{"10.0.0.0/8"}
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	r := get(t, client(), f.URL+"/a/b?q=1", "Host", "www.example.com:80")
	if r.status != 308 || r.header.Get("Location") != "https://www.example.com:8443/a/b?q=1" {
		t.Errorf("%d Location %q", r.status, r.header.Get("Location"))
	}
	cfg.Proxy.HTTPSListen = ":443"
	if err := p.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	r = get(t, client(), f.URL+"/", "Host", "www.example.com")
	if r.header.Get("Location") != "https://www.example.com/" {
		t.Errorf("Location %q", r.header.Get("Location"))
	}
	if b.hits.Load() != 0 {
		t.Error("redirected requests reached the backend")
	}
}

func TestApplyIsAtomicAndKeepsInflight(t *testing.T) {
	release := make(chan struct{})
	old := newBackend(t, "old", func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "old")
	})
	nw := newBackend(t, "new", nil)
	cfg := testConfig([]config.Pool{poolOf("old", config.AlgorithmRoundRobin, old), poolOf("new", config.AlgorithmLeastConn, nw)},
		config.Route{PathPrefix: "/", Pool: "old"})
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()

	done := make(chan result, 1)
	go func() {
		resp, err := c.Get(f.URL)
		if err != nil {
			done <- result{status: -1, body: err.Error()}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		done <- result{status: resp.StatusCode, body: string(b)}
	}()
	waitFor(t, 2*time.Second, "request in flight", func() bool { return old.hits.Load() == 1 })
	u := p.upstreams[keyOf("old", old)]

	cfg2 := testConfig(cfg.Pools, config.Route{PathPrefix: "/", Pool: "new"})
	if err := p.Apply(cfg2); err != nil {
		t.Fatal(err)
	}
	if r := get(t, c, f.URL); r.body != "new" {
		t.Errorf("after Apply: %q, want new", r.body)
	}
	if p.upstreams[keyOf("old", old)] != u || u.inflight.Load() != 1 {
		t.Error("backend state not carried over a reload")
	}
	close(release)
	if r := <-done; r.status != 200 || r.body != "old" {
		t.Errorf("in-flight request: %d %q", r.status, r.body)
	}
	if u.inflight.Load() != 0 {
		t.Errorf("in-flight count %d after completion", u.inflight.Load())
	}

	// An invalid configuration changes nothing.
	bad := testConfig(cfg.Pools, config.Route{PathPrefix: "/", Pool: "missing"})
	if err := p.Apply(bad); err == nil {
		t.Fatal("Apply accepted a route to a missing pool")
	}
	if r := get(t, c, f.URL); r.body != "new" {
		t.Errorf("after a failed Apply: %q", r.body)
	}
}

func TestP2CEWMAThroughProxy(t *testing.T) {
	slow := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(50 * time.Millisecond)
		io.WriteString(w, "slow")
	})
	fast := []*backend{newBackend(t, "f1", nil), newBackend(t, "f2", nil), newBackend(t, "f3", nil)}
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmP2CEWMA, append([]*backend{slow}, fast...)...)},
		config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()
	var wg sync.WaitGroup
	const workers, each = 8, 50
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				resp, err := c.Get(f.URL)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	share := float64(slow.hits.Load()) / (workers * each)
	t.Logf("slow backend share %.3f (%d of %d)", share, slow.hits.Load(), workers*each)
	if share > 0.08 {
		t.Errorf("slow backend got %.3f of requests, want < 0.08", share)
	}
}

func TestAccessLogMetricsUsage(t *testing.T) {
	b := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, b)}, config.Route{Host: "app.example.com", PathPrefix: "/api", Pool: "web"})
	var logs syncBuffer
	reg := prometheus.NewRegistry()
	var usage struct {
		sync.Mutex
		pool          string
		req, in, outB uint64
	}
	p := newProxy(t, cfg, Options{
		Logger:     slogJSON(&logs),
		Registerer: reg,
		Usage: func(pool string, r, in, out uint64) {
			usage.Lock()
			defer usage.Unlock()
			usage.pool, usage.req, usage.in, usage.outB = pool, usage.req+r, usage.in+in, usage.outB+out
		},
	})
	f := front(t, p)
	req, _ := http.NewRequest(http.MethodPost, f.URL+"/api/x", strings.NewReader("hello"))
	req.Host = "app.example.com"
	req.Header.Set("X-Request-ID", "req-1")
	if r := do(t, client(), req); r.status != 200 {
		t.Fatal(r.status)
	}
	get(t, client(), f.URL+"/nowhere")

	var rec map[string]any
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "http request" && m["request_id"] == "req-1" {
			rec = m
		}
	}
	if rec == nil {
		t.Fatalf("no access log record in %s", logs.String())
	}
	for k, want := range map[string]any{
		"method": "POST", "host": "app.example.com", "path": "/api/x", "status": 200.0, "bytes_in": 5.0, "bytes_out": 1.0,
		"client_ip": "127.0.0.1", "backend": "127.0.0.1:" + strconv.Itoa(b.port), "route": "app.example.com/api", "pool": "web",
	} {
		if rec[k] != want {
			t.Errorf("access log %s = %v, want %v", k, rec[k], want)
		}
	}
	if _, ok := rec["duration_ms"].(float64); !ok {
		t.Error("access log has no duration_ms")
	}

	usage.Lock()
	if usage.pool != "web" || usage.req != 1 || usage.in != 5 || usage.outB != 1 {
		t.Errorf("usage: pool %q requests %d in %d out %d", usage.pool, usage.req, usage.in, usage.outB)
	}
	usage.Unlock()

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	find := func(name string, labels map[string]string) *dto.Metric {
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
		next:
			for _, m := range mf.GetMetric() {
				for _, lp := range m.GetLabel() {
					if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
						continue next
					}
				}
				return m
			}
		}
		return nil
	}
	if m := find("veloflux_http_requests_total", map[string]string{"route": "app.example.com/api", "pool": "web", "backend": "127.0.0.1:" + strconv.Itoa(b.port), "code": "200"}); m == nil || m.GetCounter().GetValue() != 1 {
		t.Errorf("requests_total for the route: %v", m)
	}
	if m := find("veloflux_http_requests_total", map[string]string{"route": "", "code": "404"}); m == nil {
		t.Error("no requests_total series for the unrouted 404")
	}
	if m := find("veloflux_http_request_duration_seconds", map[string]string{"route": "app.example.com/api", "pool": "web"}); m == nil || m.GetHistogram().GetSampleCount() != 1 {
		t.Errorf("duration histogram: %v", m)
	}
	if m := find("veloflux_http_inflight_requests", nil); m == nil || m.GetGauge().GetValue() != 0 {
		t.Errorf("inflight gauge: %v", m)
	}
	if m := find("veloflux_http_upstream_errors_total", map[string]string{"reason": "dial"}); m == nil {
		t.Error("upstream_errors_total series missing")
	}

	st := p.Stats()
	if st.Requests != 2 || st.Status["2xx"] != 1 || st.Status["4xx"] != 1 || st.BytesIn != 5 || st.InFlight != 0 {
		t.Errorf("stats %+v", st)
	}
	if st.LatencyP50 <= 0 || st.LatencyP99 < st.LatencyP50 {
		t.Errorf("latency quantiles p50 %v p99 %v", st.LatencyP50, st.LatencyP99)
	}

	// Removing the pool's backend drops its series.
	cfg2 := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, newBackend(t, "c", nil))}, cfg.Routes...)
	if err := p.Apply(cfg2); err != nil {
		t.Fatal(err)
	}
	mfs, _ = reg.Gather()
	if m := find("veloflux_http_requests_total", map[string]string{"backend": "127.0.0.1:" + strconv.Itoa(b.port)}); m != nil {
		t.Error("series of a removed backend kept")
	}
}

func TestEventStreamOutlivesRequestTimeout(t *testing.T) {
	sse := newBackend(t, "sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := 0; i < 5; i++ {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, sse)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.Timeouts.Request = config.Duration(200 * time.Millisecond)
	p := newProxy(t, cfg, Options{})
	start := time.Now()
	resp, err := client().Get(front(t, p).URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 64)
	n, err := resp.Body.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "data: 0") {
		t.Fatalf("first event: %q %v", buf[:n], err)
	}
	if d := time.Since(start); d > 300*time.Millisecond {
		t.Errorf("first event after %v: not flushed as it came", d)
	}
	rest, err := io.ReadAll(resp.Body)
	if err != nil || !strings.Contains(string(rest), "data: 4") {
		t.Errorf("stream cut by the request timeout: %q %v", rest, err)
	}
}
