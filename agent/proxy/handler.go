package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// reqState is everything the proxy tracks about one request. It is allocated
// once per request (the response writer and body wrappers are embedded) and
// reaches the Rewrite, RoundTripper, ModifyResponse and ErrorHandler
// callbacks through the request context.
type reqState struct {
	p       *Proxy
	st      *state
	route   *route
	inCtx   context.Context // the client's context, without our deadline
	peer    netip.Addr      // the connection's address
	client  netip.Addr      // the client: peer, or from X-Forwarded-For via trusted proxies
	trusted bool            // the peer is a trusted proxy
	https   bool            // the client's scheme is https
	reqID   string
	sticky  *member // the member a valid sticky cookie names

	member   *member // the backend that answered (its in-flight slot is held)
	last     *member // the backend of the last attempt
	attempts int
	reason   string // upstream error reason, for the log

	deadline *time.Timer // the request timeout; nil when none applies
	timedOut atomic.Bool // the request timeout fired

	// bodyFault is what went wrong reading the client's request body
	// (a bodyFault value); the first fault sticks. A failed exchange with
	// a body fault is the client's doing and never counts against the
	// backend.
	bodyFault   atomic.Uint32
	readingBody atomic.Bool // a read of the client's body is waiting for the client
	// handlerMu orders the request timer's last word on the client
	// connection before the handler returns (handlerDone).
	handlerMu   sync.Mutex
	handlerDone bool

	bytesIn  atomic.Int64
	bytesOut atomic.Int64

	rw   respWriter
	body countingBody
	ctx  reqCtx
}

// Client body faults, the values of reqState.bodyFault.
const (
	bodyOK        uint32 = iota
	bodyTooLarge         // over max_body_bytes: 413
	bodyMalformed        // the client's framing is broken (bad chunked encoding, short body): 400
	bodyTooSlow          // the request timeout ended while waiting for the client's body: 408
)

// noteBodyFault records the first fault of the client's body.
func (rs *reqState) noteBodyFault(f uint32) { rs.bodyFault.CompareAndSwap(bodyOK, f) }

type ctxKey struct{}

// reqCtx carries the reqState in the request context without a separate
// context.WithValue allocation, and answers for it first: ReverseProxy's
// callbacks look it up on every request.
type reqCtx struct {
	context.Context
	rs *reqState
}

func (c *reqCtx) Value(key any) any {
	if key == (ctxKey{}) {
		return c.rs
	}
	return c.Context.Value(key)
}

func stateOf(ctx context.Context) *reqState {
	if c, ok := ctx.(*reqCtx); ok {
		return c.rs
	}
	rs, _ := ctx.Value(ctxKey{}).(*reqState)
	return rs
}

var errNoBackend = errors.New("no backend available")

func (p *Proxy) serveHTTP(w http.ResponseWriter, r *http.Request) {
	start := p.now()
	p.inflight.Add(1)
	p.prom.inflight.Inc()

	if r.TLS == nil {
		// The proxy's listeners do the TLS handshake themselves.
		if cc := clientConnOf(r.Context()); cc != nil {
			r.TLS = cc.TLS()
		}
	}
	rs := &reqState{p: p, st: p.state.Load(), inCtx: r.Context(), https: r.TLS != nil}
	rs.rw = respWriter{ResponseWriter: w, rs: rs}
	rw := &rs.rw
	defer p.finish(rs, r, start)

	st := rs.st
	if st == nil {
		refuseUnreadBody(rw, r)
		writeError(rw, http.StatusServiceUnavailable, "not_configured", "the proxy has no configuration yet")
		return
	}
	rs.reqID = p.requestID(r.Header.Get("X-Request-ID"))
	rw.Header()["X-Request-Id"] = []string{rs.reqID}
	if p.draining.Load() && r.ProtoMajor == 1 && !isUpgrade(r) {
		// Let keep-alive clients go politely as their last response ends.
		rw.Header().Set("Connection", "close")
	}

	rs.peer = remoteAddr(r.RemoteAddr)
	rs.client = rs.peer
	if rs.trusted = st.isTrusted(rs.peer); rs.trusted {
		rs.client = clientFromXFF(st, r.Header["X-Forwarded-For"], rs.peer)
		if !rs.https && strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https") {
			rs.https = true
		}
	}

	if r.Method == http.MethodConnect {
		refuseUnreadBody(rw, r)
		writeError(rw, http.StatusMethodNotAllowed, "method_not_allowed", "CONNECT is not supported by this reverse proxy")
		return
	}
	if !rs.https && st.cfg.RedirectHTTPS {
		refuseUnreadBody(rw, r)
		p.redirect(rw, r, st)
		return
	}
	if st.limiter != nil {
		if v := st.limiter.allow(rs.client, start); !v.ok {
			refuseUnreadBody(rw, r)
			p.rateLimited(rw, r, rs, v)
			return
		}
	}

	rs.route = st.routes.match(routeHost(r.Host), routePath(r.URL.Path))
	if rs.route == nil {
		refuseUnreadBody(rw, r)
		writeError(rw, http.StatusNotFound, "no_route", "no route for host "+strconv.Quote(routeHost(r.Host))+" and path "+strconv.Quote(r.URL.Path))
		return
	}

	maxBody := st.cfg.MaxBodyBytes
	if maxBody > 0 && r.ContentLength > maxBody {
		// Before any "100 Continue": the client is told at once, and
		// the body it announced is not waited for.
		refuseUnreadBody(rw, r)
		writeError(rw, http.StatusRequestEntityTooLarge, "body_too_large", "request body exceeds "+strconv.FormatInt(maxBody, 10)+" bytes")
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		var body io.ReadCloser = r.Body
		if maxBody > 0 {
			body = http.MaxBytesReader(w, body, maxBody)
		}
		rs.body = countingBody{rc: body, rs: rs}
		r.Body = &rs.body
	}
	rs.sticky = rs.route.pool.stickyMember(r)

	ctx := r.Context()
	if d := st.cfg.Timeouts.Request.Std(); d > 0 && !isUpgrade(r) {
		// The whole exchange must end within the request timeout.
		// Upgraded connections (WebSockets) are exempt, and so are event
		// streams once their headers arrive (modifyResponse stops the
		// timer): they live as long as the two sides want, like HAProxy's
		// "timeout tunnel". Hence a timer rather than context.WithTimeout.
		cctx, cancel := context.WithCancel(ctx)
		rs.deadline = time.AfterFunc(d, func() {
			if rs.readingBody.Load() {
				// We are waiting for the client, not the backend.
				rs.noteBodyFault(bodyTooSlow)
				rs.stopBodyRead(w)
			}
			rs.timedOut.Store(true)
			cancel()
		})
		defer func() {
			rs.deadline.Stop()
			cancel()
			rs.handlerMu.Lock()
			rs.handlerDone = true
			rs.handlerMu.Unlock()
		}()
		ctx = cctx
	}
	rs.ctx = reqCtx{Context: ctx, rs: rs}
	p.rp.ServeHTTP(rw, r.WithContext(&rs.ctx))
}

// finish accounts a completed request of the HTTP/2 engine (and of
// Handler). It runs deferred, so also when ReverseProxy aborts a response
// midway (panic(http.ErrAbortHandler)), which it lets continue.
func (p *Proxy) finish(rs *reqState, r *http.Request, start time.Time) {
	rec := recover()
	status := rs.rw.status
	switch {
	case status == 0 && rs.inCtx.Err() != nil:
		status = 499 // the client went away before an answer
	case status == 0:
		status = http.StatusOK // net/http's implicit answer
	}
	c := completion{
		start:    start,
		status:   status,
		route:    rs.route,
		member:   rs.member,
		last:     rs.last,
		bytesIn:  uint64(rs.bytesIn.Load()),
		bytesOut: uint64(rs.bytesOut.Load()),
		attempts: rs.attempts,
		reason:   rs.reason,
		client:   rs.client,
		aborted:  rec != nil,
	}
	if p.log.Enabled(rs.inCtx, slog.LevelInfo) {
		c.log = &accessLog{method: r.Method, host: r.Host, path: r.URL.Path, proto: r.Proto,
			userAgent: r.UserAgent(), requestID: rs.reqID}
	}
	p.complete(&c)
	if rec != nil {
		panic(rec)
	}
}

// completion is a finished request as both engines report it.
type completion struct {
	start             time.Time
	status            int
	route             *route
	member            *member // holds an in-flight slot, released here
	last              *member // the backend of the last attempt
	bytesIn, bytesOut uint64
	attempts          int
	reason            string
	client            netip.Addr
	aborted           bool
	log               *accessLog // nil: the access log is off
}

// accessLog is what the access log says of a request beyond its
// completion, copied out of the engine's request.
type accessLog struct {
	method, host, path, proto, userAgent, requestID string
}

// complete accounts a completed request: releases its backend, records
// metrics, statistics, usage and the access log.
func (p *Proxy) complete(c *completion) {
	now := p.now()
	dur := now.Sub(c.start)
	if m := c.member; m != nil {
		m.inflight.Add(-1)
	}
	p.inflight.Add(-1)
	p.prom.inflight.Dec()

	p.count.requests.Add(1)
	if cl := c.status / 100; cl >= 1 && cl <= 5 {
		p.count.class[cl].Add(1)
	}
	p.count.bytesIn.Add(c.bytesIn)
	p.count.bytesOut.Add(c.bytesOut)
	p.lat.record(now, dur)

	var routeID, poolName, backend string
	if r := c.route; r != nil {
		routeID, poolName = r.id, r.pool.name
		r.metrics.duration.Observe(dur.Seconds())
	}
	if m := c.last; m != nil {
		backend = m.addr
	}
	if r := c.route; r != nil {
		r.metrics.requestsCounter(p.prom, r, c.last, c.status).Inc()
	} else {
		p.prom.requests.WithLabelValues(routeID, poolName, backend, codeLabel(c.status)).Inc()
	}
	if p.usage != nil && poolName != "" {
		p.usage(poolName, 1, c.bytesIn, c.bytesOut)
	}

	if l := c.log; l != nil {
		attrs := make([]slog.Attr, 0, 17)
		attrs = append(attrs,
			slog.String("method", l.method),
			slog.String("host", l.host),
			slog.String("path", l.path),
			slog.String("proto", l.proto),
			slog.Int("status", c.status),
			slog.Uint64("bytes_in", c.bytesIn),
			slog.Uint64("bytes_out", c.bytesOut),
			slog.Float64("duration_ms", float64(dur.Microseconds())/1000),
			slog.String("client_ip", addrString(c.client)),
			slog.String("request_id", l.requestID),
			slog.String("route", routeID),
			slog.String("pool", poolName),
			slog.String("backend", backend),
			slog.String("user_agent", l.userAgent),
		)
		if c.attempts > 1 {
			attrs = append(attrs, slog.Int("attempts", c.attempts))
		}
		if c.reason != "" {
			attrs = append(attrs, slog.String("upstream_error", c.reason))
		}
		if c.aborted {
			attrs = append(attrs, slog.Bool("aborted", true))
		}
		p.log.LogAttrs(context.Background(), slog.LevelInfo, "http request", attrs...)
	}
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// remoteAddr parses http.Request.RemoteAddr ("ip:port").
func remoteAddr(s string) netip.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap()
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap()
	}
	return netip.Addr{}
}

// clientFromXFF finds the client behind trusted proxies: the right-most
// X-Forwarded-For address that is not itself a trusted proxy (nginx's
// real_ip_recursive). peer is trusted.
func clientFromXFF(st *state, xff []string, peer netip.Addr) netip.Addr {
	client := peer
	for i := len(xff) - 1; i >= 0; i-- {
		line := xff[i]
		for line != "" {
			var part string
			if j := strings.LastIndexByte(line, ','); j >= 0 {
				part, line = line[j+1:], line[:j]
			} else {
				part, line = line, ""
			}
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			a, ok := parseXFFAddr(part)
			if !ok {
				return client
			}
			client = a
			if !st.isTrusted(a) {
				return client
			}
		}
	}
	return client
}

func parseXFFAddr(s string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), true
	}
	return netip.Addr{}, false
}

// requestID keeps a client's X-Request-ID when it is short printable ASCII
// without spaces (safe to log and forward) and otherwise makes one.
func (p *Proxy) requestID(in string) string {
	if validRequestID([]byte(in)) {
		return in
	}
	var buf [requestIDLen]byte
	return string(p.newRequestID(&buf))
}

func isEventStream(h http.Header) bool {
	ct := h.Get("Content-Type")
	if i := strings.IndexByte(ct, ';'); i >= 0 {
		ct = ct[:i]
	}
	return strings.EqualFold(strings.TrimSpace(ct), "text/event-stream")
}

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" && headerHasToken(r.Header, "Connection", "upgrade")
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h[name] {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// redirect answers plain HTTP with a permanent redirect (308, which keeps
// the method and body) to the same URL over HTTPS.
func (p *Proxy) redirect(w http.ResponseWriter, r *http.Request, st *state) {
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
		if strings.Contains(h, ":") {
			host = "[" + h + "]"
		}
	}
	if host == "" {
		writeError(w, http.StatusBadRequest, "bad_request", "a Host header is required")
		return
	}
	port := st.httpsPort
	if port == "0" {
		port = p.boundHTTPSPort()
	}
	if port != "" && port != "443" {
		host += ":" + port
	}
	w.Header().Set("Location", "https://"+host+r.URL.RequestURI())
	w.WriteHeader(http.StatusPermanentRedirect)
}

func (p *Proxy) rateLimited(w http.ResponseWriter, r *http.Request, rs *reqState, v rlVerdict) {
	p.count.rateLimited.Add(1)
	secs := int64((v.retryAfter + time.Second - 1) / time.Second)
	w.Header().Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
	writeError(w, http.StatusTooManyRequests, "rate_limited", "too many requests; retry later")
	if v.event && p.securityEvent != nil {
		p.securityEvent("rate_limited", map[string]any{
			"client_ip":  addrString(rs.client),
			"host":       r.Host,
			"path":       r.URL.Path,
			"method":     r.Method,
			"suppressed": v.suppressed,
		})
	}
}

// writeError writes the proxy's own error answers:
// {"error":{"code":...,"message":...}}, like the agent's API.
func writeError(w http.ResponseWriter, status int, code, msg string) {
	body, _ := json.Marshal(struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}{Error: struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{code, msg}})
	body = append(body, '\n')
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(body)
}

// rewrite is ReverseProxy's Rewrite: it fills in the forwarding headers.
// The backend itself is chosen by the RoundTripper, per attempt. The Host
// header is passed through, as HAProxy and Traefik do by default.
func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	rs := stateOf(pr.Out.Context())
	out := pr.Out
	out.URL.Scheme = "http"
	out.URL.Host = "backend.invalid" // replaced per attempt
	out.Host = pr.In.Host

	in, h := pr.In.Header, out.Header
	peer := addrString(rs.peer)
	scheme := "http"
	if pr.In.TLS != nil {
		scheme = "https"
	}
	// ReverseProxy has removed X-Forwarded-* and Forwarded from out; keep
	// what a trusted proxy sent, replace what anyone else did.
	if rs.trusted {
		if prior := in["X-Forwarded-For"]; len(prior) > 0 {
			h["X-Forwarded-For"] = []string{strings.Join(prior, ", ") + ", " + peer}
		} else {
			h["X-Forwarded-For"] = []string{peer}
		}
		if v := in["X-Forwarded-Proto"]; len(v) > 0 {
			h["X-Forwarded-Proto"] = v
		} else {
			h["X-Forwarded-Proto"] = []string{scheme}
		}
		if v := in["X-Forwarded-Host"]; len(v) > 0 {
			h["X-Forwarded-Host"] = v
		} else {
			h["X-Forwarded-Host"] = []string{pr.In.Host}
		}
		if v := in["Forwarded"]; len(v) > 0 {
			h["Forwarded"] = v
		}
	} else {
		h["X-Forwarded-For"] = []string{peer}
		h["X-Forwarded-Proto"] = []string{scheme}
		h["X-Forwarded-Host"] = []string{pr.In.Host}
	}
	h["X-Real-Ip"] = []string{addrString(rs.client)}
	h["X-Request-Id"] = []string{rs.reqID}
	appendVia(h, viaProto(pr.In.ProtoMajor, pr.In.ProtoMinor))
}

// viaProto is our Via entry for a message of the given HTTP version.
func viaProto(major, minor int) string {
	switch {
	case major == 1 && minor == 1:
		return "1.1 veloflux"
	case major == 2:
		return "2 veloflux"
	case major == 1 && minor == 0:
		return "1.0 veloflux"
	}
	return strconv.Itoa(major) + "." + strconv.Itoa(minor) + " veloflux"
}

// appendVia adds our entry to the Via header (RFC 9110 §7.6.3).
func appendVia(h http.Header, v string) {
	if prior := h["Via"]; len(prior) > 0 {
		v = strings.Join(prior, ", ") + ", " + v
	}
	h["Via"] = []string{v}
}

func (p *Proxy) modifyResponse(resp *http.Response) error {
	rs := stateOf(resp.Request.Context())
	appendVia(resp.Header, viaProto(resp.ProtoMajor, resp.ProtoMinor))
	if rs.deadline != nil && isEventStream(resp.Header) {
		rs.deadline.Stop()
	}
	if pl := rs.route.pool; pl.sticky != "" && rs.member != nil && rs.sticky != rs.member {
		resp.Header.Add("Set-Cookie", pl.stickyCookie(rs.member, rs.https))
	}
	return nil
}

// errorHandler answers a failed exchange. The client's own faults: 413 for
// a body over the limit, 400 for a body whose framing is broken, 408 for a
// body the client did not send within the request timeout, nothing (logged
// as 499) when the client went away. The backend's: 503 when no backend
// could take the request, 504 for timeouts, 502 for anything else.
func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	rs := stateOf(r.Context())
	var mbe *http.MaxBytesError
	fault := rs.bodyFault.Load()
	switch {
	case fault == bodyTooLarge || errors.As(err, &mbe):
		writeError(w, http.StatusRequestEntityTooLarge, "body_too_large", "request body exceeds "+strconv.FormatInt(rs.st.cfg.MaxBodyBytes, 10)+" bytes")
	case errors.Is(err, errNoBackend):
		writeError(w, http.StatusServiceUnavailable, "no_backend", "no healthy backend in pool "+strconv.Quote(rs.route.pool.name))
	case fault == bodyTooSlow:
		// Before the client-gone case: the read deadline that ended the
		// wait also cancels the request's context. The rest of the body
		// is not coming, so the connection cannot carry another request.
		closeConnection(w, r)
		writeError(w, http.StatusRequestTimeout, "request_timeout", "the request body was not received within the request timeout")
	case fault == bodyMalformed:
		closeConnection(w, r)
		writeError(w, http.StatusBadRequest, "bad_request", "the request body could not be read: its framing is invalid or it ended early")
	case rs.inCtx.Err() != nil:
		// The client is gone; there is nobody to answer.
	case rs.timedOut.Load() || isTimeout(err):
		writeError(w, http.StatusGatewayTimeout, "gateway_timeout", "the backend did not answer in time")
	default:
		writeError(w, http.StatusBadGateway, "bad_gateway", "the backend could not be reached or failed")
	}
}

// refuseUnreadBody prepares the answer to a request the proxy turns down
// before reading its body. Left alone, net/http would read and discard up
// to 256 KiB of that body, with no deadline, before the answer, or after it
// for a client that sent "Expect: 100-continue" and waits: an HTTP/1
// request with a body gets "Connection: close" instead, and its connection
// closes at most refusedBodyLinger after the answer. Call it before the
// answer's headers are written.
func refuseUnreadBody(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor != 1 || r.Body == nil || r.Body == http.NoBody {
		return
	}
	w.Header().Set("Connection", "close")
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(refusedBodyLinger))
}

// closeConnection asks for the client's HTTP/1 connection to be closed
// after this response. (On HTTP/2 "Connection: close" would make net/http
// send GOAWAY for every stream of the connection, so it is not used there.)
func closeConnection(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 {
		w.Header().Set("Connection", "close")
	}
}

// stopBodyRead ends a read of the client's body that waits for the client:
// it fails with a timeout, so the exchange ends now rather than whenever the
// client sends more (cancelling the outgoing request is not enough, as the
// transport's close of the body waits for the read). Only while the handler
// runs, and only while a body read is pending: on an HTTP/1 connection the
// deadline would otherwise hit net/http's background read, which takes it
// for a client gone away.
func (rs *reqState) stopBodyRead(w http.ResponseWriter) {
	rs.handlerMu.Lock()
	defer rs.handlerMu.Unlock()
	if !rs.handlerDone {
		http.NewResponseController(w).SetReadDeadline(time.Now())
	}
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// classify maps a transport error to an upstream error reason.
func classify(err error) string {
	var op *net.OpError
	switch {
	case errors.As(err, &op) && op.Op == "dial":
		return ReasonDial
	case isTimeout(err):
		return ReasonTimeout
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		strings.Contains(err.Error(), "server closed"), strings.Contains(err.Error(), "connection reset"):
		return ReasonReset
	}
	return ReasonOther
}

func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// idempotent methods per RFC 9110 §9.2.2.
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// roundTripper picks a backend for every attempt of a request and sends it
// with the state's transport.
type roundTripper struct{ p *Proxy }

func (t roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	rs := stateOf(req.Context())
	if rs == nil || rs.route == nil {
		return nil, errors.New("proxy: request without routing state")
	}
	return rs.roundTrip(req)
}

const maxAttempts = 6 // config allows retries 0..5

func (rs *reqState) roundTrip(req *http.Request) (*http.Response, error) {
	p, st, pl := rs.p, rs.st, rs.route.pool
	ph := st.cfg.PassiveHealth
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	var tried [maxAttempts]*upstream
	var lastErr error
	for attempt := 0; ; attempt++ {
		now := p.now()
		m := pl.pick(now.UnixNano(), &p.live, rs.client, tried[:attempt], rs.sticky)
		if m == nil {
			if attempt == 0 {
				rs.reason = ReasonNoBackend
				p.countUpstream(ReasonNoBackend)
				return nil, errNoBackend
			}
			return nil, lastErr
		}
		m.inflight.Add(1)
		rs.attempts, rs.last = attempt+1, m
		if attempt > 0 {
			p.count.retries.Add(1)
		}

		// The outgoing request is ReverseProxy's own clone, so the first
		// attempt may set its URL in place; a retry sends a copy.
		out := req
		if attempt == 0 {
			req.URL.Host = m.addr
		} else {
			out = shallowClone(req)
			u := *req.URL
			u.Host = m.addr
			out.URL = &u
			if req.GetBody != nil {
				body, err := req.GetBody()
				if err != nil {
					m.inflight.Add(-1)
					return nil, lastErr
				}
				out.Body = body
			}
		}

		resp, err := st.transport.RoundTrip(out)
		done := p.now()
		if err == nil {
			m.observe(done.UnixNano(), float64(done.Sub(now)))
			if resp.StatusCode >= 500 {
				rs.reason = Reason5xx
				p.countUpstream(Reason5xx)
				p.passiveFail(m, done, ph.ConsecutiveFailures, ph.Ejection.Std())
			} else {
				m.passiveSuccess()
			}
			rs.member = m // the in-flight slot is released by finish
			return resp, nil
		}
		m.inflight.Add(-1)
		lastErr = err
		if rs.bodyFault.Load() != bodyOK || rs.inCtx.Err() != nil {
			// Our client's fault, not the backend's: a body over the
			// limit, broken or too slow, or a client gone away.
			return nil, err
		}
		reason := classify(err)
		if rs.timedOut.Load() {
			reason = ReasonTimeout
		}
		rs.reason = reason
		p.countUpstream(reason)
		m.observe(done.UnixNano(), max(float64(done.Sub(now)), ewmaPenalty))
		p.passiveFail(m, done, ph.ConsecutiveFailures, ph.Ejection.Std())

		// Only a connection that failed before anything was sent may be
		// retried, for an idempotent request whose body can be replayed.
		if attempt >= st.cfg.Retries || attempt+1 >= maxAttempts || !isDialError(err) ||
			!idempotent(req.Method) || !replayable || req.Context().Err() != nil {
			return nil, err
		}
		tried[attempt] = m.upstream
	}
}

func shallowClone(r *http.Request) *http.Request {
	r2 := new(http.Request)
	*r2 = *r
	return r2
}

func (p *Proxy) countUpstream(reason string) {
	i := reasonIndex(reason)
	p.count.upstream[i].Add(1)
	p.prom.upstreamByIdx[i].Inc()
}

func (p *Proxy) passiveFail(m *member, now time.Time, threshold int, ejection time.Duration) {
	if m.passiveFailure(now.UnixNano(), threshold, ejection) {
		p.count.ejections.Add(1)
		p.log.Warn("proxy: backend ejected after consecutive failures",
			"backend", m.key, "failures", threshold, "for", ejection.String())
	}
}

// countingBody counts request body bytes and records why reading the
// client's body failed, so that the failure is laid at the client's door
// rather than the backend's.
type countingBody struct {
	rc io.ReadCloser
	rs *reqState
}

func (b *countingBody) Read(p []byte) (int, error) {
	b.rs.readingBody.Store(true)
	n, err := b.rc.Read(p)
	b.rs.readingBody.Store(false)
	if n > 0 {
		b.rs.bytesIn.Add(int64(n))
	}
	if err != nil && err != io.EOF {
		var mbe *http.MaxBytesError
		switch {
		case errors.As(err, &mbe):
			b.rs.noteBodyFault(bodyTooLarge)
		case isTimeout(err):
			// Only the request timer sets a read deadline on the
			// client's connection (stopBodyRead).
			b.rs.noteBodyFault(bodyTooSlow)
		case errors.Is(err, http.ErrBodyReadAfterClose):
			// Our side closed the body (the exchange had already
			// failed): not the client's doing.
		case b.rs.inCtx.Err() == nil:
			// Bad chunked encoding, a body shorter than its
			// Content-Length, an HTTP/2 stream error.
			b.rs.noteBodyFault(bodyMalformed)
		}
	}
	return n, err
}

func (b *countingBody) Close() error { return b.rc.Close() }

// respWriter records the status and counts response bytes. It supports
// flushing and hijacking (for upgrades) and unwraps for
// http.ResponseController.
type respWriter struct {
	http.ResponseWriter
	rs     *reqState
	status int
}

func (w *respWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *respWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.rs.bytesOut.Add(int64(n))
	return n, err
}

func (w *respWriter) Flush() {
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *respWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *respWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.status = http.StatusSwitchingProtocols
	hc := &hijackedConn{Conn: conn, rs: w.rs, set: &w.rs.p.hijacked}
	w.rs.p.hijacked.add(hc)
	return hc, brw, nil
}

// hijackedConn is a client connection taken over for an upgrade: it counts
// the relayed bytes and is tracked so that Drain can close it at its
// deadline.
type hijackedConn struct {
	net.Conn
	rs   *reqState
	set  *hijackedSet
	once sync.Once
}

func (c *hijackedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.rs.bytesIn.Add(int64(n))
	return n, err
}

func (c *hijackedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.rs.bytesOut.Add(int64(n))
	return n, err
}

// CloseWrite lets ReverseProxy half-close toward the client when the
// backend is done sending.
func (c *hijackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

func (c *hijackedConn) Close() error {
	c.once.Do(func() { c.set.remove(c) })
	return c.Conn.Close()
}

// hijackedSet tracks upgraded connections (WebSockets) for the drain.
type hijackedSet = closeSet[*hijackedConn]
