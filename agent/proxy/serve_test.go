package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/veloflux/veloflux/agent/config"
)

// tlsClient dials addr whatever the URL's host, trusting roots.
func tlsClient(addr string, roots *x509.CertPool, h2 bool) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: h2,
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: tr}
}

func rootsOf(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func peerCert(t *testing.T, addr, sni string) *x509.Certificate {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
		&tls.Config{ServerName: sni, InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("tls dial %s (SNI %q): %v", addr, sni, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

func TestTLSSNIAndHTTP2(t *testing.T) {
	dir := t.TempDir()
	acf, akf, acert := writeCert(t, dir, "a", 1, "a.example.com")
	bcf, bkf, bcert := writeCert(t, dir, "b", 2, "*.b.example.com")
	be := newBackend(t, "backend", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Proto, r.Header.Get("X-Forwarded-Proto"))
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: acf, KeyFile: akf}, {CertFile: bcf, KeyFile: bkf}}
	p := newProxy(t, cfg, Options{})
	_, httpsAddr := serve(t, p)
	if httpsAddr == "" {
		t.Fatal("no HTTPS listener")
	}

	for _, tc := range []struct {
		sni  string
		want *x509.Certificate
	}{
		{"a.example.com", acert},
		{"x.b.example.com", bcert},
		{"X.B.Example.Com", bcert},
		{"unknown.org", acert}, // the first certificate is the fallback
		{"", acert},
	} {
		if got := peerCert(t, httpsAddr, tc.sni); got.SerialNumber.Cmp(tc.want.SerialNumber) != 0 {
			t.Errorf("SNI %q: served %v, want %v", tc.sni, got.DNSNames, tc.want.DNSNames)
		}
	}

	roots := rootsOf(acert, bcert)
	r := get(t, tlsClient(httpsAddr, roots, true), "https://x.b.example.com/")
	if r.status != 200 || r.proto != 2 {
		t.Fatalf("HTTPS with h2: %d proto %d", r.status, r.proto)
	}
	// HTTP/1.1 toward the backend, and the scheme is forwarded.
	if r.body != "HTTP/1.1 https" {
		t.Errorf("backend saw %q, want HTTP/1.1 https", r.body)
	}
	// ALPN falls back to HTTP/1.1 for clients without h2.
	if r := get(t, tlsClient(httpsAddr, roots, false), "https://a.example.com/"); r.status != 200 || r.proto != 1 {
		t.Errorf("HTTPS without h2: %d proto %d", r.status, r.proto)
	}

	// TLS 1.1 and older are refused.
	_, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", httpsAddr,
		&tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS11})
	if err == nil {
		t.Error("TLS 1.1 handshake succeeded")
	}
}

func TestCertificateHotReload(t *testing.T) {
	dir := t.TempDir()
	cf, kf, old := writeCert(t, dir, "site", 10, "site.example.com")
	be := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
	var logs syncBuffer
	p := newProxy(t, cfg, Options{Logger: slogJSON(&logs)})
	_, addr := serve(t, p)

	if got := peerCert(t, addr, "site.example.com"); got.SerialNumber.Int64() != 10 {
		t.Fatalf("serial %v", got.SerialNumber)
	}
	// Renewed in place: served without restart.
	_, _, renewed := writeCert(t, dir, "site", 11, "site.example.com")
	waitFor(t, 3*time.Second, "renewed certificate", func() bool {
		return peerCert(t, addr, "site.example.com").SerialNumber.Int64() == 11
	})
	// A broken pair keeps the current certificate, with an error logged.
	writeFileAtomic(t, kf, []byte("not a key"))
	waitFor(t, 3*time.Second, "reload error logged", func() bool {
		return strings.Contains(logs.String(), "reload failed")
	})
	if got := peerCert(t, addr, "site.example.com"); got.SerialNumber.Int64() != 11 {
		t.Errorf("after a broken reload serial %v, want 11 (kept)", got.SerialNumber)
	}
	// HTTPS requests still verify against the renewed certificate.
	if r := get(t, tlsClient(addr, rootsOf(renewed), true), "https://site.example.com/"); r.status != 200 {
		t.Errorf("status %d", r.status)
	}
	_ = old

	// A configuration naming a certificate that cannot be loaded is refused.
	bad := *cfg
	bad.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}, {CertFile: dir + "/missing.crt", KeyFile: dir + "/missing.key"}}
	if err := p.Apply(&bad); err == nil {
		t.Error("Apply accepted a missing certificate")
	}
}

func TestH2C(t *testing.T) {
	be := newBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Proto) })
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.H2C = true
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	c := &http.Client{Timeout: 10 * time.Second, Transport: tr}
	r := get(t, c, "http://"+addr+"/")
	if r.status != 200 || r.proto != 2 || r.body != "HTTP/1.1" {
		t.Errorf("h2c: %d proto %d backend saw %q", r.status, r.proto, r.body)
	}
	// HTTP/1.1 still works on the same listener.
	if r := get(t, client(), "http://"+addr+"/"); r.status != 200 || r.proto != 1 {
		t.Errorf("http/1.1: %d proto %d", r.status, r.proto)
	}

	// Turning h2c off replaces the listener (same address).
	cfg.Proxy.H2C = false
	cfg.Proxy.HTTPListen = addr
	if err := p.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	tr2 := &http.Transport{Protocols: new(http.Protocols)}
	tr2.Protocols.SetUnencryptedHTTP2(true)
	if _, err := (&http.Client{Timeout: 5 * time.Second, Transport: tr2}).Get("http://" + addr + "/"); err == nil {
		t.Error("h2c still accepted after it was disabled")
	}
	if r := get(t, client(), "http://"+addr+"/"); r.status != 200 {
		t.Errorf("http/1.1 after the listener was replaced: %d", r.status)
	}
}

func TestApplyManagesListeners(t *testing.T) {
	dir := t.TempDir()
	cf, kf, cert := writeCert(t, dir, "a", 1, "a.example.com")
	be := newBackend(t, "b", nil)
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	addr, httpsAddr := serve(t, p)
	if httpsAddr != "" {
		t.Fatal("HTTPS listener open without certificates")
	}
	// Adding a certificate opens HTTPS.
	cfg.Proxy.TLS = []config.TLSCert{{CertFile: cf, KeyFile: kf}}
	cfg.Proxy.HTTPListen = addr
	if err := p.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	_, httpsAddr = p.listenAddrs()
	if httpsAddr == "" {
		t.Fatal("HTTPS listener not opened by Apply")
	}
	if r := get(t, tlsClient(httpsAddr, rootsOf(cert), true), "https://a.example.com/"); r.status != 200 {
		t.Errorf("HTTPS status %d", r.status)
	}
	// Moving HTTP to another port: the new one serves, the old one closes.
	cfg.Proxy.HTTPListen = "127.0.0.1:0"
	if err := p.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	newAddr, _ := p.listenAddrs()
	if newAddr == addr {
		t.Fatal("HTTP listener not moved")
	}
	if r := get(t, client(), "http://"+newAddr+"/"); r.status != 200 {
		t.Errorf("new listener: %d", r.status)
	}
	waitFor(t, 3*time.Second, "old listener closed", func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	// A listener that cannot be opened fails Apply and changes nothing.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg2 := *cfg
	cfg2.Proxy.HTTPListen = busy.Addr().String()
	cfg2.Routes = nil
	if err := p.Apply(&cfg2); err == nil {
		t.Error("Apply succeeded with a listener address in use")
	}
	if r := get(t, client(), "http://"+newAddr+"/"); r.status != 200 {
		t.Errorf("after failed Apply: %d (routes must be unchanged)", r.status)
	}
}

func TestWebSocketThroughProxy(t *testing.T) {
	up := websocket.Upgrader{}
	be := newBackend(t, "ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		c.WriteMessage(websocket.TextMessage, []byte("hello from backend"))
		for {
			mt, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(mt, append([]byte("echo: "), msg...)); err != nil {
				return
			}
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, be)}, config.Route{PathPrefix: "/ws", Pool: "web"})
	cfg.Proxy.Timeouts.Request = config.Duration(300 * time.Millisecond) // must not cut the tunnel
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	c, resp, err := d.Dial("ws://"+addr+"/ws", nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if resp.Header.Get("Via") != "1.1 veloflux" {
		t.Errorf("101 Via %q", resp.Header.Get("Via"))
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, msg, err := c.ReadMessage(); err != nil || string(msg) != "hello from backend" {
		t.Fatalf("server push: %q %v", msg, err)
	}
	for i := 0; i < 5; i++ {
		if i == 2 {
			time.Sleep(400 * time.Millisecond) // past the request timeout
		}
		want := fmt.Sprintf("message %d", i)
		if err := c.WriteMessage(websocket.TextMessage, []byte(want)); err != nil {
			t.Fatal(err)
		}
		if _, msg, err := c.ReadMessage(); err != nil || string(msg) != "echo: "+want {
			t.Fatalf("echo %d: %q %v", i, msg, err)
		}
	}
	if got := p.Stats().InFlight; got != 1 {
		t.Errorf("in flight during the tunnel: %d", got)
	}
	c.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	c.Close()
	waitFor(t, 3*time.Second, "tunnel accounted", func() bool { return p.Stats().InFlight == 0 })
	st := p.Stats()
	if st.BytesIn < 5*9 || st.BytesOut < 5*15 || st.Status["1xx"] != 1 {
		t.Errorf("tunnel accounting: in %d out %d 1xx %d", st.BytesIn, st.BytesOut, st.Status["1xx"])
	}
}

func TestDrain(t *testing.T) {
	started := make(chan struct{}, 16)
	slow := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		time.Sleep(300 * time.Millisecond)
		io.WriteString(w, "done")
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, slow)}, config.Route{PathPrefix: "/", Pool: "web"})
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)

	const n = 8
	type res struct {
		status int
		body   string
		close  bool
		err    error
	}
	results := make(chan res, n)
	c := client()
	for i := 0; i < n; i++ {
		go func() {
			resp, err := c.Get("http://" + addr + "/")
			if err != nil {
				results <- res{err: err}
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results <- res{status: resp.StatusCode, body: string(b), close: resp.Close}
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			t.Fatal("requests did not start")
		}
	}
	drained := make(chan error, 1)
	go func() { drained <- p.Drain(context.Background()) }()
	waitFor(t, time.Second, "draining", p.Draining)
	// New connections are refused at once.
	waitFor(t, time.Second, "listener closed", func() bool {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return false
		}
		return errors.Is(err, syscall.ECONNREFUSED)
	})
	for i := 0; i < n; i++ {
		r := <-results
		if r.err != nil || r.status != 200 || r.body != "done" {
			t.Errorf("in-flight request: %d %q %v", r.status, r.body, r.err)
		}
		if !r.close {
			t.Error("keep-alive response during drain lacks Connection: close")
		}
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Errorf("Drain: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Drain did not return")
	}
	if !p.Stats().Draining {
		t.Error("Stats().Draining false")
	}
}

func TestDrainTimeoutCutsStragglers(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	hang := newBackend(t, "hang", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	cfg := testConfig([]config.Pool{poolOf("web", config.AlgorithmRoundRobin, hang)}, config.Route{PathPrefix: "/", Pool: "web"})
	cfg.Proxy.DrainTimeout = config.Duration(200 * time.Millisecond)
	p := newProxy(t, cfg, Options{})
	addr, _ := serve(t, p)
	resp, err := client().Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	start := time.Now()
	if err := p.Drain(context.Background()); err == nil {
		t.Error("Drain reported success with a request cut")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Drain took %v, want about the 200ms drain timeout", d)
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("straggler's response completed normally")
	}
}
