package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// closeSet tracks open connections, so that a server being retired or
// drained can close whatever its engines left open when its time is up:
// HTTP/1 keep-alives, HTTP/2 connections, upgraded tunnels. The zero value
// is ready to use.
type closeSet[C interface {
	comparable
	Close() error
}] struct {
	mu sync.Mutex
	m  map[C]struct{}
}

func (s *closeSet[C]) add(c C) {
	s.mu.Lock()
	if s.m == nil {
		s.m = map[C]struct{}{}
	}
	s.m[c] = struct{}{}
	s.mu.Unlock()
}

func (s *closeSet[C]) remove(c C) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
}

// closeAll closes every tracked connection and returns how many there were.
func (s *closeSet[C]) closeAll() int {
	s.mu.Lock()
	conns := make([]C, 0, len(s.m))
	for c := range s.m {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	return len(conns)
}

// connSet tracks a server's client connections.
type connSet = closeSet[*trackedConn]

// trackedConn is an accepted connection that leaves its set when closed.
//
// Neither it nor the backend connections yield before a read that follows
// a write. A runtime.Gosched there saved the read that fails with EAGAIN
// (about 4.4 system calls per request instead of 6.2), but it puts the
// goroutine on the global run queue, and Go polls the network only when
// the run queues are empty: on a saturated core, connections already
// answered waited longer. In two quiet runs each against HAProxy, plain
// HTTP's p99 was 1.70x and 2.29x HAProxy's with the yield, 1.49x and 1.67x
// without (docs/BENCHMARKS.md).
//
// A connection followed by its server's arrivalWatch (arrival.go) reads
// through it, and waits for its next request without a read that fails;
// its small writes go out at the end of the round (roundwrites.go).
type trackedConn struct {
	watchedIO
	set    *connSet
	once   sync.Once
	linger atomic.Bool
}

// refusedBodyLinger bounds how long the rest of a refused request's body is
// read (and discarded) after the answer, so that a client still sending it
// reads the answer rather than a connection reset, as nginx's lingering
// close does, while a client that sends nothing cannot hold the
// connection.
const refusedBodyLinger = time.Second

// lingerOnClose makes Close end the connection politely: the answer is
// followed by a FIN, and what the client still sends is discarded for up
// to refusedBodyLinger before the socket closes.
func (c *trackedConn) lingerOnClose() { c.linger.Store(true) }

func (c *trackedConn) Close() error {
	first := false
	c.once.Do(func() { first = true })
	if !first {
		return c.Conn.Close()
	}
	if c.watched != nil && c.watched.close() {
		// The socket closes once the client has taken what it was
		// sent (deferredWrites.close).
		c.set.remove(c)
		return nil
	}
	if c.linger.Load() {
		if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
			go func() {
				c.Conn.SetReadDeadline(time.Now().Add(refusedBodyLinger))
				io.Copy(io.Discard, c.Conn)
				c.Conn.Close()
				c.set.remove(c)
			}()
			return nil
		}
	}
	c.set.remove(c)
	return c.Conn.Close()
}

// lingerOnClose finds the tracked connection under a client connection and
// asks it to close politely.
func lingerOnClose(c net.Conn) {
	switch v := c.(type) {
	case *trackedConn:
		v.lingerOnClose()
	case *prefixConn:
		v.lingerOnClose()
	case *tlsClientConn:
		lingerOnClose(v.NetConn())
	}
}

// CloseWrite half-closes the connection (an upgraded tunnel does, toward
// the client, when the backend is done sending).
func (c *trackedConn) CloseWrite() error {
	if c.watched != nil {
		// What is pending goes before the FIN.
		if err := c.watched.writes.unbatch(); err != nil {
			return err
		}
	}
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// dispatchListener is the listener the HTTP/1.1 engine serves. It accepts
// from the real listener in its own goroutine and delivers each connection
// tracked, wrapped in TLS for HTTPS (whose handshake the engine runs, and
// hands HTTP/2 by ALPN to the HTTP/2 engine through its NextProto hook).
// With h2c on, a plain connection is first sniffed for the HTTP/2 client
// preface, within the header timeout: one that starts with it goes to the
// HTTP/2 engine, any other to the HTTP/1.1 engine with the sniffed bytes
// put back.
type dispatchListener struct {
	ln       net.Listener
	conns    *connSet
	tls      *tls.Config // nil: plain
	h2c      func(net.Conn)
	sniffFor time.Duration
	watch    *arrivalWatch // nil: connections read their sockets directly

	ch        chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
	err       error // the real listener's failure, once done is closed
}

func newDispatchListener(ln net.Listener, conns *connSet, tlsCfg *tls.Config, h2c func(net.Conn), sniffFor time.Duration, watch *arrivalWatch) *dispatchListener {
	d := &dispatchListener{ln: ln, conns: conns, tls: tlsCfg, h2c: h2c, sniffFor: sniffFor, watch: watch,
		ch: make(chan net.Conn), done: make(chan struct{})}
	go d.acceptLoop()
	return d
}

func (d *dispatchListener) acceptLoop() {
	for {
		c, err := d.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			d.fail(err)
			return
		}
		tc := &trackedConn{watchedIO: watchedIO{Conn: c}, set: d.conns}
		if d.watch != nil {
			tc.follow(d.watch)
		}
		d.conns.add(tc)
		switch {
		case d.tls != nil:
			d.deliver(&tlsClientConn{Conn: tls.Server(tc, d.tls)})
		case d.h2c != nil:
			go d.sniff(tc)
		default:
			d.deliver(tc)
		}
	}
}

// sniff reads the first bytes of a plain connection and sends it to the
// engine of its protocol.
func (d *dispatchListener) sniff(c *trackedConn) {
	preface := []byte(http2.ClientPreface)
	buf := make([]byte, len(preface))
	n := 0
	c.SetReadDeadline(time.Now().Add(d.sniffFor))
	for n < len(buf) && bytes.HasPrefix(preface, buf[:n]) {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			break
		}
	}
	c.SetReadDeadline(time.Time{})
	if n == 0 {
		c.Close()
		return
	}
	pc := &prefixConn{trackedConn: c, prefix: buf[:n]}
	if bytes.Equal(buf[:n], preface) {
		d.h2c(pc)
		return
	}
	d.deliver(pc)
}

func (d *dispatchListener) deliver(c net.Conn) {
	select {
	case d.ch <- c:
	case <-d.done:
		c.Close()
	}
}

func (d *dispatchListener) Accept() (net.Conn, error) {
	select {
	case c := <-d.ch:
		return c, nil
	case <-d.done:
		if d.err != nil {
			return nil, d.err
		}
		return nil, net.ErrClosed
	}
}

func (d *dispatchListener) Close() error {
	d.fail(nil)
	return nil
}

// fail closes the listener; err is why (nil: it was closed on purpose).
func (d *dispatchListener) fail(err error) {
	d.closeOnce.Do(func() {
		d.err = err
		close(d.done)
		d.ln.Close()
	})
}

func (d *dispatchListener) Addr() net.Addr { return d.ln.Addr() }

// prefixConn is a connection whose first bytes were read by the sniffer:
// they are read again first.
type prefixConn struct {
	*trackedConn
	prefix []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.trackedConn.Read(b)
}

// tlsClientConn is an HTTPS client connection. The HTTP/1.1 engine runs its
// handshake (Handshake and ConnectionState are what it looks for); a client
// that sent plain HTTP instead gets a plain 400, as net/http answers.
type tlsClientConn struct {
	*tls.Conn
}

func (c *tlsClientConn) Handshake() error {
	err := c.Conn.Handshake()
	var re tls.RecordHeaderError
	if err != nil && errors.As(err, &re) && re.Conn != nil {
		switch string(re.RecordHeader[:]) {
		case "GET /", "HEAD ", "POST ", "PUT /", "OPTIO":
			io.WriteString(re.Conn, "HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
			re.Conn.Close()
		}
	}
	return err
}

// CloseWrite half-closes the connection (TLS close_notify).
func (c *tlsClientConn) CloseWrite() error { return c.Conn.CloseWrite() }
