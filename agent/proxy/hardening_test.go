package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/veloflux/veloflux/agent/config"
)

// rawConn dials addr for a hand-written exchange, with every wait bounded.
func rawConn(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

// rawResponse reads one response from br and its body.
func rawResponse(t *testing.T, br *bufio.Reader) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("read response body: %v", err)
	}
	return resp, string(b)
}

// rawExchange sends req on a new connection and reads one response.
func rawExchange(t *testing.T, addr, req string) (*http.Response, string) {
	t.Helper()
	c := rawConn(t, addr)
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	return rawResponse(t, bufio.NewReader(c))
}

// sinkBackend reads request bodies whole and answers "ok".
func sinkBackend(t *testing.T) *backend {
	return newBackend(t, "sink", func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			return
		}
		io.WriteString(w, "ok")
	})
}

func upstreamErrorTotal(s Stats) uint64 {
	var n uint64
	for _, v := range s.UpstreamErrors {
		n += v
	}
	return n
}

// A client that sends a broken body is answered 400 and is not the
// backend's failure: such clients must not be able to eject a backend.
func TestMalformedBodyIs400AndSparesBackend(t *testing.T) {
	be := sinkBackend(t)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	const threshold = 3
	cfg.Proxy.PassiveHealth = config.PassiveHealth{ConsecutiveFailures: threshold, Ejection: config.Duration(time.Minute)}
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	for i := 0; i < threshold+2; i++ {
		// The second chunk's size line is not hexadecimal.
		resp, body := rawExchange(t, addr, "POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"+
			"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n")
		if resp.StatusCode != http.StatusBadRequest || errorCode(t, body) != "bad_request" {
			t.Fatalf("malformed chunked body %d: %d %q, want 400 bad_request", i, resp.StatusCode, body)
		}
		if !resp.Close {
			t.Errorf("malformed chunked body %d: the connection is kept open", i)
		}
	}
	st := p.Stats()
	if len(st.Ejected) != 0 || st.Ejections != 0 {
		t.Errorf("clients with broken bodies ejected %v (%d ejections)", st.Ejected, st.Ejections)
	}
	if n := upstreamErrorTotal(st); n != 0 {
		t.Errorf("broken client bodies counted as %d upstream errors: %v", n, st.UpstreamErrors)
	}
	if r := get(t, client(), "http://"+addr+"/"); r.status != 200 {
		t.Errorf("backend no longer served after broken client bodies: %d %q", r.status, r.body)
	}
}

// A client that stops sending its body is answered 408 when the request
// timeout ends, and that is not the backend's failure either.
func TestStalledBodyIs408AndSparesBackend(t *testing.T) {
	be := sinkBackend(t)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.Timeouts.Request = config.Duration(300 * time.Millisecond)
	cfg.Proxy.PassiveHealth = config.PassiveHealth{ConsecutiveFailures: 1, Ejection: config.Duration(time.Minute)}
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	// 10 of the announced 100 bytes, then nothing.
	resp, body := rawExchange(t, addr, "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n0123456789")
	if resp.StatusCode != http.StatusRequestTimeout || errorCode(t, body) != "request_timeout" {
		t.Fatalf("stalled body: %d %q, want 408 request_timeout", resp.StatusCode, body)
	}
	if !resp.Close {
		t.Error("stalled body: the connection is kept open")
	}
	st := p.Stats()
	if len(st.Ejected) != 0 || upstreamErrorTotal(st) != 0 {
		t.Errorf("a stalled client counted against the backend: ejected %v, upstream errors %v", st.Ejected, st.UpstreamErrors)
	}
	if r := get(t, client(), "http://"+addr+"/"); r.status != 200 {
		t.Errorf("backend no longer served after a stalled client: %d %q", r.status, r.body)
	}
}

// A body the backend stops reading is still the backend's timeout: 504.
func TestBackendNotReadingBodyIs504(t *testing.T) {
	release := make(chan struct{})
	be := newBackend(t, "stuck", func(w http.ResponseWriter, r *http.Request) {
		<-release // never reads the body nor answers
	})
	t.Cleanup(func() { close(release) })
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.Timeouts.Request = config.Duration(300 * time.Millisecond)
	cfg.Proxy.MaxBodyBytes = 64 << 20
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/", strings.NewReader(strings.Repeat("x", 16<<20)))
	if r := do(t, client(), req); r.status != http.StatusGatewayTimeout {
		t.Errorf("backend that reads nothing: %d %q, want 504", r.status, r.body)
	}
	if n := p.Stats().UpstreamErrors[ReasonTimeout]; n != 1 {
		t.Errorf("timeout upstream errors %d, want 1", n)
	}
}

// A body announced over max_body_bytes is refused at once: 413 before any
// "100 Continue" (which would invite the body), and the connection is closed
// soon after rather than held open waiting for a body nobody will read.
func TestBodyOverLimitByContentLengthIsRefusedAtOnce(t *testing.T) {
	be := sinkBackend(t)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.MaxBodyBytes = 1024
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	for _, tc := range []struct{ name, req string }{
		{"expect 100-continue", "PUT /big HTTP/1.1\r\nHost: app\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n"},
		// Without Expect the client would send the body next; the
		// answer must not wait for it either.
		{"body not sent yet", "PUT /big HTTP/1.1\r\nHost: app\r\nContent-Length: 4096\r\n\r\n"},
	} {
		c := rawConn(t, addr)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, tc.req)
		br := bufio.NewReader(c)
		status, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: no answer: %v", tc.name, err)
		}
		if !strings.HasPrefix(status, "HTTP/1.1 413 ") {
			t.Fatalf("%s: first status line %q, want 413 (and no 100 Continue)", tc.name, strings.TrimSpace(status))
		}
		resp, body := rawResponse(t, bufio.NewReader(io.MultiReader(strings.NewReader(status), br)))
		if !resp.Close || errorCode(t, body) != "body_too_large" {
			t.Errorf("%s: Connection: close %v, body %q", tc.name, resp.Close, body)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("%s: the connection was not closed after the refusal: %v", tc.name, err)
		}
	}
	if be.hits.Load() != 0 {
		t.Error("a refused request reached the backend")
	}

	// A body within the limit still gets its 100 Continue and is proxied.
	c := rawConn(t, addr)
	io.WriteString(c, "PUT /small HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(c)
	if resp, _ := rawResponse(t, br); resp.StatusCode != http.StatusContinue {
		t.Fatalf("within the limit: first answer %d, want 100 Continue", resp.StatusCode)
	}
	io.WriteString(c, "hello")
	if resp, body := rawResponse(t, br); resp.StatusCode != 200 || body != "ok" {
		t.Errorf("within the limit: %d %q", resp.StatusCode, body)
	}
}

// h2Conn is a hand-driven HTTP/2 client connection (prior knowledge, h2c)
// for abusive frame sequences no real client sends.
type h2Conn struct {
	conn   net.Conn
	w      *http2.Framer
	header []byte // an HPACK block for GET / on host app
	frames chan h2Frame
}

// h2Frame is what the tests look at in a frame the server sent.
type h2Frame struct {
	typ        http2.FrameType
	stream     uint32
	code       http2.ErrCode // RST_STREAM, GOAWAY
	lastStream uint32        // GOAWAY
	maxStreams uint32        // SETTINGS, when present
}

// dialH2C opens an h2c connection to addr (see startH2).
func dialH2C(t *testing.T, addr string) *h2Conn {
	t.Helper()
	return startH2(t, rawConn(t, addr))
}

// dialH2 opens an HTTP/2 connection over TLS (ALPN h2) to addr, trusting
// roots (see startH2).
func dialH2(t *testing.T, addr string, roots *x509.CertPool) *h2Conn {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
		&tls.Config{ServerName: "app", RootCAs: roots, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN chose %q, want h2", p)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return startH2(t, c)
}

// startH2 begins HTTP/2 on c: the preface, an empty SETTINGS frame, and a
// goroutine that hands every frame the server sends to frames until the
// connection ends (then frames is closed).
func startH2(t *testing.T, c net.Conn) *h2Conn {
	t.Helper()
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	h := &h2Conn{conn: c, w: http2.NewFramer(c, nil), frames: make(chan h2Frame, 64)}
	if err := h.w.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "app"}, {":path", "/"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	h.header = buf.Bytes()
	r := http2.NewFramer(nil, c)
	go func() {
		defer close(h.frames)
		for {
			f, err := r.ReadFrame()
			if err != nil {
				return
			}
			e := h2Frame{typ: f.Header().Type, stream: f.Header().StreamID}
			switch f := f.(type) {
			case *http2.RSTStreamFrame:
				e.code = f.ErrCode
			case *http2.GoAwayFrame:
				e.code, e.lastStream = f.ErrCode, f.LastStreamID
			case *http2.SettingsFrame:
				e.maxStreams, _ = f.Value(http2.SettingMaxConcurrentStreams)
			}
			h.frames <- e
		}
	}()
	return h
}

// open starts stream id with a GET (no body).
func (h *h2Conn) open(id uint32) error {
	return h.w.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.header, EndStream: true, EndHeaders: true})
}

// An HTTP/2 client that opens and at once cancels stream after stream (the
// rapid reset flood) has its connection ended with GOAWAY once it exceeds
// its reset budget, and the backend sees no more requests than that budget;
// over h2c and over TLS.
func TestHTTP2RapidResetEndsConnection(t *testing.T) {
	be := newBackend(t, "b", nil)
	dir := t.TempDir()
	cf, kf, cert := writeCert(t, dir, "app", 1, "app")
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.H2C = true
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
	const budget = 100
	cfg.Proxy.HTTP2 = config.HTTP2Limits{MaxConcurrentStreams: 100, MaxClientResets: budget, ResetWindow: config.Duration(time.Minute)}
	var floods atomic.Int64
	p := newProxy(t, cfg, Options{SecurityEvent: func(kind string, data map[string]any) {
		if kind == ViolationResetFlood && data["client_ip"] == "127.0.0.1" {
			floods.Add(1)
		}
	}})
	httpAddr, httpsAddr := serve(t, p)

	for i, dial := range []func() *h2Conn{
		func() *h2Conn { return dialH2C(t, httpAddr) },
		func() *h2Conn { return dialH2(t, httpsAddr, rootsOf(cert)) },
	} {
		name := [...]string{"h2c", "h2"}[i]
		hitsBefore := be.hits.Load()
		h := dial()
		const pairs = 5000
		sent := 0
		for ; sent < pairs; sent++ {
			id := uint32(2*sent + 1)
			if h.open(id) != nil || h.w.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				break // the proxy closed the connection
			}
		}
		var goaway *h2Frame
		timeout := time.After(5 * time.Second)
	wait:
		for goaway == nil {
			select {
			case f, ok := <-h.frames:
				if !ok {
					break wait
				}
				if f.typ == http2.FrameGoAway {
					goaway = &f
				}
			case <-timeout:
				break wait
			}
		}
		h.conn.Close()
		waitFor(t, 5*time.Second, "requests in flight to end", func() bool { return p.Stats().InFlight == 0 })
		hits := be.hits.Load() - hitsBefore
		t.Logf("%s: sent %d HEADERS+RST_STREAM pairs; the backend saw %d requests", name, sent, hits)

		if goaway == nil {
			t.Fatalf("%s: no GOAWAY after %d reset streams (budget %d)", name, sent, budget)
		}
		if goaway.code != http2.ErrCodeEnhanceYourCalm {
			t.Errorf("%s: GOAWAY code %v, want ENHANCE_YOUR_CALM", name, goaway.code)
		}
		// The streams past the budget were never processed.
		if max := uint32(2*(budget+1) + 1); goaway.lastStream > max {
			t.Errorf("%s: GOAWAY last stream %d: streams past the budget were processed (want <= %d)", name, goaway.lastStream, max)
		}
		if hits > budget+1 {
			t.Errorf("%s: the backend saw %d requests, want at most %d", name, hits, budget+1)
		}
	}
	if floods.Load() != 2 {
		t.Errorf("%d %s security events, want 2", floods.Load(), ViolationResetFlood)
	}
	if n := p.Stats().H2ResetFloods; n != 2 {
		t.Errorf("Stats().H2ResetFloods = %d, want 2", n)
	}
}

// Streams past max_concurrent_streams are refused, and the backend sees
// only the streams within the limit.
func TestHTTP2ConcurrentStreamsLimit(t *testing.T) {
	release := make(chan struct{})
	be := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.H2C = true
	const limit = 4
	cfg.Proxy.HTTP2 = config.HTTP2Limits{MaxConcurrentStreams: limit, MaxClientResets: 100, ResetWindow: config.Duration(time.Minute)}
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	h := dialH2C(t, addr)
	for i := 0; i <= limit; i++ {
		if err := h.open(uint32(2*i + 1)); err != nil {
			t.Fatal(err)
		}
	}
	extra := uint32(2*limit + 1)
	var advertised uint32
	refused := false
	timeout := time.After(5 * time.Second)
	for !refused {
		select {
		case f, ok := <-h.frames:
			if !ok {
				t.Fatal("the connection ended")
			}
			switch f.typ {
			case http2.FrameSettings:
				if f.maxStreams != 0 {
					advertised = f.maxStreams
				}
			case http2.FrameRSTStream:
				if f.stream != extra {
					t.Fatalf("stream %d within the limit reset: %v", f.stream, f.code)
				}
				if f.code != http2.ErrCodeRefusedStream && f.code != http2.ErrCodeProtocol {
					t.Errorf("stream over the limit reset with %v, want REFUSED_STREAM or PROTOCOL_ERROR", f.code)
				}
				refused = true
			case http2.FrameHeaders:
				if f.stream == extra {
					t.Fatalf("stream %d over the limit of %d was answered", extra, limit)
				}
			}
		case <-timeout:
			t.Fatalf("stream %d over the limit of %d was not refused (backend saw %d requests)", extra, limit, be.hits.Load())
		}
	}
	if advertised != limit {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d, want %d", advertised, limit)
	}
	waitFor(t, 5*time.Second, "the streams within the limit to reach the backend", func() bool { return be.hits.Load() == limit })
	close(release)
	answered := 0
	for answered < limit {
		select {
		case f, ok := <-h.frames:
			if !ok {
				t.Fatalf("the connection ended after %d answers", answered)
			}
			if f.typ == http2.FrameHeaders && f.stream != extra {
				answered++
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d streams within the limit answered", answered, limit)
		}
	}
	if n := be.hits.Load(); n != limit {
		t.Errorf("the backend saw %d requests, want %d", n, limit)
	}
}

// smugglingStream is a client's pipelined requests: three ordinary ones
// (a Content-Length body, a chunked body with an extension and a trailer,
// none), then one with both Content-Length and Transfer-Encoding whose
// "body", by Content-Length, hides a second request.
const smugglingStream = "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello" +
	"POST /b HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: v\r\n\r\n" +
	"GET /c HTTP/1.1\r\nHost: app\r\n\r\n" +
	"POST /d HTTP/1.1\r\nHost: app\r\nContent-Length: 38\r\nTransfer-Encoding: chunked\r\n\r\n" +
	"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"

// A request with both Content-Length and Transfer-Encoding is refused with
// 400 and its connection closed, on HTTP and HTTPS: the request hidden in
// its body is never answered, while the requests before it on the same
// connection are served.
func TestContentLengthWithTransferEncodingIsRefused(t *testing.T) {
	var paths []string
	var mu sync.Mutex
	be := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		mu.Lock()
		paths = append(paths, r.URL.Path)
		mu.Unlock()
		io.WriteString(w, "ok")
	})
	dir := t.TempDir()
	cf, kf, cert := writeCert(t, dir, "app", 1, "app")
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
	// With h2c on, plain connections are first told from HTTP/2 by their
	// opening bytes ("POST" shares its "P" with the HTTP/2 preface).
	cfg.Proxy.H2C = true
	var events atomic.Int64
	p := newProxy(t, cfg, Options{SecurityEvent: func(kind string, data map[string]any) {
		if kind == ViolationAmbiguousFraming && data["client_ip"] == "127.0.0.1" {
			events.Add(1)
		}
	}})
	httpAddr, httpsAddr := serve(t, p)

	for _, scheme := range []string{"http", "https"} {
		mu.Lock()
		paths = nil
		mu.Unlock()
		var c net.Conn
		if scheme == "http" {
			c = rawConn(t, httpAddr)
		} else {
			tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", httpsAddr,
				&tls.Config{ServerName: "app", RootCAs: rootsOf(cert), NextProtos: []string{"http/1.1"}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { tc.Close() })
			tc.SetDeadline(time.Now().Add(10 * time.Second))
			c = tc
		}
		if _, err := io.WriteString(c, smugglingStream); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		for _, path := range []string{"/a", "/b", "/c"} {
			if resp, body := rawResponse(t, br); resp.StatusCode != 200 || body != "ok" {
				t.Fatalf("%s %s: %d %q", scheme, path, resp.StatusCode, body)
			}
		}
		resp, _ := rawResponse(t, br)
		if resp.StatusCode != http.StatusBadRequest || !resp.Close {
			t.Errorf("%s: Content-Length with Transfer-Encoding: %d, Connection: close %v; want 400 and close", scheme, resp.StatusCode, resp.Close)
		}
		// Closed: EOF, or a reset as the unread rest arrives.
		if extra, err := br.ReadString('\n'); err == nil {
			t.Errorf("%s: the connection goes on after the refusal: %q", scheme, extra)
		}
		mu.Lock()
		if got := strings.Join(paths, " "); got != "/a /b /c" {
			t.Errorf("%s: the backend saw %q, want /a /b /c", scheme, got)
		}
		mu.Unlock()
	}
	if n := p.Stats().AmbiguousFraming; n != 2 || events.Load() != 2 {
		t.Errorf("Stats().AmbiguousFraming %d, security events %d; want 2 and 2", n, events.Load())
	}
}

// The HTTPS listener, whose TLS handshake is the proxy's, still answers a
// plain HTTP request with a 400 saying so.
func TestPlainHTTPToHTTPSListener(t *testing.T) {
	dir := t.TempDir()
	cf, kf, _ := writeCert(t, dir, "app", 1, "app")
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, sinkBackend(t))}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
	p := newProxy(t, cfg, Options{})
	_, httpsAddr := serve(t, p)
	resp, body := rawExchange(t, httpsAddr, "GET / HTTP/1.1\r\nHost: app\r\n\r\n")
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "HTTPS") {
		t.Errorf("plain HTTP to the HTTPS listener: %d %q", resp.StatusCode, body)
	}
}
