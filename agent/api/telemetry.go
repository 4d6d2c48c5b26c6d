package api

import (
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/snapshot"
)

// RatesBetween turns two counter reads into the metrics channel's view:
// totals and per-second rates. A first read, or a counter that went
// backwards (an id reused), gives rate 0.
func RatesBetween(prev, cur snapshot.Counters) MetricsView {
	mv := MetricsView{
		At: cur.At, VIPs: []VIPMetrics{}, Reasons: cur.Reasons,
		Verdicts: map[string]uint64{}, VerdictRates: map[string]float64{},
		Drops: map[string]uint64{}, DropRates: map[string]float64{},
	}
	dt := cur.At.Sub(prev.At).Seconds()
	if prev.At.IsZero() || dt <= 0 {
		dt = 0
	}
	mv.IntervalSeconds = dt
	rate := func(now, before uint64) float64 {
		if dt == 0 || now < before {
			return 0
		}
		return float64(now-before) / dt
	}
	before := map[string]snapshot.VIPCounters{}
	for _, v := range prev.VIPs {
		before[v.VIP] = v
	}
	for _, v := range cur.VIPs {
		p := before[v.VIP]
		r := Rates{PPS: rate(v.Packets, p.Packets), BPS: 8 * rate(v.Bytes, p.Bytes),
			NewFlowsPS: rate(v.NewFlows, p.NewFlows), DropsPS: rate(v.Drops, p.Drops)}
		mv.VIPs = append(mv.VIPs, VIPMetrics{VIPCounters: v, Rates: r})
		mv.Total.PPS += r.PPS
		mv.Total.BPS += r.BPS
		mv.Total.NewFlowsPS += r.NewFlowsPS
		mv.Total.DropsPS += r.DropsPS
	}
	reasonsBefore := map[string]snapshot.ReasonCounters{}
	for _, r := range prev.Reasons {
		reasonsBefore[r.Reason] = r
	}
	for _, r := range cur.Reasons {
		rr := rate(r.Packets, reasonsBefore[r.Reason].Packets)
		mv.Verdicts[r.Verdict] += r.Packets
		mv.VerdictRates[r.Verdict] += rr
		if r.Drop {
			mv.Drops[r.Reason] = r.Packets
			mv.DropRates[r.Reason] = rr
		}
	}
	return mv
}

// BackendCheck is what the health checker knows of one backend.
type BackendCheck struct {
	Healthy   bool
	LastCheck time.Time
	LastError string
	Latency   time.Duration
}

// BackendViews joins the configured backends with their checks (by
// config.Backend.Key; a backend without one is down), the drain set and
// the data path's counters: GET /api/backends and backend_update.
func BackendViews(cfg *config.Config, drained map[string]bool, checks map[string]BackendCheck,
	counters snapshot.Counters) []BackendView {
	byKey := map[string]snapshot.BackendCounters{}
	for _, b := range counters.Backends {
		byKey[b.Pool+"/"+b.Backend] = b
	}
	var out []BackendView
	for _, p := range cfg.Pools {
		for _, b := range p.Backends {
			key := b.Key(p.Name)
			bc := byKey[key]
			st, checked := checks[key]
			view := BackendView{
				ID: fmt.Sprintf("%s:%s", p.Name, b.Endpoint()), Pool: p.Name, Address: b.Address, Port: b.Port,
				Weight: b.EffectiveWeight(), Healthy: checked && st.Healthy, Drained: drained[key],
				RealID: bc.RealID, Packets: bc.Packets, Bytes: bc.Bytes,
			}
			if checked {
				view.LastCheck, view.LastError = st.LastCheck, st.LastError
				view.CheckLatencyMs = float64(st.Latency.Microseconds()) / 1000
			}
			switch {
			case !view.Healthy:
				view.State = "down"
			case view.Drained:
				view.State = "draining"
			default:
				view.State, view.EffectiveWeight = "up", view.Weight
			}
			out = append(out, view)
		}
	}
	return out
}

// SecurityStats counts what the security channel summarizes. It is safe
// for concurrent use.
type SecurityStats struct {
	mu          sync.Mutex
	since       time.Time
	byReason    map[string]uint64 // sampled drop events and proxy events, by reason or kind
	authFailure uint64
	windowStart time.Time
	window      map[string]uint64
	windowAuth  uint64
}

// NewSecurityStats starts counting at now.
func NewSecurityStats(now time.Time) *SecurityStats {
	return &SecurityStats{since: now, windowStart: now, byReason: map[string]uint64{}, window: map[string]uint64{}}
}

// DropEvent counts one sampled drop (by its reason) or proxy event (by its
// kind).
func (s *SecurityStats) DropEvent(reason string) {
	s.mu.Lock()
	s.byReason[reason]++
	s.window[reason]++
	s.mu.Unlock()
}

// AuthEvents counts n failed API authentications.
func (s *SecurityStats) AuthEvents(n int) {
	s.mu.Lock()
	s.authFailure += uint64(n)
	s.windowAuth += uint64(n)
	s.mu.Unlock()
}

// Summary reports the totals since start and the window since the last
// rolled summary; roll starts a new window.
func (s *SecurityStats) Summary(now time.Time, roll bool) SecuritySummary {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := SecuritySummary{
		Since:              s.since.UTC(),
		WindowSeconds:      now.Sub(s.windowStart).Seconds(),
		SampledDrops:       maps.Clone(s.byReason),
		WindowSampledDrops: maps.Clone(s.window),
		AuthFailures:       s.authFailure,
		WindowAuthFailures: s.windowAuth,
	}
	if roll {
		s.windowStart, s.window, s.windowAuth = now, map[string]uint64{}, 0
	}
	return out
}
