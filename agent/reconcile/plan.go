package reconcile

import (
	"cmp"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/maglev"
)

// plan is the model with ids assigned and compared with the mirror of the
// installed state: every write the reconcile will do, decided before the
// first one, so that running out of ids or an impossible ring is reported
// with nothing written.
type plan struct {
	reals []*realPlan // wanted, in address order
	vips  []*vipPlan  // wanted, in configuration order
	rings map[string]*ringPlan

	staleVIPs  []dataplane.VIP
	staleRings []uint32
	staleReals []uint32
	denyAdd    []netip.Prefix
	denyRemove []netip.Prefix

	// natPortsSet are the nat real ports to write (new or changed), in key
	// order; natPortsStale those installed that no nat VIP wants any more.
	natPortsSet   []natPort
	natPortsStale []dataplane.NATRealKey
}

// natPort is one real's port under one nat VIP.
type natPort struct {
	key  dataplane.NATRealKey
	port uint16
}

type realPlan struct {
	*realModel
	id    uint32
	isNew bool // id allocated by this reconcile
	// installed is what the data plane holds under id, if has.
	installed dataplane.Real
	has       bool
	// want is what it should hold; resolveMACs fills in the MAC.
	want dataplane.Real
}

type vipPlan struct {
	vipModel
	id            uint32
	newID         bool // id allocated by this reconcile: ring and stats start afresh
	installed     bool
	installedMeta dataplane.VIPMeta
	ring          *ringPlan
}

func (vp *vipPlan) meta() dataplane.VIPMeta {
	return dataplane.VIPMeta{ID: vp.id, Mode: vp.mode, SourceAffinity: vp.affinity, NAT: vp.nat}
}

// ringPlan is the ring of one pool, shared by every VIP on the pool.
type ringPlan struct {
	pool     string
	backends []maglev.Backend
	// fp identifies the backend set (keys, ids, weights). The table is a
	// function of it and the ring size, so equal fingerprints mean equal
	// tables and a ring can be skipped without being built or read.
	fp    string
	table []uint32 // built on first use: a no-op reconcile builds none
	// content is the table's maglev.Fingerprint, computed with the table
	// from addrs, the address of each real id in backends.
	content uint64
	addrs   map[uint32]netip.Addr
	// users counts the VIPs whose ring has not been applied yet; the
	// table is dropped after the last, so that a reconcile touching many
	// pools holds one table at a time rather than all of them.
	users int
}

// idAllocator hands out the lowest free ids of [1, limit) in increasing
// order. Id 0 is never handed out: in a ring it means "no real".
type idAllocator struct {
	next  uint32
	limit uint32
	used  func(uint32) bool
}

func (a *idAllocator) take() (uint32, bool) {
	for a.next < a.limit && a.used(a.next) {
		a.next++
	}
	if a.next >= a.limit {
		return 0, false
	}
	id := a.next
	a.next++
	return id, true
}

func (r *Reconciler) plan(m *model) (*plan, error) {
	p := &plan{rings: map[string]*ringPlan{}}
	realIDs, err := r.planReals(m, p)
	if err != nil {
		return nil, err
	}
	if err := r.planVIPs(m, p, realIDs); err != nil {
		return nil, err
	}
	if err := r.planNATPorts(m, p, realIDs); err != nil {
		return nil, err
	}
	r.planDeny(m, p)
	return p, nil
}

// planReals assigns every wanted real its id: the one it already has in the
// data plane, or the lowest free one. Ids of reals that are going away are
// not free yet: their slots are cleared only at the end of this reconcile,
// after the rings stopped naming them, and become free for the next one.
func (r *Reconciler) planReals(m *model, p *plan) (map[netip.Addr]uint32, error) {
	byAddr := make(map[netip.Addr][]uint32, len(r.reals))
	for id, real := range r.reals {
		byAddr[real.Addr] = append(byAddr[real.Addr], id)
	}

	addrs := make([]netip.Addr, 0, len(m.reals))
	for a := range m.reals {
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, netip.Addr.Compare)

	claimed := make(map[uint32]bool, len(addrs))
	ids := make(map[netip.Addr]uint32, len(addrs))
	p.reals = make([]*realPlan, 0, len(addrs))
	for _, a := range addrs {
		rp := &realPlan{realModel: m.reals[a]}
		// Several ids for one address can only come from someone else's
		// writes; the lowest is kept and the others cleared as stale.
		if have := byAddr[a]; len(have) > 0 {
			rp.id = slices.Min(have)
			rp.installed, rp.has = r.reals[rp.id], true
			claimed[rp.id] = true
			ids[a] = rp.id
		}
		p.reals = append(p.reals, rp)
	}

	alloc := idAllocator{next: 1, limit: r.maxReals, used: func(id uint32) bool {
		_, installed := r.reals[id]
		return installed || claimed[id]
	}}
	for _, rp := range p.reals {
		if rp.has {
			continue
		}
		id, ok := alloc.take()
		if !ok {
			return nil, fmt.Errorf("reconcile: no free real id for %s: %d reals wanted, the data plane has ids 1..%d",
				rp.addr, len(addrs), r.maxReals-1)
		}
		rp.id, rp.isNew = id, true
		claimed[id] = true
		ids[rp.addr] = id
	}
	for _, rp := range p.reals {
		rp.want = dataplane.Real{Addr: rp.addr, State: rp.state()}
	}

	for id := range r.reals {
		if !claimed[id] {
			p.staleReals = append(p.staleReals, id)
		}
	}
	slices.Sort(p.staleReals)
	return ids, nil
}

// planVIPs assigns VIP ids the same way as real ids and works out each VIP's
// ring.
func (r *Reconciler) planVIPs(m *model, p *plan, realIDs map[netip.Addr]uint32) error {
	claimed := make(map[uint32]bool, len(m.vips))
	p.vips = make([]*vipPlan, 0, len(m.vips))
	for _, vm := range m.vips {
		vp := &vipPlan{vipModel: vm}
		vp.installedMeta, vp.installed = r.vips[vm.vip]
		// An installed id is kept unless it is out of range or another
		// VIP already holds it, which only someone else's writes can cause.
		if vp.installed && vp.installedMeta.ID < r.maxVIPs && !claimed[vp.installedMeta.ID] {
			vp.id = vp.installedMeta.ID
			claimed[vp.id] = true
		} else {
			vp.newID = true
		}
		ring, err := r.poolRing(m, p, vm.pool, realIDs)
		if err != nil {
			return fmt.Errorf("reconcile: VIP %s: %w", vm.vip, err)
		}
		vp.ring = ring
		ring.users++
		p.vips = append(p.vips, vp)
	}

	// Ids of installed VIPs stay taken until their deletion at the end.
	used := make(map[uint32]bool, len(r.vips))
	for _, meta := range r.vips {
		used[meta.ID] = true
	}
	alloc := idAllocator{next: 1, limit: r.maxVIPs, used: func(id uint32) bool {
		return used[id] || claimed[id]
	}}
	for _, vp := range p.vips {
		if !vp.newID {
			continue
		}
		id, ok := alloc.take()
		if !ok {
			return fmt.Errorf("reconcile: no free VIP id for %s: %d VIPs wanted, the data plane has ids 1..%d",
				vp.vip, len(p.vips), r.maxVIPs-1)
		}
		vp.id = id
		claimed[id] = true
	}

	wanted := make(map[dataplane.VIP]bool, len(p.vips))
	for _, vp := range p.vips {
		wanted[vp.vip] = true
	}
	for v := range r.vips {
		if !wanted[v] {
			p.staleVIPs = append(p.staleVIPs, v)
		}
	}
	slices.SortFunc(p.staleVIPs, func(a, b dataplane.VIP) int {
		return cmp.Or(cmp.Compare(r.vips[a].ID, r.vips[b].ID), strings.Compare(a.String(), b.String()))
	})
	// Rings to delete: those of VIPs going away, and those this reconciler
	// wrote for an id no VIP ended up using (the VIP write failed).
	for id := range used {
		if !claimed[id] {
			p.staleRings = append(p.staleRings, id)
		}
	}
	for id := range r.rings {
		if !claimed[id] && !used[id] {
			p.staleRings = append(p.staleRings, id)
		}
	}
	slices.Sort(p.staleRings)
	return nil
}

// poolRing returns the ring plan of a pool, computing it on first use.
func (r *Reconciler) poolRing(m *model, p *plan, pool string, realIDs map[netip.Addr]uint32) (*ringPlan, error) {
	if rp := p.rings[pool]; rp != nil {
		return rp, nil
	}
	pm := m.pools[pool]
	// Entries naming the same address (say, ports 80 and 8080) are one
	// real to the data path, so they share one place in the ring with
	// their weights added. The smallest key names it, so the choice does
	// not depend on the order of the configuration.
	type group struct {
		key    string
		weight uint64
	}
	groups := map[netip.Addr]*group{}
	for _, e := range pm.entries {
		if !e.live || e.weight == 0 {
			continue
		}
		g := groups[e.addr]
		if g == nil {
			groups[e.addr] = &group{key: e.key, weight: uint64(e.weight)}
			continue
		}
		g.key = min(g.key, e.key)
		g.weight += uint64(e.weight)
	}
	rp := &ringPlan{pool: pool, backends: make([]maglev.Backend, 0, len(groups)),
		addrs: make(map[uint32]netip.Addr, len(groups))}
	for a, g := range groups {
		rp.addrs[realIDs[a]] = a
		rp.backends = append(rp.backends, maglev.Backend{
			ID:     realIDs[a],
			Key:    g.key,
			Weight: uint32(min(g.weight, math.MaxUint32)),
		})
	}
	if uint64(len(rp.backends)) > uint64(r.ringSize) {
		return nil, fmt.Errorf("pool %q has %d live backends, more than the %d slots of a ring", pool, len(rp.backends), r.ringSize)
	}
	slices.SortFunc(rp.backends, func(a, b maglev.Backend) int { return strings.Compare(a.Key, b.Key) })

	var fp strings.Builder
	for _, b := range rp.backends {
		fp.WriteString(b.Key)
		fp.WriteByte('=')
		fp.WriteString(strconv.FormatUint(uint64(b.ID), 10))
		fp.WriteByte('*')
		fp.WriteString(strconv.FormatUint(uint64(b.Weight), 10))
		fp.WriteByte(';')
	}
	rp.fp = fp.String()
	p.rings[pool] = rp
	return rp, nil
}

func (r *Reconciler) table(rp *ringPlan) ([]uint32, error) {
	if rp.table == nil {
		t, err := maglev.Build(rp.backends, r.ringSize)
		if err != nil {
			return nil, fmt.Errorf("reconcile: build ring of pool %q: %w", rp.pool, err)
		}
		rp.table = t
		rp.content = maglev.Fingerprint(t, func(id uint32) netip.Addr { return rp.addrs[id] })
	}
	return rp.table, nil
}

// installed is what the mirror remembers of a VIP's ring once it holds
// this plan's table; only called after the table was built.
func (rp *ringPlan) installed() installedRing {
	live := 0
	for _, b := range rp.backends {
		if b.Weight > 0 {
			live++
		}
	}
	return installedRing{backends: rp.fp, info: RingInfo{Backends: live, Fingerprint: rp.content}}
}

func (r *Reconciler) planDeny(m *model, p *plan) {
	for pfx := range m.deny {
		if !r.deny[pfx] {
			p.denyAdd = append(p.denyAdd, pfx)
		}
	}
	for pfx := range r.deny {
		if !m.deny[pfx] {
			p.denyRemove = append(p.denyRemove, pfx)
		}
	}
	slices.SortFunc(p.denyAdd, comparePrefix)
	slices.SortFunc(p.denyRemove, comparePrefix)
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// planNATPorts works out the port of every real of every nat VIP, the
// backend's own, and compares it with the mirror. Validation keeps an
// address to one line of a nat VIP's pool, so a real has one port there.
func (r *Reconciler) planNATPorts(m *model, p *plan, realIDs map[netip.Addr]uint32) error {
	want := map[dataplane.NATRealKey]uint16{}
	for _, vp := range p.vips {
		if vp.mode != dataplane.ModeNAT {
			continue
		}
		for _, e := range m.pools[vp.pool].entries {
			k := dataplane.NATRealKey{VIPID: vp.id, RealID: realIDs[e.addr]}
			if old, dup := want[k]; dup && old != e.port {
				return fmt.Errorf("reconcile: VIP %s: backend %s is in pool %q on ports %d and %d; mode nat needs one",
					vp.vip, e.addr, vp.pool, old, e.port)
			}
			want[k] = e.port
		}
	}
	for k, port := range want {
		if installed, ok := r.natPorts[k]; !ok || installed != port {
			p.natPortsSet = append(p.natPortsSet, natPort{key: k, port: port})
		}
	}
	for k := range r.natPorts {
		if _, ok := want[k]; !ok {
			p.natPortsStale = append(p.natPortsStale, k)
		}
	}
	slices.SortFunc(p.natPortsSet, func(a, b natPort) int { return compareNATRealKeys(a.key, b.key) })
	slices.SortFunc(p.natPortsStale, compareNATRealKeys)
	return nil
}

func compareNATRealKeys(a, b dataplane.NATRealKey) int {
	return cmp.Or(cmp.Compare(a.VIPID, b.VIPID), cmp.Compare(a.RealID, b.RealID))
}
