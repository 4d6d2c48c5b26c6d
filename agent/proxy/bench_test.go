package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// The benchmarks drive keep-alive HTTP/1.1 over loopback, through the
// proxy's own listeners (its HTTP/1.1 engine), with 64 parallel
// clients (b.SetParallelism scales with GOMAXPROCS), a 1 KiB response, and
// report requests per second. BenchmarkDirectKeepAlive is the same load
// without the proxy, for comparison.

const benchClients = 64

var benchBody = strings.Repeat("x", 1024)

func benchBackend(b *testing.B) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, benchBody)
	}))
	b.Cleanup(s.Close)
	return s
}

func benchConfig(b *testing.B, be *httptest.Server, algo config.Algorithm) *config.Config {
	port := be.Listener.Addr().(*net.TCPAddr).Port
	w := uint32(1)
	pl := config.Pool{Name: "web", Algorithm: algo, Backends: []config.Backend{
		{Address: "127.0.0.1", Port: port, Weight: &w},
	}}
	return testConfig([]config.Pool{pl}, config.Route{PathPrefix: "/", Pool: "web"})
}

func runClients(b *testing.B, url string) {
	tr := &http.Transport{MaxIdleConnsPerHost: benchClients, MaxConnsPerHost: benchClients, DisableCompression: true}
	b.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr}
	procs := max(1, benchClients/runtime.GOMAXPROCS(0))
	b.SetParallelism(procs)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := c.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
}

func benchProxy(b *testing.B, algo config.Algorithm, log *slog.Logger) {
	be := benchBackend(b)
	p, err := New(Options{Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	if err := p.Apply(benchConfig(b, be, algo)); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Serve(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	var addr string
	for i := 0; i < 500 && addr == ""; i++ {
		time.Sleep(10 * time.Millisecond)
		addr, _ = p.listenAddrs()
	}
	if addr == "" {
		b.Fatal("Serve did not open its listener")
	}
	runClients(b, "http://"+addr+"/bench")
}

// BenchmarkProxyKeepAlive is the proxy with access logging disabled.
func BenchmarkProxyKeepAlive(b *testing.B) {
	benchProxy(b, config.AlgorithmRoundRobin, slog.New(slog.DiscardHandler))
}

// BenchmarkProxyKeepAliveAccessLog adds the JSON access log (to io.Discard).
func BenchmarkProxyKeepAliveAccessLog(b *testing.B) {
	benchProxy(b, config.AlgorithmRoundRobin, slog.New(slog.NewJSONHandler(io.Discard, nil)))
}

// BenchmarkProxyKeepAliveP2C uses p2c_ewma, the costliest algorithm.
func BenchmarkProxyKeepAliveP2C(b *testing.B) {
	benchProxy(b, config.AlgorithmP2CEWMA, slog.New(slog.DiscardHandler))
}

// BenchmarkDirectKeepAlive is the same load straight to the backend.
func BenchmarkDirectKeepAlive(b *testing.B) {
	runClients(b, benchBackend(b).URL+"/bench")
}

// BenchmarkBareReverseProxyKeepAlive is httputil.ReverseProxy with the same
// Transport settings and nothing of ours (no routing, health, metrics,
// headers beyond X-Forwarded-*): the floor of the proxy's cost.
func BenchmarkBareReverseProxyKeepAlive(b *testing.B) {
	be := benchBackend(b)
	target := be.Listener.Addr().String()
	tr := &http.Transport{MaxIdleConnsPerHost: 256, DisableCompression: true}
	b.Cleanup(tr.CloseIdleConnections)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", target
			pr.SetXForwarded()
		},
		Transport:  tr,
		BufferPool: bufferPool{},
	}
	f := httptest.NewServer(rp)
	b.Cleanup(f.Close)
	runClients(b, f.URL+"/bench")
}

// BenchmarkIdleConnMemory reports what an idle keep-alive client connection
// costs the proxy in memory (heap and goroutine stacks, B/idle-conn), with
// the write buffer handed back between requests (fasthttp's
// ReduceMemoryUsage, the proxy's setting) and kept per connection, at the
// default header limit (64 KiB, the size of the read buffer every
// connection keeps) and at 16 KiB (proxy.max_header_bytes).
func BenchmarkIdleConnMemory(b *testing.B) {
	const conns = 1000
	for _, c := range []struct {
		keep      bool
		maxHeader int
	}{{false, 64 << 10}, {true, 64 << 10}, {false, 16 << 10}} {
		b.Run(fmt.Sprintf("keep-buffers=%v/max-header=%dk", c.keep, c.maxHeader>>10), func(b *testing.B) {
			be := benchBackend(b)
			p, err := New(Options{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			p.keepBuffers = c.keep
			cfg := benchConfig(b, be, config.AlgorithmRoundRobin)
			cfg.Proxy.MaxHeaderBytes = c.maxHeader
			if err := p.Apply(cfg); err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- p.Serve(ctx) }()
			b.Cleanup(func() { cancel(); <-done })
			var addr string
			for i := 0; i < 500 && addr == ""; i++ {
				time.Sleep(10 * time.Millisecond)
				addr, _ = p.listenAddrs()
			}
			before := inUse()
			open := make([]net.Conn, 0, conns)
			b.Cleanup(func() {
				for _, c := range open {
					c.Close()
				}
			})
			buf := make([]byte, 4096)
			for range conns {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				open = append(open, c)
				io.WriteString(c, "GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n")
				// One 1 KiB answer: its head and body fit in buf.
				for got := 0; got < len(benchBody); {
					n, err := c.Read(buf)
					if err != nil {
						b.Fatal(err)
					}
					got += n
					if got > 0 && strings.Contains(string(buf[:n]), benchBody[:16]) {
						break
					}
				}
			}
			time.Sleep(100 * time.Millisecond) // the proxy's side settles into its idle wait
			after := inUse()
			b.ReportMetric(float64(after-before)/conns, "B/idle-conn")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// inUse is the heap and stack memory in use after two collections (the
// second empties sync.Pool's victim caches).
func inUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}
