package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// connGuard is what the connections of one server enforce, and where they
// report abuse.
type connGuard struct {
	p *Proxy
	// maxResets is an HTTP/2 connection's budget of client stream resets,
	// refilled at maxResets per resetWindow.
	maxResets   int
	resetWindow time.Duration
}

// clientConn is an HTTP/2 client connection (h2 by ALPN, or h2c by prior
// knowledge) as the HTTP/2 server sees it. Everything the client sends
// passes through Read on its way to the server, which lets the proxy
// enforce what the server does not: every RST_STREAM the client sends
// spends one unit of the connection's reset budget. A client over budget
// (the rapid reset flood: streams opened and cancelled at once, each
// costing a backend request and the client nothing) gets no further frame
// through: the HTTP/2 server reads a connection error and ends the
// connection with GOAWAY (ENHANCE_YOUR_CALM).
//
// The HTTP/2 server reads a connection from one goroutine, so the
// inspection state needs no lock.
type clientConn struct {
	net.Conn
	tls   *tls.Conn // nil for plain HTTP
	guard *connGuard
	peer  netip.Addr

	tlsOnce  sync.Once
	tlsState *tls.ConnectionState

	sniffed int // bytes of the client preface passed so far

	// cutErr, once set, is what every further Read returns: the bytes
	// after the cut are never passed on.
	cutErr error

	frames   frameScanner
	resets   int     // RST_STREAM frames received
	tokens   float64 // reset budget left
	refilled time.Time
	cutAtEnd bool // the current frame is the last one passed on
}

// errResetFlood is what the HTTP/2 server reads from a connection whose
// client is over its reset budget. golang.org/x/net/http2's server handles
// a read error that is an http2.ConnectionError as one found in a frame: it
// sends GOAWAY with that code (rather than drop the connection silently,
// as for an I/O error) and closes after its GOAWAY timeout.
// TestHTTP2RapidResetEndsConnection holds it to that.
var errResetFlood error = http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)

func (c *clientConn) Read(b []byte) (int, error) {
	if c.cutErr != nil {
		return 0, c.cutErr
	}
	n, err := c.Conn.Read(b)
	if n > 0 {
		n = c.inspect(b[:n])
		if c.cutErr != nil && n == 0 {
			return 0, c.cutErr
		}
	}
	return n, err
}

// inspect looks at bytes the client sent and returns how many of them are
// passed on. The client preface comes first (the server checks it); the
// frames after it are followed.
func (c *clientConn) inspect(b []byte) int {
	i := 0
	if c.sniffed < len(http2.ClientPreface) {
		i = min(len(b), len(http2.ClientPreface)-c.sniffed)
		c.sniffed += i
		if c.sniffed < len(http2.ClientPreface) {
			return len(b)
		}
		c.tokens = float64(c.guard.maxResets)
		c.refilled = c.guard.p.now()
	}
	return i + c.inspectFrames(b[i:])
}

// inspectFrames follows HTTP/2 frames and spends the reset budget. Past
// it, the frame that exceeded it (an RST_STREAM, which cancels its
// stream) is the last passed on.
func (c *clientConn) inspectFrames(b []byte) int {
	for i := 0; i < len(b); {
		if c.frames.inHeader() {
			i += c.frames.headerBytes(b[i:])
			if c.frames.inHeader() {
				break
			}
			if c.frames.typ() == http2.FrameRSTStream && !c.cutAtEnd {
				c.resets++
				if !c.spendReset() {
					c.cutAtEnd = true
					c.guard.resetFlood(c)
				}
			}
		}
		i += c.frames.payloadBytes(len(b) - i)
		if c.cutAtEnd && !c.frames.inPayload() {
			c.cutErr = errResetFlood
			return i
		}
	}
	return len(b)
}

// spendReset takes one reset from the budget, a token bucket of maxResets
// refilled at maxResets per resetWindow, and reports whether there was
// one.
func (c *clientConn) spendReset() bool {
	g := c.guard
	now := g.p.now()
	if d := now.Sub(c.refilled); d > 0 {
		c.tokens = min(float64(g.maxResets), c.tokens+float64(g.maxResets)*float64(d)/float64(g.resetWindow))
		c.refilled = now
	}
	if c.tokens < 1 {
		return false
	}
	c.tokens--
	return true
}

// TLS returns the connection's TLS state once its handshake is done; nil
// for plain HTTP. (It is deliberately not named ConnectionState: net/http
// would then take the connection for TLS it handles itself and not offer
// it HTTP/2, which it does here as for h2c, the handshake being ours.)
func (c *clientConn) TLS() *tls.ConnectionState {
	if c.tls == nil {
		return nil
	}
	c.tlsOnce.Do(func() {
		st := c.tls.ConnectionState()
		c.tlsState = &st
	})
	return c.tlsState
}

type clientConnKey struct{}

// withClientConn is the servers' ConnContext: requests find their
// connection in their context.
func withClientConn(ctx context.Context, c net.Conn) context.Context {
	if cc, ok := c.(*clientConn); ok {
		return context.WithValue(ctx, clientConnKey{}, cc)
	}
	return ctx
}

func clientConnOf(ctx context.Context) *clientConn {
	cc, _ := ctx.Value(clientConnKey{}).(*clientConn)
	return cc
}

// resetFlood reports a connection whose client went over its reset budget.
func (g *connGuard) resetFlood(c *clientConn) {
	g.p.violation(ViolationResetFlood, c.peer, "proxy: HTTP/2 client over its stream reset budget; ending the connection with GOAWAY",
		"resets", c.resets, "budget", g.maxResets, "window", g.resetWindow.String())
}

// violation counts, logs and reports client abuse of a kind (a Violation
// constant) from peer.
func (p *Proxy) violation(kind string, peer netip.Addr, msg string, attrs ...any) {
	switch kind {
	case ViolationResetFlood:
		p.count.resetFloods.Add(1)
	case ViolationAmbiguousFraming:
		p.count.ambiguous.Add(1)
	}
	p.prom.violations.WithLabelValues(kind).Inc()
	p.log.Warn(msg, append([]any{"client_ip", addrString(peer)}, attrs...)...)
	if p.securityEvent != nil {
		data := map[string]any{"client_ip": addrString(peer)}
		for i := 0; i+1 < len(attrs); i += 2 {
			data[attrs[i].(string)] = attrs[i+1]
		}
		p.securityEvent(kind, data)
	}
}

// frameScanner follows HTTP/2 frame boundaries in a byte stream: a 9-byte
// header (24-bit length, type, flags, stream id), then length bytes of
// payload.
type frameScanner struct {
	hdr  [9]byte
	hdrN int
	left int // payload bytes still to come
}

func (s *frameScanner) inHeader() bool  { return s.left == 0 && s.hdrN < len(s.hdr) }
func (s *frameScanner) inPayload() bool { return s.left > 0 }

func (s *frameScanner) typ() http2.FrameType { return http2.FrameType(s.hdr[3]) }

// headerBytes takes header bytes from b and returns how many it took. When
// the header is complete the payload begins.
func (s *frameScanner) headerBytes(b []byte) int {
	n := copy(s.hdr[s.hdrN:], b)
	s.hdrN += n
	if s.hdrN == len(s.hdr) {
		s.left = int(s.hdr[0])<<16 | int(s.hdr[1])<<8 | int(s.hdr[2])
	}
	return n
}

// payloadBytes takes up to avail bytes of payload and returns how many it
// took; at the end of the payload the next header begins.
func (s *frameScanner) payloadBytes(avail int) int {
	if s.hdrN < len(s.hdr) {
		return 0
	}
	n := min(s.left, avail)
	s.left -= n
	if s.left == 0 {
		s.hdrN = 0
	}
	return n
}
