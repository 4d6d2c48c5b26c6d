package proxy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// backend is a test backend on loopback that answers with its name.
type backend struct {
	name string
	srv  *httptest.Server
	hits atomic.Int64
	port int
}

func newBackend(t *testing.T, name string, h http.HandlerFunc) *backend {
	t.Helper()
	b := &backend{name: name}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		w.Header().Set("X-Backend", name)
		if h != nil {
			h(w, r)
			return
		}
		io.WriteString(w, name)
	}))
	t.Cleanup(b.srv.Close)
	_, port, _ := net.SplitHostPort(b.srv.Listener.Addr().String())
	b.port, _ = strconv.Atoi(port)
	return b
}

func (b *backend) cfg() config.Backend {
	w := uint32(1)
	return config.Backend{Address: "127.0.0.1", Port: b.port, Weight: &w}
}

func poolOf(name string, algo config.Algorithm, bs ...*backend) config.Pool {
	p := config.Pool{Name: name, Algorithm: algo}
	for _, b := range bs {
		p.Backends = append(p.Backends, b.cfg())
	}
	return p
}

// deadPort returns a loopback port nothing listens on.
func deadPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func testConfig(pools []config.Pool, routes ...config.Route) *config.Config {
	c := config.Default()
	c.Proxy.Enabled = true
	c.Proxy.HTTPListen = "127.0.0.1:0"
	c.Proxy.HTTPSListen = "127.0.0.1:0"
	c.Proxy.Timeouts = config.ProxyTimeout{
		Dial:           config.Duration(time.Second),
		TLSHandshake:   config.Duration(2 * time.Second),
		ResponseHeader: config.Duration(3 * time.Second),
		Idle:           config.Duration(10 * time.Second),
		Request:        config.Duration(5 * time.Second),
	}
	c.Proxy.PassiveHealth.ConsecutiveFailures = 0
	c.Proxy.DrainTimeout = config.Duration(5 * time.Second)
	c.Pools = pools
	c.Routes = routes
	return c
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newProxy(t *testing.T, cfg *config.Config, opts Options) *Proxy {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	if opts.StickyKey == nil {
		opts.StickyKey = []byte("test sticky key, 32 bytes long!!")
	}
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	p.seed = 7
	p.certPoll = 50 * time.Millisecond
	if err := p.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	return p
}

// frontend is a proxy serving on loopback.
type frontend struct{ URL string }

// fronts remembers the proxies front has started.
var fronts sync.Map // *Proxy -> *frontend

// front serves p with Serve's listeners on loopback (once per proxy), so
// that tests exercise the engines clients meet.
func front(t *testing.T, p *Proxy) *frontend {
	t.Helper()
	if f, ok := fronts.Load(p); ok {
		return f.(*frontend)
	}
	httpAddr, _ := serve(t, p)
	f := &frontend{URL: "http://" + httpAddr}
	fronts.Store(p, f)
	t.Cleanup(func() { fronts.Delete(p) })
	return f
}

// client is an HTTP client with bounded waits and no connection reuse
// surprises across tests.
func client() *http.Client {
	return &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: 64},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

type result struct {
	status int
	body   string
	header http.Header
	proto  int
}

func do(t *testing.T, c *http.Client, req *http.Request) result {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	return result{status: resp.StatusCode, body: string(b), header: resp.Header, proto: resp.ProtoMajor}
}

func get(t *testing.T, c *http.Client, url string, hdr ...string) result {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Add(hdr[i], hdr[i+1])
	}
	return do(t, c, req)
}

// errorCode decodes the proxy's JSON error body.
func errorCode(t *testing.T, body string) string {
	t.Helper()
	var e struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("error body %q is not JSON: %v", body, err)
	}
	if e.Error.Message == "" {
		t.Errorf("error body %q has no message", body)
	}
	return e.Error.Code
}

// healthMap is a settable Options.Healthy / Options.Drained.
type healthMap struct {
	mu      sync.Mutex
	down    map[string]bool
	drained map[string]bool
}

func newHealthMap() *healthMap {
	return &healthMap{down: map[string]bool{}, drained: map[string]bool{}}
}

func (h *healthMap) healthy(key string) (bool, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.down[key], true
}

func (h *healthMap) isDrained(key string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.drained[key]
}

func (h *healthMap) set(m map[string]bool, key string, v bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	m[key] = v
}

func keyOf(pool string, b *backend) string {
	return pool + "/127.0.0.1:" + strconv.Itoa(b.port)
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// writeCert writes a self-signed ECDSA certificate for names to dir and
// returns the file paths and the certificate.
func writeCert(t *testing.T, dir, base string, serial int64, names ...string) (certFile, keyFile string, cert *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: names[0]},
		DNSNames:              names,
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key")
	writeFileAtomic(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFileAtomic(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
	return certFile, keyFile, cert
}

func writeFileAtomic(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// serve runs p.Serve until the test ends and returns the bound addresses.
func serve(t *testing.T, p *Proxy) (httpAddr, httpsAddr string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return")
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		httpAddr, httpsAddr = p.listenAddrs()
		if httpAddr != "" {
			return httpAddr, httpsAddr
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("Serve did not open its listeners")
	return "", ""
}

// listenAddrs returns the bound listener addresses ("" when closed).
func (p *Proxy) listenAddrs() (httpAddr, httpsAddr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s := p.servers[roleHTTP]; s != nil {
		httpAddr = s.ln.Addr().String()
	}
	if s := p.servers[roleHTTPS]; s != nil {
		httpsAddr = s.ln.Addr().String()
	}
	return
}

// waitFor polls cond for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func slogJSON(w io.Writer) *slog.Logger { return slog.New(slog.NewJSONHandler(w, nil)) }
