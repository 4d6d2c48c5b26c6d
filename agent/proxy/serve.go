package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"time"

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
	h2         h2Limits
}

// h2Limits are proxy.http2, in the types the server takes.
type h2Limits struct {
	maxStreams  uint32
	maxResets   int
	resetWindow time.Duration
}

// maxHeaderBytes bounds request headers, like HAProxy's 16k buffers and
// nginx's large_client_header_buffers, with room for large cookies.
const maxHeaderBytes = 64 << 10

func serverSpecs(pc *config.ProxyConfig, haveCerts bool) [2]serverSpec {
	var s [2]serverSpec
	if !pc.Enabled {
		return s
	}
	// ReadHeaderTimeout bounds a request's headers (slowloris) and, since
	// net/http applies it to the TLS handshake too, the client's handshake.
	common := serverSpec{idle: pc.Timeouts.Idle.Std(), readHeader: pc.Timeouts.TLSHandshake.Std(), h2: h2Limits{
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

// server is one running listener and its http.Server.
type server struct {
	spec serverSpec
	srv  *http.Server
	ln   net.Listener
	// done is closed when the server's accept loop has returned, so that
	// Listeners sees a failed listener at once rather than only after
	// Serve has reacted to the failure.
	done chan struct{}
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

// newServer builds the http.Server for a role and the listener it serves:
// ln's connections as clientConns, TLS ones included, the TLS handshake
// being the proxy's rather than net/http's so that clientConn reads what
// the client sends in the clear.
//
// HTTP/2 is served by golang.org/x/net/http2's server (which net/http hands
// the connections that start with the HTTP/2 preface, h2 by ALPN as well
// as h2c), as its connection errors are what clientConn uses to end a
// connection with GOAWAY.
func (p *Proxy) newServer(role int, spec serverSpec, ln net.Listener) (*http.Server, net.Listener, error) {
	srv := &http.Server{
		Handler:           http.HandlerFunc(p.serveHTTP),
		ReadHeaderTimeout: spec.readHeader,
		IdleTimeout:       spec.idle,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		ConnContext:       withClientConn,
		Protocols:         new(http.Protocols),
	}
	srv.Protocols.SetHTTP1(true)
	cl := &clientListener{Listener: ln, guard: &connGuard{p: p, maxResets: spec.h2.maxResets, resetWindow: spec.h2.resetWindow}}
	if role == roleHTTPS {
		cl.tls = p.certs.tlsConfig()
		cl.guard.h2 = true
	} else if spec.h2c {
		// HTTP/2 with prior knowledge, as nginx and HAProxy offer h2c
		// (the deprecated Upgrade: h2c dance is not supported).
		cl.guard.h2 = true
	}
	if cl.guard.h2 {
		// The handshake is ours, so net/http sees HTTP/2 over TLS as it
		// sees h2c: a connection that starts with the preface.
		srv.Protocols.SetUnencryptedHTTP2(true)
		// x/net's server, not net/http's bundled copy: the connection
		// guard ends a reset flood by returning an http2.ConnectionError
		// from Read, which only x/net's server turns into a GOAWAY.
		//lint:ignore SA1019 see above; net/http's HTTP2Config has no such hook
		h2 := &http2.Server{MaxConcurrentStreams: spec.h2.maxStreams}
		//lint:ignore SA1019 see above
		if err := http2.ConfigureServer(srv, h2); err != nil {
			return nil, nil, fmt.Errorf("proxy: %s server: http2: %w", roleName[role], err)
		}
	}
	return srv, cl, nil
}

// startServer serves ln in the background. Called with p.mu held.
func (p *Proxy) startServer(role int, spec serverSpec, ln net.Listener) error {
	srv, cl, err := p.newServer(role, spec, ln)
	if err != nil {
		return err
	}
	s := &server{spec: spec, srv: srv, ln: ln, done: make(chan struct{})}
	p.servers[role] = s
	go func() {
		err := s.srv.Serve(cl)
		close(s.done)
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
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
		old.ln.Close()
		timeout := p.state.Load().cfg.DrainTimeout.Std()
		go p.retire(old, timeout)
	}
}

// retire shuts a server down gracefully within timeout, then forcibly.
func (p *Proxy) retire(s *server, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
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
			s.srv.Close()
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
		go func() { errc <- s.srv.Shutdown(dctx) }()
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
				s.srv.Close()
			}
		}
		tunnels := p.hijacked.closeAll()
		p.log.Warn("proxy: drain timed out; closed remaining connections", "in_flight", left, "upgraded", tunnels)
		return fmt.Errorf("proxy: drain: %d requests still in flight after %s", left, timeout)
	}
	p.log.Info("proxy: drained")
	return nil
}
