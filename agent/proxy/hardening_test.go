package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

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
