package health

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// Generous bounds: the race detector and loaded CI machines slow things
// down by an order of magnitude, and these tests assert behaviour, not
// timing precision.
const (
	testInterval = 50 * time.Millisecond
	testTimeout  = 200 * time.Millisecond
	waitLimit    = 5 * time.Second
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testWriter sends log lines to t.Log so they show up only for failures
// (or with -v).
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// start runs c until the test ends.
func start(t *testing.T, c *Checker) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := c.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// tcpBackend is a loopback listener that accepts and closes connections.
func tcpBackend(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.Close()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln
}

// deadPort returns a loopback address nothing listens on.
func deadPort(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := addrOf(t, ln.Addr())
	ln.Close()
	return ap
}

func addrOf(t *testing.T, a net.Addr) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

func tcpSpec() Spec {
	return Spec{Type: TypeTCP, Interval: testInterval, Timeout: testTimeout, Rise: 2, Fall: 2}
}

func httpSpec(path string) Spec {
	return Spec{Type: TypeHTTP, Path: path, ExpectedStatus: 200, Interval: testInterval, Timeout: testTimeout, Rise: 2, Fall: 2}
}

// waitEvent returns the next event for key, failing the test after limit.
// Events for other keys are skipped.
func waitEvent(t *testing.T, ch <-chan Event, key string, limit time.Duration) Event {
	t.Helper()
	deadline := time.After(limit)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("event channel closed while waiting for %s", key)
			}
			if ev.Key == key {
				return ev
			}
		case <-deadline:
			t.Fatalf("no event for %s within %s", key, limit)
		}
	}
}

// noEvent fails if an event for key arrives within d.
func noEvent(t *testing.T, ch <-chan Event, key string, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case ev := <-ch:
			if ev.Key == key {
				t.Fatalf("unexpected event %+v", ev)
			}
		case <-deadline:
			return
		}
	}
}

// waitFor polls cond until it holds, failing the test after waitLimit.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func statusOf(t *testing.T, c *Checker, key string) Status {
	t.Helper()
	for _, s := range c.Status() {
		if s.Key == key {
			return s
		}
	}
	t.Fatalf("no status for %s", key)
	return Status{}
}

func mustSet(t *testing.T, c *Checker, targets ...Target) {
	t.Helper()
	if err := c.Set(targets); err != nil {
		t.Fatalf("Set: %v", err)
	}
}

func TestTCPUpThenDown(t *testing.T) {
	ln := tcpBackend(t)
	addr := addrOf(t, ln.Addr())
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(16)
	defer unsubscribe()
	mustSet(t, c, Target{Pool: "web", Addr: addr, Check: tcpSpec()})
	key := Key("web", addr)
	if h, known := c.Healthy(key); h || !known {
		t.Fatalf("new target: Healthy = %v, %v; want false (down until rise), true", h, known)
	}
	start(t, c)

	ev := waitEvent(t, events, key, waitLimit)
	if !ev.Healthy || ev.Pool != "web" || ev.Addr != addr || ev.At.IsZero() {
		t.Fatalf("first event = %+v, want up for web %s", ev, addr)
	}
	if ev.Reason != "2 consecutive successes" {
		t.Errorf("up reason = %q", ev.Reason)
	}
	if st := statusOf(t, c, key); !st.Healthy || st.ConsecutiveOK < 2 || st.ConsecutiveFail != 0 {
		t.Errorf("status after up = %+v", st)
	}

	ln.Close()
	closed := time.Now()
	ev = waitEvent(t, events, key, waitLimit)
	elapsed := time.Since(closed)
	if ev.Healthy {
		t.Fatalf("second event = %+v, want down", ev)
	}
	if !strings.HasPrefix(ev.Reason, "2 consecutive failures: ") || !strings.Contains(ev.Reason, "refused") {
		t.Errorf("down reason = %q, want 2 consecutive failures with connection refused", ev.Reason)
	}
	// fall×interval + timeout, plus slack for the race detector.
	if limit := 2*testInterval + testTimeout + time.Second; elapsed > limit {
		t.Errorf("down after %s, want within %s", elapsed, limit)
	}
	if h, _ := c.Healthy(key); h {
		t.Error("Healthy after down event = true")
	}
}

func TestFirstCheckIsImmediate(t *testing.T) {
	ln := tcpBackend(t)
	addr := addrOf(t, ln.Addr())
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(1)
	defer unsubscribe()
	start(t, c)
	spec := tcpSpec()
	spec.Interval = time.Hour // a check after one interval would never come
	spec.Rise = 1
	mustSet(t, c, Target{Pool: "web", Addr: addr, Check: spec})
	if ev := waitEvent(t, events, Key("web", addr), waitLimit); !ev.Healthy {
		t.Fatalf("event = %+v, want up", ev)
	}
}

// statusServer is an HTTP backend whose answer the test controls.
type statusServer struct {
	*httptest.Server
	status   atomic.Int32
	requests atomic.Int32
	wrong    atomic.Int32 // requests for a path other than the checked one
	agent    atomic.Value // last User-Agent
}

func newStatusServer(t *testing.T, path string) *statusServer {
	t.Helper()
	s := &statusServer{}
	s.status.Store(200)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		s.agent.Store(r.UserAgent())
		if r.URL.RequestURI() != path {
			s.wrong.Add(1)
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(int(s.status.Load()))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *statusServer) addr(t *testing.T) netip.AddrPort {
	t.Helper()
	return addrOf(t, s.Listener.Addr())
}

func TestHTTPExpectedStatus(t *testing.T) {
	const path = "/healthz?deep=1"
	srv := newStatusServer(t, path)
	addr := srv.addr(t)
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(16)
	defer unsubscribe()
	start(t, c)
	mustSet(t, c, Target{Pool: "api", Addr: addr, Check: httpSpec(path)})
	key := Key("api", addr)

	if ev := waitEvent(t, events, key, waitLimit); !ev.Healthy {
		t.Fatalf("event = %+v, want up", ev)
	}
	if n := srv.wrong.Load(); n != 0 {
		t.Errorf("%d requests for a path other than %s", n, path)
	}
	if ua, _ := srv.agent.Load().(string); ua != userAgent {
		t.Errorf("User-Agent = %q, want %q", ua, userAgent)
	}

	srv.status.Store(503)
	ev := waitEvent(t, events, key, waitLimit)
	if ev.Healthy {
		t.Fatalf("event = %+v, want down", ev)
	}
	if !strings.Contains(ev.Reason, "status 503, want 200") {
		t.Errorf("down reason = %q, want it to mention status 503, want 200", ev.Reason)
	}
	if st := statusOf(t, c, key); !strings.Contains(st.LastError, "503") {
		t.Errorf("LastError = %q", st.LastError)
	}

	srv.status.Store(200)
	if ev := waitEvent(t, events, key, waitLimit); !ev.Healthy {
		t.Fatalf("event = %+v, want up again", ev)
	}
}

func TestHTTPNonDefaultExpectedStatusAndNoRedirects(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/moved" {
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	addr := addrOf(t, srv.Listener.Addr())
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(16)
	defer unsubscribe()
	start(t, c)
	spec := httpSpec("/moved")
	spec.ExpectedStatus = http.StatusFound
	spec.Rise = 1
	mustSet(t, c, Target{Pool: "p", Addr: addr, Check: spec})
	// Following the redirect would see 200 and fail.
	if ev := waitEvent(t, events, Key("p", addr), waitLimit); !ev.Healthy {
		t.Fatalf("event = %+v, want up on 302", ev)
	}
}

func TestHTTPTimeout(t *testing.T) {
	// Accepts connections but never answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	}()
	defer func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()

	addr := addrOf(t, ln.Addr())
	c := New(testLogger(t))
	start(t, c)
	spec := httpSpec("/")
	spec.Timeout = 100 * time.Millisecond
	mustSet(t, c, Target{Pool: "slow", Addr: addr, Check: spec})
	key := Key("slow", addr)

	waitFor(t, "a failed check", func() bool { return statusOf(t, c, key).ConsecutiveFail >= 1 })
	st := statusOf(t, c, key)
	if !strings.Contains(st.LastError, "timeout") {
		t.Errorf("LastError = %q, want it to mention timeout", st.LastError)
	}
	if st.Healthy {
		t.Error("a target that never answered is healthy")
	}
	if st.Latency < spec.Timeout {
		t.Errorf("Latency = %s, want at least the timeout %s", st.Latency, spec.Timeout)
	}
}

func TestHysteresis(t *testing.T) {
	var failNext atomic.Bool
	var served atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		if failNext.CompareAndSwap(true, false) {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	addr := addrOf(t, srv.Listener.Addr())

	var failures atomic.Int32
	c := New(testLogger(t), WithObserver(func(pool, key string, d time.Duration, ok bool) {
		if !ok {
			failures.Add(1)
		}
	}))
	events, unsubscribe := c.Subscribe(16)
	defer unsubscribe()
	start(t, c)
	spec := httpSpec("/")
	spec.Rise, spec.Fall = 1, 2
	mustSet(t, c, Target{Pool: "p", Addr: addr, Check: spec})
	key := Key("p", addr)
	if ev := waitEvent(t, events, key, waitLimit); !ev.Healthy {
		t.Fatalf("event = %+v, want up", ev)
	}

	failNext.Store(true)
	waitFor(t, "the single failed check", func() bool { return failures.Load() == 1 })
	after := served.Load()
	waitFor(t, "two more checks", func() bool { return served.Load() >= after+2 })
	noEvent(t, events, key, 2*testInterval)
	if h, _ := c.Healthy(key); !h {
		t.Fatal("one failure flipped an up target with fall=2")
	}
	if n := failures.Load(); n != 1 {
		t.Fatalf("%d failures observed, want 1", n)
	}
	if st := statusOf(t, c, key); st.ConsecutiveFail != 0 || st.LastError != "" {
		t.Errorf("status after recovery = %+v, want failure streak and error cleared", st)
	}
}

func TestSetReconciles(t *testing.T) {
	lnA, lnB := tcpBackend(t), tcpBackend(t)
	a, b := addrOf(t, lnA.Addr()), addrOf(t, lnB.Addr())
	keyA, keyB := Key("web", a), Key("web", b)
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(64)
	defer unsubscribe()
	start(t, c)

	targetA := Target{Pool: "web", Addr: a, Check: tcpSpec()}
	mustSet(t, c, targetA)
	if ev := waitEvent(t, events, keyA, waitLimit); !ev.Healthy {
		t.Fatalf("A: event = %+v, want up", ev)
	}

	// Adding B leaves A alone: still up, no event.
	targetB := Target{Pool: "web", Addr: b, Check: tcpSpec()}
	mustSet(t, c, targetA, targetB)
	if h, _ := c.Healthy(keyA); !h {
		t.Fatal("A lost its verdict when B was added")
	}
	if ev := waitEvent(t, events, keyB, waitLimit); !ev.Healthy {
		t.Fatalf("B: event = %+v, want up", ev)
	}

	// Changing B's check restarts it with the new Spec while keeping its
	// verdict: pointing the check at a dead port takes B down after fall
	// failures, proving the new Spec is in effect.
	changed := targetB
	changed.Check.Port = int(deadPort(t).Port())
	mustSet(t, c, targetA, changed)
	if h, _ := c.Healthy(keyB); !h {
		t.Fatal("B's verdict was reset by a Spec change")
	}
	if st := statusOf(t, c, keyB); st.ConsecutiveOK > 1 {
		// 0 right after Set, 1 at most if a probe of the new Spec
		// could somehow already have passed.
		t.Errorf("B's counters not reset: %+v", st)
	}
	ev := waitEvent(t, events, keyB, waitLimit)
	if ev.Healthy || !strings.Contains(ev.Reason, "refused") {
		t.Fatalf("B after check port change: event = %+v, want down with connection refused", ev)
	}
	if ev.Addr != b {
		t.Errorf("event Addr = %s, want the serving address %s, not the check address", ev.Addr, b)
	}

	// Removing A publishes a down event, since an unknown key is down.
	mustSet(t, c, changed)
	ev = waitEvent(t, events, keyA, waitLimit)
	if ev.Healthy || ev.Reason != "removed from health checking" {
		t.Fatalf("A removed: event = %+v", ev)
	}
	if _, known := c.Healthy(keyA); known {
		t.Error("A still known after removal")
	}
	if st := c.Status(); len(st) != 1 || st[0].Key != keyB {
		t.Errorf("Status after removal = %+v, want only B", st)
	}

	// An invalid set changes nothing and names every problem.
	err := c.Set([]Target{
		targetA,
		{Pool: "web", Addr: a, Check: tcpSpec()}, // duplicate key
		{Pool: "web", Check: tcpSpec()},          // no address
		{Pool: "web", Addr: b, Check: Spec{Type: "icmp"}},
		{Key: "x", Pool: "web", Addr: b, Check: Spec{Type: TypeHTTP, Path: "healthz", ExpectedStatus: 42}},
	})
	if err == nil {
		t.Fatal("invalid Set succeeded")
	}
	for _, want := range []string{"duplicate key", "invalid address", `unknown check type "icmp"`, `must start with "/"`, "between 100 and 599", "interval must be positive", "rise must be at least 1"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Set error %q does not mention %q", err, want)
		}
	}
	if st := c.Status(); len(st) != 1 || st[0].Key != keyB {
		t.Errorf("Status after invalid Set = %+v, want unchanged", st)
	}
}

func TestUnchangedTargetKeepsRunning(t *testing.T) {
	ln := tcpBackend(t)
	addr := addrOf(t, ln.Addr())
	var probes atomic.Int32
	c := New(testLogger(t), WithObserver(func(string, string, time.Duration, bool) { probes.Add(1) }))
	events, unsubscribe := c.Subscribe(16)
	defer unsubscribe()
	start(t, c)
	target := Target{Pool: "web", Addr: addr, Check: tcpSpec()}
	mustSet(t, c, target)
	key := Key("web", addr)
	waitEvent(t, events, key, waitLimit)
	before := statusOf(t, c, key)

	// Equivalent spellings of the same target are not a change either.
	same := target
	same.Key = key
	mustSet(t, c, same)
	after := statusOf(t, c, key)
	if !after.Healthy || after.ConsecutiveOK < before.ConsecutiveOK || !after.Since.Equal(before.Since) {
		t.Fatalf("unchanged target was reset: before %+v, after %+v", before, after)
	}
	n := probes.Load()
	waitFor(t, "probing to continue", func() bool { return probes.Load() >= n+2 })
	noEvent(t, events, key, testInterval)
}

func TestSlowSubscriberDoesNotBlock(t *testing.T) {
	// Every request flips the answer, so with rise=fall=1 every check is
	// a verdict change.
	var flapping atomic.Bool
	flapping.Store(true)
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if flapping.Load() && n.Add(1)%2 == 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	addr := addrOf(t, srv.Listener.Addr())
	key := Key("p", addr)

	c := New(testLogger(t))
	stuck, unsubscribeStuck := c.Subscribe(0) // never read until the end
	defer unsubscribeStuck()
	fast, unsubscribeFast := c.Subscribe(0)
	defer unsubscribeFast()
	start(t, c)
	spec := httpSpec("/")
	spec.Interval = 10 * time.Millisecond
	spec.Rise, spec.Fall = 1, 1
	mustSet(t, c, Target{Pool: "p", Addr: addr, Check: spec})

	const want = 10
	for i := 0; i < want; i++ {
		ev := waitEvent(t, fast, key, waitLimit)
		if ev.Healthy != (i%2 == 0) {
			t.Fatalf("event %d = %+v: verdicts must alternate starting with up", i, ev)
		}
	}
	if c.DroppedEvents() == 0 {
		t.Error("DroppedEvents = 0 with a subscriber that never reads")
	}

	// Once things settle, the stuck subscriber's last event is the
	// current verdict even though it missed the flaps in between.
	flapping.Store(false)
	waitFor(t, "the target to settle up", func() bool {
		h, _ := c.Healthy(key)
		return h
	})
	noEventFor := 5 * spec.Interval
	var last Event
	got := 0
	for drained := false; !drained; {
		select {
		case ev := <-stuck:
			last, got = ev, got+1
		case <-time.After(noEventFor):
			drained = true
		}
	}
	if got == 0 || got >= want {
		t.Errorf("stuck subscriber received %d events, want some but fewer than %d (coalesced)", got, want)
	}
	if !last.Healthy {
		t.Errorf("stuck subscriber's last event = %+v, want the current verdict (up)", last)
	}
}

func TestUnsubscribeAndStopCloseChannels(t *testing.T) {
	c := New(nil)
	ch, unsubscribe := c.Subscribe(1)
	unsubscribe()
	unsubscribe() // idempotent
	waitClosed(t, ch)

	ch2, unsubscribe2 := c.Subscribe(1)
	defer unsubscribe2()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	waitClosed(t, ch2)
	if err := c.Run(context.Background()); err == nil {
		t.Error("second Run succeeded")
	}
	ch3, unsubscribe3 := c.Subscribe(1)
	defer unsubscribe3()
	waitClosed(t, ch3)
}

func waitClosed(t *testing.T, ch <-chan Event) {
	t.Helper()
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("received an event, want a closed channel")
		}
	case <-time.After(waitLimit):
		t.Fatal("channel not closed")
	}
}

func TestTypeNoneAlwaysHealthy(t *testing.T) {
	dead := deadPort(t)
	var probes atomic.Int32
	c := New(testLogger(t), WithObserver(func(string, string, time.Duration, bool) { probes.Add(1) }))
	events, unsubscribe := c.Subscribe(4)
	defer unsubscribe()
	start(t, c)
	// Interval etc. are irrelevant for none and may be left zero.
	mustSet(t, c, Target{Pool: "static", Addr: dead, Check: Spec{Type: TypeNone}})
	key := Key("static", dead)
	if h, known := c.Healthy(key); !h || !known {
		t.Fatalf("Healthy = %v, %v; want true, true", h, known)
	}
	ev := waitEvent(t, events, key, waitLimit)
	if !ev.Healthy || !strings.Contains(ev.Reason, "none") {
		t.Errorf("event = %+v, want up because of type none", ev)
	}
	time.Sleep(3 * testInterval)
	if h, _ := c.Healthy(key); !h || probes.Load() != 0 {
		t.Errorf("after a while: healthy %v, %d probes; want healthy and no probes", h, probes.Load())
	}
	if st := statusOf(t, c, key); st.Type != TypeNone || !st.LastCheck.IsZero() {
		t.Errorf("status = %+v", st)
	}
}

func TestStatusSnapshot(t *testing.T) {
	ln := tcpBackend(t)
	up := addrOf(t, ln.Addr())
	dead := deadPort(t)
	c := New(testLogger(t))
	start(t, c)
	mustSet(t, c,
		Target{Pool: "z", Addr: up, Check: tcpSpec()},
		Target{Pool: "a", Addr: dead, Check: tcpSpec()},
	)
	keyUp, keyDead := Key("z", up), Key("a", dead)
	waitFor(t, "checks of both targets", func() bool {
		return statusOf(t, c, keyUp).Healthy && statusOf(t, c, keyDead).ConsecutiveFail >= 2
	})

	st := c.Status()
	if len(st) != 2 || st[0].Key != keyDead || st[1].Key != keyUp {
		t.Fatalf("Status = %+v, want [%s %s] sorted by key", st, keyDead, keyUp)
	}
	d, u := st[0], st[1]
	if d.Healthy || d.Pool != "a" || d.Addr != dead || d.Type != TypeTCP {
		t.Errorf("dead target status = %+v", d)
	}
	if !strings.Contains(d.LastError, dead.String()) || !strings.Contains(d.LastError, "refused") {
		t.Errorf("dead target LastError = %q, want the address and connection refused", d.LastError)
	}
	if d.ConsecutiveOK != 0 || d.LastCheck.IsZero() || d.Latency <= 0 || d.Since.IsZero() {
		t.Errorf("dead target status = %+v", d)
	}
	if !u.Healthy || u.LastError != "" || u.ConsecutiveFail != 0 || u.ConsecutiveOK < 2 {
		t.Errorf("up target status = %+v", u)
	}
	if u.LastCheck.IsZero() || time.Since(u.LastCheck) > time.Minute || u.Latency <= 0 {
		t.Errorf("up target LastCheck %v, Latency %s", u.LastCheck, u.Latency)
	}
}

func TestSetBeforeRunAndAfterStop(t *testing.T) {
	ln := tcpBackend(t)
	addr := addrOf(t, ln.Addr())
	c := New(testLogger(t))
	mustSet(t, c, Target{Pool: "web", Addr: addr, Check: tcpSpec()})
	events, unsubscribe := c.Subscribe(4)
	defer unsubscribe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	if ev := waitEvent(t, events, Key("web", addr), waitLimit); !ev.Healthy {
		t.Fatalf("event = %+v, want up", ev)
	}
	cancel()
	<-done
	// After Run returns Set still records targets, without probing.
	mustSet(t, c, Target{Pool: "web", Addr: addr, Check: tcpSpec()}, Target{Pool: "x", Addr: deadPort(t), Check: tcpSpec()})
	if len(c.Status()) != 2 {
		t.Errorf("Status after stop = %+v", c.Status())
	}
}

func TestTargetsFromPools(t *testing.T) {
	hc := config.HealthCheck{
		Type: config.HealthCheckHTTP, Path: "/healthz", ExpectedStatus: 204,
		Interval: config.Duration(2 * time.Second), Timeout: config.Duration(time.Second),
		Rise: 2, Fall: 3, Port: 8081,
	}
	pools := []config.Pool{
		{Name: "web", HealthCheck: hc, Backends: []config.Backend{
			{Address: "10.0.0.11", Port: 80},
			{Address: "2001:db8::1", Port: 80},
		}},
		{Name: "bad", HealthCheck: hc, Backends: []config.Backend{
			{Address: "not-an-ip", Port: 80},
			{Address: "10.0.0.12", Port: 0},
		}},
	}
	targets, err := TargetsFromPools(pools)
	if err == nil || !strings.Contains(err.Error(), "pools[1].backends[0].address") || !strings.Contains(err.Error(), "pools[1].backends[1].port") {
		t.Errorf("error = %v, want both bad backends named by path", err)
	}
	if len(targets) != 2 {
		t.Fatalf("targets = %+v, want the 2 valid ones", targets)
	}
	want := Spec{Type: TypeHTTP, Path: "/healthz", ExpectedStatus: 204, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3, Port: 8081}
	if targets[0].Key != "web/10.0.0.11:80" || targets[0].Pool != "web" ||
		targets[0].Addr != netip.MustParseAddrPort("10.0.0.11:80") || targets[0].Check != want {
		t.Errorf("targets[0] = %+v", targets[0])
	}
	if targets[1].Key != "web/[2001:db8::1]:80" {
		t.Errorf("targets[1].Key = %q", targets[1].Key)
	}
	if err := New(nil).Set(targets); err != nil {
		t.Errorf("Set(TargetsFromPools) = %v", err)
	}
}

func TestCheckPortOverride(t *testing.T) {
	// The backend's own port is dead; the check port is alive.
	ln := tcpBackend(t)
	serving := deadPort(t)
	spec := tcpSpec()
	spec.Port = int(addrOf(t, ln.Addr()).Port())
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(4)
	defer unsubscribe()
	start(t, c)
	mustSet(t, c, Target{Pool: "web", Addr: serving, Check: spec})
	ev := waitEvent(t, events, Key("web", serving), waitLimit)
	if !ev.Healthy || ev.Addr != serving {
		t.Fatalf("event = %+v, want up, reported under the serving address", ev)
	}
}

func TestRemovedMidProbeDoesNotRecord(t *testing.T) {
	// A slow backend keeps a probe in flight while the target is removed;
	// the canceled probe must neither block Set nor resurrect the target.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- conn
		}
	}()
	defer func() {
		for {
			select {
			case conn := <-accepted:
				conn.Close()
			default:
				return
			}
		}
	}()
	addr := addrOf(t, ln.Addr())
	c := New(testLogger(t))
	start(t, c)
	spec := httpSpec("/")
	spec.Timeout = time.Hour
	mustSet(t, c, Target{Pool: "p", Addr: addr, Check: spec})
	select {
	case conn := <-accepted:
		defer conn.Close()
	case <-time.After(waitLimit):
		t.Fatal("no probe connection")
	}
	setDone := make(chan error, 1)
	go func() { setDone <- c.Set(nil) }()
	select {
	case err := <-setDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Set blocked on an in-flight probe")
	}
	time.Sleep(testInterval)
	if st := c.Status(); len(st) != 0 {
		t.Errorf("Status after removal = %+v", st)
	}
	if _, known := c.Healthy(Key("p", addr)); known {
		t.Error("removed target came back")
	}
}

func TestProbeErrorsAreDescriptive(t *testing.T) {
	c := New(nil)
	dead := deadPort(t)
	err := c.probe(context.Background(), tcpSpec(), dead)
	if err == nil || !strings.Contains(err.Error(), "dial tcp "+dead.String()) {
		t.Errorf("tcp probe of dead port: %v", err)
	}
	err = c.probe(context.Background(), httpSpec("/x"), dead)
	if err == nil || !strings.HasPrefix(err.Error(), "GET http://"+dead.String()+"/x: ") || strings.Contains(err.Error(), `Get "`) {
		t.Errorf("http probe of dead port: %v", err)
	}
}

// A seeded-up target starts healthy (an agent restarting over a running data
// path) and still goes down after fall failures; seeds never touch targets
// that already exist.
func TestSeededVerdict(t *testing.T) {
	ln := tcpBackend(t)
	addr := addrOf(t, ln.Addr())
	key := Key("web", addr)
	c := New(testLogger(t))
	events, unsubscribe := c.Subscribe(16)
	defer unsubscribe()
	c.Seed(map[string]bool{key: true})
	mustSet(t, c, Target{Pool: "web", Addr: addr, Check: tcpSpec()})
	if h, known := c.Healthy(key); !h || !known {
		t.Fatalf("seeded target: Healthy = %v, %v; want true, true", h, known)
	}
	c.Seed(map[string]bool{key: false})
	if h, _ := c.Healthy(key); !h {
		t.Fatal("a seed changed the verdict of an existing target")
	}
	start(t, c)
	noEvent(t, events, key, 3*testInterval)
	ln.Close()
	if ev := waitEvent(t, events, key, waitLimit); ev.Healthy {
		t.Fatalf("event %+v, want down after the listener closed", ev)
	}
}
