// Package health runs the agent's active health checks and keeps the one
// verdict per backend that both the XDP (L4) data plane and the L7 proxy act
// on, so the two never disagree about whether a backend may take traffic.
//
// Each Target is probed on its own goroutine with a TCP connect or an HTTP
// GET. A single probe result never flips a verdict: a backend goes up after
// Spec.Rise consecutive successes and down after Spec.Fall consecutive
// failures (hysteresis), so one lost SYN or one slow response does not churn
// the Maglev tables or the proxy's pools.
//
// Verdict rules:
//
//   - A newly added target starts down and is probed immediately (within a
//     few milliseconds, not one interval later), so a healthy backend with
//     rise=2 takes traffic after about one interval. Starting up
//     optimistically would send traffic to backends that were added while
//     dead or misconfigured.
//   - A target of type none is up as soon as it is added and is never probed.
//   - Set keeps the verdict of targets it does not change. A target whose
//     Spec changes keeps its verdict too, but its counters are reset and its
//     probe loop restarts with the new Spec, so re-tuning a pool's interval
//     does not take every backend down.
//   - A key that is unknown, or was removed, is down.
//
// Consumers learn verdicts through Status/Healthy (pull) and Subscribe
// (push). Every verdict change is published as an Event, including a target
// of type none coming up when added and an up target going down because it
// was removed, so a consumer can mirror every verdict from events alone:
// subscribe first, then read Status for the initial state.
//
// Typical use:
//
//	c := health.New(logger, health.WithObserver(observeProbe))
//	events, unsubscribe := c.Subscribe(64)
//	defer unsubscribe()
//	targets, err := health.TargetsFromPools(cfg.Pools)
//	...
//	if err := c.Set(targets); err != nil { ... }
//	go c.Run(ctx)
//	for ev := range events { ... }
package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// CheckType is the kind of probe run against a target. Its values match
// config.HealthCheckType.
type CheckType string

// Check types.
const (
	// TypeTCP passes when a TCP connection can be established.
	TypeTCP CheckType = "tcp"
	// TypeHTTP passes when GET Path returns ExpectedStatus.
	TypeHTTP CheckType = "http"
	// TypeNone is always healthy; nothing is probed.
	TypeNone CheckType = "none"
)

// Defaults applied to zero fields of an http Spec, matching the config
// package's defaults.
const (
	DefaultPath           = "/"
	DefaultExpectedStatus = http.StatusOK
)

// Spec describes how to check a target. It is comparable, so Set can detect
// a changed check with ==.
type Spec struct {
	Type CheckType
	// Path and ExpectedStatus apply to http checks only. An empty Path
	// means "/", a zero ExpectedStatus means 200.
	Path           string
	ExpectedStatus int
	// Interval is the time between the starts of two probes; Timeout
	// bounds one probe. A probe that outlives Interval delays the next one
	// rather than overlapping it.
	Interval time.Duration
	Timeout  time.Duration
	// Rise consecutive successes mark a down target up; Fall consecutive
	// failures mark an up target down. Both must be at least 1.
	Rise int
	Fall int
	// Port, when not 0, is probed instead of the target's port (for
	// example a separate health endpoint).
	Port int
}

// Target is one backend to check.
type Target struct {
	// Key is the target's stable identity; Set matches targets by it. Empty
	// means Key(Pool, Addr), e.g. "web/10.0.0.11:80".
	Key  string
	Pool string
	// Addr is the backend's serving address. Probes go to Addr, or to
	// Addr's IP and Check.Port when Check.Port is set; Status and Event
	// always report Addr so consumers can find the backend.
	Addr  netip.AddrPort
	Check Spec
}

// Key returns the default key of the backend addr in pool:
// "pool/10.0.0.11:80", or "pool/[2001:db8::1]:80" for IPv6.
func Key(pool string, addr netip.AddrPort) string {
	return config.Backend{Address: addr.Addr().String(), Port: int(addr.Port())}.Key(pool)
}

// Status is a snapshot of one target's health.
type Status struct {
	Key     string
	Pool    string
	Addr    netip.AddrPort
	Type    CheckType
	Healthy bool
	// Since is when the current verdict was reached, or when the target
	// was added if the verdict never changed.
	Since time.Time
	// LastCheck is when the most recent completed probe started (zero
	// before the first one and for type none), Latency how long it took.
	LastCheck time.Time
	Latency   time.Duration
	// LastError describes why the most recent probe failed; it is empty
	// when that probe passed.
	LastError       string
	ConsecutiveOK   int
	ConsecutiveFail int
}

// Event is a verdict change of one target.
type Event struct {
	Key     string
	Pool    string
	Addr    netip.AddrPort
	Healthy bool
	// Reason is for humans, e.g. "3 consecutive failures: dial tcp
	// 10.0.0.11:80: connect: connection refused".
	Reason string
	At     time.Time
}

// Observer is called after every completed probe with its duration and
// outcome, e.g. to feed a metrics histogram. It runs on the probing
// goroutine, so it must be fast and must not call back into the Checker.
type Observer func(pool, key string, d time.Duration, ok bool)

// Option configures a Checker.
type Option func(*Checker)

// WithObserver registers an Observer for probe durations.
func WithObserver(o Observer) Option {
	return func(c *Checker) { c.observer = o }
}

// Checker runs the health checks of a set of targets.
type Checker struct {
	logger   *slog.Logger
	observer Observer
	client   *http.Client

	mu      sync.Mutex
	state   runState
	runCtx  context.Context // set while running; parent of every probe loop
	targets map[string]*entry
	seed    map[string]bool // starting verdicts of keys that are not targets yet
	wg      sync.WaitGroup  // probe loops

	subMu   sync.Mutex
	subs    map[*subscriber]struct{}
	stopped chan struct{} // closed when Run has stopped every loop
	dropped atomic.Uint64
}

type runState int

const (
	stateIdle runState = iota
	stateRunning
	stateStopped
)

// entry is a target and its health. st is guarded by Checker.mu.
type entry struct {
	t  Target // normalized
	st Status
	// cancel and done belong to the probe loop currently running for this
	// entry; both are nil when no loop runs (type none, or not running).
	cancel context.CancelFunc
	done   chan struct{}
}

// New returns a Checker with no targets. A nil logger discards logs.
func New(logger *slog.Logger, opts ...Option) *Checker {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	c := &Checker{
		logger:  logger,
		client:  newHTTPClient(),
		targets: make(map[string]*entry),
		subs:    make(map[*subscriber]struct{}),
		stopped: make(chan struct{}),
	}
	for _, o := range opts {
		if o != nil {
			o(c)
		}
	}
	return c
}

// Run probes the targets until ctx is done, then stops every probe loop,
// waits for them, closes every subscription channel and returns nil. Targets
// passed to Set before Run are started by Run; Set may be called at any time.
// Run may be called only once.
func (c *Checker) Run(ctx context.Context) error {
	c.mu.Lock()
	if c.state != stateIdle {
		c.mu.Unlock()
		return errors.New("health: Run called more than once")
	}
	c.state = stateRunning
	c.runCtx = ctx
	for _, e := range c.targets {
		c.startLocked(e, nil)
	}
	c.mu.Unlock()

	<-ctx.Done()

	c.mu.Lock()
	c.state = stateStopped
	for _, e := range c.targets {
		if e.cancel != nil {
			e.cancel()
		}
	}
	c.mu.Unlock()
	c.wg.Wait()

	c.subMu.Lock()
	close(c.stopped)
	c.subs = nil
	c.subMu.Unlock()
	c.logger.Debug("health checker stopped")
	return nil
}

// Set replaces the set of targets: new keys are added (and probed at once),
// missing keys are removed, targets whose Pool, Addr or Check changed are
// restarted, and unchanged targets keep running with their verdict and
// counters. If any target is invalid, or two share a key, Set changes
// nothing and returns an error naming every problem.
func (c *Checker) Set(targets []Target) error {
	norm := make([]Target, 0, len(targets))
	var errs []error
	index := make(map[string]int, len(targets))
	for i, t := range targets {
		nt, err := normalize(t)
		if err != nil {
			errs = append(errs, fmt.Errorf("target %d: %w", i, err))
			continue
		}
		if j, dup := index[nt.Key]; dup {
			errs = append(errs, fmt.Errorf("target %d: duplicate key %q (also target %d)", i, nt.Key, j))
			continue
		}
		index[nt.Key] = i
		norm = append(norm, nt)
	}
	if len(errs) > 0 {
		return fmt.Errorf("health: set targets: %w", errors.Join(errs...))
	}

	now := time.Now()
	var events []Event
	var added, removed, changed int

	c.mu.Lock()
	for key, e := range c.targets {
		if _, keep := index[key]; keep {
			continue
		}
		c.stopLocked(e)
		delete(c.targets, key)
		removed++
		if e.st.Healthy {
			events = append(events, c.transitionLocked(e, false, "removed from health checking", now))
		}
	}
	for _, t := range norm {
		old, exists := c.targets[t.Key]
		switch {
		case exists && old.t == t:
			continue
		case exists && old.t.Pool == t.Pool && old.t.Addr == t.Addr:
			// Only the check changed: keep the verdict (see the package
			// doc), restart the loop once the old one has finished so two
			// probes of the target are never in flight.
			changed++
			prev := old.done
			c.stopLocked(old)
			e := &entry{t: t, st: old.st}
			e.st.Type = t.Check.Type
			e.st.ConsecutiveOK, e.st.ConsecutiveFail = 0, 0
			c.targets[t.Key] = e
			if t.Check.Type == TypeNone && !e.st.Healthy {
				events = append(events, c.transitionLocked(e, true, "health check disabled (type none)", now))
			}
			c.startLocked(e, prev)
		default:
			if exists {
				// Same key, different backend: the old backend's
				// verdict says nothing about the new one.
				c.stopLocked(old)
				removed++
				if old.st.Healthy {
					events = append(events, c.transitionLocked(old, false, "replaced by "+t.Addr.String(), now))
				}
			}
			added++
			e := &entry{t: t, st: Status{
				Key: t.Key, Pool: t.Pool, Addr: t.Addr, Type: t.Check.Type, Since: now,
				Healthy: !exists && c.seed[t.Key],
			}}
			delete(c.seed, t.Key)
			c.targets[t.Key] = e
			if t.Check.Type == TypeNone {
				events = append(events, c.transitionLocked(e, true, "health check disabled (type none)", now))
			}
			c.startLocked(e, nil)
		}
	}
	c.mu.Unlock()

	for _, ev := range events {
		c.logTransition(ev)
	}
	if added+removed+changed > 0 {
		c.logger.Debug("health targets updated",
			"added", added, "removed", removed, "changed", changed, "total", len(norm))
	}
	return nil
}

// Seed sets the verdict that keys start with when Set first adds them,
// instead of down. An agent restarting over a data path that is still
// forwarding carries over the verdicts it finds there, so that no backend is
// taken out of service before a check says it should be; fall failures then
// bring a seeded-up target down as usual. Keys already targets are ignored.
func (c *Checker) Seed(verdicts map[string]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seed == nil {
		c.seed = make(map[string]bool, len(verdicts))
	}
	for key, healthy := range verdicts {
		if _, exists := c.targets[key]; !exists {
			c.seed[key] = healthy
		}
	}
}

// Status returns a snapshot of every target, sorted by key.
func (c *Checker) Status() []Status {
	c.mu.Lock()
	out := make([]Status, 0, len(c.targets))
	for _, e := range c.targets {
		out = append(out, e.st)
	}
	c.mu.Unlock()
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// Healthy reports the verdict for key; known is false for a key that is not
// a current target (which consumers should treat as down).
func (c *Checker) Healthy(key string) (healthy, known bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.targets[key]
	if !ok {
		return false, false
	}
	return e.st.Healthy, true
}

// normalize validates t and returns it with defaults applied and the fields
// that do not matter for its check type cleared, so that == on the result
// means "same check".
func normalize(t Target) (Target, error) {
	if !t.Addr.IsValid() {
		return t, fmt.Errorf("key %q pool %q: invalid address", t.Key, t.Pool)
	}
	if t.Key == "" {
		t.Key = Key(t.Pool, t.Addr)
	}
	s := t.Check
	var errs []string
	switch s.Type {
	case TypeNone:
		// Nothing about a none check can change its outcome.
		t.Check = Spec{Type: TypeNone}
		return t, nil
	case TypeTCP:
		s.Path, s.ExpectedStatus = "", 0
	case TypeHTTP:
		if s.Path == "" {
			s.Path = DefaultPath
		}
		if s.ExpectedStatus == 0 {
			s.ExpectedStatus = DefaultExpectedStatus
		}
		if !strings.HasPrefix(s.Path, "/") || strings.ContainsFunc(s.Path, isSpaceOrControl) {
			errs = append(errs, fmt.Sprintf("path must start with \"/\" and contain no spaces, got %q", s.Path))
		} else if _, err := url.ParseRequestURI(s.Path); err != nil {
			errs = append(errs, fmt.Sprintf("invalid path %q: %v", s.Path, err))
		}
		if s.ExpectedStatus < 100 || s.ExpectedStatus > 599 {
			errs = append(errs, fmt.Sprintf("expected status must be between 100 and 599, got %d", s.ExpectedStatus))
		}
	default:
		return t, fmt.Errorf("%s: unknown check type %q (want %q, %q or %q)", t.Key, s.Type, TypeTCP, TypeHTTP, TypeNone)
	}
	if s.Interval <= 0 {
		errs = append(errs, fmt.Sprintf("interval must be positive, got %s", s.Interval))
	}
	if s.Timeout <= 0 {
		errs = append(errs, fmt.Sprintf("timeout must be positive, got %s", s.Timeout))
	}
	if s.Rise < 1 {
		errs = append(errs, fmt.Sprintf("rise must be at least 1, got %d", s.Rise))
	}
	if s.Fall < 1 {
		errs = append(errs, fmt.Sprintf("fall must be at least 1, got %d", s.Fall))
	}
	if s.Port < 0 || s.Port > 65535 {
		errs = append(errs, fmt.Sprintf("check port must be between 0 and 65535, got %d", s.Port))
	} else if s.Port == 0 && t.Addr.Port() == 0 {
		errs = append(errs, "no port to probe: address has port 0 and no check port is set")
	}
	if len(errs) > 0 {
		return t, fmt.Errorf("%s: %s", t.Key, strings.Join(errs, "; "))
	}
	t.Check = s
	return t, nil
}

func isSpaceOrControl(r rune) bool {
	return r <= ' ' || r == 0x7f
}

// startLocked starts e's probe loop if the checker is running and e needs
// probing. The loop first waits for prev (the loop it replaces) to exit.
func (c *Checker) startLocked(e *entry, prev <-chan struct{}) {
	if c.state != stateRunning || e.t.Check.Type == TypeNone {
		return
	}
	ctx, cancel := context.WithCancel(c.runCtx)
	e.cancel = cancel
	e.done = make(chan struct{})
	c.wg.Add(1)
	go c.loop(ctx, e, prev)
}

// stopLocked cancels e's probe loop, if any, without waiting for it: a
// canceled loop never records a result (see record), and a replacement loop
// waits for it on its own goroutine, so Set never blocks on a probe.
func (c *Checker) stopLocked(e *entry) {
	if e.cancel != nil {
		e.cancel()
		e.cancel = nil
	}
}

// loop probes one target until ctx is canceled. Probes run one after the
// other on this goroutine, so at most one is in flight per target.
func (c *Checker) loop(ctx context.Context, e *entry, prev <-chan struct{}) {
	defer c.wg.Done()
	defer close(e.done)
	if prev != nil {
		select {
		case <-prev:
		case <-ctx.Done():
			return
		}
	}

	spec := e.t.Check // immutable for this loop: a change restarts it
	addr := e.t.Addr
	if spec.Port != 0 {
		addr = netip.AddrPortFrom(addr.Addr(), uint16(spec.Port))
	}
	// The first probe runs almost at once so a new backend's verdict is
	// not delayed by a whole interval; the second is pushed back by up to
	// 10% of the interval so targets added together (a config load) do
	// not probe in lockstep forever after.
	first := jitter(min(spec.Interval/10, 5*time.Millisecond))
	spread := jitter(spec.Interval / 10)

	timer := time.NewTimer(first)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		start := time.Now()
		err := c.probe(ctx, spec, addr)
		d := time.Since(start)
		if ctx.Err() != nil {
			// Stopped mid-probe: the failure is ours, not the target's.
			return
		}
		c.record(ctx, e, start, d, err)
		if c.observer != nil {
			c.observer(e.t.Pool, e.t.Key, d, err == nil)
		}

		wait := time.Until(start.Add(spec.Interval + spread))
		spread = 0
		timer.Reset(max(wait, 0))
	}
}

// jitter returns a random duration in [0, n), or 0 if n <= 0.
func jitter(n time.Duration) time.Duration {
	if n <= 0 {
		return 0
	}
	return rand.N(n)
}

// record applies one probe result to e and publishes a verdict change.
func (c *Checker) record(ctx context.Context, e *entry, start time.Time, d time.Duration, err error) {
	c.mu.Lock()
	if ctx.Err() != nil {
		// Set or Run canceled this loop while it was probing; e may
		// already have been replaced, so its result must not land.
		c.mu.Unlock()
		return
	}
	st := &e.st
	st.LastCheck = start
	st.Latency = d
	now := start.Add(d)
	var ev Event
	var changed bool
	if err == nil {
		st.LastError = ""
		st.ConsecutiveFail = 0
		st.ConsecutiveOK = inc(st.ConsecutiveOK)
		if !st.Healthy && st.ConsecutiveOK >= e.t.Check.Rise {
			reason := plural(st.ConsecutiveOK, "consecutive success", "consecutive successes")
			ev, changed = c.transitionLocked(e, true, reason, now), true
		}
	} else {
		st.LastError = err.Error()
		st.ConsecutiveOK = 0
		st.ConsecutiveFail = inc(st.ConsecutiveFail)
		if st.Healthy && st.ConsecutiveFail >= e.t.Check.Fall {
			reason := plural(st.ConsecutiveFail, "consecutive failure", "consecutive failures") + ": " + st.LastError
			ev, changed = c.transitionLocked(e, false, reason, now), true
		}
	}
	// Copied under the lock for the log line below.
	healthy, fails := st.Healthy, st.ConsecutiveFail
	c.mu.Unlock()

	switch {
	case changed:
		c.logTransition(ev)
	case err != nil:
		// Failures that do not (yet) flip the verdict are routine
		// noise at Info level, but useful when chasing a flapping
		// backend.
		c.logger.Debug("health check failed",
			"key", e.t.Key, "pool", e.t.Pool, "addr", e.t.Addr.String(),
			"healthy", healthy, "consecutive_failures", fails, "error", err.Error())
	}
}

// transitionLocked sets e's verdict and publishes the change. Publishing
// under c.mu keeps every subscriber's events for a key in verdict order; it
// never blocks (see subscriber.enqueue).
func (c *Checker) transitionLocked(e *entry, healthy bool, reason string, at time.Time) Event {
	e.st.Healthy = healthy
	e.st.Since = at
	ev := Event{Key: e.t.Key, Pool: e.t.Pool, Addr: e.t.Addr, Healthy: healthy, Reason: reason, At: at}
	c.publish(ev)
	return ev
}

func (c *Checker) logTransition(ev Event) {
	state := "down"
	if ev.Healthy {
		state = "up"
	}
	c.logger.Info("backend "+state,
		"key", ev.Key, "pool", ev.Pool, "addr", ev.Addr.String(),
		"healthy", ev.Healthy, "reason", ev.Reason)
}

// inc increments n without wrapping around, so a backend that has been up
// for ages never appears to have a negative streak.
func inc(n int) int {
	if n == int(^uint(0)>>1) {
		return n
	}
	return n + 1
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}
