package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/snapshot"
	"github.com/veloflux/veloflux/agent/statefile"
)

// The agent is the API's Controller.
var _ api.Controller = (*Agent)(nil)

// drainedFile keeps the drained backends across restarts, in the state dir.
const drainedFile = "drained.json"

// Config returns the configuration in force. It is never modified in place:
// changes replace it whole.
func (a *Agent) Config() *config.Config { return a.config() }

// Status is the API's view of the agent.
func (a *Agent) Status() api.StatusView { return a.statusView() }

// ValidateConfig parses a candidate configuration without applying it.
func (a *Agent) ValidateConfig(data []byte) (*config.Config, error) {
	next, err := config.Parse(data)
	if err != nil {
		return nil, err
	}
	return next, config.RestartOnlyChanges(a.config(), next)
}

// Update applies a change the way the file would, all or nothing: the
// whole result is validated, put in force, and only then saved atomically
// (the previous file kept as .bak). A change that fails any step, saving
// included, leaves both the file and the running state as they were.
func (a *Agent) Update(ctx context.Context, mutate func(*config.Config) error) (*config.Config, error) {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	cur := a.config()
	next, err := cur.Modify(mutate)
	if err != nil {
		return nil, err
	}
	if err := config.RestartOnlyChanges(cur, next); err != nil {
		return nil, err
	}
	if err := a.apply(ctx, cur, next, "api"); err != nil {
		return nil, err
	}
	if err := config.Save(a.opts.ConfigPath, next); err != nil {
		err = fmt.Errorf("save configuration: %w", err)
		if rerr := a.apply(context.WithoutCancel(ctx), next, cur, "rollback"); rerr != nil {
			return nil, fmt.Errorf("%w; rolling the running state back failed too: %w", err, rerr)
		}
		return nil, fmt.Errorf("%w (nothing changed)", err)
	}
	return next, nil
}

// Reload re-reads the configuration file once it has stopped changing. A
// file that does not validate, asks for a change only a restart can make,
// withdraws every VIP without saying so, or fails to apply leaves the
// running state as it was and returns every error.
func (a *Agent) Reload(ctx context.Context) error {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	cur := a.config()
	next, err := config.LoadSettled(ctx, a.opts.ConfigPath, config.DefaultSettle, config.DefaultSettleMax)
	if err == nil {
		err = config.CheckReplacement(cur, next)
	}
	if err == nil {
		err = a.apply(ctx, cur, next, "reload")
	}
	if err != nil {
		a.reloadResult("failure")
		return err
	}
	a.reloadResult("success")
	return nil
}

func (a *Agent) reloadResult(result string) {
	if a.metrics != nil {
		a.metrics.ConfigReload(result)
	}
}

// apply replaces the configuration in force, cur, by next, all or nothing.
// What can fail without side effects comes first (binding moved listeners,
// reading the API token file), then attaching XDP to every interface, then
// the data path's settings, the health targets, the L7 proxy, the BGP
// speaker's settings and peers, and the reconcile of the maps (after which
// the announced VIPs follow). A failure at any step undoes the steps before it,
// so the running state is cur's again; the moved listeners and the new API
// access take over only once everything else succeeded.
func (a *Agent) apply(ctx context.Context, cur, next *config.Config, why string) error {
	var commits []func()
	abort := func() {}
	if a.apiSlot != nil {
		access, err := a.apiAccess(next)
		if err != nil {
			return err
		}
		apiMove, err := a.apiSlot.prepare(next.API.Listen)
		if err != nil {
			return err
		}
		metricsMove, err := a.metricsSlot.prepare(next.Metrics.Listen)
		if err != nil {
			apiMove.abort()
			return err
		}
		abort = func() { apiMove.abort(); metricsMove.abort() }
		commits = append(commits, apiMove.commit, metricsMove.commit, func() {
			a.api.SetAccess(access)
			a.hub.SetAllowedOrigins(next.API.AllowedOrigins)
		})
	}

	bgpPlan, err := resolveBGP(next)
	if err != nil {
		abort()
		return err
	}

	added, err := a.attachAll(next)
	if err != nil {
		abort()
		return err
	}
	// restore puts cur's data path, checks, proxy and BGP speaker back, step by step
	// in reverse; steps is how far the change got.
	steps := 0
	undoBGP := func() {}
	restore := func() {
		if steps >= 4 {
			undoBGP()
		}
		if steps >= 3 {
			if p := a.proxy.Load(); p != nil {
				if err := p.Apply(cur); err != nil {
					a.log.Error("roll back: L7 proxy", "err", err)
				}
			}
		}
		if steps >= 2 {
			if err := a.applyHealthTargets(cur); err != nil {
				a.log.Error("roll back: health targets", "err", err)
			}
		}
		if steps >= 1 {
			if err := a.dp.SetSettings(settingsFrom(cur)); err != nil {
				a.log.Error("roll back: data path settings", "err", err)
			}
		}
		a.undoAttach(cur, added)
		abort()
	}
	err = a.dp.SetSettings(settingsFrom(next))
	if err == nil {
		steps = 1
		err = a.applyHealthTargets(next)
	}
	if err == nil {
		steps = 2
		if p := a.proxy.Load(); p != nil {
			err = p.Apply(next)
		}
	}
	if err == nil {
		steps = 3
		if a.bgp != nil {
			undoBGP, err = a.bgp.reconfigure(ctx, bgpPlan)
		}
	}
	if err != nil {
		restore()
		return err
	}
	steps = 4

	a.setConfig(next)
	if err := a.reconcileNow(ctx, why); err != nil {
		a.setConfig(cur)
		restore()
		if rerr := a.reconcileNow(context.WithoutCancel(ctx), "rollback"); rerr != nil {
			return fmt.Errorf("apply the configuration: %w; restoring the previous one failed too, will retry: %w", err, rerr)
		}
		return fmt.Errorf("apply the configuration (the previous one stays in force): %w", err)
	}
	for _, commit := range commits {
		commit()
	}
	if err := a.detachUnconfigured(next); err != nil {
		a.log.Error("detach from interfaces no longer configured", "err", err)
	}
	a.mu.Lock()
	a.generation++
	gen := a.generation
	a.mu.Unlock()
	a.log.Info("configuration applied", "trigger", why, "generation", gen, "vips", len(next.VIPs), "pools", len(next.Pools))
	a.publishStatus()
	return nil
}

func (a *Agent) setConfig(c *config.Config) {
	a.mu.Lock()
	a.cfg = c
	a.mu.Unlock()
}

// apiAccess reads the API token for cfg: the one in force when the token
// file did not change, else the new file's (created if missing).
func (a *Agent) apiAccess(cfg *config.Config) (api.Access, error) {
	token, err := api.LoadOrCreateToken(cfg.API.TokenFile, a.log)
	if err != nil {
		return api.Access{}, fmt.Errorf("api.token_file: %w", err)
	}
	return api.Access{Token: token, ProtectReads: cfg.API.ProtectReads}, nil
}

// SetDrained drains or undrains a backend ("address:port" in pool). A
// drained backend takes no new flows and keeps its existing ones; the set
// survives restarts.
func (a *Agent) SetDrained(ctx context.Context, pool, backend string, drained bool) error {
	ap, err := netip.ParseAddrPort(backend)
	if err != nil {
		return fmt.Errorf("backend %q: %w", backend, err)
	}
	cfg := a.config()
	var key string
	for _, p := range cfg.Pools {
		if p.Name != pool {
			continue
		}
		for _, b := range p.Backends {
			if addr, err := config.ParseAddr(b.Address); err == nil && addr == ap.Addr() && b.Port == int(ap.Port()) {
				key = b.Key(p.Name)
			}
		}
	}
	if key == "" {
		return &api.Error{Status: 404, Code: "not_found", Message: fmt.Sprintf("pool %q has no backend %s", pool, backend)}
	}
	// drainMu makes the change and its save one step: without it, two
	// requests could save their snapshots in the other order and leave a
	// file that disagrees with the set in force. The new set is put in
	// force only once saved, so no reconcile ever sees a change whose
	// save failed.
	a.drainMu.Lock()
	a.mu.Lock()
	next := maps.Clone(a.drained)
	a.mu.Unlock()
	if drained {
		next[key] = true
	} else {
		delete(next, key)
	}
	err = a.saveDrained(slices.Sorted(maps.Keys(next)))
	if err == nil {
		a.mu.Lock()
		a.drained = next
		a.mu.Unlock()
	}
	a.drainMu.Unlock()
	if err != nil {
		return err
	}
	a.log.Info("backend drain changed", "backend", key, "drained", drained)
	// The drain set is saved and in force; a failed reconcile is retried
	// on the next trigger, as any other.
	_ = a.reconcileNow(ctx, "drain")
	return nil
}

// drainedState is the form of drainedFile.
type drainedState struct {
	Version int      `json:"version"`
	Drained []string `json:"drained"`
}

func (a *Agent) saveDrained(keys []string) error {
	if a.opts.StateDir == "" {
		return nil
	}
	data, err := json.Marshal(drainedState{Version: 1, Drained: keys})
	if err != nil {
		return err
	}
	path := filepath.Join(a.opts.StateDir, drainedFile)
	if err := statefile.Write(path, data, statefile.Options{}); err != nil {
		return fmt.Errorf("save drained backends: %w", err)
	}
	return nil
}

// loadDrained restores the drained set. A file that does not parse is moved
// aside by statefile.Read and the agent starts with nothing drained.
func (a *Agent) loadDrained() error {
	if a.opts.StateDir == "" {
		return nil
	}
	var st drainedState
	_, err := statefile.Read(filepath.Join(a.opts.StateDir, drainedFile), a.log, func(data []byte) error {
		if err := json.Unmarshal(data, &st); err != nil {
			return fmt.Errorf("%w: drained backends: %w", statefile.ErrCorrupt, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("load drained backends: %w", err)
	}
	a.mu.Lock()
	for _, k := range st.Drained {
		a.drained[k] = true
	}
	a.mu.Unlock()
	return nil
}

// Backends is GET /api/backends.
func (a *Agent) Backends() ([]api.BackendView, error) {
	counters, err := a.Counters()
	if err != nil {
		return nil, err
	}
	return a.backendViews(counters), nil
}

// Metrics is the latest telemetry snapshot (GET /api/metrics). Before the
// first tick it reads the counters now (totals, no rates yet), so that a
// client never sees an empty snapshot with "vips": null.
func (a *Agent) Metrics() api.MetricsView {
	a.mu.Lock()
	mv := a.lastMetrics
	a.mu.Unlock()
	if mv.At.IsZero() {
		if cur, err := a.Counters(); err == nil {
			return api.RatesBetween(snapshot.Counters{}, cur)
		}
	}
	return mv
}

// Flows is a conntrack sample with the real's address.
func (a *Agent) Flows(limit int) ([]api.FlowView, error) {
	flows, err := a.dp.Flows(limit)
	if err != nil {
		return nil, err
	}
	reals, err := a.dp.Reals()
	if err != nil {
		return nil, err
	}
	out := make([]api.FlowView, 0, len(flows))
	for _, f := range flows {
		out = append(out, api.FlowView{
			Client:   netip.AddrPortFrom(f.Src, f.SrcPort).String(),
			VIP:      netip.AddrPortFrom(f.Dst, f.DstPort).String(),
			Protocol: f.Proto.String(), RealID: f.RealID, Real: reals[f.RealID].Addr.String(),
			IdleMs: f.Idle.Milliseconds(),
		})
	}
	return out, nil
}
