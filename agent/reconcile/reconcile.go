// Package reconcile keeps the XDP data plane's maps in step with the agent's
// desired state. From the configuration model, the health checker's verdicts
// and the set of drained backends it computes the reals, Maglev rings, VIPs
// and denylist the data path should hold, compares them with what is
// installed, and writes only the difference.
//
// Writing only the difference matters for more than speed: a ring swap moves
// flows that have no conntrack entry yet, a rewritten real briefly races with
// the packets using it, and a reset statistic is lost for good. So a
// reconcile with nothing to change makes no write at all, and a ring is
// rebuilt only for a VIP whose live backends or weights changed.
//
// # Identities
//
// The data path names reals and VIPs by small integer ids: conntrack
// remembers the real id of every flow, and rings hold real ids. A real is
// identified by its address alone (dsr and ipip forward to an address; the
// port is the application's business) and keeps its id for as long as some
// pool lists that address. A VIP is identified by (address, port, protocol).
// On the first reconcile the ids already present in the data plane are
// adopted, so a restarted agent keeps every flow where it was. New objects
// take the lowest free id from 1 up, and their statistics are reset first so
// that they never inherit a predecessor's counters.
//
// # Order of writes
//
// The data path follows references VIP -> ring -> real. Writes therefore go
// bottom up (reals, then rings, then VIPs) and deletions top down (VIPs, then
// rings, then reals), so that no packet ever finds a reference to something
// that is not there yet or no longer there.
//
// # Memory and failures
//
// The Reconciler mirrors what is installed, read from the data plane on the
// first reconcile and then updated after each successful write, so a no-op
// reconcile costs no map reads. Rings are too large to read back each time,
// so for each VIP id it remembers a fingerprint of the backend set its ring
// was built from. A failed write stops the reconcile and is not recorded, so
// the next reconcile sees the difference again and retries it; after any
// failure the mirror is also re-read from the data plane.
package reconcile

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/maglev"
)

// Dataplane is the part of the data plane the reconciler writes through. It
// is satisfied by *dataplane.Dataplane; tests use an in-memory fake.
type Dataplane interface {
	SetVIP(v dataplane.VIP, meta dataplane.VIPMeta) error
	DeleteVIP(v dataplane.VIP) error
	VIPs() (map[dataplane.VIP]dataplane.VIPMeta, error)

	SetReal(id uint32, r dataplane.Real) error
	DeleteReal(id uint32) error
	Reals() (map[uint32]dataplane.Real, error)

	// SetRings installs rings by VIP id, all in one update of the outer
	// map; each ring is swapped whole.
	SetRings(rings map[uint32][]uint32) error
	Ring(vipID uint32) ([]uint32, error)
	DeleteRing(vipID uint32) error

	// SetNATRealPort, DeleteNATRealPort and NATRealPorts keep the port a
	// new flow of a nat VIP reaches each of its reals on.
	SetNATRealPort(k dataplane.NATRealKey, port uint16) error
	DeleteNATRealPort(k dataplane.NATRealKey) error
	NATRealPorts() (map[dataplane.NATRealKey]uint16, error)

	ResetVIPStats(vipID uint32) error
	ResetRealStats(realID uint32) error

	AddDeny(p netip.Prefix) error
	RemoveDeny(p netip.Prefix) error
	DenyList() ([]netip.Prefix, error)

	RingSize() uint32
	MaxVIPs() uint32
	MaxReals() uint32
}

// The real data plane must keep satisfying the interface the reconciler is
// written against; this fails the build, not a test, when either drifts.
var _ Dataplane = (*dataplane.Dataplane)(nil)

// MACResolver finds the link-layer address of a dsr real on the segment the
// balancer transmits on. Resolve must honour ctx's deadline.
type MACResolver interface {
	Resolve(ctx context.Context, addr netip.Addr) (net.HardwareAddr, error)
}

// Desired is the state the data plane should reflect.
type Desired struct {
	// Config is the validated configuration model. Only Pools, VIPs and
	// Security.Denylist are read.
	Config *config.Config
	// Healthy returns the health verdict of a backend by its config.Backend.Key,
	// and whether a verdict exists at all. A backend without a verdict
	// counts as unhealthy, unless its pool's health check type is "none".
	// A nil Healthy means no verdict is known for any backend. It is
	// called during Reconcile, with the Reconciler's lock held, so it must
	// not call back into the Reconciler.
	Healthy func(key string) (healthy, known bool)
	// Drained holds the config.Backend.Keys of backends that take no new flows but
	// keep their existing ones.
	Drained map[string]bool
	// InterfaceAddress gives the primary address of a family (IPv4 when v4)
	// on the balancer's interface: the SNAT address of a nat VIP that
	// names none. Nil when the caller has none to offer.
	InterfaceAddress func(v4 bool) (netip.Addr, error)
}

// Result summarizes one reconcile.
type Result struct {
	VIPsAdded, VIPsUpdated, VIPsRemoved    int
	RealsAdded, RealsUpdated, RealsRemoved int
	RingsRebuilt                           int
	DenyAdded, DenyRemoved                 int
	// Warnings are problems that did not stop the reconcile, such as a
	// dsr real whose MAC could not be resolved.
	Warnings []string
	// Duration is the time spent reconciling, not waiting for another
	// reconcile to finish.
	Duration time.Duration
}

// Changed reports whether the reconcile wrote anything.
func (r Result) Changed() bool {
	return r.VIPsAdded+r.VIPsUpdated+r.VIPsRemoved+
		r.RealsAdded+r.RealsUpdated+r.RealsRemoved+
		r.RingsRebuilt+r.DenyAdded+r.DenyRemoved > 0
}

func (r Result) String() string {
	return fmt.Sprintf("vips +%d ~%d -%d, reals +%d ~%d -%d, rings rebuilt %d, deny +%d -%d, %d warnings, in %s",
		r.VIPsAdded, r.VIPsUpdated, r.VIPsRemoved,
		r.RealsAdded, r.RealsUpdated, r.RealsRemoved,
		r.RingsRebuilt, r.DenyAdded, r.DenyRemoved, len(r.Warnings), r.Duration)
}

// Options tune MAC resolution. The zero value is usable.
type Options struct {
	// MACTimeout bounds the resolution of one real's MAC; default 2s.
	MACTimeout time.Duration
	// MACRefresh is how long a resolved MAC is trusted before it is
	// resolved again, so that a backend whose NIC was replaced is found
	// again without a restart; default 1m.
	MACRefresh time.Duration
	// MACParallel is how many MACs are resolved at once; default 16. An
	// unresolvable real costs a whole MACTimeout, so resolving one by one
	// would let a few dead backends stall a reconcile for long.
	MACParallel int
}

func (o *Options) applyDefaults() {
	if o.MACTimeout <= 0 {
		o.MACTimeout = 2 * time.Second
	}
	if o.MACRefresh <= 0 {
		o.MACRefresh = time.Minute
	}
	if o.MACParallel <= 0 {
		o.MACParallel = 16
	}
}

// Reconciler writes desired state into a data plane. It is safe for
// concurrent use; reconciles are serialized.
type Reconciler struct {
	dp       Dataplane
	macs     MACResolver
	opts     Options
	ringSize uint32
	maxVIPs  uint32
	maxReals uint32
	now      func() time.Time // replaced in tests

	mu sync.Mutex
	// synced is false until the mirror below has been read from the data
	// plane, and again after a failed write, whose outcome is unknown.
	synced bool
	vips   map[dataplane.VIP]dataplane.VIPMeta
	reals  map[uint32]dataplane.Real
	deny   map[netip.Prefix]bool
	// natPorts is each real's port under each nat VIP.
	natPorts map[dataplane.NATRealKey]uint16
	// rings maps a VIP id to the fingerprint of the backend set its
	// installed ring was built from. An id is absent when that is unknown
	// (never seen, or its last write failed); the ring is then read back
	// and compared before deciding to write.
	rings map[uint32]installedRing
	// resolved remembers when each dsr real's MAC was last resolved.
	resolved map[netip.Addr]macRecord

	// installed is a copy of the mirror's VIPs and reals as of the last
	// reconcile that succeeded; nil before one and after a failed one.
	installed atomic.Pointer[Installed]
}

// Installed is what the data plane holds, as the Reconciler wrote it.
type Installed struct {
	VIPs  map[dataplane.VIP]dataplane.VIPMeta
	Reals map[uint32]dataplane.Real
	// Rings describes the ring of every VIP, by VIP id.
	Rings map[uint32]RingInfo
}

// RingInfo describes one installed Maglev ring.
type RingInfo struct {
	// Backends is how many live backends the ring spreads flows over;
	// 0 means every flow to the VIP is dropped.
	Backends int
	// Fingerprint is the maglev.Fingerprint of the installed table.
	Fingerprint uint64
}

// installedRing is what the mirror remembers of an installed ring.
type installedRing struct {
	// backends identifies the backend set the ring was built from (the
	// ring plan's fp), so that an unchanged ring is neither built nor read.
	backends string
	info     RingInfo
}

// Installed returns the VIPs and reals as of the last successful reconcile,
// without reading the maps and without waiting for a reconcile in progress.
// Reading the reals back costs a lookup per slot of the array map (some
// 30 ms at 16,384 slots), too much for every telemetry tick and scrape. It
// returns nil before the first successful reconcile and after a failed one,
// when the mirror is not trusted; callers then read the data plane.
// The maps are shared: callers must not modify them.
func (r *Reconciler) Installed() *Installed { return r.installed.Load() }

type macRecord struct {
	mac net.HardwareAddr
	at  time.Time
}

// New returns a Reconciler for dp. macs resolves the MACs of dsr reals; it
// may be nil when no VIP uses dsr (dsr reals are then written without a MAC,
// with a warning).
func New(dp Dataplane, macs MACResolver, opts Options) (*Reconciler, error) {
	if dp == nil {
		return nil, fmt.Errorf("reconcile: nil data plane")
	}
	opts.applyDefaults()
	r := &Reconciler{
		dp:       dp,
		macs:     macs,
		opts:     opts,
		ringSize: dp.RingSize(),
		maxVIPs:  dp.MaxVIPs(),
		maxReals: dp.MaxReals(),
		now:      time.Now,
		rings:    map[uint32]installedRing{},
		resolved: map[netip.Addr]macRecord{},
	}
	if !maglev.IsPrime(r.ringSize) {
		return nil, fmt.Errorf("reconcile: data plane ring size %d is not prime", r.ringSize)
	}
	// Id 0 is reserved for both (0 means "no real" in a ring, and is kept
	// unused for VIPs so a zero VIPMeta never aliases a live VIP), so one
	// usable id needs a size of at least 2.
	if r.maxVIPs < 2 || r.maxReals < 2 {
		return nil, fmt.Errorf("reconcile: data plane has room for %d VIPs and %d reals, need at least 2 of each", r.maxVIPs, r.maxReals)
	}
	return r, nil
}

// Resync makes the next reconcile read the installed state back from the
// data plane, including every ring, instead of trusting what it remembers.
// Call it when something other than this Reconciler may have written the
// maps, for example after the data plane was reloaded.
func (r *Reconciler) Resync() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.synced = false
	clear(r.rings)
	clear(r.resolved)
}

// Reconcile brings the data plane to the desired state and reports what it
// changed. On a data plane error it stops at the failed write and returns an
// error naming the object; writes done before it stay (the order of writes
// keeps every intermediate state consistent), and the next reconcile retries
// the rest. An invalid Desired is rejected before anything is written.
func (r *Reconciler) Reconcile(ctx context.Context, d Desired) (Result, error) {
	return r.ReconcileLatest(ctx, func() Desired { return d })
}

// ReconcileLatest is Reconcile with the desired state read by desired once
// this reconcile holds the lock, not before it waits for one in progress.
// Callers that reconcile after changing shared state (a drain, a new
// configuration) use it so that, however their calls interleave, the
// reconcile that runs last installs the newest state: a snapshot taken
// before waiting could be older than the one a concurrent caller already
// installed, and would undo it until the next trigger.
func (r *Reconciler) ReconcileLatest(ctx context.Context, desired func() Desired) (Result, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	start := time.Now()
	var res Result
	err := r.reconcile(ctx, desired(), &res)
	res.Duration = time.Since(start)
	if err == nil && r.synced {
		rings := make(map[uint32]RingInfo, len(r.rings))
		for id, ring := range r.rings {
			rings[id] = ring.info
		}
		r.installed.Store(&Installed{VIPs: maps.Clone(r.vips), Reals: maps.Clone(r.reals), Rings: rings})
	} else {
		r.installed.Store(nil)
	}
	return res, err
}

func (r *Reconciler) reconcile(ctx context.Context, d Desired, res *Result) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	m, err := buildModel(d)
	if err != nil {
		return err
	}
	if !r.synced {
		if err := r.load(); err != nil {
			return err
		}
	}
	p, err := r.plan(m)
	if err != nil {
		return err
	}
	r.resolveMACs(ctx, p, res)
	// A context that ended during resolution would otherwise have every
	// pending resolution fail and new dsr reals written without a MAC.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	if err := r.apply(p, res); err != nil {
		// The failed write may or may not have reached the kernel.
		r.synced = false
		return err
	}
	return nil
}

// load reads the installed VIPs, reals, nat real ports and denylist into
// the mirror.
func (r *Reconciler) load() error {
	vips, err := r.dp.VIPs()
	if err != nil {
		return fmt.Errorf("reconcile: read installed VIPs: %w", err)
	}
	reals, err := r.dp.Reals()
	if err != nil {
		return fmt.Errorf("reconcile: read installed reals: %w", err)
	}
	deny, err := r.dp.DenyList()
	if err != nil {
		return fmt.Errorf("reconcile: read installed denylist: %w", err)
	}
	natPorts, err := r.dp.NATRealPorts()
	if err != nil {
		return fmt.Errorf("reconcile: read installed nat real ports: %w", err)
	}
	r.natPorts = natPorts
	r.vips = make(map[dataplane.VIP]dataplane.VIPMeta, len(vips))
	for v, meta := range vips {
		r.vips[v] = meta
	}
	r.reals = make(map[uint32]dataplane.Real, len(reals))
	for id, real := range reals {
		r.reals[id] = real
	}
	r.deny = make(map[netip.Prefix]bool, len(deny))
	for _, p := range deny {
		r.deny[p.Masked()] = true
	}
	r.synced = true
	return nil
}
