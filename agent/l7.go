package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/metrics"
	"github.com/veloflux/veloflux/agent/proxy"
	"github.com/veloflux/veloflux/agent/statefile"
)

// stickyKeyFile holds the HMAC key of sticky cookies, so that cookies stay
// valid across restarts.
const stickyKeyFile = "sticky.key"

// stickyKeySize is the length of the sticky-cookie HMAC key in bytes.
const stickyKeySize = 32

// startProxy runs the L7 proxy when the configuration enables it. Its
// listeners close, and its in-flight requests finish, when ctx ends.
func (a *Agent) startProxy(ctx context.Context, cfg *config.Config) error {
	if !cfg.Proxy.Enabled {
		return nil
	}
	key, err := a.stickyKey()
	if err != nil {
		return err
	}
	p, err := proxy.New(proxy.Options{
		Logger:        a.log.With("component", "proxy"),
		Healthy:       a.checker.Healthy,
		Drained:       a.isDrained,
		Registerer:    a.metrics.Registry(),
		SecurityEvent: a.onProxySecurityEvent,
		Usage:         a.onProxyUsage,
		StickyKey:     key,
	})
	if err != nil {
		return err
	}
	if err := p.Apply(cfg); err != nil {
		return err
	}
	a.proxy.Store(p)
	a.metrics.SetProxy(func() metrics.ProxyState { return proxyState(p) })
	a.proxyDone = make(chan struct{})
	go func() {
		defer close(a.proxyDone)
		if err := p.Serve(ctx); err != nil {
			a.log.Error("L7 proxy stopped", "err", err)
		}
	}()
	return nil
}

// waitProxy waits for the proxy's drain after the agent was told to stop.
func (a *Agent) waitProxy() {
	if a.proxyDone == nil {
		return
	}
	limit := a.config().Proxy.DrainTimeout.Std() + 5*time.Second
	select {
	case <-a.proxyDone:
	case <-time.After(limit):
		a.log.Warn("L7 proxy did not drain in time", "waited", limit)
	}
}

// DrainProxy stops the L7 proxy gracefully (POST /api/system/drain): the
// listeners close, in-flight requests finish within drain_timeout, and
// /health reports draining so that whatever is in front moves away.
func (a *Agent) DrainProxy(ctx context.Context) error {
	p := a.proxy.Load()
	if p == nil {
		return &api.Error{Status: 409, Code: "conflict", Message: "the L7 proxy is not running (proxy.enabled is false)"}
	}
	a.log.Info("draining the L7 proxy")
	a.publishStatus()
	err := p.Drain(ctx)
	a.publishStatus()
	return err
}

// proxyState is what the metrics report of the proxy's listeners.
func proxyState(p *proxy.Proxy) metrics.ProxyState {
	st := metrics.ProxyState{Draining: p.Draining()}
	for _, l := range p.Listeners() {
		st.Listeners = append(st.Listeners, metrics.ProxyListener{Role: l.Role, Serving: l.Serving})
	}
	return st
}

func (a *Agent) proxyDraining() bool {
	p := a.proxy.Load()
	return p != nil && p.Draining()
}

func (a *Agent) isDrained(key string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.drained[key]
}

func (a *Agent) onProxyUsage(pool string, requests, bytesIn, bytesOut uint64) {
	if a.ledger == nil {
		return
	}
	subject, ok := a.usageSubjects.Load(pool)
	if !ok {
		subject, _ = a.usageSubjects.LoadOrStore(pool, "pool:"+pool)
	}
	a.ledger.AddL7(subject.(string), requests, bytesIn, bytesOut)
}

// onProxySecurityEvent turns the proxy's report of client abuse (see
// proxy.Options.SecurityEvent for its keys) into a security_event.
func (a *Agent) onProxySecurityEvent(kind string, data map[string]any) {
	a.security.DropEvent(kind)
	ev := api.SecurityEventData{Kind: kind, Severity: "warning"}
	for k, v := range data {
		switch k {
		case "client_ip":
			ev.ClientIP = fmt.Sprint(v)
		case "host":
			ev.Host = fmt.Sprint(v)
		case "path":
			ev.Path = fmt.Sprint(v)
		case "method":
			ev.Method = fmt.Sprint(v)
		case "suppressed":
			if n, ok := v.(int); ok && n > 0 {
				ev.Suppressed = uint64(n)
			}
		default:
			if ev.Detail == nil {
				ev.Detail = map[string]string{}
			}
			ev.Detail[k] = fmt.Sprint(v)
		}
	}
	a.hub.Publish("security", api.NewMessage(api.MsgSecurityEvent, ev))
}

// l7Rates turns two proxy stats reads into the metrics channel's L7 view.
func l7Rates(prev, cur proxy.Stats, dt float64) *api.L7Rates {
	rate := func(now, before uint64) float64 {
		if dt <= 0 || now < before {
			return 0
		}
		return float64(now-before) / dt
	}
	status := map[string]float64{}
	for class, n := range cur.Status {
		status[class] = rate(n, prev.Status[class])
	}
	var errNow, errBefore uint64
	for _, n := range cur.UpstreamErrors {
		errNow += n
	}
	for _, n := range prev.UpstreamErrors {
		errBefore += n
	}
	return &api.L7Rates{
		Requests:           cur.Requests,
		RequestsPerS:       rate(cur.Requests, prev.Requests),
		StatusPerS:         status,
		UpstreamErrorsPerS: rate(errNow, errBefore),
		BytesInPerS:        rate(cur.BytesIn, prev.BytesIn),
		BytesOutPerS:       rate(cur.BytesOut, prev.BytesOut),
		InFlight:           cur.InFlight,
		LatencyP50Seconds:  cur.LatencyP50,
		LatencyP99Seconds:  cur.LatencyP99,
		RateLimited:        cur.RateLimited,
		Draining:           cur.Draining,
	}
}

// stickyKey loads the sticky-cookie key from the state dir, creating it on
// first use; without a state dir it lives as long as the process. A key
// file of the wrong size is moved aside and replaced: cookies issued with
// it stop pinning, which costs one re-balance per client and nothing else.
func (a *Agent) stickyKey() ([]byte, error) {
	if a.opts.StateDir == "" {
		key := make([]byte, stickyKeySize)
		_, err := rand.Read(key)
		return key, err
	}
	path := filepath.Join(a.opts.StateDir, stickyKeyFile)
	read := func() ([]byte, bool, error) {
		var key []byte
		found, err := statefile.Read(path, a.log, func(data []byte) error {
			if len(data) != stickyKeySize {
				return fmt.Errorf("%w: sticky cookie key holds %d bytes, want %d", statefile.ErrCorrupt, len(data), stickyKeySize)
			}
			key = data
			return nil
		})
		return key, found, err
	}
	if key, found, err := read(); err != nil || found {
		return key, err
	}
	key := make([]byte, stickyKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	err := statefile.Write(path, key, statefile.Options{Exclusive: true})
	if errors.Is(err, fs.ErrExist) {
		// Another agent sharing the state dir made one first: use it.
		if key, found, err := read(); err != nil || found {
			return key, err
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create sticky cookie key: %w", err)
	}
	return key, nil
}
