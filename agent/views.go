package agent

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/health"
	"github.com/veloflux/veloflux/agent/model"
	"github.com/veloflux/veloflux/agent/proxy"
	"github.com/veloflux/veloflux/agent/reconcile"
)

// Counters reads every data-plane counter once (model.CounterSource). It
// is what Prometheus scrapes and what the 1 s telemetry tick samples.
func (a *Agent) Counters() (model.Counters, error) {
	cfg := a.config()
	out := model.Counters{At: time.Now()}
	// The reconciler's copy of what it installed spares reading the reals
	// array slot by slot (~30 ms) on every tick and scrape.
	var installed map[dataplane.VIP]dataplane.VIPMeta
	var reals map[uint32]dataplane.Real
	var err error
	if inst := a.installedState(); inst != nil {
		installed, reals = inst.VIPs, inst.Reals
	} else if installed, err = a.dp.VIPs(); err != nil {
		return out, err
	}
	for _, v := range cfg.VIPs {
		key, err := reconcile.DataplaneVIP(v)
		if err != nil {
			continue // validated config: cannot happen
		}
		meta, ok := installed[key]
		if !ok {
			continue // not reconciled yet
		}
		st, err := a.dp.VIPStats(meta.ID)
		if err != nil {
			return out, err
		}
		out.VIPs = append(out.VIPs, model.VIPCounters{
			VIP: key.String(), Address: key.Addr.String(), Port: key.Port, Protocol: key.Proto.String(),
			Mode: string(v.Mode), Pool: v.Pool, ID: meta.ID,
			Packets: st.Packets, Bytes: st.Bytes, NewFlows: st.NewFlows, Drops: st.Drops,
		})
	}
	if reals == nil {
		if reals, err = a.dp.Reals(); err != nil {
			return out, err
		}
	}
	idByAddr := make(map[netip.Addr]uint32, len(reals))
	for id, r := range reals {
		idByAddr[r.Addr] = id
	}
	realStats := map[uint32]dataplane.RealStats{}
	for _, p := range cfg.Pools {
		for _, b := range p.Backends {
			addr, err := netip.ParseAddr(b.Address)
			if err != nil {
				continue
			}
			bc := model.BackendCounters{Pool: p.Name, Backend: netip.AddrPortFrom(addr, uint16(b.Port)).String(),
				Address: addr.String(), Port: uint16(b.Port), State: "absent"}
			if id, ok := idByAddr[addr]; ok {
				st, seen := realStats[id]
				if !seen {
					if st, err = a.dp.RealStats(id); err != nil {
						return out, err
					}
					realStats[id] = st
				}
				bc.RealID, bc.State, bc.Packets, bc.Bytes = id, reals[id].State.String(), st.Packets, st.Bytes
			}
			out.Backends = append(out.Backends, bc)
		}
	}
	counters, err := a.dp.Counters()
	if err != nil {
		return out, err
	}
	for i, c := range counters {
		r := dataplane.Reason(i)
		out.Reasons = append(out.Reasons, model.ReasonCounters{Reason: r.String(), Verdict: r.Verdict().String(),
			Packets: c.Packets, Bytes: c.Bytes})
	}
	return out, nil
}

// installedState is the reconciler's view of the maps, or nil when it has
// none to trust (the caller then reads the data plane).
func (a *Agent) installedState() *reconcile.Installed {
	if a.rec == nil {
		return nil
	}
	return a.rec.Installed()
}

// ratesBetween turns two counter reads into per-second rates.
func ratesBetween(prev, cur model.Counters) api.MetricsView {
	mv := api.MetricsView{
		At: cur.At, VIPs: []api.VIPMetrics{}, Reasons: cur.Reasons,
		Verdicts: map[string]uint64{}, VerdictRates: map[string]float64{},
		Drops: map[string]uint64{}, DropRates: map[string]float64{},
	}
	dt := cur.At.Sub(prev.At).Seconds()
	if prev.At.IsZero() || dt <= 0 {
		dt = 0
	}
	mv.IntervalSeconds = dt
	rate := func(now, before uint64) float64 {
		if dt == 0 || now < before { // first read, or a counter reset
			return 0
		}
		return float64(now-before) / dt
	}
	before := map[string]model.VIPCounters{}
	for _, v := range prev.VIPs {
		before[v.VIP] = v
	}
	for _, v := range cur.VIPs {
		p := before[v.VIP]
		r := api.Rates{PPS: rate(v.Packets, p.Packets), BPS: 8 * rate(v.Bytes, p.Bytes),
			NewFlowsPS: rate(v.NewFlows, p.NewFlows), DropsPS: rate(v.Drops, p.Drops)}
		mv.VIPs = append(mv.VIPs, api.VIPMetrics{VIPCounters: v, Rates: r})
		mv.Total.PPS += r.PPS
		mv.Total.BPS += r.BPS
		mv.Total.NewFlowsPS += r.NewFlowsPS
		mv.Total.DropsPS += r.DropsPS
	}
	reasonsBefore := map[string]model.ReasonCounters{}
	for _, r := range prev.Reasons {
		reasonsBefore[r.Reason] = r
	}
	for _, r := range cur.Reasons {
		rr := rate(r.Packets, reasonsBefore[r.Reason].Packets)
		mv.Verdicts[r.Verdict] += r.Packets
		mv.VerdictRates[r.Verdict] += rr
		if r.Verdict == dataplane.VerdictDrop.String() {
			mv.Drops[r.Reason] = r.Packets
			mv.DropRates[r.Reason] = rr
		}
	}
	return mv
}

// backendViews joins configuration, health, drain state and counters.
func (a *Agent) backendViews(counters model.Counters) []api.BackendView {
	cfg := a.config()
	a.mu.Lock()
	drained := maps.Clone(a.drained)
	a.mu.Unlock()
	byKey := map[string]model.BackendCounters{}
	for _, b := range counters.Backends {
		byKey[b.Pool+"/"+b.Backend] = b
	}
	statuses := map[string]health.Status{}
	for _, st := range a.checker.Status() {
		statuses[st.Key] = st
	}
	var out []api.BackendView
	for _, p := range cfg.Pools {
		for _, b := range p.Backends {
			key := b.Key(p.Name)
			bc := byKey[key]
			st, checked := statuses[key]
			view := api.BackendView{
				ID: p.Name + ":" + bc.Backend, Pool: p.Name, Address: b.Address, Port: b.Port,
				Weight: b.EffectiveWeight(), Healthy: checked && st.Healthy, Drained: drained[key],
				RealID: bc.RealID, Packets: bc.Packets, Bytes: bc.Bytes,
			}
			if bc.Backend == "" {
				view.ID = fmt.Sprintf("%s:%s:%d", p.Name, b.Address, b.Port)
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

// healthViews is the health channel's view of every backend.
func (a *Agent) healthViews() []model.BackendHealth {
	var out []model.BackendHealth
	for _, st := range a.checker.Status() {
		out = append(out, model.BackendHealth{Pool: st.Pool, Backend: st.Addr.String(), Healthy: st.Healthy,
			Since: st.Since, LastCheck: st.LastCheck, Latency: st.Latency, LastError: st.LastError})
	}
	return out
}

// statusView is GET /api/status and the status channel's payload.
func (a *Agent) statusView() api.StatusView {
	a.mu.Lock()
	cfg, gen, res, rerr, at := a.cfg, a.generation, a.lastResult, a.lastErr, a.lastReconcileAt
	a.mu.Unlock()
	sv := api.StatusView{
		Status: "ok", Version: a.opts.Version, Node: cfg.Node.Name, StartedAt: a.started.UTC(),
		UptimeSeconds: time.Since(a.started).Seconds(), XDPMode: string(cfg.Dataplane.XDPMode),
		ConfigGeneration: gen,
		LastReconcile: api.ReconcileView{At: at.UTC(), DurationMs: float64(res.Duration.Microseconds()) / 1000,
			Result: res.String()},
	}
	if rerr != nil {
		sv.LastReconcile.Error = rerr.Error()
		sv.Status = "degraded"
	}
	if a.dp != nil {
		sv.ProgramID, _ = a.dp.ProgramID()
		links, _ := a.dp.PinnedLinks()
		attached := map[string]dataplane.AttachedLink{}
		for _, l := range links {
			attached[l.Interface] = l
		}
		held := a.dp.Attached()
		sv.Attached = len(cfg.Dataplane.Interfaces) > 0
		for _, name := range cfg.Dataplane.Interfaces {
			iv := api.InterfaceView{Name: name}
			if l, ok := attached[name]; ok && !l.Detached {
				iv.Attached, iv.ProgramID = true, l.ProgramID
			} else if slices.Contains(held, name) && a.opts.PinPath == "" {
				iv.Attached, iv.ProgramID = true, sv.ProgramID
			}
			sv.Attached = sv.Attached && iv.Attached
			sv.Interfaces = append(sv.Interfaces, iv)
		}
	}
	healthy := 0
	for _, st := range a.checker.Status() {
		if st.Healthy {
			healthy++
		}
	}
	backends := 0
	for _, p := range cfg.Pools {
		backends += len(p.Backends)
	}
	sv.Counts = api.Counts{Pools: len(cfg.Pools), Backends: backends, HealthyBackends: healthy,
		VIPs: len(cfg.VIPs), Routes: len(cfg.Routes), DenyPrefixes: len(cfg.Security.Denylist)}
	if !sv.Attached && sv.Status == "ok" {
		sv.Status = "degraded"
	}
	if p := a.proxy.Load(); p != nil {
		sv.Proxy = proxyView(p)
	}
	if a.proxyDraining() {
		sv.Status = "draining"
	}
	return sv
}

// proxyView reports the proxy's listeners as they are now.
func proxyView(p *proxy.Proxy) *api.ProxyView {
	pv := &api.ProxyView{Draining: p.Draining(), Listeners: []api.ListenerView{}}
	serving := true
	for _, l := range p.Listeners() {
		pv.Listeners = append(pv.Listeners, api.ListenerView{Role: l.Role, Address: l.Addr, Serving: l.Serving})
		serving = serving && l.Serving
	}
	pv.Serving = serving && len(pv.Listeners) > 0
	return pv
}
