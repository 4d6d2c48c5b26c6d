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
	common := serverSpec{idle: pc.Timeouts.Idle.Std(), readHeader: pc.Timeouts.TLSHandshake.Std()}
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

// newServer builds the http.Server for a role.
func (p *Proxy) newServer(role int, spec serverSpec) *http.Server {
	srv := &http.Server{
		Handler:           http.HandlerFunc(p.serveHTTP),
		ReadHeaderTimeout: spec.readHeader,
		IdleTimeout:       spec.idle,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		Protocols:         new(http.Protocols),
	}
	srv.Protocols.SetHTTP1(true)
	if role == roleHTTPS {
		srv.Protocols.SetHTTP2(true)
		srv.TLSConfig = p.certs.tlsConfig()
	} else if spec.h2c {
		// HTTP/2 with prior knowledge, as nginx and HAProxy offer h2c
		// (the deprecated Upgrade: h2c dance is not supported).
		srv.Protocols.SetUnencryptedHTTP2(true)
	}
	return srv
}

// startServer serves ln in the background. Called with p.mu held.
func (p *Proxy) startServer(role int, spec serverSpec, ln net.Listener) *server {
	s := &server{spec: spec, srv: p.newServer(role, spec), ln: ln, done: make(chan struct{})}
	p.servers[role] = s
	go func() {
		var err error
		if role == roleHTTPS {
			err = s.srv.ServeTLS(ln, "", "")
		} else {
			err = s.srv.Serve(ln)
		}
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
	return s
}

// replaceServer starts the role's new server (ln may be nil to close the
// role) and retires the old one gracefully in the background. Called with
// p.mu held.
func (p *Proxy) replaceServer(role int, spec serverSpec, ln net.Listener) {
	old := p.servers[role]
	p.servers[role] = nil
	if ln != nil {
		p.startServer(role, spec, ln)
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
		if lns[i] != nil {
			p.startServer(i, s, lns[i])
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
