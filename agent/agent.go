// Package agent wires VeloFlux together: the configuration file is the
// desired state, the health checker turns backends up and down, and the
// reconciler writes the difference into the XDP data plane. It owns the
// agent's lifecycle: start over whatever a previous agent left pinned,
// reload on demand, and stop without taking the data path down.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/billing"
	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/health"
	"github.com/veloflux/veloflux/agent/insights"
	"github.com/veloflux/veloflux/agent/metrics"
	"github.com/veloflux/veloflux/agent/proxy"
	"github.com/veloflux/veloflux/agent/reconcile"
	"github.com/veloflux/veloflux/agent/snapshot"
	"github.com/veloflux/veloflux/agent/web"
)

// Options are the agent's command-line settings.
type Options struct {
	ConfigPath string
	PinPath    string
	StateDir   string
	Version    string
	Logger     *slog.Logger
}

// resyncEvery bounds how long the maps can drift from the desired state
// without any event (a MAC that changed, a map written by hand).
const resyncEvery = 30 * time.Second

// eventSampleEvery: one sampled drop event per this many drops of a reason
// on a CPU, so a flood of bad packets cannot flood the ring buffer reader.
const eventSampleEvery = 8

// Agent runs the control plane of one balancer.
type Agent struct {
	opts    Options
	log     *slog.Logger
	started time.Time

	dp      *dataplane.Dataplane
	checker *health.Checker
	rec     *reconcile.Reconciler

	hub         *api.Hub
	api         *api.Server
	apiSlot     *httpSlot // the API's listener, movable by a reload
	metricsSlot *httpSlot // the metrics listener, movable by a reload
	metrics     *metrics.Metrics
	// proxy is set once startProxy has built it (nil unless
	// proxy.enabled); the API and telemetry goroutines already run then.
	proxy     atomic.Pointer[proxy.Proxy]
	proxyDone chan struct{} // closed when the proxy has drained
	analyzer  *insights.Analyzer
	ledger    *billing.Ledger
	// usageSubjects maps an L7 pool's name to its billing subject
	// ("pool:" + name), made once rather than on every request.
	usageSubjects sync.Map
	security      *api.SecurityStats
	// bgp announces the VIPs to the routers (a speaker runs only while
	// the configuration has a bgp section).
	bgp         *announcer
	nodeDrained atomic.Bool // the whole node withdraws its VIPs

	writeMu sync.Mutex // serializes configuration changes (API, SIGHUP)
	drainMu sync.Mutex // serializes drain changes with their save

	mu              sync.Mutex
	cfg             *config.Config
	generation      uint64
	drained         map[string]bool
	lastResult      reconcile.Result
	lastErr         error
	lastReconcileAt time.Time
	lastMetrics     api.MetricsView
	lastCounters    snapshot.Counters  // the telemetry tick's read, reused by new clients
	insights        []insights.Insight // the most recent, for new ai clients

	kick chan struct{} // asks the loop for a reconcile
}

// New loads and validates the configuration. It touches nothing else, so a
// bad file fails before the data plane is disturbed.
func New(opts Options) (*Agent, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	cfg, err := config.Load(opts.ConfigPath)
	if err != nil {
		return nil, err
	}
	return &Agent{
		opts:    opts,
		log:     opts.Logger,
		cfg:     cfg,
		drained: map[string]bool{},
		kick:    make(chan struct{}, 1),
	}, nil
}

// Run starts (or adopts) the data plane and serves until ctx ends. On return
// the XDP links and maps stay pinned, so forwarding goes on without an agent.
func (a *Agent) Run(ctx context.Context) error {
	a.started = time.Now()
	if a.opts.StateDir != "" {
		if err := os.MkdirAll(a.opts.StateDir, 0o700); err != nil {
			return fmt.Errorf("create state directory %s: %w", a.opts.StateDir, err)
		}
	}
	cfg := a.config()
	dp, err := dataplane.Load(dataplane.Options{
		PinPath:       a.opts.PinPath,
		RingSize:      uint32(cfg.Dataplane.RingSize),
		ConntrackSize: uint32(cfg.Dataplane.ConntrackSize),
		NewFlowTable:  uint32(cfg.Dataplane.NewFlowLimit.TableSize),
		NATTableSize:  uint32(cfg.Dataplane.NAT.TableSize),
	})
	if err != nil {
		return err
	}
	if replaced := dp.ReplacedPins(); len(replaced) > 0 {
		a.log.Warn("replaced pinned maps an older version laid out differently; their counters start from zero",
			"maps", replaced, "pin_path", a.opts.PinPath)
	}
	if moved, dropped := dp.MovedFlows4(); moved+dropped > 0 {
		a.log.Info("moved the IPv4 flows of the older conntrack layout into its table of sets",
			"flows", moved, "did_not_fit", dropped, "pin_path", a.opts.PinPath)
	}
	a.dp = dp
	defer func() {
		if err := dp.Close(); err != nil {
			a.log.Error("close data plane", "err", err)
		}
	}()
	if err := dp.SetSettings(settingsFrom(cfg)); err != nil {
		return err
	}

	if a.rec, err = reconcile.New(dp, dsrNeighbors{a}, reconcile.Options{}); err != nil {
		return err
	}

	if err := a.loadDrained(); err != nil {
		return err
	}
	if err := a.loadNodeDrained(); err != nil {
		return err
	}
	a.metrics = metrics.New(metrics.Options{
		Source: a, Version: a.opts.Version, Health: a.healthViews,
		WSClients: func() map[string]int { return a.hub.Clients() },
		XDP:       a.xdpAttachments,
		BGP:       a.bgpMetrics, Rings: a.ringMetrics,
		NAT: a.natMetrics,
	})
	a.checker = health.New(a.log.With("component", "health"),
		health.WithObserver(func(pool, key string, d time.Duration, ok bool) {
			a.metrics.ObserveHealthCheck(pool, key, d, ok)
		}))
	seed, err := a.inheritedVerdicts(cfg)
	if err != nil {
		return err
	}
	a.checker.Seed(seed)
	if err := a.applyHealthTargets(cfg); err != nil {
		return err
	}
	events, unsubscribe := a.checker.Subscribe(256)
	defer unsubscribe()
	checkerDone := make(chan error, 1)
	checkerCtx, stopChecker := context.WithCancel(context.WithoutCancel(ctx))
	go func() { checkerDone <- a.checker.Run(checkerCtx) }()
	defer func() { stopChecker(); <-checkerDone }()

	// Fill the maps before attaching, so a fresh program never sees an empty
	// VIP table; over adopted maps this is a no-op for unchanged state.
	a.reconcileNow(ctx, "start")
	if err := a.syncAttachments(cfg); err != nil {
		return err
	}
	a.setGeneration(1)
	if err := a.startBGP(ctx, cfg, len(seed) > 0); err != nil {
		return err
	}
	defer a.bgp.stop(context.WithoutCancel(ctx))

	if err := a.startServices(ctx, cfg); err != nil {
		return err
	}
	if err := a.startProxy(ctx, cfg); err != nil {
		return err
	}

	links := make(chan linkChange, 16)
	go a.watchLinks(ctx, links)
	linkState := map[string]linkChange{}

	progID, _ := dp.ProgramID()
	a.log.Info("agent running", "version", a.opts.Version, "node", cfg.Node.Name,
		"interfaces", cfg.Dataplane.Interfaces, "xdp_mode", cfg.Dataplane.XDPMode,
		"program_id", progID, "vips", len(cfg.VIPs), "pools", len(cfg.Pools))

	resync := time.NewTicker(resyncEvery)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			a.waitProxy()
			a.log.Info("agent stopping; the data path stays attached and pinned")
			return nil
		case _, ok := <-events: // the checker logs each transition itself
			if !ok {
				return errors.New("health checker stopped unexpectedly")
			}
			a.drainEvents(events)
			a.reconcileNow(ctx, "health")
		case <-a.kick:
			a.reconcileNow(ctx, "request")
		case lc := <-links:
			a.onLinkChange(ctx, linkState, lc)
			// XDP coming off or on an interface is a link change too.
			a.announce(ctx)
		case <-resync.C:
			a.reconcileNow(ctx, "periodic")
		}
	}
}

// drainEvents folds a burst of health events into one reconcile.
func (a *Agent) drainEvents(events <-chan health.Event) {
	for {
		select {
		case _, ok := <-events:
			if !ok {
				return
			}
		default:
			return
		}
	}
}

// Kick asks for a reconcile soon, coalescing with one already pending.
func (a *Agent) Kick() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// startServices starts what serves and streams while the agent runs: the
// API and WebSocket hub on :9090, Prometheus on :8080, and the telemetry
// feeding the channels. They stop with ctx.
func (a *Agent) startServices(ctx context.Context, cfg *config.Config) error {
	token, err := api.LoadOrCreateToken(cfg.API.TokenFile, a.log)
	if err != nil {
		return err
	}
	a.security = api.NewSecurityStats(time.Now())
	a.analyzer = insights.New(insights.Config{})
	if a.opts.StateDir != "" {
		if a.ledger, err = billing.Open(filepath.Join(a.opts.StateDir, "billing.json"), time.Now(), a.log); err != nil {
			return err
		}
		go func() {
			report := func(err error) { a.log.Error("save billing ledger", "err", err) }
			if err := a.ledger.Run(context.WithoutCancel(ctx), time.Minute, report); err != nil {
				report(err)
			}
		}()
	}
	a.hub = api.NewHub(api.HubOptions{AllowedOrigins: cfg.API.AllowedOrigins, OnConnect: a.onConnect,
		Logger: a.log.With("component", "websocket")})
	a.api = api.New(api.Options{Controller: a, Hub: a.hub, Token: token, ProtectReads: cfg.API.ProtectReads,
		Version: a.opts.Version, Logger: a.log.With("component", "api"), SecurityEvents: a.onAuthFailure,
		Pages: web.Handler()})
	a.apiSlot = newHTTPSlot("API", "api.listen", a.api.Handler(), a.log.With("component", "api"))
	a.metricsSlot = newHTTPSlot("metrics", "metrics.listen", a.metrics.Handler(), a.log.With("component", "metrics"))

	healthEvents, unsubscribe := a.checker.Subscribe(256)
	go func() { defer unsubscribe(); a.forwardHealth(ctx, healthEvents) }()
	go a.forwardDropEvents(ctx)
	go a.telemetry(ctx)
	go func() {
		<-ctx.Done()
		a.hub.Close()
		a.apiSlot.close()
		a.api.Close()
		a.metricsSlot.close()
	}()
	// A listener that cannot bind at start is logged, not fatal: the data
	// path matters more than the API. A reload binds it again.
	for _, bind := range []struct {
		slot *httpSlot
		addr string
	}{{a.apiSlot, cfg.API.Listen}, {a.metricsSlot, cfg.Metrics.Listen}} {
		change, err := bind.slot.prepare(bind.addr)
		if err != nil {
			a.log.Error("listener not started", "err", err)
			continue
		}
		change.commit()
	}
	return nil
}

func (a *Agent) config() *config.Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg
}

func (a *Agent) setGeneration(g uint64) {
	a.mu.Lock()
	a.generation = g
	a.mu.Unlock()
}

// inheritedVerdicts makes a restarted agent start from what the pinned data
// plane says: a backend whose real is live there starts healthy, so a restart
// never empties a ring before a check has run.
func (a *Agent) inheritedVerdicts(cfg *config.Config) (map[string]bool, error) {
	reals, err := a.dp.Reals()
	if err != nil {
		return nil, err
	}
	live := map[netip.Addr]bool{}
	for _, r := range reals {
		if r.State != dataplane.RealDown {
			live[r.Addr] = true
		}
	}
	seed := map[string]bool{}
	for _, p := range cfg.Pools {
		for _, b := range p.Backends {
			if addr, err := config.ParseAddr(b.Address); err == nil && live[addr] {
				seed[b.Key(p.Name)] = true
			}
		}
	}
	if len(seed) > 0 {
		a.log.Info("adopted a running data plane", "live_backends", len(seed), "reals", len(reals))
	}
	return seed, nil
}

func (a *Agent) applyHealthTargets(cfg *config.Config) error {
	targets, err := health.TargetsFromPools(cfg.Pools)
	if err != nil {
		return err
	}
	return a.checker.Set(targets)
}

func (a *Agent) desired() reconcile.Desired {
	a.mu.Lock()
	defer a.mu.Unlock()
	d := reconcile.Desired{Config: a.cfg, Healthy: a.checker.Healthy, Drained: maps.Clone(a.drained)}
	if ifaces := a.cfg.Dataplane.Interfaces; len(ifaces) > 0 {
		first := ifaces[0]
		d.InterfaceAddress = func(v4 bool) (netip.Addr, error) { return primaryAddress(first, v4) }
	}
	return d
}

// reconcileNow writes the difference between the desired state and the
// maps, reading the desired state only once no other reconcile runs. A
// failure is logged, retried on the next trigger, and returned.
func (a *Agent) reconcileNow(ctx context.Context, why string) error {
	res, err := a.rec.ReconcileLatest(ctx, a.desired)
	end := time.Now()
	a.mu.Lock()
	a.lastResult, a.lastErr, a.lastReconcileAt = res, err, end
	a.mu.Unlock()
	a.metrics.ObserveReconcile(err == nil, len(res.Warnings), end)
	switch {
	case err != nil:
		a.log.Error("reconcile failed; will retry", "trigger", why, "err", err)
	case res.Changed():
		a.log.Info("reconciled", "trigger", why, "result", res.String(), "duration", res.Duration)
	}
	for _, w := range res.Warnings {
		a.log.Warn("reconcile warning", "trigger", why, "warning", w)
	}
	// A ring that lost its last live backend is withdrawn right away.
	a.announce(ctx)
	return err
}

// startBGP starts the speaker when cfg has a bgp section. adopted says
// that the data path kept forwarding since a previous agent, which the
// speaker tells the routers (graceful restart) so they keep its routes.
func (a *Agent) startBGP(ctx context.Context, cfg *config.Config, adopted bool) error {
	a.bgp = &announcer{log: a.log.With("component", "bgp"), onChange: a.publishStatus, restarting: adopted,
		announced: map[netip.Addr]bool{}}
	plan, err := resolveBGP(cfg)
	if err != nil {
		return err
	}
	if _, err := a.bgp.reconfigure(ctx, plan); err != nil {
		return err
	}
	a.announce(ctx)
	return nil
}

// syncAttachments attaches to every configured interface (swapping the
// program onto links a previous agent pinned) and detaches from interfaces
// no longer configured.
func (a *Agent) syncAttachments(cfg *config.Config) error {
	if _, err := a.attachAll(cfg); err != nil {
		return err
	}
	return a.detachUnconfigured(cfg)
}

// attachAll attaches to every interface of cfg in its mode. It is all or
// nothing: when one interface fails (it does not exist, or refuses the
// mode), the interfaces it newly attached are detached again and those it
// switched to another mode are put back, and the error names every
// failure. It returns the interfaces it newly attached.
func (a *Agent) attachAll(cfg *config.Config) ([]string, error) {
	mode := xdpMode(cfg.Dataplane.XDPMode)
	before := a.dp.Attached()
	var added []string
	var errs []error
	for _, ifname := range cfg.Dataplane.Interfaces {
		if err := a.dp.Attach(ifname, mode); err != nil {
			errs = append(errs, err)
			continue
		}
		if !slices.Contains(before, ifname) {
			added = append(added, ifname)
		}
	}
	if len(errs) == 0 {
		return added, nil
	}
	a.undoAttach(a.config(), added)
	return nil, errors.Join(errs...)
}

// undoAttach detaches the interfaces added and re-attaches those of prev
// in prev's mode, after a change that did not go through.
func (a *Agent) undoAttach(prev *config.Config, added []string) {
	for _, ifname := range added {
		if err := a.dp.Detach(ifname); err != nil {
			a.log.Error("roll back: detach", "interface", ifname, "err", err)
		}
	}
	mode := xdpMode(prev.Dataplane.XDPMode)
	for _, ifname := range prev.Dataplane.Interfaces {
		if err := a.dp.Attach(ifname, mode); err != nil {
			a.log.Error("roll back: re-attach", "interface", ifname, "mode", mode, "err", err)
		}
	}
}

// detachUnconfigured detaches from pinned interfaces cfg does not list.
func (a *Agent) detachUnconfigured(cfg *config.Config) error {
	pinned, err := a.dp.AdoptPinnedLinks()
	if err != nil {
		return err
	}
	var errs []error
	for _, ifname := range pinned {
		if !slices.Contains(cfg.Dataplane.Interfaces, ifname) {
			a.log.Info("detaching from an interface no longer configured", "interface", ifname)
			if err := a.dp.Detach(ifname); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// settingsFrom maps the configuration onto the data path's global knobs.
func settingsFrom(cfg *config.Config) dataplane.Settings {
	d := cfg.Dataplane
	s := dataplane.Settings{
		UseFIB:           d.Nexthop == config.NexthopFIB,
		GUEPort:          uint16(d.GUEPort), // validated: 1..65535
		ICMPTooBig:       d.ICMPTooBig,
		TCPIdleTimeoutNs: uint64(d.TCPIdleTimeout.Std()),
		UDPIdleTimeoutNs: uint64(d.UDPIdleTimeout.Std()),
		EventSampleEvery: eventSampleEvery,
		NAT: dataplane.NATSettings{
			PortMin: uint16(d.NAT.PortMin), PortMax: uint16(d.NAT.PortMax),
			ClosingTimeoutNs: uint64(d.NAT.ClosingTimeout.Std()),
		},
	}
	if l := d.NewFlowLimit; l.RatePerSecond > 0 {
		s.NewFlowLimit = dataplane.NewFlowLimit{RatePerSecond: uint32(l.RatePerSecond), Burst: uint32(l.Burst)}
	}
	// The config was validated, so these parse.
	if d.GatewayMAC != "" {
		s.GatewayMAC, _ = net.ParseMAC(d.GatewayMAC)
	}
	if d.EncapSourceV4 != "" {
		s.EncapSource4, _ = netip.ParseAddr(d.EncapSourceV4)
	}
	if d.EncapSourceV6 != "" {
		s.EncapSource6, _ = netip.ParseAddr(d.EncapSourceV6)
	}
	return s
}

// dsrNeighbors resolves the MACs of dsr reals in the neighbour table of the
// first interface of the configuration in force, so that a reload that
// changes the interfaces moves resolution with them.
type dsrNeighbors struct{ a *Agent }

func (n dsrNeighbors) Resolve(ctx context.Context, addr netip.Addr) (net.HardwareAddr, error) {
	ifaces := n.a.config().Dataplane.Interfaces
	if len(ifaces) == 0 {
		return nil, fmt.Errorf("resolve MAC of %s: no interface is configured", addr)
	}
	return (&reconcile.NeighborResolver{Interface: ifaces[0]}).Resolve(ctx, addr)
}

// xdpMode maps the configuration's XDP mode onto the data plane's; the two
// types spell the modes alike today, but a cast would let one change
// silently break the other.
func xdpMode(m config.XDPMode) dataplane.XDPMode {
	switch m {
	case config.XDPModeNative:
		return dataplane.XDPNative
	case config.XDPModeGeneric:
		return dataplane.XDPGeneric
	}
	return dataplane.XDPAuto
}
