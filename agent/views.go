package agent

import (
	"maps"
	"net/netip"
	"time"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/proxy"
	"github.com/veloflux/veloflux/agent/reconcile"
	"github.com/veloflux/veloflux/agent/snapshot"
)

// Counters reads every data-plane counter once (snapshot.CounterSource). It
// is what Prometheus scrapes and what the 1 s telemetry tick samples.
func (a *Agent) Counters() (snapshot.Counters, error) {
	cfg := a.config()
	out := snapshot.Counters{At: time.Now()}
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
		out.VIPs = append(out.VIPs, snapshot.VIPCounters{
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
			bc := snapshot.BackendCounters{Pool: p.Name, Backend: netip.AddrPortFrom(addr, uint16(b.Port)).String(),
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
		out.Reasons = append(out.Reasons, snapshot.ReasonCounters{Reason: r.String(), Verdict: r.Verdict().String(), Drop: r.Verdict() == dataplane.VerdictDrop,
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

// backendViews joins configuration, health, drain state and counters.
func (a *Agent) backendViews(counters snapshot.Counters) []api.BackendView {
	cfg := a.config()
	a.mu.Lock()
	drained := maps.Clone(a.drained)
	a.mu.Unlock()
	checks := map[string]api.BackendCheck{}
	for _, st := range a.checker.Status() {
		checks[st.Key] = api.BackendCheck{Healthy: st.Healthy, LastCheck: st.LastCheck, LastError: st.LastError,
			Latency: st.Latency}
	}
	return api.BackendViews(cfg, drained, checks, counters)
}

// healthViews is the health channel's view of every backend.
func (a *Agent) healthViews() []snapshot.BackendHealth {
	var out []snapshot.BackendHealth
	for _, st := range a.checker.Status() {
		out = append(out, snapshot.BackendHealth{Pool: st.Pool, Backend: st.Addr.String(), Healthy: st.Healthy,
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
		// The kernel's word, as veloflux_xdp_attached has it; an
		// interface whose state cannot be read counts as not attached.
		ats, _ := a.dp.Attachments(cfg.Dataplane.Interfaces)
		attached := map[string]bool{}
		for _, at := range ats {
			attached[at.Interface] = at.Attached
		}
		sv.Attached = len(cfg.Dataplane.Interfaces) > 0
		for _, name := range cfg.Dataplane.Interfaces {
			iv := api.InterfaceView{Name: name, Attached: attached[name]}
			if iv.Attached {
				iv.ProgramID = sv.ProgramID
			}
			sv.Attached = sv.Attached && iv.Attached
			sv.Interfaces = append(sv.Interfaces, iv)
		}
	}
	sv.NodeDrained = a.nodeDrained.Load()
	if bv := a.BGP(); bv.Enabled {
		sv.BGP = &bv
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
