package dataplane

import (
	"fmt"
	"maps"
	"slices"
)

// vf_vip_filter lets the program pass a packet to no VIP's address without
// a hash lookup: slot vipFilterSlot(addr) counts the VIPs, of any port and
// protocol, whose address hashes there. These must be the program's
// VF_VIP_FILTER_BITS and VF_VIP_FILTER_MULT (bpf/include/vf_types.h);
// every packet test of a VIP checks that both sides agree.
const (
	vipFilterBits = 16
	vipFilterMult = 0x9e3779b1
)

// vipFilterSlot is vf_vip_filter_slot of bpf/balancer.bpf.c: the address
// words as the program loads them, an IPv6 address folded into one word.
func vipFilterSlot(key balancerVfVipKey) uint32 {
	word := key.Addr[0]
	if key.Family == afInet6 {
		word ^= key.Addr[1] ^ key.Addr[2] ^ key.Addr[3]
	}
	return (word * vipFilterMult) >> (32 - vipFilterBits)
}

// countInVIPFilter adds delta to the slot of key's address. Called with
// d.vipMu held, so no other write interleaves its read and write.
func (d *Dataplane) countInVIPFilter(key balancerVfVipKey, delta int) error {
	if d.objs.VfVipFilter == nil {
		return fmt.Errorf("the VIP filter is not loaded (maps opened read-only)")
	}
	slot := vipFilterSlot(key)
	var n uint32
	if err := d.objs.VfVipFilter.Lookup(slot, &n); err != nil {
		return fmt.Errorf("read VIP filter slot %d: %w", slot, err)
	}
	if delta < 0 && n == 0 {
		return fmt.Errorf("VIP filter slot %d is already 0: the filter lost count of vf_vips", slot)
	}
	n = uint32(int64(n) + int64(delta))
	if err := d.objs.VfVipFilter.Put(slot, n); err != nil {
		return fmt.Errorf("write VIP filter slot %d: %w", slot, err)
	}
	return nil
}

// clearVIPSlot empties the vf_vips_by_id slot of id if it holds key, so
// that the flows of a VIP that left (or changed its id) stop finding it
// there. A slot another VIP took over is left to that VIP.
func (d *Dataplane) clearVIPSlot(id uint32, key balancerVfVipKey) error {
	if id >= d.opts.MaxVIPs {
		return nil
	}
	var slot balancerVfVipSlot
	if err := d.objs.VfVipsById.Lookup(id, &slot); err != nil {
		return fmt.Errorf("read VIP slot %d: %w", id, err)
	}
	if slot.Key != key {
		return nil
	}
	if err := d.objs.VfVipsById.Put(id, &balancerVfVipSlot{}); err != nil {
		return fmt.Errorf("clear VIP slot %d: %w", id, err)
	}
	return nil
}

// rebuildVIPIndexes fills the freshly loaded (zeroed) maps derived from
// vf_vips, which may hold the VIPs of an earlier agent's pins: the filter
// and the by-id slots. The program is not on any interface yet, so no
// packet sees them half built.
func (d *Dataplane) rebuildVIPIndexes() error {
	d.vipMu.Lock()
	defer d.vipMu.Unlock()
	counts := map[uint32]uint32{}
	var key balancerVfVipKey
	var val balancerVfVipMeta
	it := d.objs.VfVips.Iterate()
	for it.Next(&key, &val) {
		counts[vipFilterSlot(key)]++
		if val.VipId >= d.opts.MaxVIPs {
			return fmt.Errorf("pinned VIP %v has id %d, beyond the %d VIPs configured",
				wordsAddr(key.Addr, key.Family), val.VipId, d.opts.MaxVIPs)
		}
		if err := d.objs.VfVipsById.Put(val.VipId, &balancerVfVipSlot{Key: key, Meta: val}); err != nil {
			return fmt.Errorf("write VIP slot %d: %w", val.VipId, err)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate VIPs to build the VIP filter: %w", err)
	}
	for _, slot := range slices.Sorted(maps.Keys(counts)) {
		if err := d.objs.VfVipFilter.Put(slot, counts[slot]); err != nil {
			return fmt.Errorf("write VIP filter slot %d: %w", slot, err)
		}
	}
	return nil
}
