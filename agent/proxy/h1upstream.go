package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"github.com/valyala/fasthttp"
	"golang.org/x/sys/unix"
)

// newHostClient is the connection pool of one backend for the HTTP/1.1
// engine. Only its pool is used: the proxy writes requests and reads
// responses on its connections itself, so fasthttp's own retries never
// run, and the proxy's retry rule alone decides. follow wraps each new
// connection (Proxy.followBackend).
func newHostClient(addr string, k transportKey, follow func(net.Conn) net.Conn) *fasthttp.HostClient {
	d := &net.Dialer{Timeout: k.dial, KeepAlive: 30 * time.Second}
	return &fasthttp.HostClient{
		Addr: addr,
		Dial: func(addr string) (net.Conn, error) {
			c, err := d.Dial("tcp", addr)
			if err != nil {
				return nil, err
			}
			return follow(c), nil
		},
		MaxConns:                      1 << 20, // no limit, as http.Transport's default
		MaxIdleConnDuration:           k.idle,
		ReadBufferSize:                transportBufSize,
		WriteBufferSize:               transportBufSize,
		DisableHeaderNamesNormalizing: true,
		DisablePathNormalizing:        true,
		NoDefaultUserAgentHeader:      true,
	}
}

// upstreamLease is a backend connection taken from a member's pool.
type upstreamLease struct {
	hc     *fasthttp.HostClient
	cc     any // fasthttp's pooled connection, handed back by release
	conn   net.Conn
	br     *bufio.Reader
	reused bool // it served requests before: it may have been closed by the backend since
}

// acquire takes a connection to the backend, idle or newly dialed. since
// is when the attempt began: a connection created before it was idle. An
// idle connection unused for longer than staleAfter is checked first, and
// dropped if the backend has closed it since (many servers close idle
// keep-alive connections after a few seconds): a request with a body
// could not be sent again had it been written to a closed connection.
func acquire(hc *fasthttp.HostClient, since time.Time) (upstreamLease, error) {
	for {
		cc, err := hc.AcquireConn(0, false)
		if err != nil {
			return upstreamLease{}, err
		}
		l := upstreamLease{hc: hc, cc: cc, conn: cc.Conn(), reused: cc.CreatedTime().Before(since)}
		if l.reused && since.Sub(cc.LastUseTime()) > staleAfter && peerClosed(l.conn) {
			l.release(false)
			continue
		}
		return l, nil
	}
}

// staleAfter is how long a backend connection may have been idle before it
// is checked for a close by the backend.
const staleAfter = time.Second

// peerClosed reports whether the backend has closed conn (or sent bytes
// nobody asked for), with one non-blocking peek.
func peerClosed(conn net.Conn) bool {
	_, n, err := peekSocket(conn)
	return n == 0 && err == nil || n > 0 // 0 bytes: the backend closed; more: a stray answer
}

// peekSocket looks at the next byte waiting on a TCP connection without
// consuming it or blocking: n is 1 with the byte, or 0 with a nil error at
// the end of the stream (the peer closed its side), or 0 with the error
// (syscall.EAGAIN: nothing yet; errors.ErrUnsupported: conn is no socket).
func peekSocket(conn net.Conn) (b byte, n int, err error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return 0, 0, errors.ErrUnsupported
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var buf [1]byte
	if cerr := rc.Read(func(fd uintptr) bool {
		n, _, err = syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return true
	}); cerr != nil {
		return 0, 0, cerr
	}
	if err != nil {
		return 0, 0, err
	}
	return buf[0], n, nil
}

// clientCheckAfter is how long a request must have waited for its backend
// before the proxy checks, once, that its client is still connected: a
// client that gave up meanwhile is answered with nothing and the request
// accounted as 499 (client closed request), as nginx does. Quicker
// exchanges skip the check, and its system call: their client is almost
// always still there, and the answer is on its way either way.
const clientCheckAfter = 100 * time.Millisecond

// clientGone reports whether the client of a request has closed its
// connection (or reset it), with one non-blocking system call. In plain
// HTTP a peek tells: the end of the stream, or a reset; a client that sent
// more, such as its next pipelined request, is still there. Over TLS the
// bytes before the end cannot tell (TLS 1.3 encrypts the close_notify
// alert like data), so the socket's state does: the client's FIN (after
// whatever it sent) or a reset.
func clientGone(c net.Conn) bool {
	overTLS := false
	for {
		switch v := c.(type) {
		case *tlsClientConn:
			c, overTLS = v.NetConn(), true
			continue
		case *prefixConn:
			if len(v.prefix) > 0 {
				return false
			}
			c = v.trackedConn
			continue
		case *trackedConn:
			c = v.Conn
			continue
		}
		break
	}
	if overTLS {
		return peerHungUp(c)
	}
	_, n, err := peekSocket(c)
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return true
	case err != nil:
		return false
	default:
		return n == 0
	}
}

// peerHungUp reports whether the peer of a TCP connection has closed its
// side (FIN received) or reset it, whatever data is still unread, with one
// zero-timeout poll(2).
func peerHungUp(conn net.Conn) bool {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	hungUp := false
	rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(pfd, 0); err == nil && n > 0 {
			hungUp = pfd[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0
		}
	})
	return hungUp
}

// clientLeft ends a request whose client has gone: no answer is written
// (fasthttp closes the connection instead), and the request is accounted
// as 499.
func (rq *h1Request) clientLeft() {
	rq.status = statusClientClosedRequest
	rq.ctx.SetConnectionClose()
	rq.ctx.HijackSetNoResponse(true)
	rq.ctx.Hijack(func(net.Conn) {}) // fasthttp closes the connection when this returns
}

// statusClientClosedRequest is nginx's status for a request whose client
// closed the connection before the answer.
const statusClientClosedRequest = 499

// release hands the connection back to the pool when reuse is true (the
// exchange ended cleanly at a message boundary), and closes it otherwise.
func (l *upstreamLease) release(reuse bool) {
	if l.hc == nil {
		return
	}
	if l.br != nil {
		l.hc.ReleaseReader(l.br)
	}
	if reuse {
		releaseWith(l.hc.ReleaseConn, l.cc)
	} else {
		releaseWith(l.hc.CloseConn, l.cc)
	}
	*l = upstreamLease{}
}

// releaseWith calls fasthttp's release function with its own connection
// type, which it does not export.
func releaseWith[C any](f func(C), cc any) { f(cc.(C)) }

// proxy sends the request to a backend of the route's pool, retrying as
// the configuration allows, and prepares the response. It reports whether
// the response body is relayed from the backend (accounted for when it is
// closed).
func (rq *h1Request) proxy() bool {
	p, st, pl := rq.p, rq.st, rq.route.pool
	ph := st.cfg.PassiveHealth
	ctx := rq.ctx
	hasBody := rq.hasBody()
	var body io.Reader
	if hasBody {
		body = ctx.RequestBodyStream()
		if !rq.deadline.IsZero() {
			// The client's body must arrive within the request
			// timeout; fasthttp sets its own deadlines again before
			// the next request.
			ctx.Conn().SetReadDeadline(rq.deadline)
		}
	}
	var tried [maxAttempts]*upstream
	var lastErr error
	for attempt := 0; ; attempt++ {
		// The first attempt starts at the request's own clock reading
		// (its header has just arrived); later ones read the clock.
		now := rq.start
		if attempt > 0 {
			now = clockAfter(rq.start)
		}
		m := pl.pick(now.UnixNano(), &p.live, rq.client, tried[:attempt], rq.sticky)
		if m == nil {
			if attempt == 0 {
				rq.reason = ReasonNoBackend
				p.countUpstream(ReasonNoBackend)
				rq.refuseUnreadBody()
				rq.writeError(http.StatusServiceUnavailable, "no_backend", "no healthy backend in pool "+strconv.Quote(pl.name))
				return false
			}
			break
		}
		m.inflight.Add(1)
		rq.attempts, rq.last = attempt+1, m
		if attempt > 0 {
			p.count.retries.Add(1)
		}
		dialed, err := rq.exchange(m, body, now)
		done := clockAfter(rq.start)
		if err == nil {
			m.observe(done.UnixNano(), float64(done.Sub(now)))
			if rq.resp.StatusCode() >= 500 {
				rq.reason = Reason5xx
				p.countUpstream(Reason5xx)
				p.passiveFail(m, done, ph.ConsecutiveFailures, ph.Ejection.Std())
			} else {
				m.passiveSuccess()
			}
			rq.member = m // the in-flight slot is released by complete
			if done.Sub(rq.start) >= clientCheckAfter && rq.resp.StatusCode() != http.StatusSwitchingProtocols && clientGone(ctx.Conn()) {
				rq.releaseUpstream(false)
				rq.clientLeft()
				return false
			}
			return rq.relay()
		}
		m.inflight.Add(-1)
		lastErr = err
		if rq.fault != bodyOK {
			// The client's fault, not the backend's.
			break
		}
		reason := classify(err)
		if !dialed {
			reason = ReasonDial
		}
		rq.reason = reason
		p.countUpstream(reason)
		m.observe(done.UnixNano(), max(float64(done.Sub(now)), ewmaPenalty))
		p.passiveFail(m, done, ph.ConsecutiveFailures, ph.Ejection.Std())
		// Only a connection that could not be established may be
		// retried, for an idempotent request without a body.
		if attempt >= st.cfg.Retries || attempt+1 >= maxAttempts || dialed ||
			!idempotent(b2s(ctx.Method())) || hasBody || (!rq.deadline.IsZero() && done.After(rq.deadline)) {
			break
		}
		tried[attempt] = m.upstream
	}
	rq.answerFailure(lastErr)
	return false
}

// answerFailure answers a request no backend answered: the client's own
// faults (413, 400, 408), or the backend's (504 for timeouts, 502
// otherwise).
func (rq *h1Request) answerFailure(err error) {
	switch rq.fault {
	case bodyTooLarge:
		rq.bodyTooLarge()
		return
	case bodyTooSlow:
		rq.closeUnread()
		rq.writeError(http.StatusRequestTimeout, "request_timeout", "the request body was not received within the request timeout")
		return
	case bodyMalformed:
		rq.closeUnread()
		rq.writeError(http.StatusBadRequest, "bad_request", "the request body could not be read: its framing is invalid or it ended early")
		return
	}
	if time.Since(rq.start) >= clientCheckAfter && clientGone(rq.ctx.Conn()) {
		rq.clientLeft()
		return
	}
	if rq.hasBody() {
		// The body may be partly unread, and cannot be skipped safely.
		rq.closeUnread()
	}
	if isTimeout(err) {
		rq.writeError(http.StatusGatewayTimeout, "gateway_timeout", "the backend did not answer in time")
		return
	}
	rq.writeError(http.StatusBadGateway, "bad_gateway", "the backend could not be reached or failed")
}

// exchange sends the request to m and reads the response header. dialed
// reports whether a connection to the backend was established (the
// request may have been sent); on success rq.resp and rq.up hold the
// response and its connection.
func (rq *h1Request) exchange(m *member, body io.Reader, since time.Time) (dialed bool, err error) {
	for try := 0; ; try++ {
		lease, err := acquire(m.client, since)
		if err != nil {
			return false, err
		}
		// The response header timeout runs from the send: the clock
		// read when the attempt began still says when that is, unless
		// a dial or an earlier try took time since.
		start := since
		if try > 0 || !lease.reused {
			start = time.Now()
		}
		headerBy := rq.headerDeadline(start)
		err = rq.send(&lease, body, headerBy)
		if err == nil {
			err = rq.receive(&lease, body != nil, headerBy)
		}
		if err == nil {
			rq.up = lease
			return true, nil
		}
		reused := lease.reused // release clears the lease
		lease.release(false)
		// A keep-alive connection the backend closed while it was idle
		// fails at once; the request, without a body, is sent again on
		// another connection, as net/http's transport does.
		if reused && body == nil && try < 2 && rq.fault == bodyOK && staleConnError(err) {
			continue
		}
		return true, err
	}
}

// clockAfter is the time now, read as the monotonic time elapsed since
// ref (which has a monotonic reading): one clock read, where time.Now
// reads the wall clock as well. Per request, that second read is
// measurable.
func clockAfter(ref time.Time) time.Time { return ref.Add(time.Since(ref)) }

func staleConnError(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, fasthttp.ErrConnectionClosed)
}

// headerDeadline is when the backend's response header must have arrived,
// for a request sent at now: within the response header timeout, and the
// request's deadline.
func (rq *h1Request) headerDeadline(now time.Time) time.Time {
	by := rq.deadline
	if d := rq.st.tkey.responseHeader; d > 0 {
		if t := now.Add(d); by.IsZero() || t.Before(by) {
			by = t
		}
	}
	return by
}

// send writes the request head and body to the backend. A body must be
// sent within the request's deadline; a request without one is only a
// head, and one deadline for the connection covers writing it and reading
// the answer's header.
func (rq *h1Request) send(l *upstreamLease, body io.Reader, headerBy time.Time) error {
	conn := l.conn
	var err error
	if body == nil {
		err = conn.SetDeadline(headerBy)
	} else {
		err = conn.SetWriteDeadline(rq.deadline)
	}
	if err != nil {
		return err
	}
	cl := rq.ctx.Request.Header.ContentLength()
	rq.head = rq.appendHead(rq.head[:0], cl)
	if body == nil {
		return writeAwaitingReply(conn, rq.head)
	}
	bw := l.hc.AcquireWriter(conn)
	defer l.hc.ReleaseWriter(bw)
	if _, err := bw.Write(rq.head); err != nil {
		return err
	}
	if err := rq.copyBody(bw, body, cl); err != nil {
		return err
	}
	return bw.Flush()
}

// writeAwaitingReply writes a whole request to a backend connection and
// returns once the connection is readable: the reply (or the backend's
// close) has begun to arrive. A plain write followed by a read costs one
// more system call per request, the read that finds nothing yet and fails
// with EAGAIN before Go's poller parks the goroutine: the reply cannot
// arrive before the request is sent.
//
// Waiting without reading first is safe here, as it would not be on the
// client's side (where a pipelined request may sit unread in the socket):
// the poller's readiness is reset before the request is written, so
// whatever arrives after it wakes the wait, and a backend sends nothing
// unasked. One that closed the idle connection meanwhile answers the
// request with a reset, which wakes the wait too; the read that follows
// reports it, and exchange sends the request again on another connection.
// A write the socket cannot take at once completes through conn.Write,
// and the read that follows waits as usual.
//
// A connection the arrival watch follows needs none of this: the read
// that follows a plain write waits for the watch's mark without trying
// the socket first.
func writeAwaitingReply(conn net.Conn, b []byte) error {
	sc, ok := conn.(syscall.Conn)
	if _, watched := conn.(*backendConn); watched || !ok {
		_, err := conn.Write(b)
		return err
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	written := 0
	var werr error
	rerr := rc.Read(func(fd uintptr) bool {
		if written == len(b) {
			return true // woken: the caller reads
		}
		for written < len(b) {
			n, err := unix.Write(int(fd), b[written:])
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return true // the rest goes through conn.Write
			case err != nil:
				werr = err
				return true
			}
			written += n
		}
		return false // wait for readiness, without a read that would fail
	})
	switch {
	case werr != nil:
		return opError("write", conn, os.NewSyscallError("write", werr))
	case written < len(b) && rerr == nil:
		_, err := conn.Write(b[written:])
		return err
	case rerr != nil:
		return readError(conn, rerr)
	}
	return nil
}

// hopByHop reports the headers that concern one connection only and are
// not forwarded (RFC 9110 §7.6.1), besides those the Connection header
// names. Content-Length is here too: the proxy frames the body itself.
func hopByHop(name []byte) bool {
	switch len(name) {
	case 2:
		return asciiEqualFold(name, "TE")
	case 7:
		return asciiEqualFold(name, "Upgrade") || asciiEqualFold(name, "Trailer")
	case 10:
		return asciiEqualFold(name, "Connection") || asciiEqualFold(name, "Keep-Alive")
	case 14:
		return asciiEqualFold(name, "Content-Length")
	case 16:
		return asciiEqualFold(name, "Proxy-Connection")
	case 17:
		return asciiEqualFold(name, "Transfer-Encoding")
	case 19:
		return asciiEqualFold(name, "Proxy-Authenticate")
	}
	return false
}

// replacedByProxy reports the request headers the proxy writes itself.
func replacedByProxy(name []byte) bool {
	switch name[0] | 0x20 {
	case 'x':
		return asciiEqualFold(name, "X-Forwarded-For") || asciiEqualFold(name, "X-Forwarded-Proto") ||
			asciiEqualFold(name, "X-Forwarded-Host") || asciiEqualFold(name, "X-Real-Ip") ||
			asciiEqualFold(name, "X-Request-Id")
	case 'f':
		return asciiEqualFold(name, "Forwarded")
	case 'v':
		return asciiEqualFold(name, "Via")
	case 'e':
		// The proxy has answered the client's expectation; the body
		// follows the head at once.
		return asciiEqualFold(name, "Expect")
	}
	return false
}

// appendHead appends the request head for the backend: the request line
// as received (HTTP/1.1 toward the backend), the client's header lines as
// sent except hop-by-hop ones, the forwarding headers, and the framing.
func (rq *h1Request) appendHead(b []byte, cl int) []byte {
	h := &rq.ctx.Request.Header
	b = append(b, h.Method()...)
	b = append(b, ' ')
	b = append(b, h.RequestURI()...)
	b = append(b, " HTTP/1.1\r\n"...)
	named := len(rq.hdr.connection) > 0
	chunked := cl == -1
	eachHeaderLine(h.RawHeaders(), func(_, name, value []byte) bool {
		if len(name) == 0 || replacedByProxy(name) {
			return true
		}
		// The Trailer announcement goes with a chunked body, whose
		// trailer fields copyBody relays.
		if hopByHop(name) && !(chunked && isTrailerField(name)) {
			return true
		}
		if named && rq.connectionNames(name) {
			return true
		}
		b = append(b, name...)
		b = append(b, ": "...)
		b = append(b, value...)
		b = append(b, "\r\n"...)
		return true
	})

	// Keep what a trusted proxy sent, replace what anyone else did.
	b = append(b, "X-Forwarded-For: "...)
	if rq.trusted && len(rq.hdr.xff) > 0 {
		for _, v := range rq.hdr.xff {
			b = append(b, v...)
			b = append(b, ", "...)
		}
	}
	b = rq.peer.AppendTo(b)
	b = append(b, "\r\nX-Forwarded-Proto: "...)
	switch {
	case rq.trusted && len(rq.hdr.xfp) > 0:
		b = appendJoined(b, rq.hdr.xfp)
	case rq.ctx.IsTLS():
		b = append(b, "https"...)
	default:
		b = append(b, "http"...)
	}
	b = append(b, "\r\nX-Forwarded-Host: "...)
	if rq.trusted && len(rq.hdr.xfh) > 0 {
		b = appendJoined(b, rq.hdr.xfh)
	} else {
		b = append(b, h.Host()...)
	}
	b = append(b, "\r\n"...)
	if rq.trusted && len(rq.hdr.forwarded) > 0 {
		b = append(b, "Forwarded: "...)
		b = appendJoined(b, rq.hdr.forwarded)
		b = append(b, "\r\n"...)
	}
	b = append(b, "X-Real-Ip: "...)
	b = rq.client.AppendTo(b)
	b = append(b, "\r\nX-Request-Id: "...)
	b = append(b, rq.id...)
	b = append(b, "\r\nVia: "...)
	if len(rq.hdr.via) > 0 {
		b = appendJoined(b, rq.hdr.via)
		b = append(b, ", "...)
	}
	if h.IsHTTP11() {
		b = append(b, "1.1 veloflux\r\n"...)
	} else {
		b = append(b, "1.0 veloflux\r\n"...)
	}
	if rq.upgrade {
		b = append(b, "Connection: Upgrade\r\nUpgrade: "...)
		b = append(b, rq.hdr.upgradeVal...)
		b = append(b, "\r\n"...)
	}
	switch {
	case cl == -1:
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	case cl > 0 || (cl == 0 && !h.IsGet() && !h.IsHead()):
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, int64(max(cl, 0)), 10)
		b = append(b, "\r\n"...)
	}
	return append(b, "\r\n"...)
}

func appendJoined(b []byte, vals [][]byte) []byte {
	for i, v := range vals {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = append(b, v...)
	}
	return b
}

// connectionNames reports whether the request's Connection header names
// the header name (making it hop-by-hop).
func (rq *h1Request) connectionNames(name []byte) bool {
	found := false
	eachToken(rq.hdr.connection, func(t []byte) bool {
		found = bytes.EqualFold(t, name)
		return !found
	})
	return found
}

// copyBody sends the client's body to the backend: cl bytes, or chunked
// when cl is -1. Failures reading the client's body are recorded as the
// client's faults.
func (rq *h1Request) copyBody(bw *bufio.Writer, body io.Reader, cl int) error {
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	buf := *bp
	limit := rq.st.cfg.MaxBodyBytes
	var total int64
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			total += int64(n)
			rq.bytesIn.Add(int64(n))
			if limit > 0 && total > limit {
				rq.noteFault(bodyTooLarge)
				return errBodyTooLarge
			}
			if cl == -1 {
				bw.WriteString(strconv.FormatInt(int64(n), 16))
				bw.WriteString("\r\n")
			}
			if _, err := bw.Write(buf[:n]); err != nil {
				return err
			}
			if cl == -1 {
				if _, err := bw.WriteString("\r\n"); err != nil {
					return err
				}
			}
		}
		if rerr == io.EOF {
			if cl >= 0 && total != int64(cl) {
				rq.noteFault(bodyMalformed)
				return io.ErrUnexpectedEOF
			}
			if cl == -1 {
				bw.WriteString("0\r\n")
				bw.Write(rq.trailerSection(rq.head[:0], &rq.ctx.Request.Header))
				_, err := bw.WriteString("\r\n")
				return err
			}
			return nil
		}
		if rerr != nil {
			var ne net.Error
			if errors.As(rerr, &ne) && ne.Timeout() {
				rq.noteFault(bodyTooSlow)
			} else {
				rq.noteFault(bodyMalformed)
			}
			return rerr
		}
	}
}

var errBodyTooLarge = errors.New("request body over the limit")

func (rq *h1Request) noteFault(f uint32) {
	if rq.fault == bodyOK {
		rq.fault = f
	}
}

// receive reads the backend's response header by headerBy (send has set
// that deadline unless the request had a body), then lets the body take
// until the request's deadline, except for event streams and upgrades,
// which last as long as both sides want.
func (rq *h1Request) receive(l *upstreamLease, hadBody bool, headerBy time.Time) error {
	conn := l.conn
	if hadBody {
		if err := conn.SetReadDeadline(headerBy); err != nil {
			return err
		}
	}
	l.br = l.hc.AcquireReader(conn)
	resp := fasthttp.AcquireResponse()
	resp.StreamBody = true
	resp.Header.DisableNormalizing()
	if rq.ctx.Request.Header.IsHead() {
		resp.SkipBody = true
	}
	if err := resp.ReadLimitBody(l.br, 0); err != nil {
		fasthttp.ReleaseResponse(resp)
		if !headerBy.IsZero() && !time.Now().Before(headerBy) {
			// fasthttp does not always keep the net.Error of a read
			// deadline; the clock says what happened.
			return fmt.Errorf("backend response header: %w (%v)", os.ErrDeadlineExceeded, err)
		}
		return err
	}
	rq.resp = resp
	rq.eventStream = isEventStreamType(resp.Header.ContentType())
	bodyBy := rq.deadline
	if rq.eventStream || rq.upgrade {
		bodyBy = time.Time{}
	}
	if bodyBy.Equal(headerBy) {
		return nil
	}
	if cl := resp.Header.ContentLength(); resp.SkipBody || (cl >= 0 && cl <= l.br.Buffered()) {
		// The whole body has arrived with the header: no read waits.
		return nil
	}
	return conn.SetReadDeadline(bodyBy)
}

func isTrailerField(name []byte) bool { return asciiEqualFold(name, "Trailer") }

// trailerFields is what fasthttp's request and response headers have in
// common for trailers: the trailer section as received, after the body.
type trailerFields interface{ TrailerHeader() []byte }

// trailerSection appends the trailer fields received with a chunked body
// (one "name: value\r\n" line each) that may be relayed: not those that
// concern one connection, nor those the proxy sets itself. fasthttp has
// refused the ones the HTTP specification forbids in a trailer (framing,
// routing, authentication, X-Forwarded-*).
func (rq *h1Request) trailerSection(b []byte, h trailerFields) []byte {
	eachHeaderLine(h.TrailerHeader(), func(_, name, value []byte) bool {
		if len(name) == 0 || hopByHop(name) || replacedByProxy(name) {
			return true
		}
		b = append(b, name...)
		b = append(b, ": "...)
		b = append(b, value...)
		b = append(b, "\r\n"...)
		return true
	})
	return b
}

// relayTrailers puts the trailer fields the backend sent after its chunked
// body on the client's response, which fasthttp writes after the body.
func (rq *h1Request) relayTrailers() {
	if rq.resp.Header.ContentLength() != -1 {
		return // no chunked body, no trailer
	}
	out := &rq.ctx.Response.Header
	eachHeaderLine(rq.resp.Header.TrailerHeader(), func(_, name, value []byte) bool {
		if len(name) == 0 || hopByHop(name) {
			return true
		}
		// Announced now if the backend did not: the client's header
		// block is gone, but fasthttp writes announced fields after
		// the body.
		if out.AddTrailerBytes(name) == nil {
			out.AddBytesKV(name, value)
		}
		return true
	})
}

func isEventStreamType(ct []byte) bool {
	if i := bytes.IndexByte(ct, ';'); i >= 0 {
		ct = ct[:i]
	}
	return asciiEqualFold(bytes.TrimSpace(ct), "text/event-stream")
}

// relay puts the backend's response on the client's response: status,
// headers (without hop-by-hop ones), our Via and sticky cookie, and the
// body as a stream. It reports whether a body is relayed.
func (rq *h1Request) relay() bool {
	ctx, resp := rq.ctx, rq.resp
	status := resp.StatusCode()
	rq.status = status
	if status == http.StatusSwitchingProtocols {
		if rq.upgrade {
			return rq.tunnel()
		}
		// An upgrade nobody asked for cannot be relayed.
		rq.releaseUpstream(false)
		rq.status = 0
		rq.writeError(http.StatusBadGateway, "bad_gateway", "the backend switched protocols unasked")
		return false
	}
	out := &ctx.Response.Header
	out.SetStatusCode(status)
	rq.copyResponseHeaders()
	if pl := rq.route.pool; pl.sticky != "" && rq.member != nil && rq.sticky != rq.member {
		out.Add("Set-Cookie", pl.stickyCookie(rq.member, rq.https))
	}
	stream := resp.BodyStream()
	cl := resp.Header.ContentLength()
	if stream == nil || resp.SkipBody || status == http.StatusNoContent || status == http.StatusNotModified || cl == 0 {
		rq.releaseUpstream(true)
		if cl > 0 && (resp.SkipBody || status == http.StatusNotModified) {
			out.SetContentLength(cl)
			ctx.Response.SkipBody = true
		} else if status == http.StatusNoContent || status == http.StatusNotModified {
			ctx.Response.SkipBody = true
		}
		return false
	}
	if cl > 0 && cl <= rq.up.br.Buffered() {
		rq.copyBufferedBody(cl)
		return false
	}
	rq.body = stream
	if cl < 0 {
		// Chunked toward the client, whatever the backend did, and
		// the header sent at once: an event stream or a long poll may
		// send nothing more for a while.
		cl = -1
		ctx.Response.ImmediateHeaderFlush = true
		for _, name := range resp.Header.PeekTrailerKeys() {
			if !hopByHop(name) {
				out.AddTrailerBytes(name) // fasthttp has refused forbidden names
			}
		}
	}
	ctx.Response.SetBodyStream(rq, cl)
	return true
}

// copyBufferedBody puts a response body that arrived whole with its
// header (cl bytes, all in the backend connection's read buffer) on the
// client's response, and ends the backend exchange at once: the
// connection goes back to its pool before the client is written to, and
// fasthttp writes the body from its own buffer rather than through the
// stream and its Close. The bytes are taken from the read buffer
// directly: fasthttp's body stream has read none of them yet (its own
// buffer is empty until it reads), so it is closed unread.
func (rq *h1Request) copyBufferedBody(cl int) {
	br := rq.up.br
	body, err := br.Peek(cl)
	if err != nil {
		// Buffered bytes cannot fail to peek; should the reader refuse
		// them anyway, the backend is blamed and the client answered
		// 502, as for a body cut short.
		rq.reason = classify(err)
		rq.p.countUpstream(rq.reason)
		rq.releaseUpstream(false)
		rq.ctx.Response.Header.Reset()
		rq.ctx.Response.Header.SetBytesKV(strXRequestID, rq.id)
		rq.status = 0
		rq.writeError(http.StatusBadGateway, "bad_gateway", "the backend's response body could not be read")
		return
	}
	rq.ctx.Response.AppendBody(body)
	br.Discard(cl)
	rq.bytesOut.Add(int64(cl))
	rq.bodyDone = true
	rq.releaseUpstream(true)
}

// copyResponseHeaders copies the backend's response headers to the
// client's response, as sent, except hop-by-hop ones, and adds our Via.
func (rq *h1Request) copyResponseHeaders() {
	out := &rq.ctx.Response.Header
	in := &rq.resp.Header
	conn := in.PeekAll("Connection")
	var via [][]byte
	for k, v := range in.All() {
		if hopByHop(k) {
			if rq.upgrade && rq.status == http.StatusSwitchingProtocols && (asciiEqualFold(k, "Upgrade") || asciiEqualFold(k, "Connection")) {
				out.AddBytesKV(k, v)
			}
			continue
		}
		if len(conn) > 0 && namedIn(conn, k) {
			continue
		}
		if asciiEqualFold(k, "Via") {
			via = append(via, v)
			continue
		}
		out.AddBytesKV(k, v)
	}
	if len(via) == 0 {
		out.SetBytesKV(strVia, strViaOurs) // copied by fasthttp
		return
	}
	vb := appendJoined(nil, via)
	vb = append(vb, ", "...)
	vb = append(vb, strViaOurs...)
	out.SetBytesKV(strVia, vb)
}

var strVia, strViaOurs = []byte("Via"), []byte("1.1 veloflux")

func namedIn(conn [][]byte, name []byte) bool {
	found := false
	eachToken(conn, func(t []byte) bool {
		found = bytes.EqualFold(t, name)
		return !found
	})
	return found
}

// Read is the client response's body: the backend's, counted.
func (rq *h1Request) Read(b []byte) (int, error) {
	n, err := rq.body.Read(b)
	rq.bytesOut.Add(int64(n))
	if err == io.EOF {
		rq.bodyDone = true
		rq.relayTrailers()
	} else if err != nil && rq.reason == "" {
		// The backend's body ended early: the client's response is cut
		// (fasthttp closes its connection), and the backend blamed.
		rq.reason = classify(err)
		rq.p.countUpstream(rq.reason)
	}
	return n, err
}

// Close is called by fasthttp once the response body has been written (or
// abandoned): the backend connection goes back to its pool when its body
// was read to the end, and the request is accounted for.
func (rq *h1Request) Close() error {
	if rq.closed {
		return nil
	}
	rq.closed = true
	rq.releaseUpstream(rq.bodyDone)
	rq.complete()
	return nil
}

// releaseUpstream ends the backend exchange.
func (rq *h1Request) releaseUpstream(reuse bool) {
	if rq.resp != nil {
		if reuse && rq.resp.ConnectionClose() {
			reuse = false
		}
		rq.resp.CloseBodyStream()
		fasthttp.ReleaseResponse(rq.resp)
		rq.resp = nil
	}
	rq.body = nil
	rq.up.release(reuse)
}

// tunnel relays an upgraded connection (a WebSocket) between the client
// and the backend once the backend has switched protocols.
func (rq *h1Request) tunnel() bool {
	ctx := rq.ctx
	ctx.Response.Header.SetStatusCode(http.StatusSwitchingProtocols)
	rq.copyResponseHeaders()
	up := rq.up
	rq.up = upstreamLease{}
	fasthttp.ReleaseResponse(rq.resp)
	rq.resp = nil
	backend := up.conn
	buffered := up.br
	ctx.Hijack(func(client net.Conn) {
		defer func() {
			releaseWith(up.hc.CloseConn, up.cc)
			rq.complete()
		}()
		backend.SetDeadline(time.Time{})
		client.SetDeadline(time.Time{})
		writeAtOnce(backend)
		writeAtOnce(client)
		// Whichever side ends first ends the tunnel, as
		// httputil.ReverseProxy does.
		done := make(chan struct{}, 2)
		go func() {
			// Backend to client, starting with what was read past the
			// response header.
			buffered.WriteTo(&countingWriter{w: client, n: &rq.bytesOut})
			done <- struct{}{}
		}()
		go func() {
			io.Copy(&countingWriter{w: backend, n: &rq.bytesIn}, client)
			done <- struct{}{}
		}()
		<-done
		backend.Close()
		client.Close()
		<-done
		up.hc.ReleaseReader(buffered)
	})
	return true
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n interface{ Add(int64) int64 }
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}

func unsafeString(b []byte) string { return unsafe.String(&b[0], len(b)) }
