// Command refproxy is a measuring device for BenchmarkL7, not part of
// VeloFlux: the barest HTTP servers and proxies the Go standard library
// allows, run under the same load and CPU budget as HAProxy, nginx and the
// agent. They answer one question: how much of the agent's cost per request
// is VeloFlux's own (routing, health, retries, headers, metrics, timeouts)
// and how much is the cost of net/http itself, which the L7 issue mandates.
//
// Modes:
//
//	rp      httputil.ReverseProxy over http.Transport with the agent's
//	        transport settings and copy-buffer pool, round robin over the
//	        backends, X-Forwarded-* only. Nothing else.
//	rp-sync httputil.ReverseProxy over a synchronous RoundTripper: the
//	        request is written and the response read on the handler's own
//	        goroutine with net/http's Request.Write and ReadResponse, over a
//	        LIFO pool of idle connections per backend. This drops
//	        http.Transport's two goroutines per connection and its channel
//	        hand-offs. It handles only what the benchmark sends (no
//	        upgrades, no HTTP/2, no idle timeout): an upper bound for any
//	        Transport, not a usable one.
//	static  no proxy: net/http's server answering the benchmark's 1 KiB
//	        body from memory. The floor of net/http's server side alone.
//
// All modes answer on -listen (HTTP) and, with -cert and -key, -tls-listen
// (TLS 1.2+, HTTP/1.1 and HTTP/2 by ALPN).
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	var (
		mode      = flag.String("mode", "rp", "rp, rp-sync or static")
		listen    = flag.String("listen", "127.0.0.1:8081", "HTTP listen address")
		tlsListen = flag.String("tls-listen", "", "HTTPS listen address (needs -cert and -key)")
		certFile  = flag.String("cert", "", "PEM certificate for -tls-listen")
		keyFile   = flag.String("key", "", "PEM private key for -tls-listen")
		backends  = flag.String("backends", "", "comma-separated host:port list (rp and rp-sync)")
		bodySize  = flag.Int("body-size", 1024, "static: bytes in every answer")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	handler, err := newHandler(*mode, *backends, *bodySize)
	if err != nil {
		log.Error("refproxy: bad arguments", "err", err)
		os.Exit(2)
	}
	errs := make(chan error, 2)
	go func() { errs <- serve(*listen, handler, nil) }()
	if *tlsListen != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Error("refproxy: load certificate", "cert", *certFile, "key", *keyFile, "err", err)
			os.Exit(2)
		}
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		go func() { errs <- serve(*tlsListen, handler, cfg) }()
	}
	log.Info("refproxy: serving", "mode", *mode, "listen", *listen, "tls_listen", *tlsListen)
	log.Error("refproxy: stopped", "err", <-errs)
	os.Exit(1)
}

func serve(addr string, h http.Handler, tlsCfg *tls.Config) error {
	srv := &http.Server{Addr: addr, Handler: h, TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second}
	if tlsCfg != nil {
		return srv.ListenAndServeTLS("", "")
	}
	return srv.ListenAndServe()
}

func newHandler(mode, backendList string, bodySize int) (http.Handler, error) {
	if mode == "static" {
		if bodySize < 0 {
			return nil, fmt.Errorf("-body-size %d: must not be negative", bodySize)
		}
		return staticHandler(bytes.Repeat([]byte("x"), bodySize)), nil
	}
	var backends []string
	for _, b := range strings.Split(backendList, ",") {
		if b = strings.TrimSpace(b); b == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(b); err != nil {
			return nil, fmt.Errorf("-backends: %q: %w", b, err)
		}
		backends = append(backends, b)
	}
	if len(backends) == 0 {
		return nil, errors.New("-backends: at least one host:port is needed")
	}
	var rt http.RoundTripper
	switch mode {
	case "rp":
		rt = &http.Transport{
			DialContext:           (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
			MaxIdleConns:          4096,
			MaxIdleConnsPerHost:   256,
			IdleConnTimeout:       90 * time.Second,
			ResponseHeaderTimeout: 15 * time.Second,
			DisableCompression:    true,
			ReadBufferSize:        32 << 10,
			WriteBufferSize:       32 << 10,
		}
	case "rp-sync":
		rt = &syncTransport{idle: map[string][]*backendConn{}}
	default:
		return nil, fmt.Errorf("-mode %q: want rp, rp-sync or static", mode)
	}
	var next atomic.Uint64
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = backends[(next.Add(1)-1)%uint64(len(backends))]
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport:  rt,
		BufferPool: copyBuffers{},
	}, nil
}

func staticHandler(body []byte) http.Handler {
	length := []string{strconv.Itoa(len(body))}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["Content-Type"] = []string{"text/plain"}
		h["Content-Length"] = length
		w.Write(body)
	})
}

// copyBuffers is ReverseProxy's pool of 32 KiB copy buffers, as the agent's.
type copyBuffers struct{}

var copyBufferPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (copyBuffers) Get() []byte  { return *copyBufferPool.Get().(*[]byte) }
func (copyBuffers) Put(b []byte) { copyBufferPool.Put(&b) }

// syncTransport sends a request on the calling goroutine over an idle
// keep-alive connection (or a new one) and returns the connection to the
// pool when the response body has been read to its end.
type syncTransport struct {
	mu   sync.Mutex
	idle map[string][]*backendConn
}

type backendConn struct {
	net.Conn
	br *bufio.Reader
	bw *bufio.Writer
}

func (t *syncTransport) get(addr string) (*backendConn, error) {
	t.mu.Lock()
	if l := t.idle[addr]; len(l) > 0 {
		c := l[len(l)-1]
		t.idle[addr] = l[:len(l)-1]
		t.mu.Unlock()
		return c, nil
	}
	t.mu.Unlock()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	return &backendConn{Conn: c, br: bufio.NewReaderSize(c, 32<<10), bw: bufio.NewWriterSize(c, 32<<10)}, nil
}

func (t *syncTransport) put(addr string, c *backendConn) {
	t.mu.Lock()
	t.idle[addr] = append(t.idle[addr], c)
	t.mu.Unlock()
}

func (t *syncTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	addr := req.URL.Host
	c, err := t.get(addr)
	if err != nil {
		return nil, err
	}
	if err := req.Write(c.bw); err != nil {
		c.Close()
		return nil, fmt.Errorf("write request to %s: %w", addr, err)
	}
	if err := c.bw.Flush(); err != nil {
		c.Close()
		return nil, fmt.Errorf("write request to %s: %w", addr, err)
	}
	resp, err := http.ReadResponse(c.br, req)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("read response from %s: %w", addr, err)
	}
	resp.Body = &pooledBody{ReadCloser: resp.Body, t: t, addr: addr, c: c, reuse: !resp.Close}
	return resp, nil
}

// pooledBody gives its connection back once read to io.EOF; closed before
// that, the connection is dropped (the rest of the body is unread).
type pooledBody struct {
	io.ReadCloser
	t     *syncTransport
	addr  string
	c     *backendConn
	reuse bool
	done  bool
}

func (b *pooledBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		if b.reuse {
			b.t.put(b.addr, b.c)
		} else {
			b.c.Close()
		}
	}
	return n, err
}

func (b *pooledBody) Close() error {
	if !b.done {
		b.done = true
		b.c.Close()
	}
	return nil
}
