package proxy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// rawBackend is a backend on a plain TCP listener that records each
// request head exactly as the proxy wrote it, with its body as framed,
// and answers with a fixed raw response.
type rawBackend struct {
	port     int
	response string
	mu       sync.Mutex
	heads    []string
	bodies   []string
	hits     atomic.Int64
}

func newRawBackend(t *testing.T, response string) *rawBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	b := &rawBackend{port: ln.Addr().(*net.TCPAddr).Port, response: response}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go b.serve(c)
		}
	}()
	return b
}

func (b *rawBackend) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	for {
		var head strings.Builder
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			head.WriteString(line)
			if line == "\r\n" {
				break
			}
		}
		b.hits.Add(1)
		h := head.String()
		var body []byte
		switch {
		case strings.Contains(strings.ToLower(h), "\r\ntransfer-encoding: chunked\r\n"):
			// Kept as framed: size lines, data, the last chunk and
			// the trailer section.
			raw := &bytes.Buffer{}
			for {
				line, err := br.ReadString('\n')
				raw.WriteString(line)
				if err != nil {
					return
				}
				n, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(line, ";", 2)[0]), 16, 64)
				if err != nil {
					return
				}
				if n == 0 {
					break
				}
				if _, err := io.CopyN(raw, br, n+2); err != nil {
					return
				}
			}
			for {
				line, err := br.ReadString('\n')
				raw.WriteString(line)
				if err != nil || line == "\r\n" {
					break
				}
			}
			body = raw.Bytes()
		case strings.Contains(strings.ToLower(h), "\r\ncontent-length: "):
			i := strings.Index(strings.ToLower(h), "\r\ncontent-length: ") + len("\r\ncontent-length: ")
			n, _ := strconv.Atoi(h[i : i+strings.Index(h[i:], "\r\n")])
			body = make([]byte, n)
			io.ReadFull(br, body)
		}
		b.mu.Lock()
		b.heads = append(b.heads, h)
		b.bodies = append(b.bodies, string(body))
		b.mu.Unlock()
		io.WriteString(c, b.response)
	}
}

func (b *rawBackend) last() (head, body string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.heads) == 0 {
		return "", ""
	}
	return b.heads[len(b.heads)-1], b.bodies[len(b.bodies)-1]
}

func (b *rawBackend) pool() config.Pool {
	w := uint32(1)
	return config.Pool{Name: "web", Algorithm: config.AlgorithmRoundRobin,
		Backends: []config.Backend{{Address: "127.0.0.1", Port: b.port, Weight: &w}}}
}

// readRawResponse reads one response and returns its head as sent, and
// its body.
func readRawResponse(t *testing.T, br *bufio.Reader) (head, body string) {
	t.Helper()
	var h strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the response head: %v (so far %q)", err, h.String())
		}
		h.WriteString(line)
		if line == "\r\n" {
			break
		}
	}
	resp, err := http.ReadResponse(bufio.NewReader(io.MultiReader(strings.NewReader(h.String()), br)), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	return h.String(), string(b)
}

// Headers reach the backend, and the client, as they were sent: names in
// their own case, repeated headers as separate lines in their order
// (Cookie included), quotes kept; hop-by-hop headers, named in Connection
// or not and in any case, are removed.
func TestHeaderSemantics(t *testing.T) {
	be := newRawBackend(t, "HTTP/1.1 200 OK\r\n"+
		"Content-Length: 2\r\n"+
		"Set-Cookie: a=1; Path=/\r\n"+
		"Set-Cookie: a=2; Path=/x\r\n"+
		"X-Dup: one\r\n"+
		"X-Dup: two\r\n"+
		"x-lower-Case: v\r\n"+
		"X-Quoted: \"q v\"\r\n"+
		"Connection: X-Hop-Resp\r\n"+
		"X-Hop-Resp: secret\r\n"+
		"keep-alive: timeout=5\r\n"+
		"\r\nok")
	cfg := testConfig([]config.Pool{be.pool()}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	c := rawConn(t, addr)
	io.WriteString(c, "GET /h?q=\"1\" HTTP/1.1\r\n"+
		"Host: app\r\n"+
		"Cookie: a=1\r\n"+
		"Cookie: b=\"2\"\r\n"+
		"X-Dup: one\r\n"+
		"X-Dup: two\r\n"+
		"x-lower-Case: v\r\n"+
		"X-Quoted: \"q v\"\r\n"+
		"Connection: keep-alive, X-Hop\r\n"+
		"x-hop: secret\r\n"+
		"KEEP-ALIVE: timeout=5\r\n"+
		"te: trailers\r\n"+
		"Proxy-Connection: keep-alive\r\n"+
		"Upgrade: something\r\n"+
		"\r\n")
	head, body := readRawResponse(t, bufio.NewReader(c))
	if body != "ok" {
		t.Fatalf("body %q", body)
	}
	sent, _ := be.last()
	if !strings.HasPrefix(sent, "GET /h?q=\"1\" HTTP/1.1\r\n") {
		t.Errorf("request line toward the backend: %q", strings.SplitN(sent, "\r\n", 2)[0])
	}
	for _, tc := range []struct {
		what, in string
		want     []string // substrings, in this order
		not      []string // lower-case substrings that must not appear
	}{
		{"request", sent,
			[]string{"\r\nHost: app\r\n", "\r\nCookie: a=1\r\nCookie: b=\"2\"\r\n", "\r\nX-Dup: one\r\nX-Dup: two\r\n",
				"\r\nx-lower-Case: v\r\n", "\r\nX-Quoted: \"q v\"\r\n"},
			[]string{"x-hop", "keep-alive", "\r\nte:", "proxy-connection", "upgrade", "connection"}},
		{"response", head,
			[]string{"\r\nSet-Cookie: a=1; Path=/\r\n", "\r\nSet-Cookie: a=2; Path=/x\r\n"},
			[]string{"x-hop-resp", "keep-alive"}},
		{"response", head,
			[]string{"\r\nX-Dup: one\r\n", "\r\nX-Dup: two\r\n"}, nil},
		{"response", head, []string{"\r\nx-lower-Case: v\r\n"}, nil},
		{"response", head, []string{"\r\nX-Quoted: \"q v\"\r\n"}, nil},
	} {
		rest := tc.in
		for _, w := range tc.want {
			i := strings.Index(rest, w)
			if i < 0 {
				t.Errorf("%s head lacks %q (in order):\n%s", tc.what, w, tc.in)
				break
			}
			rest = rest[i+len(w)-2:]
		}
		for _, n := range tc.not {
			if strings.Contains(strings.ToLower(tc.in), n) {
				t.Errorf("%s head has %q:\n%s", tc.what, n, tc.in)
			}
		}
	}
}

// Request headers of up to 64 KiB are served; a larger block is answered
// 431 without reaching the backend.
func TestRequestHeaderLimit(t *testing.T) {
	be := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)
	for _, tc := range []struct {
		size int
		want int
	}{{60 << 10, 200}, {70 << 10, http.StatusRequestHeaderFieldsTooLarge}} {
		resp, _ := rawExchange(t, addr, "GET / HTTP/1.1\r\nHost: app\r\nCookie: c="+strings.Repeat("x", tc.size)+"\r\n\r\n")
		if resp.StatusCode != tc.want {
			t.Errorf("%d KiB of headers: %d, want %d", tc.size>>10, resp.StatusCode, tc.want)
		}
	}
	if be.hits.Load() != 1 {
		t.Errorf("backend hits %d, want 1", be.hits.Load())
	}
}

// proxy.max_header_bytes sets the limit: with 16 KiB, a 12 KiB header
// block is served and a 20 KiB one answered 431 (and logged so).
func TestRequestHeaderLimitIsConfigurable(t *testing.T) {
	be := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.MaxHeaderBytes = 16 << 10
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)
	for _, tc := range []struct {
		size int
		want int
	}{{12 << 10, 200}, {20 << 10, http.StatusRequestHeaderFieldsTooLarge}} {
		resp, body := rawExchange(t, addr, "GET / HTTP/1.1\r\nHost: app\r\nCookie: c="+strings.Repeat("x", tc.size)+"\r\n\r\n")
		if resp.StatusCode != tc.want {
			t.Errorf("%d KiB of headers: %d, want %d", tc.size>>10, resp.StatusCode, tc.want)
		}
		if tc.want == http.StatusRequestHeaderFieldsTooLarge && !strings.Contains(body, "exceeds 16384 bytes") {
			t.Errorf("431 body %q does not name the limit", body)
		}
	}
	if be.hits.Load() != 1 {
		t.Errorf("backend hits %d, want 1", be.hits.Load())
	}
}

// Requests whose framing could be read two ways, or that break the
// header syntax, are refused with 400 and their connection closed; the
// request pipelined behind them is never served, and the backend sees
// none of them.
func TestSmugglingTable(t *testing.T) {
	be := newRawBackend(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	cfg := testConfig([]config.Pool{be.pool()}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)
	const next = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"
	for _, tc := range []struct{ name, req string }{
		{"Content-Length then Transfer-Encoding", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"Transfer-Encoding then Content-Length", "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"},
		{"Content-Length with Transfer-Encoding identity", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nTransfer-Encoding: identity\r\n\r\nhello"},
		{"differing duplicate Content-Length", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"},
		{"equal duplicate Content-Length", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"},
		{"Content-Length list", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\n\r\nhello"},
		{"non-numeric Content-Length", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nhello"},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: app\r\nX-A: a\r\n b\r\n\r\n"},
		{"obs-fold with a tab", "GET / HTTP/1.1\r\nHost: app\r\nX-A: a\r\n\tb\r\n\r\n"},
		{"space before the colon", "POST / HTTP/1.1\r\nHost: app\r\nContent-Length : 5\r\n\r\nhello"},
		{"tab before the colon", "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n"},
		{"unknown transfer coding", "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"},
		{"duplicate Transfer-Encoding", "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"Transfer-Encoding on HTTP/1.0", "POST / HTTP/1.0\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"duplicate Host", "GET / HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n"},
		{"NUL in a header value", "GET / HTTP/1.1\r\nHost: app\r\nX-A: a\x00b\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rawConn(t, addr)
			io.WriteString(c, tc.req+next)
			br := bufio.NewReader(c)
			resp, _ := rawResponse(t, br)
			if resp.StatusCode != http.StatusBadRequest || !resp.Close {
				t.Errorf("%d, Connection: close %v; want 400 and close", resp.StatusCode, resp.Close)
			}
			if extra, err := br.ReadString('\n'); err == nil {
				t.Errorf("the connection goes on after the refusal: %q", extra)
			}
		})
	}
	if n := be.hits.Load(); n != 0 {
		t.Errorf("the backend saw %d requests", n)
	}
}

// The proxy frames every body toward the backend itself: a chunked body
// is sent chunked again, without the client's chunk extensions (its
// trailer fields are relayed: TestTrailersAreRelayed); a body with a
// Content-Length is sent with it.
func TestBodiesAreReframed(t *testing.T) {
	be := newRawBackend(t, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	cfg := testConfig([]config.Pool{be.pool()}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	c := rawConn(t, addr)
	io.WriteString(c, "POST /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"3;ext=\"x\"\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: v\r\n\r\n")
	br := bufio.NewReader(c)
	if _, body := readRawResponse(t, br); body != "ok" {
		t.Fatalf("chunked: %q", body)
	}
	head, body := be.last()
	lh := strings.ToLower(head)
	if !strings.Contains(lh, "\r\ntransfer-encoding: chunked\r\n") || strings.Contains(lh, "content-length") {
		t.Errorf("chunked request head toward the backend:\n%s", head)
	}
	if strings.Contains(body, "ext") {
		t.Errorf("the client's chunk extensions reached the backend: %q", body)
	}
	if dec, _ := io.ReadAll(httputil.NewChunkedReader(strings.NewReader(body))); string(dec) != "abcde" {
		t.Errorf("chunked body %q decodes to %q", body, dec)
	}

	io.WriteString(c, "PUT /l HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
	if _, b := readRawResponse(t, br); b != "ok" {
		t.Fatalf("content-length: %q", b)
	}
	head, body = be.last()
	if !strings.Contains(head, "\r\nContent-Length: 5\r\n") || strings.Contains(strings.ToLower(head), "transfer-encoding") || body != "hello" {
		t.Errorf("content-length request toward the backend:\n%s%q", head, body)
	}
}

// A response body is relayed as it arrives: an event stream event by
// event, and a large download without being held in memory.
func TestResponsesAreStreamed(t *testing.T) {
	events := make(chan string)
	be := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/big" {
			w.Header().Set("Content-Length", strconv.Itoa(50<<20))
			chunk := bytes.Repeat([]byte("x"), 1<<20)
			for i := 0; i < 50; i++ {
				w.Write(chunk)
			}
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		for e := range events {
			io.WriteString(w, "data: "+e+"\n\n")
			w.(http.Flusher).Flush()
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	f := front(t, p)

	resp, err := client().Get(f.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for _, e := range []string{"one", "two", "three"} {
		events <- e
		line, err := br.ReadString('\n')
		if err != nil || line != "data: "+e+"\n" {
			t.Fatalf("event %q arrived as %q, %v", e, line, err)
		}
		br.ReadString('\n')
	}
	close(events)

	var before runtimeMem
	before.read()
	resp2, err := client().Get(f.URL + "/big")
	if err != nil {
		t.Fatal(err)
	}
	var peak uint64
	buf := make([]byte, 64<<10)
	var n int64
	for {
		m, err := resp2.Body.Read(buf)
		n += int64(m)
		if n%(10<<20) < int64(m) {
			var cur runtimeMem
			cur.read()
			peak = max(peak, cur.heap)
		}
		if err != nil {
			break
		}
	}
	resp2.Body.Close()
	if n != 50<<20 {
		t.Fatalf("download of %d bytes, want %d", n, 50<<20)
	}
	// The test's own backend and client run in this process too; the
	// bound is far below the 50 MB a buffering proxy would hold.
	if peak > before.heap+24<<20 {
		t.Errorf("heap grew from %d to %d MB during a 50 MB download", before.heap>>20, peak>>20)
	}
}

// Many clients at once, each with its own path, body and request id: every
// answer and access log line is its own request's, so nothing of a
// request fasthttp recycles is kept past its handler (run with -race).
func TestConcurrentRequestsKeepTheirOwnData(t *testing.T) {
	be := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s %s", r.URL.Path, r.Header.Get("X-Request-Id"), b)
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	var logBuf syncBuffer
	p := newProxy(t, cfg, Options{Logger: slogJSON(&logBuf)})
	f := front(t, p)
	const clients, each = 8, 100
	var wg sync.WaitGroup
	errs := make(chan string, clients*each)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := client()
			for i := 0; i < each; i++ {
				path := fmt.Sprintf("/c%d/r%d", c, i)
				id := fmt.Sprintf("id-%d-%d", c, i)
				body := strings.Repeat(string(rune('a'+c)), 10+i)
				method := http.MethodGet
				var rd io.Reader
				if i%2 == 0 {
					method, rd = http.MethodPost, strings.NewReader(body)
				} else {
					body = ""
				}
				req, _ := http.NewRequest(method, f.URL+path, rd)
				req.Header.Set("X-Request-Id", id)
				resp, err := cl.Do(req)
				if err != nil {
					errs <- err.Error()
					return
				}
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if want := path + " " + id + " " + body; string(got) != want || resp.Header.Get("X-Request-Id") != id {
					errs <- fmt.Sprintf("%s: got %q (id %q), want %q", path, got, resp.Header.Get("X-Request-Id"), want)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	waitFor(t, 5*time.Second, "access log lines", func() bool {
		return strings.Count(logBuf.String(), `"msg":"http request"`) >= clients*each
	})
	for _, line := range strings.Split(strings.TrimSpace(logBuf.String()), "\n") {
		var e struct {
			Msg, Path, RequestID string `json:",omitempty"`
			ID                   string `json:"request_id"`
		}
		if json.Unmarshal([]byte(line), &e) != nil || e.Msg != "http request" {
			continue
		}
		var c, i int
		if _, err := fmt.Sscanf(e.Path, "/c%d/r%d", &c, &i); err != nil || e.ID != fmt.Sprintf("id-%d-%d", c, i) {
			t.Errorf("access log line mixes requests: path %q, request id %q", e.Path, e.ID)
		}
	}
}

// runtimeMem is the heap in use.
type runtimeMem struct{ heap uint64 }

func (m *runtimeMem) read() {
	var s runtime.MemStats
	runtime.ReadMemStats(&s)
	m.heap = s.HeapAlloc
}

// A backend connection the backend closed while it sat idle in the pool is
// not used for the next request: a request with a body, which cannot be
// sent twice, is not lost to it.
func TestBackendClosedIdleConnectionIsNotUsed(t *testing.T) {
	// A backend that closes idle keep-alive connections after 100 ms.
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	}))
	srv.Config.IdleTimeout = 100 * time.Millisecond
	srv.Start()
	t.Cleanup(srv.Close)
	be := &backend{name: "b", srv: srv, port: srv.Listener.Addr().(*net.TCPAddr).Port}
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	f := front(t, p)
	c := client()
	if r := get(t, c, f.URL); r.status != 200 {
		t.Fatalf("first request: %d", r.status)
	}
	time.Sleep(staleAfter + 200*time.Millisecond) // the backend has closed its side
	req, _ := http.NewRequest(http.MethodPost, f.URL+"/post", strings.NewReader("payload"))
	if r := do(t, c, req); r.status != 200 || r.body != "payload" {
		t.Errorf("POST after the backend closed the idle connection: %d %q", r.status, r.body)
	}
}

// closingBackend is a raw HTTP/1.1 backend that answers each connection's
// first request with a keep-alive response, then closes the connection
// after a pause: too soon for the proxy's idle check of pooled connections
// (staleAfter), so the next request is written to a connection the backend
// has already closed. It counts the connections it accepted.
func closingBackend(t *testing.T, pause time.Duration) (port int, conns *atomic.Int64) {
	return rawHTTPBackend(t, func(c net.Conn) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		time.Sleep(pause)
	})
}

// rawHTTPBackend is a loopback listener that hands each connection it
// accepts to serve, in a goroutine of its own, and closes the connection
// when serve returns. It counts the connections it accepted.
func rawHTTPBackend(t *testing.T, serve func(net.Conn)) (port int, conns *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	conns = new(atomic.Int64)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, conns
}

// A request without a body written to a pooled connection the backend has
// just closed (the idle check skips connections idle for less than
// staleAfter) is answered: the backend's reset wakes the wait for the
// reply at once, and the request goes again on a new connection.
func TestBackendJustClosedConnectionGetsAnswered(t *testing.T) {
	port, conns := closingBackend(t, 20*time.Millisecond)
	w := uint32(1)
	pool := config.Pool{Name: "web", Algorithm: config.AlgorithmRoundRobin,
		Backends: []config.Backend{{Address: "127.0.0.1", Port: port, Weight: &w}}}
	p := newProxy(t, testConfig([]config.Pool{pool}, config.Route{PathPrefix: "/", Pool: "web"}), Options{})
	f := front(t, p)
	c := client()
	for i := range 5 {
		// A wait nothing woke would end at the response header timeout,
		// in a 504.
		r := get(t, c, f.URL+"/r"+strconv.Itoa(i))
		if r.status != 200 || r.body != "ok" {
			t.Fatalf("request %d on a connection the backend closed: %d %q", i, r.status, r.body)
		}
		time.Sleep(100 * time.Millisecond) // the backend closes its side meanwhile
	}
	if n := conns.Load(); n < 5 {
		t.Errorf("backend accepted %d connections for 5 requests: closed ones were reused", n)
	}
}

// tcpPair is a connected loopback TCP pair.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// writeAwaitingReply returns once the reply has arrived, with the reply
// unread, and a request too big for the socket's buffer is sent whole.
func TestWriteAwaitingReply(t *testing.T) {
	for _, size := range []int{100, 4 << 20} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			c, s := tcpPair(t)
			if err := c.SetWriteBuffer(4096); err != nil {
				t.Fatal(err)
			}
			req := bytes.Repeat([]byte{'q'}, size)
			got := make(chan error, 1)
			go func() {
				b := make([]byte, size)
				if _, err := io.ReadFull(s, b); err != nil {
					got <- err
					return
				}
				if !bytes.Equal(b, req) {
					got <- errors.New("the request arrived altered")
					return
				}
				_, err := s.Write([]byte("reply"))
				got <- err
			}()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := writeAwaitingReply(c, req); err != nil {
				t.Fatalf("writeAwaitingReply: %v", err)
			}
			if err := <-got; err != nil {
				t.Fatalf("backend side: %v", err)
			}
			b := make([]byte, 5)
			if _, err := io.ReadFull(c, b); err != nil || string(b) != "reply" {
				t.Fatalf("reply after the wait: %q, %v", b, err)
			}
		})
	}
}

// A backend that never answers ends the wait at the read deadline, as a
// timeout; one that has closed its socket ends it with a reset.
func TestWriteAwaitingReplyEnds(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		c, _ := tcpPair(t)
		c.SetDeadline(time.Now().Add(100 * time.Millisecond))
		err := writeAwaitingReply(c, []byte("GET / HTTP/1.1\r\n\r\n"))
		if !isTimeout(err) || classify(err) != ReasonTimeout {
			t.Fatalf("no reply by the deadline: %v, want a timeout", err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		c, s := tcpPair(t)
		s.Close()
		time.Sleep(50 * time.Millisecond) // the FIN arrives and is seen before the write
		c.SetDeadline(time.Now().Add(5 * time.Second))
		err := writeAwaitingReply(c, []byte("GET / HTTP/1.1\r\n\r\n"))
		if err == nil {
			// Woken by the reset: the read says so.
			_, err = c.Read(make([]byte, 1))
		}
		if !staleConnError(err) {
			t.Fatalf("closed backend: %v, want a reset or the end of the stream", err)
		}
	})
}

// Response bodies of every size reach the client whole, with their length,
// whether they arrived with the header (copied at once, the backend
// connection released before the client is written to) or not (streamed);
// either way the one backend connection serves every request in turn.
func TestResponseBodiesOfEverySize(t *testing.T) {
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		w.Header().Set("Content-Length", strconv.Itoa(n))
		w.Write(bytes.Repeat([]byte{'b'}, n))
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	w := uint32(1)
	p := newProxy(t, testConfig([]config.Pool{{Name: "web", Algorithm: config.AlgorithmRoundRobin,
		Backends: []config.Backend{{Address: "127.0.0.1", Port: port, Weight: &w}}}}, config.Route{Pool: "web"}), Options{})
	f := front(t, p)
	c := client()
	for _, n := range []int{1, 1000, 4000, 30000, 40000, 1 << 20} {
		for range 3 {
			r := get(t, c, f.URL+"/?n="+strconv.Itoa(n))
			if r.status != http.StatusOK || len(r.body) != n || strings.Trim(r.body, "b") != "" {
				t.Fatalf("n=%d: status %d, %d bytes", n, r.status, len(r.body))
			}
			if cl := r.header.Get("Content-Length"); cl != strconv.Itoa(n) {
				t.Fatalf("n=%d: Content-Length %q", n, cl)
			}
		}
	}
	if got := conns.Load(); got != 1 {
		t.Errorf("the backend saw %d connections for requests sent one after another, want 1", got)
	}
}
