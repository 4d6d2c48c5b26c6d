package agent

import (
	"context"
	"net/netip"
	"sort"
	"time"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/billing"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/health"
	"github.com/veloflux/veloflux/agent/insights"
	"github.com/veloflux/veloflux/agent/proxy"
	"github.com/veloflux/veloflux/agent/snapshot"
)

// Telemetry cadences. Rates and backends are sampled every second; the
// slower channels summarize.
const (
	sampleEvery          = time.Second
	statusEvery          = 5 * time.Second
	billingEvery         = 5 * time.Second
	securitySummaryEvery = 10 * time.Second
	latencyCheckEvery    = 10 * time.Second
	recentInsights       = 20
)

// telemetry samples the counters and feeds the WebSocket channels, the
// billing ledger and the traffic analysis until ctx ends.
func (a *Agent) telemetry(ctx context.Context) {
	tick := time.NewTicker(sampleEvery)
	defer tick.Stop()
	var prev snapshot.Counters
	var prevL7 proxy.Stats
	lastStatus, lastBilling, lastSummary, lastLatency := time.Time{}, time.Time{}, time.Now(), time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			cur, err := a.Counters()
			if err != nil {
				a.log.Warn("read counters", "err", err)
				continue
			}
			mv := api.RatesBetween(prev, cur)
			if p := a.proxy.Load(); p != nil {
				st := p.Stats()
				mv.L7 = l7Rates(prevL7, st, mv.IntervalSeconds)
				prevL7 = st
			}
			a.mu.Lock()
			a.lastMetrics, a.lastCounters = mv, cur
			a.mu.Unlock()
			a.hub.Publish("metrics", api.NewMessage(api.MsgMetricsUpdate, mv))
			a.hub.Publish("backends", api.NewMessage(api.MsgBackendUpdate, api.BackendUpdate{Backends: a.backendViews(cur)}))
			if !prev.At.IsZero() {
				a.analyze(now, mv)
			}
			prev = cur
			if now.Sub(lastLatency) >= latencyCheckEvery {
				a.analyzeLatencies(now)
				lastLatency = now
			}
			if now.Sub(lastStatus) >= statusEvery {
				a.publishStatus()
				lastStatus = now
			}
			if a.ledger != nil && now.Sub(lastBilling) >= billingEvery {
				snap := a.ledger.Record(now, usageOf(cur))
				a.hub.Publish("billing", api.NewMessage(api.MsgUsageUpdate, api.UsageUpdate(snap)))
				lastBilling = now
			}
			if now.Sub(lastSummary) >= securitySummaryEvery {
				a.hub.Publish("security", api.NewMessage(api.MsgSecuritySummary, a.security.Summary(now, true)))
				lastSummary = now
			}
		}
	}
}

func (a *Agent) publishStatus() {
	if a.hub != nil {
		a.hub.Publish("status", api.NewMessage(api.MsgStatusUpdate, a.statusView()))
	}
}

// usageOf maps counters to billing subjects: every VIP, and every pool as
// the sum of the VIPs that use it.
func usageOf(c snapshot.Counters) map[string]billing.Usage {
	out := map[string]billing.Usage{}
	for _, v := range c.VIPs {
		u := billing.Usage{Packets: v.Packets, Bytes: v.Bytes, NewFlows: v.NewFlows}
		out["vip:"+v.VIP] = u
		p := out["pool:"+v.Pool]
		p.Packets += u.Packets
		p.Bytes += u.Bytes
		p.NewFlows += u.NewFlows
		out["pool:"+v.Pool] = p
	}
	return out
}

func (a *Agent) analyze(now time.Time, mv api.MetricsView) {
	for _, v := range mv.VIPs {
		dropRate := 0.0
		if v.Rates.PPS > 0 {
			dropRate = v.Rates.DropsPS / v.Rates.PPS
		}
		for _, in := range a.analyzer.ObserveVIP(now, "vip "+v.VIP, v.Rates.PPS, v.Rates.NewFlowsPS, dropRate) {
			a.publishInsight(in)
		}
	}
}

func (a *Agent) analyzeLatencies(now time.Time) {
	latencies := map[string]map[string]time.Duration{}
	for _, st := range a.checker.Status() {
		if st.LastCheck.IsZero() || st.Type == health.TypeNone {
			continue
		}
		if latencies[st.Pool] == nil {
			latencies[st.Pool] = map[string]time.Duration{}
		}
		latencies[st.Pool][st.Key] = st.Latency
	}
	for _, in := range a.analyzer.ObserveLatencies(now, latencies) {
		a.publishInsight(in)
	}
}

func (a *Agent) publishInsight(in insights.Insight) {
	a.mu.Lock()
	a.insights = append(a.insights, in)
	if len(a.insights) > recentInsights {
		a.insights = a.insights[len(a.insights)-recentInsights:]
	}
	a.mu.Unlock()
	a.hub.Publish("ai", api.NewMessage(api.MsgInsight, api.Insight(in)))
}

// forwardHealth streams verdict transitions to the health channel.
func (a *Agent) forwardHealth(ctx context.Context, events <-chan health.Event) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			a.hub.Publish("health", api.NewMessage(api.MsgHealthEvent, api.HealthEvent{
				Key: ev.Key, Pool: ev.Pool, Backend: ev.Addr.String(), Healthy: ev.Healthy,
				Reason: ev.Reason, At: ev.At.UTC(),
			}))
			a.publishStatus()
		}
	}
}

// forwardDropEvents streams the data path's sampled drop events (denylist,
// malformed packets, martian sources, the new-flow limit) to the security
// channel.
func (a *Agent) forwardDropEvents(ctx context.Context) {
	err := a.dp.ReadEvents(ctx, func(e dataplane.Event) {
		a.security.DropEvent(e.Reason.String())
		proto := e.Proto
		data := api.SecurityEventData{Kind: dropEventKind(e.Reason), Severity: "warning", Reason: e.Reason.String(),
			PacketLen: e.PacketLen, Protocol: &proto}
		if e.Src.IsValid() {
			data.Source = netip.AddrPortFrom(e.Src, e.SrcPort).String()
			data.Destination = netip.AddrPortFrom(e.Dst, e.DstPort).String()
		}
		a.hub.Publish("security", api.NewMessage(api.MsgSecurityEvent, data))
	})
	if err != nil && ctx.Err() == nil {
		a.log.Error("drop events stopped", "err", err)
	}
}

// dropEventKind names what a sampled drop means on the security channel.
func dropEventKind(r dataplane.Reason) string {
	switch r {
	case dataplane.ReasonDropDenylist:
		return api.SecurityDenylistDrop
	case dataplane.ReasonDropNewFlowRateLimited:
		return api.SecurityNewFlowRateLimited
	case dataplane.ReasonDropMartianVIP, dataplane.ReasonDropMartianUnspec, dataplane.ReasonDropMartianBroadcast,
		dataplane.ReasonDropMartianMulticast, dataplane.ReasonDropMartianLoopback:
		return api.SecurityMartianSource
	}
	return api.SecurityMalformed
}

// onAuthFailure reports a failed API authentication on the security channel.
// The API server has logged it already, and calls at a bounded rate with
// the number of failures each event stands for.
func (a *Agent) onAuthFailure(e api.SecurityEvent) {
	a.security.AuthEvents(e.Count)
	at := e.At
	a.hub.Publish("security", api.NewMessage(api.MsgSecurityEvent, api.SecurityEventData{
		Kind: e.Kind, Remote: e.Remote, Method: e.Method, Path: e.Path, Reason: e.Reason,
		Severity: "warning", At: &at, Count: e.Count,
	}))
}

// onConnect gives a new WebSocket client its channel's current state.
func (a *Agent) onConnect(channel string) []api.Message {
	switch channel {
	case "metrics":
		return []api.Message{api.NewMessage(api.MsgMetricsUpdate, a.Metrics())}
	case "backends":
		// A thousand clients connecting at once must not mean a thousand
		// map reads: until the first tick, read once per client.
		a.mu.Lock()
		counters := a.lastCounters
		a.mu.Unlock()
		if counters.At.IsZero() {
			var err error
			if counters, err = a.Counters(); err != nil {
				return nil
			}
		}
		return []api.Message{api.NewMessage(api.MsgBackendUpdate, api.BackendUpdate{Backends: a.backendViews(counters)})}
	case "status":
		return []api.Message{api.NewMessage(api.MsgStatusUpdate, a.statusView())}
	case "health":
		return []api.Message{api.NewMessage(api.MsgHealthStatus, api.HealthStatus{Backends: a.healthViews()})}
	case "security":
		return []api.Message{api.NewMessage(api.MsgSecuritySummary, a.security.Summary(time.Now(), false))}
	case "billing":
		if a.ledger == nil {
			return nil
		}
		return []api.Message{api.NewMessage(api.MsgUsageUpdate, api.UsageUpdate(a.ledger.Snapshot(time.Now())))}
	case "ai":
		a.mu.Lock()
		recent := append([]insights.Insight{}, a.insights...)
		a.mu.Unlock()
		sort.SliceStable(recent, func(i, j int) bool { return recent[i].At.After(recent[j].At) })
		cfg := a.analyzer.Config()
		return []api.Message{api.NewMessage(api.MsgAIStatus, api.AIStatus{
			Recent:           recent,
			WarmupSamples:    cfg.Warmup,
			ZThreshold:       cfg.ZThreshold,
			ForecastHorizonS: cfg.Horizon.Seconds(),
			OutlierZ:         cfg.OutlierZ,
		})}
	}
	return nil
}
