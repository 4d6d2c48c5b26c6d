package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// connSet tracks open client connections, so that a server being retired
// or drained can close whatever its engines left open when its time is
// up: HTTP/1 keep-alives, HTTP/2 connections, upgraded tunnels.
type connSet struct {
	mu sync.Mutex
	m  map[*trackedConn]struct{}
}

func (s *connSet) add(c *trackedConn) {
	s.mu.Lock()
	if s.m == nil {
		s.m = map[*trackedConn]struct{}{}
	}
	s.m[c] = struct{}{}
	s.mu.Unlock()
}

func (s *connSet) remove(c *trackedConn) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
}

// closeAll closes every tracked connection and returns how many there were.
func (s *connSet) closeAll() int {
	s.mu.Lock()
	conns := make([]*trackedConn, 0, len(s.m))
	for c := range s.m {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	return len(conns)
}

// trackedConn is an accepted connection that leaves its set when closed.
type trackedConn struct {
	net.Conn
	set  *connSet
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.set.remove(c) })
	return c.Conn.Close()
}

// CloseWrite half-closes the connection (an upgraded tunnel does, toward
// the client, when the backend is done sending).
func (c *trackedConn) CloseWrite() error {
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

	ch        chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
	err       error // the real listener's failure, once done is closed
}

func newDispatchListener(ln net.Listener, conns *connSet, tlsCfg *tls.Config, h2c func(net.Conn), sniffFor time.Duration) *dispatchListener {
	d := &dispatchListener{ln: ln, conns: conns, tls: tlsCfg, h2c: h2c, sniffFor: sniffFor,
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
			d.err = err
			d.Close()
			return
		}
		tc := &trackedConn{Conn: c, set: d.conns}
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
	d.closeOnce.Do(func() {
		close(d.done)
		d.ln.Close()
	})
	return nil
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
