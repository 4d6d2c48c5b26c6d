package reconcile

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// fakeDP is an in-memory Dataplane that records every call, and checks the
// invariants the real maps enforce (id ranges, ring size) plus the one the
// reconciler promises: nothing references what is not there.
type fakeDP struct {
	mu       sync.Mutex
	ringSize uint32
	maxVIPs  uint32
	maxReals uint32

	vips      map[dataplane.VIP]dataplane.VIPMeta
	reals     map[uint32]dataplane.Real
	rings     map[uint32][]uint32
	deny      map[netip.Prefix]bool
	natPorts  map[dataplane.NATRealKey]uint16
	vipStats  map[uint32]uint64
	realStats map[uint32]uint64

	// record enables the call log; shareRings stores rings without
	// copying them (for benchmarks, whose rings would otherwise cost
	// hundreds of megabytes).
	record     bool
	shareRings bool
	calls      []string
	// fail, when set, is asked before every write and makes it fail.
	fail func(call string) error
	// ringReadErr, when set, is what Ring returns.
	ringReadErr error
	// violations lists dangling references seen after a write.
	violations []string
	checkRefs  bool
}

func newFakeDP(ringSize uint32) *fakeDP {
	return &fakeDP{
		ringSize:  ringSize,
		maxVIPs:   64,
		maxReals:  64,
		vips:      map[dataplane.VIP]dataplane.VIPMeta{},
		reals:     map[uint32]dataplane.Real{},
		rings:     map[uint32][]uint32{},
		deny:      map[netip.Prefix]bool{},
		natPorts:  map[dataplane.NATRealKey]uint16{},
		vipStats:  map[uint32]uint64{},
		realStats: map[uint32]uint64{},
		record:    true,
		checkRefs: true,
	}
}

func (f *fakeDP) log(format string, args ...any) error {
	call := fmt.Sprintf(format, args...)
	if f.record {
		f.calls = append(f.calls, call)
	}
	if f.fail != nil {
		return f.fail(call)
	}
	return nil
}

// checkRefsLocked records a violation if a VIP has no ring or a ring names a
// real that is not there. Called after every successful write.
func (f *fakeDP) checkRefsLocked(after string) {
	if !f.checkRefs {
		return
	}
	for v, meta := range f.vips {
		if _, ok := f.rings[meta.ID]; !ok {
			f.violations = append(f.violations, fmt.Sprintf("after %s: VIP %s (id %d) has no ring", after, v, meta.ID))
		}
	}
	for vid, ring := range f.rings {
		seen := map[uint32]bool{}
		for _, id := range ring {
			if id == 0 || seen[id] {
				continue
			}
			seen[id] = true
			if _, ok := f.reals[id]; !ok {
				f.violations = append(f.violations, fmt.Sprintf("after %s: ring %d names missing real %d", after, vid, id))
			}
		}
	}
}

func (f *fakeDP) SetVIP(v dataplane.VIP, meta dataplane.VIPMeta) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	call := fmt.Sprintf("SetVIP %s id=%d %s aff=%t", v, meta.ID, meta.Mode, meta.SourceAffinity)
	if err := f.log("%s", call); err != nil {
		return err
	}
	if meta.ID >= f.maxVIPs {
		return fmt.Errorf("VIP %v: id %d out of range", v, meta.ID)
	}
	f.vips[v] = meta
	f.checkRefsLocked(call)
	return nil
}

func (f *fakeDP) DeleteVIP(v dataplane.VIP) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("DeleteVIP %s", v); err != nil {
		return err
	}
	delete(f.vips, v)
	return nil
}

func (f *fakeDP) VIPs() (map[dataplane.VIP]dataplane.VIPMeta, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.record {
		f.calls = append(f.calls, "VIPs")
	}
	return maps.Clone(f.vips), nil
}

func (f *fakeDP) SetReal(id uint32, r dataplane.Real) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	call := fmt.Sprintf("SetReal %d %s %s mac=%s", id, r.Addr, r.State, r.MAC)
	if err := f.log("%s", call); err != nil {
		return err
	}
	if id == 0 || id >= f.maxReals {
		return fmt.Errorf("real %v: id %d out of range", r.Addr, id)
	}
	if len(r.MAC) != 0 && len(r.MAC) != 6 {
		return fmt.Errorf("real %v: bad MAC", r.Addr)
	}
	r.MAC = bytes.Clone(r.MAC)
	f.reals[id] = r
	return nil
}

func (f *fakeDP) DeleteReal(id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	call := fmt.Sprintf("DeleteReal %d", id)
	if err := f.log("%s", call); err != nil {
		return err
	}
	delete(f.reals, id)
	f.checkRefsLocked(call)
	return nil
}

func (f *fakeDP) Reals() (map[uint32]dataplane.Real, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.record {
		f.calls = append(f.calls, "Reals")
	}
	out := make(map[uint32]dataplane.Real, len(f.reals))
	for id, r := range f.reals {
		r.MAC = bytes.Clone(r.MAC)
		out[id] = r
	}
	return out, nil
}

// SetRings records one "SetRing <id>" call per ring, in id order, as the
// batch is applied, so tests can check ordering ring by ring.
func (f *fakeDP) SetRings(rings map[uint32][]uint32) error {
	for _, id := range slices.Sorted(maps.Keys(rings)) {
		if err := f.setRing(id, rings[id]); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeDP) setRing(vipID uint32, ring []uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	call := fmt.Sprintf("SetRing %d", vipID)
	if err := f.log("%s", call); err != nil {
		return err
	}
	if uint32(len(ring)) != f.ringSize {
		return fmt.Errorf("ring of VIP %d has %d slots, want %d", vipID, len(ring), f.ringSize)
	}
	if vipID >= f.maxVIPs {
		return fmt.Errorf("ring: VIP id %d out of range", vipID)
	}
	if !f.shareRings {
		ring = slices.Clone(ring)
	}
	f.rings[vipID] = ring
	f.checkRefsLocked(call)
	return nil
}

func (f *fakeDP) Ring(vipID uint32) ([]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.record {
		f.calls = append(f.calls, fmt.Sprintf("Ring %d", vipID))
	}
	if f.ringReadErr != nil {
		return nil, f.ringReadErr
	}
	return slices.Clone(f.rings[vipID]), nil
}

func (f *fakeDP) DeleteRing(vipID uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	call := fmt.Sprintf("DeleteRing %d", vipID)
	if err := f.log("%s", call); err != nil {
		return err
	}
	delete(f.rings, vipID)
	f.checkRefsLocked(call)
	return nil
}

func (f *fakeDP) SetNATRealPort(k dataplane.NATRealKey, port uint16) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("SetNATRealPort %d/%d %d", k.VIPID, k.RealID, port); err != nil {
		return err
	}
	f.natPorts[k] = port
	return nil
}

func (f *fakeDP) DeleteNATRealPort(k dataplane.NATRealKey) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("DeleteNATRealPort %d/%d", k.VIPID, k.RealID); err != nil {
		return err
	}
	delete(f.natPorts, k)
	return nil
}

func (f *fakeDP) NATRealPorts() (map[dataplane.NATRealKey]uint16, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.natPorts), nil
}

func (f *fakeDP) ResetVIPStats(vipID uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("ResetVIPStats %d", vipID); err != nil {
		return err
	}
	delete(f.vipStats, vipID)
	return nil
}

func (f *fakeDP) ResetRealStats(realID uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("ResetRealStats %d", realID); err != nil {
		return err
	}
	delete(f.realStats, realID)
	return nil
}

func (f *fakeDP) AddDeny(p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("AddDeny %s", p); err != nil {
		return err
	}
	f.deny[p.Masked()] = true
	return nil
}

func (f *fakeDP) RemoveDeny(p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.log("RemoveDeny %s", p); err != nil {
		return err
	}
	delete(f.deny, p.Masked())
	return nil
}

func (f *fakeDP) DenyList() ([]netip.Prefix, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.record {
		f.calls = append(f.calls, "DenyList")
	}
	return slices.Collect(maps.Keys(f.deny)), nil
}

func (f *fakeDP) RingSize() uint32 { return f.ringSize }
func (f *fakeDP) MaxVIPs() uint32  { return f.maxVIPs }
func (f *fakeDP) MaxReals() uint32 { return f.maxReals }

// takeCalls returns the calls recorded since the last takeCalls.
func (f *fakeDP) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

// writes filters the calls down to the ones that change the data plane.
func writes(calls []string) []string {
	var out []string
	for _, c := range calls {
		switch strings.Fields(c)[0] {
		case "VIPs", "Reals", "Ring", "DenyList":
		default:
			out = append(out, c)
		}
	}
	return out
}

// fakeMACs resolves from a fixed table and counts calls.
type fakeMACs struct {
	mu    sync.Mutex
	table map[netip.Addr]net.HardwareAddr
	calls int
}

func (m *fakeMACs) Resolve(ctx context.Context, addr netip.Addr) (net.HardwareAddr, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls++
	if mac, ok := m.table[addr]; ok {
		return mac, nil
	}
	return nil, fmt.Errorf("no neighbour entry for %s", addr)
}

// macFor gives every address a distinct, stable MAC.
func macFor(a netip.Addr) net.HardwareAddr {
	b := a.As16()
	return net.HardwareAddr{0x02, 0x00, b[12], b[13], b[14], b[15]}
}
