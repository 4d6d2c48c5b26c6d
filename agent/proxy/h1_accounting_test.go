package proxy

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// accessLogStatuses returns the status of every access log record in the
// JSON log.
func accessLogStatuses(t *testing.T, log string) []int {
	t.Helper()
	var out []int
	for line := range strings.SplitSeq(strings.TrimSpace(log), "\n") {
		var rec struct {
			Msg    string `json:"msg"`
			Status int    `json:"status"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec.Msg == "http request" {
			out = append(out, rec.Status)
		}
	}
	return out
}

// Requests fasthttp refuses before the proxy's handler sees them (a
// malformed header block, one over the header limit) are counted and
// logged like every other request.
func TestRequestsRefusedByTheParserAreAccounted(t *testing.T) {
	be := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	var log syncBuffer
	p := newProxy(t, cfg, Options{Logger: slogJSON(&log)})
	addr, _ := serve(t, p)

	for _, tc := range []struct {
		req  string
		want int
	}{
		{"GET / HTTP/1.1\r\nHost: app\r\nNo colon here\r\n\r\n", http.StatusBadRequest},
		{"GET / HTTP/1.1\r\nHost: app\r\nCookie: c=" + strings.Repeat("x", 70<<10) + "\r\n\r\n", http.StatusRequestHeaderFieldsTooLarge},
	} {
		if resp, _ := rawExchange(t, addr, tc.req); resp.StatusCode != tc.want {
			t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
		}
	}
	waitFor(t, 5*time.Second, "two requests accounted", func() bool { return p.Stats().Requests == 2 })
	if s := p.Stats(); s.Status["4xx"] != 2 || s.InFlight != 0 {
		t.Errorf("stats %+v, want 2 requests of 4xx and none in flight", s)
	}
	waitFor(t, 5*time.Second, "two access log records", func() bool { return len(accessLogStatuses(t, log.String())) == 2 })
	if got := accessLogStatuses(t, log.String()); got[0] != 400 || got[1] != 431 {
		t.Errorf("access log statuses %v, want [400 431]", got)
	}
	if be.hits.Load() != 0 {
		t.Errorf("the backend saw %d requests", be.hits.Load())
	}
}

// A client that goes away while the backend is still working is logged
// and counted as 499 (client closed request), as on the HTTP/2 engine and
// as nginx does, not as the backend's status; in plain HTTP (the end of
// its stream) and over TLS (its close_notify alert).
func TestClientGoneBeforeTheAnswerIs499(t *testing.T) {
	for _, overTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "tls"}[overTLS], func(t *testing.T) {
			release := make(chan struct{})
			be := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
				select {
				case <-release:
				case <-time.After(5 * time.Second):
				}
				io.WriteString(w, "late")
			})
			cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
			var roots *x509.CertPool
			if overTLS {
				cf, kf, cert := writeCert(t, t.TempDir(), "app", 1, "app")
				cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
				roots = x509.NewCertPool()
				roots.AddCert(cert)
			}
			var log syncBuffer
			p := newProxy(t, cfg, Options{Logger: slogJSON(&log)})
			addr, httpsAddr := serve(t, p)

			var c net.Conn = rawConn(t, addr)
			if overTLS {
				tc := tls.Client(rawConn(t, httpsAddr), &tls.Config{ServerName: "app", RootCAs: roots, NextProtos: []string{"http/1.1"}})
				if err := tc.Handshake(); err != nil {
					t.Fatal(err)
				}
				c = tc
			}
			io.WriteString(c, "GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
			waitFor(t, 5*time.Second, "the request at the backend", func() bool { return be.hits.Load() == 1 })
			c.Close()
			// The backend answers after the client left, and after the
			// proxy's threshold for checking on its client.
			time.Sleep(clientCheckAfter + 50*time.Millisecond)
			close(release)
			waitFor(t, 5*time.Second, "the request accounted", func() bool { return p.Stats().Requests == 1 })
			if s := p.Stats(); s.Status["4xx"] != 1 || s.Status["2xx"] != 0 {
				t.Errorf("status classes %v, want one 4xx", s.Status)
			}
			waitFor(t, 5*time.Second, "an access log record", func() bool { return len(accessLogStatuses(t, log.String())) == 1 })
			if got := accessLogStatuses(t, log.String()); got[0] != 499 {
				t.Errorf("access log status %d, want 499", got[0])
			}
		})
	}
}

// Trailers are relayed both ways on chunked messages: the client's toward
// the backend (with their announcement), the backend's toward the client;
// trailer fields the proxy sets itself or that concern one connection are
// dropped (fasthttp refuses those the HTTP specification forbids, such as
// X-Forwarded-For).
func TestTrailersAreRelayed(t *testing.T) {
	be := newRawBackend(t, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"+
		"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n")
	cfg := testConfig([]config.Pool{be.pool()}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{Logger: slog.New(slog.DiscardHandler)})
	addr, _ := serve(t, p)

	c := rawConn(t, addr)
	io.WriteString(c, "POST /t HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest, X-Request-Id\r\n\r\n"+
		"3\r\nabc\r\n0\r\nX-Digest: d1\r\nX-Request-Id: spoofed\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "ok" {
		t.Fatalf("body %q, %v", body, err)
	}
	if got := resp.Trailer.Get("X-Checksum"); got != "abc" {
		t.Errorf("response trailer X-Checksum %q, want abc (trailers %v, header %v)", got, resp.Trailer, resp.Header)
	}
	head, framed := be.last()
	if !strings.Contains(framed, "0\r\nX-Digest: d1\r\n\r\n") {
		t.Errorf("request trailer not relayed; the body as framed toward the backend: %q", framed)
	}
	if strings.Contains(framed, "spoofed") {
		t.Errorf("an X-Request-Id trailer reached the backend: %q", framed)
	}
	if !strings.Contains(strings.ToLower(head), "\r\ntrailer: x-digest") {
		t.Errorf("the request's Trailer announcement did not reach the backend:\n%s", head)
	}
}
