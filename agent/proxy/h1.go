package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// The HTTP/1.1 engine: fasthttp's server reads the client's requests, and
// the proxy writes each request toward the backend itself, from the raw
// header block fasthttp has parsed and validated, so that header names,
// order, duplicates and values reach the backend as the client sent them,
// and the body is always framed anew (Content-Length, or chunked when the
// client's length is unknown). Responses come back through fasthttp's
// response parser and are streamed to the client.

// h1Request is everything the proxy tracks about one HTTP/1.1 request. It
// is pooled; nothing in it outlives the request. Byte slices pointing into
// fasthttp's request (valid until the handler returns) are dropped before
// it returns; what the access log needs afterwards is copied.
type h1Request struct {
	p     *Proxy
	st    *state
	ctx   *fasthttp.RequestCtx
	route *route
	start time.Time

	peer, client netip.Addr
	trusted      bool
	https        bool
	upgrade      bool
	eventStream  bool
	http10       bool
	id           []byte // the request id (our own, or the client's)
	idBuf        [requestIDLen]byte

	sticky, member, last *member
	attempts             int
	reason               string
	status               int
	fault                uint32 // a bodyFault value
	deadline             time.Time

	bytesIn, bytesOut atomic.Int64

	// Header facts from the raw header block, valid while the handler
	// runs.
	hdr h1Header

	// The backend exchange whose response body is being relayed.
	up       upstreamLease
	resp     *fasthttp.Response
	body     io.Reader
	bodyDone bool // the backend's body was read to its end
	closed   bool

	// Copies for the access log, made only when it is on.
	logMethod, logHost, logPath, logUA string
	logging                            bool

	head []byte // the outgoing request head
}

var h1Requests = sync.Pool{New: func() any { return new(h1Request) }}

// requestIDLen is the length of the request ids the proxy makes: 32
// hexadecimal digits, the process's random prefix and a counter.
const requestIDLen = 32

// newRequestID writes the next request id into buf: unique within the
// process (the counter) and across processes (the random prefix), and
// cheap, unlike 16 random bytes per request.
func (p *Proxy) newRequestID(buf *[requestIDLen]byte) []byte {
	n := p.idCounter.Add(1)
	copy(buf[:16], p.idPrefix[:])
	const hexDigits = "0123456789abcdef"
	for i := requestIDLen - 1; i >= 16; i-- {
		buf[i] = hexDigits[n&0xf]
		n >>= 4
	}
	return buf[:]
}

// validRequestID reports whether a client's X-Request-ID is kept: short
// printable ASCII without spaces or quotes (safe to log and forward).
func validRequestID(in []byte) bool {
	if len(in) == 0 || len(in) > 128 {
		return false
	}
	for _, c := range in {
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// serveH1 is the HTTP/1.1 engine's handler.
func (p *Proxy) serveH1(ctx *fasthttp.RequestCtx) {
	rq := h1Requests.Get().(*h1Request)
	rq.p, rq.ctx, rq.start = p, ctx, ctx.Time()
	p.inflight.Add(1)
	p.prom.inflight.Inc()
	if !rq.handle() {
		// Answered here: accounted now. Otherwise the response body's
		// Close accounts for it once the body has been relayed.
		rq.complete()
	}
}

// handle serves the request and reports whether its response is a relayed
// backend body, to be accounted for when fasthttp closes it.
func (rq *h1Request) handle() bool {
	p, ctx := rq.p, rq.ctx
	h := &ctx.Request.Header
	rq.https = ctx.IsTLS()
	rq.http10 = !h.IsHTTP11()
	rq.st = p.state.Load()
	st := rq.st
	if st == nil {
		rq.refuseUnreadBody()
		rq.writeError(http.StatusServiceUnavailable, "not_configured", "the proxy has no configuration yet")
		return false
	}
	if !rq.hdr.scan(h.RawHeaders()) {
		// Both Content-Length and Transfer-Encoding (smuggling), or a
		// folded header line: refused, and the connection closed, as
		// nothing after this header block can be trusted to start a
		// request.
		if rq.hdr.ambiguous {
			p.violation(ViolationAmbiguousFraming, remoteIP(ctx), "proxy: request with both Content-Length and Transfer-Encoding refused; closing the connection")
		}
		ctx.SetConnectionClose()
		rq.writeError(http.StatusBadRequest, "bad_request", rq.hdr.problem)
		return false
	}
	if p.log.Enabled(context.Background(), slog.LevelInfo) {
		rq.logging = true
		rq.logMethod = string(h.Method())
		rq.logHost = string(h.Host())
		rq.logPath = string(rq.hdr.path(h.RequestURI()))
		rq.logUA = string(h.UserAgent())
	}
	if id := rq.hdr.requestID; validRequestID(id) {
		rq.id = id
	} else {
		rq.id = p.newRequestID(&rq.idBuf)
	}
	ctx.Response.Header.SetBytesKV(strXRequestID, rq.id)
	if p.draining.Load() && !rq.hdr.isUpgrade() {
		ctx.SetConnectionClose()
	}

	rq.peer = remoteIP(ctx)
	rq.client = rq.peer
	if rq.trusted = st.isTrusted(rq.peer); rq.trusted {
		rq.client = clientFromXFF(st, rq.hdr.stringsOf(rq.hdr.xff), rq.peer)
		if !rq.https && len(rq.hdr.xfp) > 0 && asciiEqualFold(bytes.TrimSpace(rq.hdr.xfp[0]), "https") {
			rq.https = true
		}
	}

	if h.IsConnect() {
		rq.refuseUnreadBody()
		rq.writeError(http.StatusMethodNotAllowed, "method_not_allowed", "CONNECT is not supported by this reverse proxy")
		return false
	}
	if !rq.https && st.cfg.RedirectHTTPS {
		rq.refuseUnreadBody()
		rq.redirect()
		return false
	}
	if st.limiter != nil {
		if v := st.limiter.allow(rq.client, rq.start); !v.ok {
			rq.refuseUnreadBody()
			rq.rateLimited(v)
			return false
		}
	}

	host := routeHost(b2s(h.Host()))
	path := routePath(b2s(rq.hdr.decodedPath(h.RequestURI())))
	rq.route = st.routes.match(host, path)
	if rq.route == nil {
		rq.refuseUnreadBody()
		rq.writeError(http.StatusNotFound, "no_route", "no route for host "+strconv.Quote(host)+" and path "+strconv.Quote(path))
		return false
	}
	if maxBody := st.cfg.MaxBodyBytes; (maxBody > 0 && int64(h.ContentLength()) > maxBody) || (rq.hdr.contentLength > 0 && h.ContentLength() == 0) {
		// (A Content-Length the header hook found over the limit is
		// zeroed there, so that fasthttp does not wait for its body.)
		rq.refuseUnreadBody()
		rq.bodyTooLarge()
		return false
	}
	rq.sticky = rq.route.pool.stickyMemberOf(rq.hdr.cookies)
	rq.upgrade = rq.hdr.isUpgrade()
	if d := st.cfg.Timeouts.Request.Std(); d > 0 && !rq.upgrade {
		rq.deadline = rq.start.Add(d)
	}
	return rq.proxy()
}

// refuseUnreadBody closes the connection after the answer to a request
// refused before its body was read: the client may still be sending it,
// and nothing it sends can be taken for the next request.
func (rq *h1Request) refuseUnreadBody() {
	if rq.hasBody() || rq.hdr.contentLength > 0 {
		rq.closeUnread()
	}
}

// closeUnread closes the connection after the answer, lingering so that a
// client still sending a body reads the answer.
func (rq *h1Request) closeUnread() {
	rq.ctx.SetConnectionClose()
	lingerOnClose(rq.ctx.Conn())
}

func (rq *h1Request) hasBody() bool {
	cl := rq.ctx.Request.Header.ContentLength()
	return cl > 0 || cl == -1
}

func (rq *h1Request) bodyTooLarge() {
	rq.closeUnread()
	rq.writeError(http.StatusRequestEntityTooLarge, "body_too_large", "request body exceeds "+strconv.FormatInt(rq.st.cfg.MaxBodyBytes, 10)+" bytes")
}

// writeError writes the proxy's own JSON error answer.
func (rq *h1Request) writeError(status int, code, msg string) {
	rq.status = status
	writeFastError(rq.ctx, status, code, msg)
}

func writeFastError(ctx *fasthttp.RequestCtx, status int, code, msg string) {
	ctx.Response.SetStatusCode(status)
	ctx.Response.Header.SetContentType("application/json")
	ctx.Response.Header.Set("Cache-Control", "no-store")
	ctx.Response.Header.Set("X-Content-Type-Options", "nosniff")
	ctx.Response.SetBodyRaw(errorBody(code, msg))
}

func (rq *h1Request) redirect() {
	ctx := rq.ctx
	host := string(ctx.Request.Header.Host())
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
		if bytes.IndexByte([]byte(h), ':') >= 0 {
			host = "[" + h + "]"
		}
	}
	if host == "" {
		rq.writeError(http.StatusBadRequest, "bad_request", "a Host header is required")
		return
	}
	port := rq.st.httpsPort
	if port == "0" {
		port = rq.p.boundHTTPSPort()
	}
	if port != "" && port != "443" {
		host += ":" + port
	}
	rq.status = http.StatusPermanentRedirect
	ctx.Response.Header.Set("Location", "https://"+host+string(ctx.Request.Header.RequestURI()))
	ctx.Response.SetStatusCode(http.StatusPermanentRedirect)
}

func (rq *h1Request) rateLimited(v rlVerdict) {
	p := rq.p
	p.count.rateLimited.Add(1)
	secs := int64((v.retryAfter + time.Second - 1) / time.Second)
	rq.ctx.Response.Header.Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
	rq.writeError(http.StatusTooManyRequests, "rate_limited", "too many requests; retry later")
	if v.event && p.securityEvent != nil {
		h := &rq.ctx.Request.Header
		p.securityEvent("rate_limited", map[string]any{
			"client_ip":  addrString(rq.client),
			"host":       string(h.Host()),
			"path":       string(rq.hdr.path(h.RequestURI())),
			"method":     string(h.Method()),
			"suppressed": v.suppressed,
		})
	}
}

// complete accounts for the request and returns its state to the pool.
func (rq *h1Request) complete() {
	c := completion{
		start:    rq.start,
		status:   rq.status,
		route:    rq.route,
		member:   rq.member,
		last:     rq.last,
		bytesIn:  uint64(rq.bytesIn.Load()),
		bytesOut: uint64(rq.bytesOut.Load()),
		attempts: rq.attempts,
		reason:   rq.reason,
		client:   rq.client,
	}
	if c.status == 0 {
		c.status = http.StatusOK
	}
	if rq.logging {
		c.log = &accessLog{method: rq.logMethod, host: rq.logHost, path: rq.logPath, proto: "HTTP/1.1",
			userAgent: rq.logUA, requestID: string(rq.id)}
		if rq.http10 {
			c.log.proto = "HTTP/1.0"
		}
	}
	rq.p.complete(&c)
	rq.reset()
	h1Requests.Put(rq)
}

func (rq *h1Request) reset() {
	head := rq.head[:0]
	hdr := rq.hdr
	*rq = h1Request{head: head}
	rq.hdr.reuse(&hdr)
}

func remoteIP(ctx *fasthttp.RequestCtx) netip.Addr {
	if a, ok := ctx.RemoteAddr().(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			return ip.Unmap()
		}
	}
	return remoteAddr(ctx.RemoteAddr().String())
}

// b2s views b as a string without copying, for lookups that do not keep
// it.
func b2s(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafeString(b)
}

var (
	strXRequestID = []byte("X-Request-Id")
)

// h1Header is what the proxy needs from a request's raw header block,
// found in one pass over it.
type h1Header struct {
	ambiguous     bool   // both Content-Length and Transfer-Encoding
	contentLength int64  // the Content-Length as sent; -1 when none
	problem       string // why the block was refused

	connection [][]byte // Connection values
	upgradeVal []byte   // the Upgrade value
	xff        [][]byte // X-Forwarded-For values
	xfp        [][]byte // X-Forwarded-Proto values
	xfh        [][]byte // X-Forwarded-Host values
	forwarded  [][]byte
	via        [][]byte
	cookies    [][]byte
	requestID  []byte
}

func (h *h1Header) reuse(old *h1Header) {
	*h = h1Header{
		connection: old.connection[:0], xff: old.xff[:0], xfp: old.xfp[:0], xfh: old.xfh[:0],
		forwarded: old.forwarded[:0], via: old.via[:0], cookies: old.cookies[:0],
	}
	for _, s := range [][][]byte{old.connection, old.xff, old.xfp, old.xfh, old.forwarded, old.via, old.cookies} {
		clear(s[:cap(s)])
	}
}

// eachHeaderLine calls f with the name and value (without surrounding
// whitespace) of every line of a raw header block, and the line's first
// byte, until f returns false.
func eachHeaderLine(raw []byte, f func(line, name, value []byte) bool) {
	for len(raw) > 0 {
		var line []byte
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			line, raw = raw, nil
		}
		line = bytes.TrimSuffix(line, crlf[1:2])
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		if len(line) == 0 {
			return
		}
		var name, value []byte
		if c := bytes.IndexByte(line, ':'); c > 0 {
			name, value = line[:c], bytes.Trim(line[c+1:], " \t")
		}
		if !f(line, name, value) {
			return
		}
	}
}

var crlf = []byte("\r\n")

// scan reads the raw header block and reports whether the request may be
// served. fasthttp has refused the rest already (a space before a colon,
// invalid names or values, duplicate Content-Length or Host, a transfer
// coding other than chunked).
func (h *h1Header) scan(raw []byte) bool {
	var hasCL, hasTE bool
	ok := true
	h.contentLength = -1
	eachHeaderLine(raw, func(line, name, value []byte) bool {
		if line[0] == ' ' || line[0] == '\t' {
			h.problem = "obsolete line folding in the request header is not accepted"
			ok = false
			return false
		}
		if len(name) == 0 {
			return true
		}
		switch name[0] | 0x20 {
		case 'c':
			switch {
			case asciiEqualFold(name, "Content-Length"):
				hasCL = true
				if n, err := strconv.ParseInt(string(value), 10, 64); err == nil {
					h.contentLength = n
				}
			case asciiEqualFold(name, "Connection"):
				h.connection = append(h.connection, value)
			case asciiEqualFold(name, "Cookie"):
				h.cookies = append(h.cookies, value)
			}
		case 't':
			if asciiEqualFold(name, "Transfer-Encoding") {
				hasTE = true
			}
		case 'u':
			if asciiEqualFold(name, "Upgrade") {
				h.upgradeVal = value
			}
		case 'x':
			switch {
			case asciiEqualFold(name, "X-Forwarded-For"):
				h.xff = append(h.xff, value)
			case asciiEqualFold(name, "X-Forwarded-Proto"):
				h.xfp = append(h.xfp, value)
			case asciiEqualFold(name, "X-Forwarded-Host"):
				h.xfh = append(h.xfh, value)
			case asciiEqualFold(name, "X-Request-Id"):
				if h.requestID == nil {
					h.requestID = value
				}
			}
		case 'f':
			if asciiEqualFold(name, "Forwarded") {
				h.forwarded = append(h.forwarded, value)
			}
		case 'v':
			if asciiEqualFold(name, "Via") {
				h.via = append(h.via, value)
			}
		}
		return true
	})
	if ok && hasCL && hasTE {
		h.ambiguous = true
		h.problem = "a request with both Content-Length and Transfer-Encoding is not accepted"
		ok = false
	}
	return ok
}

// isUpgrade reports an upgrade request: an Upgrade header and "upgrade"
// among the Connection tokens.
func (h *h1Header) isUpgrade() bool {
	return len(h.upgradeVal) > 0 && h.connectionHas("upgrade")
}

func (h *h1Header) connectionHas(token string) bool {
	found := false
	eachToken(h.connection, func(t []byte) bool {
		found = asciiEqualFold(t, token)
		return !found
	})
	return found
}

// eachToken calls f with every comma-separated token of vals, until it
// returns false.
func eachToken(vals [][]byte, f func([]byte) bool) {
	for _, v := range vals {
		for len(v) > 0 {
			var t []byte
			if i := bytes.IndexByte(v, ','); i >= 0 {
				t, v = v[:i], v[i+1:]
			} else {
				t, v = v, nil
			}
			if t = bytes.TrimSpace(t); len(t) > 0 && !f(t) {
				return
			}
		}
	}
}

func (h *h1Header) stringsOf(vals [][]byte) []string {
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = string(v)
	}
	return out
}

// path is the path of a request target: origin form up to the query, or
// the path of an absolute form.
func (h *h1Header) path(uri []byte) []byte {
	if len(uri) > 0 && uri[0] != '/' {
		if i := bytes.Index(uri, []byte("://")); i >= 0 {
			uri = uri[i+3:]
			if j := bytes.IndexByte(uri, '/'); j >= 0 {
				uri = uri[j:]
			} else {
				return []byte("/")
			}
		}
	}
	if i := bytes.IndexAny(uri, "?#"); i >= 0 {
		uri = uri[:i]
	}
	return uri
}

// decodedPath is the path with percent escapes decoded, as routes see it.
func (h *h1Header) decodedPath(uri []byte) []byte {
	p := h.path(uri)
	if bytes.IndexByte(p, '%') < 0 {
		return p
	}
	out := make([]byte, 0, len(p))
	for i := 0; i < len(p); i++ {
		if p[i] == '%' && i+2 < len(p) {
			if v, err := strconv.ParseUint(string(p[i+1:i+3]), 16, 8); err == nil {
				out = append(out, byte(v))
				i += 2
				continue
			}
		}
		out = append(out, p[i])
	}
	return out
}

// stickyMemberOf returns the member a request's sticky cookie names, or
// nil. cookies are the request's Cookie header values, unmerged.
func (p *pool) stickyMemberOf(cookies [][]byte) *member {
	if p.sticky == "" {
		return nil
	}
	for _, line := range cookies {
		for len(line) > 0 {
			var part []byte
			if i := bytes.IndexByte(line, ';'); i >= 0 {
				part, line = line[:i], line[i+1:]
			} else {
				part, line = line, nil
			}
			part = bytes.TrimSpace(part)
			eq := bytes.IndexByte(part, '=')
			if eq <= 0 || string(part[:eq]) != p.sticky {
				continue
			}
			v := part[eq+1:]
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			if m := p.cookies[string(v)]; m != nil {
				return m
			}
			return nil
		}
	}
	return nil
}

// errorBody is the proxy's JSON error body:
// {"error":{"code":...,"message":...}}, like the agent's API.
func errorBody(code, msg string) []byte {
	b := make([]byte, 0, 40+len(code)+len(msg))
	b = append(b, `{"error":{"code":`...)
	b = strconv.AppendQuote(b, code)
	b = append(b, `,"message":`...)
	b = appendJSONString(b, msg)
	b = append(b, "}}\n"...)
	return b
}

// appendJSONString appends s as a JSON string.
func appendJSONString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c < 0x20 || c == '<' || c == '>' || c == '&':
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

// h1ErrorHandler answers requests fasthttp could not read: 431 for a
// header block over the limit, 408 for one not received in time, 400 for
// anything malformed. The connection is closed after it. The request is
// accounted for like any other (metrics, statistics, access log): the
// handler never saw it.
func (p *Proxy) h1ErrorHandler(ctx *fasthttp.RequestCtx, err error, maxHeader int) {
	var small *fasthttp.ErrSmallBuffer
	var ne net.Error
	var status int
	switch {
	case errors.As(err, &small):
		status = http.StatusRequestHeaderFieldsTooLarge
		writeFastError(ctx, status, "header_too_large", "request header exceeds "+strconv.Itoa(maxHeader)+" bytes")
	case errors.As(err, &ne) && ne.Timeout():
		status = http.StatusRequestTimeout
		writeFastError(ctx, status, "request_timeout", "the request was not received in time")
	default:
		status = http.StatusBadRequest
		writeFastError(ctx, status, "bad_request", "the request could not be parsed")
	}
	p.inflight.Add(1)
	p.prom.inflight.Inc()
	c := completion{start: p.now(), status: status, client: remoteIP(ctx)}
	if p.log.Enabled(context.Background(), slog.LevelInfo) {
		// Nothing of the request is known for sure: its header block
		// did not parse.
		c.log = &accessLog{}
	}
	p.complete(&c)
}

// headerReceived runs when a request's header block is read, before its
// body: a Content-Length over the limit is set to 0 there, so that fasthttp
// does not read ahead into a body the proxy refuses (serveH1 finds the
// length as sent in the raw header block, and answers 413).
func (p *Proxy) headerReceived(h *fasthttp.RequestHeader) fasthttp.RequestConfig {
	if st := p.state.Load(); st != nil && st.cfg.MaxBodyBytes > 0 && int64(h.ContentLength()) > st.cfg.MaxBodyBytes {
		// No "100 Continue" either: the answer is 413 at once.
		h.SetContentLength(0)
		h.Del("Expect")
		h.SetConnectionClose()
	}
	return fasthttp.RequestConfig{}
}

// asciiEqualFold reports whether b equals the ASCII string s, ignoring
// case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}
