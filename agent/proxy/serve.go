package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http2"

	"github.com/veloflux/veloflux/agent/config"
)

const (
	roleHTTP = iota
	roleHTTPS
)

var roleName = [2]string{"http", "https"}

// serverSpec is what an http.Server is built from; a server is replaced
// when its spec changes.
type serverSpec struct {
	addr       string // "" = closed
	h2c        bool
	idle       time.Duration
	readHeader time.Duration
	maxHeader  int // bytes of a request's header block (proxy.max_header_bytes)
	h2         h2Limits
}

// h2Limits are proxy.http2, in the types the server takes.
type h2Limits struct {
	maxStreams  uint32
	maxResets   int
	resetWindow time.Duration
}

func serverSpecs(pc *config.ProxyConfig, haveCerts bool) [2]serverSpec {
	var s [2]serverSpec
	if !pc.Enabled {
		return s
	}
	// ReadHeaderTimeout bounds a request's headers (slowloris) and, since
	// net/http applies it to the TLS handshake too, the client's handshake.
	common := serverSpec{idle: pc.Timeouts.Idle.Std(), readHeader: pc.Timeouts.TLSHandshake.Std(), maxHeader: pc.MaxHeaderBytes, h2: h2Limits{
		maxStreams:  uint32(pc.HTTP2.MaxConcurrentStreams),
		maxResets:   pc.HTTP2.MaxClientResets,
		resetWindow: pc.HTTP2.ResetWindow.Std(),
	}}
	s[roleHTTP] = common
	s[roleHTTP].addr = pc.HTTPListen
	s[roleHTTP].h2c = pc.H2C
	if haveCerts {
		s[roleHTTPS] = common
		s[roleHTTPS].addr = pc.HTTPSListen
	}
	return s
}

// server is one running listener and its two engines: fasthttp's server
// for HTTP/1.1, and for HTTP/2 (by ALPN over TLS, or h2c by prior
// knowledge) golang.org/x/net/http2's server, whose connections are handed
// over one by one.
type server struct {
	spec serverSpec
	fast *fasthttp.Server
	h2   *http.Server // the HTTP/2 connections' base configuration and graceful shutdown
	//lint:ignore SA1019 see newServer: the guard needs x/net's server
	h2s   *http2.Server
	ln    net.Listener // the TCP listener
	dl    *dispatchListener
	conns connSet
	guard *connGuard
	// done is closed when the server's accept loop has returned, so that
	// Listeners sees a failed listener at once rather than only after
	// Serve has reacted to the failure.
	done chan struct{}
}

// shutdown stops accepting connections and lets the open ones finish:
// HTTP/1.1 keep-alive connections close when idle (a response still due
// carries "Connection: close"), HTTP/2 connections get GOAWAY. It returns
// when every HTTP/1.1 connection is closed, or with ctx's error.
func (s *server) shutdown(ctx context.Context) error {
	s.dl.Close()
	errc := make(chan error, 1)
	go func() { errc <- s.fast.ShutdownWithContext(ctx) }()
	s.h2.Shutdown(ctx)
	return <-errc
}

// accepting reports whether the server's accept loop still runs.
func (s *server) accepting() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// close closes the listener and every connection at once.
func (s *server) close() {
	s.dl.Close()
	s.conns.closeAll()
}

// listen opens a TCP listener with SO_REUSEPORT, so that a listener being
// replaced (new settings on the same address) can stay open until its
// successor is accepting, as HAProxy and nginx do on reload.
func listen(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", addr)
}

func (p *Proxy) needsRestart(role int, spec serverSpec) bool {
	cur := p.servers[role]
	if cur == nil {
		return spec.addr != ""
	}
	return cur.spec != spec
}

// newServer builds the engines for a role and ln.
func (p *Proxy) newServer(role int, spec serverSpec, ln net.Listener) (*server, error) {
	s := &server{spec: spec, ln: ln, done: make(chan struct{})}
	s.guard = &connGuard{p: p, maxResets: spec.h2.maxResets, resetWindow: spec.h2.resetWindow}
	s.fast = &fasthttp.Server{
		Handler:        p.serveH1,
		ErrorHandler:   func(ctx *fasthttp.RequestCtx, err error) { p.h1ErrorHandler(ctx, err, spec.maxHeader) },
		HeaderReceived: p.headerReceived,
		// The read buffer is fasthttp's request header limit, and
		// what an idle keep-alive connection keeps (streamed request
		// bodies keep fasthttp from handing it back).
		ReadBufferSize:                spec.maxHeader,
		ReadTimeout:                   spec.readHeader,
		IdleTimeout:                   spec.idle,
		MaxRequestBodySize:            math.MaxInt, // the proxy applies max_body_bytes itself
		StreamRequestBody:             true,
		DisablePreParseMultipartForm:  true,
		DisableHeaderNamesNormalizing: true,
		NoDefaultServerHeader:         true,
		NoDefaultDate:                 true,
		NoDefaultContentType:          true,
		CloseOnShutdown:               true,
		// Idle keep-alive connections hand their 64 KiB read buffer
		// and the write buffer back (BenchmarkIdleConnMemory).
		ReduceMemoryUsage:     !p.keepBuffers,
		SecureErrorLogMessage: true,
		Logger:                fastLogger{p.log},
	}
	s.h2 = &http.Server{
		IdleTimeout:       spec.idle,
		ReadHeaderTimeout: spec.readHeader,
		MaxHeaderBytes:    spec.maxHeader,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
	}
	// x/net's server, not net/http's bundled copy: the connection guard
	// ends a reset flood by returning an http2.ConnectionError from Read,
	// which only x/net's server turns into a GOAWAY; and it serves
	// connections handed to it one by one (ServeConn).
	//lint:ignore SA1019 see above; net/http's HTTP2Config has no such hook
	s.h2s = &http2.Server{MaxConcurrentStreams: spec.h2.maxStreams}
	//lint:ignore SA1019 see above
	if err := http2.ConfigureServer(s.h2, s.h2s); err != nil {
		return nil, fmt.Errorf("proxy: %s server: http2: %w", roleName[role], err)
	}
	var tlsCfg *tls.Config
	var h2c func(net.Conn)
	if role == roleHTTPS {
		tlsCfg = p.certs.tlsConfig()
		s.fast.NextProto("h2", func(c net.Conn) error {
			s.serveH2(c)
			return nil
		})
	} else if spec.h2c {
		// HTTP/2 with prior knowledge, as nginx and HAProxy offer h2c
		// (the deprecated Upgrade: h2c dance is not supported).
		h2c = func(c net.Conn) { s.serveH2(c) }
	}
	s.dl = newDispatchListener(ln, &s.conns, tlsCfg, h2c, spec.readHeader, p.watch.Load())
	return s, nil
}

// serveH2 serves one HTTP/2 connection with the proxy's net/http handler,
// through a clientConn that enforces the HTTP/2 guard.
func (s *server) serveH2(c net.Conn) {
	writeAtOnce(c)
	cc := &clientConn{Conn: c, guard: s.guard, peer: remoteAddr(c.RemoteAddr().String())}
	if tc, ok := c.(*tlsClientConn); ok {
		cc.tls = tc.Conn
	}
	//lint:ignore SA1019 see newServer: the guard needs x/net's server
	s.h2s.ServeConn(cc, &http2.ServeConnOpts{
		Context:    withClientConn(context.Background(), cc),
		BaseConfig: s.h2,
		Handler:    http.HandlerFunc(s.guard.p.serveHTTP),
	})
	c.Close()
}

// startServer serves ln in the background. Called with p.mu held.
func (p *Proxy) startServer(role int, spec serverSpec, ln net.Listener) error {
	s, err := p.newServer(role, spec, ln)
	if err != nil {
		return err
	}
	p.servers[role] = s
	go func() {
		err := s.fast.Serve(s.dl)
		if err == nil {
			err = s.dl.err
		}
		close(s.done)
		if err != nil && !errors.Is(err, net.ErrClosed) {
			p.mu.Lock()
			current := p.servers[role] == s
			p.mu.Unlock()
			if current {
				select {
				case p.fatal <- fmt.Errorf("proxy: %s listener %s: %w", roleName[role], ln.Addr(), err):
				default:
				}
			}
		}
	}()
	p.log.Info("proxy: listening", "role", roleName[role], "addr", ln.Addr().String(), "h2c", spec.h2c)
	return nil
}

// fastLogger sends fasthttp's log lines to the proxy's logger, at debug
// level: they are about single connections.
type fastLogger struct{ log *slog.Logger }

func (l fastLogger) Printf(format string, args ...any) {
	if l.log.Enabled(context.Background(), slog.LevelDebug) {
		l.log.Debug(fmt.Sprintf(format, args...), "engine", "fasthttp")
	}
}

// replaceServer starts the role's new server (ln may be nil to close the
// role) and retires the old one gracefully in the background. Called with
// p.mu held.
func (p *Proxy) replaceServer(role int, spec serverSpec, ln net.Listener) {
	old := p.servers[role]
	p.servers[role] = nil
	if ln != nil {
		if err := p.startServer(role, spec, ln); err != nil {
			// The role stays closed, and Listeners says so.
			ln.Close()
			p.log.Error("proxy: listener not replaced", "role", roleName[role], "err", err)
		}
	}
	if old != nil {
		// Close the old listener now, so that no connection reaches the
		// old settings once Apply has returned; its open connections
		// finish in the background.
		old.dl.Close()
		timeout := p.state.Load().cfg.DrainTimeout.Std()
		go p.retire(old, timeout)
	}
}

// retire shuts a server down gracefully within timeout, then forcibly.
func (p *Proxy) retire(s *server, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := s.shutdown(ctx); err != nil {
		s.close()
	}
}

// Listener is one listener the applied configuration asks for.
type Listener struct {
	Role    string // "http" or "https"
	Addr    string // the configured address
	Serving bool   // open, with its server accepting connections
}

// Listeners reports every listener the applied configuration asks for
// (http_listen, and https_listen when certificates are configured) and
// whether it serves now. A listener is not serving before Serve opened it,
// when Serve could not open it (an address in use, a privileged port without
// CAP_NET_BIND_SERVICE), after its server failed, and after Drain. The proxy
// reopens none of them by itself: only a new Serve, that is a restart of the
// agent, does.
func (p *Proxy) Listeners() []Listener {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.state.Load()
	if st == nil {
		return nil
	}
	var out []Listener
	for role, spec := range serverSpecs(&st.cfg, len(st.cfg.TLS) > 0) {
		if spec.addr == "" {
			continue
		}
		s := p.servers[role]
		out = append(out, Listener{Role: roleName[role], Addr: spec.addr, Serving: s != nil && s.accepting()})
	}
	return out
}

func (p *Proxy) boundHTTPSPort() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s := p.servers[roleHTTPS]; s != nil {
		if a, ok := s.ln.Addr().(*net.TCPAddr); ok {
			return strconv.Itoa(a.Port)
		}
	}
	return ""
}

// Serve opens the listeners the applied configuration asks for (http_listen,
// and https_listen when certificates are configured) and serves until ctx
// ends, a listener fails, or Drain completes. When ctx ends it drains first
// (within drain_timeout). Certificate files are polled for changes while it
// runs. Apply must have been called.
func (p *Proxy) Serve(ctx context.Context) error {
	p.mu.Lock()
	st := p.state.Load()
	switch {
	case st == nil:
		p.mu.Unlock()
		return errors.New("proxy: Serve before Apply")
	case p.serving:
		p.mu.Unlock()
		return errors.New("proxy: already serving")
	case p.draining.Load():
		p.mu.Unlock()
		return errors.New("proxy: drained")
	}
	// One arrival watch serves the connections of both servers and those
	// to the backends, for as long as Serve runs: each wake-up of its
	// goroutine covers every connection that received something
	// meanwhile. Its write flushers, one per P, send their writes at the
	// end of each round. Connections still open afterwards (upgraded
	// ones) read and write their sockets directly.
	watch, err := newArrivalWatch(runtime.GOMAXPROCS(0))
	if err != nil {
		// Correct without it, at one more system call per request.
		p.log.Warn("proxy: connections will read without an arrival watch", "error", err)
		watch = nil
	} else {
		defer watch.stop()
	}
	p.watch.Store(watch)
	defer p.watch.Store(nil)
	specs := serverSpecs(&st.cfg, len(st.cfg.TLS) > 0)
	var lns [2]net.Listener
	for i, s := range specs {
		if s.addr == "" {
			continue
		}
		ln, err := listen(s.addr)
		if err != nil {
			for _, l := range lns {
				if l != nil {
					l.Close()
				}
			}
			p.mu.Unlock()
			return fmt.Errorf("proxy: %s listener: %w", roleName[i], err)
		}
		lns[i] = ln
	}
	for i, s := range specs {
		if lns[i] == nil {
			continue
		}
		if err := p.startServer(i, s, lns[i]); err != nil {
			for j, l := range lns {
				if j >= i && l != nil {
					l.Close()
				}
			}
			p.mu.Unlock()
			p.shutdownNow()
			return err
		}
	}
	p.serving = true
	p.mu.Unlock()

	poll := time.NewTicker(p.certPoll)
	defer poll.Stop()
	for {
		select {
		case <-ctx.Done():
			p.Drain(context.Background())
			return nil
		case <-p.drained:
			return nil
		case err := <-p.fatal:
			p.shutdownNow()
			return err
		case <-poll.C:
			p.certs.reload()
		}
	}
}

// shutdownNow closes every server at once.
func (p *Proxy) shutdownNow() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, s := range p.servers {
		if s != nil {
			s.close()
			p.servers[i] = nil
		}
	}
	p.serving = false
}

// Drain stops accepting connections (the listeners close, so new
// connections are refused), lets requests in flight finish, and closes
// keep-alive connections politely: HTTP/1 responses carry "Connection:
// close" and HTTP/2 connections get GOAWAY. It waits for at most
// drain_timeout (or until ctx ends), then closes whatever is left, upgraded
// connections included, and reports how many requests were cut. Drain is
// final; calling it again waits for nothing.
func (p *Proxy) Drain(ctx context.Context) error {
	p.draining.Store(true)
	p.mu.Lock()
	servers := p.servers
	p.servers = [2]*server{}
	p.serving = false
	timeout := 15 * time.Second
	if st := p.state.Load(); st != nil {
		timeout = st.cfg.DrainTimeout.Std()
	}
	p.mu.Unlock()
	defer p.drainOnce.Do(func() { close(p.drained) })

	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	errc := make(chan error, len(servers))
	n := 0
	for _, s := range servers {
		if s == nil {
			continue
		}
		n++
		go func() { errc <- s.shutdown(dctx) }()
	}
	for ; n > 0; n-- {
		<-errc
	}
	// Shutdown does not wait for hijacked (upgraded) connections, and the
	// handler may serve requests without any server of ours (Handler()):
	// wait for the in-flight count itself.
	for p.inflight.Load() > 0 {
		if !sleepCtx(dctx, p.drainPoll) {
			break
		}
	}
	if left := p.inflight.Load(); left > 0 {
		for _, s := range servers {
			if s != nil {
				s.close()
			}
		}
		tunnels := p.hijacked.closeAll()
		p.log.Warn("proxy: drain timed out; closed remaining connections", "in_flight", left, "upgraded", tunnels)
		return fmt.Errorf("proxy: drain: %d requests still in flight after %s", left, timeout)
	}
	p.log.Info("proxy: drained")
	return nil
}
