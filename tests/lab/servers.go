package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Ports served by every backend (see StartBackendServers).
const (
	HTTPPort    = 80
	TCPEchoPort = 7000
	UDPEchoPort = 7001
)

// serverSet is one backend's running servers.
type serverSet struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	done   chan struct{} // closed once every server goroutine has returned
}

func (s *serverSet) stop() {
	s.cancel()
	<-s.done
}

func (s *serverSet) running() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// StartBackendServers starts, in every backend namespace, HTTP on :80
// (any path answers "backend-N\n", /healthz answers 200 "ok\n"), a TCP
// echo on :7000 and a UDP echo on :7001, each on 0.0.0.0 and [::] so the
// VIPs on lo are served too. They stop when ctx ends, on StopBackend or
// on Close.
func (l *Lab) StartBackendServers(ctx context.Context) error {
	for i := range l.Backends {
		if err := l.StartBackend(ctx, i); err != nil {
			return errors.Join(err, l.stopAll())
		}
	}
	return nil
}

// StartBackend starts backend i's servers (see StartBackendServers). It
// fails if they are already running.
func (l *Lab) StartBackend(ctx context.Context, i int) error {
	if i < 0 || i >= len(l.Backends) {
		return fmt.Errorf("lab: StartBackend(%d): only %d backends", i, len(l.Backends))
	}
	b := l.Backends[i]

	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("lab: StartBackend(%d): lab is closed", i)
	}
	if s := l.servers[i]; s != nil && s.running() {
		return fmt.Errorf("lab: StartBackend(%d): %s servers already running", i, b.Name)
	}

	var (
		streams []net.Listener
		packets []*net.UDPConn
	)
	closeAll := func() {
		for _, ln := range streams {
			ln.Close()
		}
		for _, pc := range packets {
			pc.Close()
		}
	}
	// Sockets are created inside the namespace and keep it afterwards, so
	// the serving goroutines below can run on any thread.
	err := b.Do(func() error {
		var lc net.ListenConfig
		for _, port := range []int{HTTPPort, TCPEchoPort} {
			for _, addr := range []string{fmt.Sprintf("0.0.0.0:%d", port), fmt.Sprintf("[::]:%d", port)} {
				// tcp4/tcp6 rather than "tcp": a "tcp" listener on [::]
				// is dual-stack and would clash with the 0.0.0.0 one.
				network := "tcp4"
				if addr[0] == '[' {
					network = "tcp6"
				}
				ln, err := lc.Listen(ctx, network, addr)
				if err != nil {
					return fmt.Errorf("listen %s %s: %w", network, addr, err)
				}
				streams = append(streams, ln)
			}
		}
		for _, network := range []string{"udp4", "udp6"} {
			pc, err := listenUDPPktinfo(ctx, network, UDPEchoPort)
			if err != nil {
				return err
			}
			packets = append(packets, pc)
		}
		return nil
	})
	if err != nil {
		closeAll()
		return fmt.Errorf("lab: start %s servers: %w", b.Name, err)
	}

	sctx, cancel := context.WithCancel(ctx)
	s := &serverSet{cancel: cancel, done: make(chan struct{})}
	log := l.log.With("host", b.Name)
	conns := &connSet{m: map[net.Conn]struct{}{}}

	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("X-Backend", b.Name)
		io.WriteString(w, b.Name+"\n")
	})
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}

	serve := func(fn func()) {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			fn()
		}()
	}
	for _, ln := range streams[:2] {
		serve(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Warn("http server stopped", "addr", ln.Addr(), "err", err)
			}
		})
	}
	for _, ln := range streams[2:] {
		serve(func() { tcpEcho(ln, conns, &s.wg, log) })
	}
	for _, pc := range packets {
		serve(func() { udpEcho(pc, log) })
	}
	// Shutdown is driven from one place so ctx cancellation and explicit
	// stops behave the same.
	go func() {
		<-sctx.Done()
		srv.Close()
		closeAll()
		conns.closeAll()
		s.wg.Wait()
		// Log before signalling: after done a test may already be over,
		// and a test logger must not be written to then.
		log.Debug("backend servers stopped")
		close(s.done)
	}()

	if l.servers == nil {
		l.servers = map[int]*serverSet{}
	}
	l.servers[i] = s
	log.Debug("backend servers started", "ports", []int{HTTPPort, TCPEchoPort, UDPEchoPort})
	return nil
}

// StopBackend stops backend i's servers and waits until their sockets are
// closed, so new connections are refused. Stopping a stopped backend is a
// no-op.
func (l *Lab) StopBackend(i int) error {
	if i < 0 || i >= len(l.Backends) {
		return fmt.Errorf("lab: StopBackend(%d): only %d backends", i, len(l.Backends))
	}
	l.mu.Lock()
	s := l.servers[i]
	delete(l.servers, i)
	l.mu.Unlock()
	if s != nil {
		s.stop()
	}
	return nil
}

func (l *Lab) stopAll() error {
	var errs []error
	for i := range l.Backends {
		errs = append(errs, l.StopBackend(i))
	}
	return errors.Join(errs...)
}

// connSet tracks accepted echo connections so a stop can cut them; a
// health test expects a stopped backend to be really gone.
type connSet struct {
	mu     sync.Mutex
	m      map[net.Conn]struct{}
	closed bool
}

func (c *connSet) add(conn net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.m[conn] = struct{}{}
	return true
}

func (c *connSet) remove(conn net.Conn) {
	c.mu.Lock()
	delete(c.m, conn)
	c.mu.Unlock()
}

func (c *connSet) closeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for conn := range c.m {
		conn.Close()
	}
}

func tcpEcho(ln net.Listener, conns *connSet, wg *sync.WaitGroup, log *slog.Logger) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Warn("tcp echo accept failed", "addr", ln.Addr(), "err", err)
			}
			return
		}
		if !conns.add(c) {
			c.Close()
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conns.remove(c)
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}

// listenUDPPktinfo opens a wildcard UDP socket that reports each datagram's
// destination address. Without it a reply to a datagram sent to a VIP
// would leave with the veth address as source and the client (which talked
// to the VIP) would drop it.
func listenUDPPktinfo(ctx context.Context, network string, port int) (*net.UDPConn, error) {
	addr := fmt.Sprintf("0.0.0.0:%d", port)
	level, opt := unix.IPPROTO_IP, unix.IP_PKTINFO
	if network == "udp6" {
		addr = fmt.Sprintf("[::]:%d", port)
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, 1) }); err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s %s: %w", network, addr, err)
	}
	return pc.(*net.UDPConn), nil
}

// udpEcho answers every datagram from the address it was sent to.
func udpEcho(pc *net.UDPConn, log *slog.Logger) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, 256)
	for {
		n, oobn, _, from, err := pc.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Warn("udp echo read failed", "addr", pc.LocalAddr(), "err", err)
			}
			return
		}
		var reply []byte
		if dst, ok := pktinfoDst(oob[:oobn]); ok {
			if dst.Is4() {
				reply = unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: dst.As4()})
			} else {
				reply = unix.PktInfo6(&unix.Inet6Pktinfo{Addr: dst.As16()})
			}
		}
		if _, _, err := pc.WriteMsgUDPAddrPort(buf[:n], reply, from); err != nil {
			log.Debug("udp echo write failed", "to", from, "err", err)
		}
	}
}

// pktinfoDst extracts the datagram's destination address from an
// IP_PKTINFO or IPV6_PKTINFO control message.
func pktinfoDst(oob []byte) (netip.Addr, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.Addr{}, false
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
			return netip.AddrFrom4([4]byte(m.Data[8:12])), true
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			// struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
			return netip.AddrFrom16([16]byte(m.Data[0:16])), true
		}
	}
	return netip.Addr{}, false
}
