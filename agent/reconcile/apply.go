package reconcile

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// apply performs the plan's writes in reference order and records each in
// the mirror as soon as it succeeded, so that after a failure the mirror
// holds exactly the writes that were done.
func (r *Reconciler) apply(p *plan, res *Result) error {
	// Denylist additions reference nothing, and blocking early is the safe
	// side, so they go first and removals last.
	for _, pfx := range p.denyAdd {
		if err := r.dp.AddDeny(pfx); err != nil {
			return fmt.Errorf("reconcile: add %s to the denylist: %w", pfx, err)
		}
		r.deny[pfx] = true
		res.DenyAdded++
	}

	// Reals before the rings that name them, except a live real going
	// down or draining: the rings drop it first, so that new flows hashing
	// to it go to a live real rather than to a real already marked down
	// (which the data path would drop) during the swap.
	var leaving []*realPlan
	for _, rp := range p.reals {
		if !rp.isNew && rp.installed.State == dataplane.RealUp && rp.want.State != dataplane.RealUp {
			leaving = append(leaving, rp)
			continue
		}
		if err := r.applyReal(rp, res); err != nil {
			return err
		}
	}

	// A real's port under a nat VIP before any ring names it there, so
	// that no new flow falls back to the VIP's default port.
	for _, np := range p.natPortsSet {
		if err := r.dp.SetNATRealPort(np.key, np.port); err != nil {
			return fmt.Errorf("reconcile: write nat port %d of real %d under VIP id %d: %w",
				np.port, np.key.RealID, np.key.VIPID, err)
		}
		r.natPorts[np.key] = np.port
	}

	// Rings before the VIPs that use them, installed in batches: every
	// install waits for an RCU grace period, once per batch rather than
	// once per VIP, and a bounded batch bounds the tables held at once.
	batch := &ringBatch{rings: map[uint32][]uint32{}}
	for _, vp := range p.vips {
		if err := r.applyRing(vp, batch); err != nil {
			return err
		}
		if len(batch.vips) >= ringBatchSize {
			if err := r.flushRings(batch, res); err != nil {
				return err
			}
		}
	}
	if err := r.flushRings(batch, res); err != nil {
		return err
	}
	if batch.unreadable > 0 {
		res.Warnings = append(res.Warnings, fmt.Sprintf(
			"%d installed rings could not be read back (%v) and were reinstalled with the same content",
			batch.unreadable, dataplane.ErrRingUnreadable))
	}
	for _, rp := range leaving {
		if err := r.applyReal(rp, res); err != nil {
			return err
		}
	}
	for _, vp := range p.vips {
		meta := vp.meta()
		if vp.installed && vp.installedMeta == meta {
			continue
		}
		if err := r.dp.SetVIP(vp.vip, meta); err != nil {
			return fmt.Errorf("reconcile: write VIP %s (id %d, %s, pool %q): %w", vp.vip, vp.id, vp.mode, vp.pool, err)
		}
		r.vips[vp.vip] = meta
		if vp.installed {
			res.VIPsUpdated++
		} else {
			res.VIPsAdded++
		}
	}

	// Deletions top down: a VIP stops matching before its ring goes, and
	// a real's slot is cleared only once no ring names it.
	for _, v := range p.staleVIPs {
		if err := r.dp.DeleteVIP(v); err != nil {
			return fmt.Errorf("reconcile: delete VIP %s (id %d): %w", v, r.vips[v].ID, err)
		}
		delete(r.vips, v)
		res.VIPsRemoved++
	}
	for _, id := range p.staleRings {
		if err := r.dp.DeleteRing(id); err != nil {
			return fmt.Errorf("reconcile: delete ring of removed VIP id %d: %w", id, err)
		}
		delete(r.rings, id)
	}
	// Once no ring names the real under the VIP, or the VIP is gone.
	for _, k := range p.natPortsStale {
		if err := r.dp.DeleteNATRealPort(k); err != nil {
			return fmt.Errorf("reconcile: delete nat port of real %d under VIP id %d: %w", k.RealID, k.VIPID, err)
		}
		delete(r.natPorts, k)
	}
	for _, id := range p.staleReals {
		if err := r.dp.DeleteReal(id); err != nil {
			return fmt.Errorf("reconcile: clear real %d (%s): %w", id, r.reals[id].Addr, err)
		}
		delete(r.reals, id)
		res.RealsRemoved++
	}

	for _, pfx := range p.denyRemove {
		if err := r.dp.RemoveDeny(pfx); err != nil {
			return fmt.Errorf("reconcile: remove %s from the denylist: %w", pfx, err)
		}
		delete(r.deny, pfx)
		res.DenyRemoved++
	}
	return nil
}

// applyReal writes one real unless it is installed as wanted.
func (r *Reconciler) applyReal(rp *realPlan, res *Result) error {
	if rp.isNew {
		if err := r.dp.ResetRealStats(rp.id); err != nil {
			return fmt.Errorf("reconcile: reset statistics of real %d for new real %s: %w", rp.id, rp.addr, err)
		}
	} else if realEqual(rp.installed, rp.want) {
		return nil
	}
	if err := r.dp.SetReal(rp.id, rp.want); err != nil {
		return fmt.Errorf("reconcile: write real %d (%s, %s): %w", rp.id, rp.addr, rp.want.State, err)
	}
	r.reals[rp.id] = cloneReal(rp.want)
	if rp.isNew {
		res.RealsAdded++
	} else {
		res.RealsUpdated++
	}
	return nil
}

// ringBatchSize bounds the rings installed by one outer-map update.
const ringBatchSize = 64

// ringBatch holds rings waiting to be installed.
type ringBatch struct {
	vips  []*vipPlan
	rings map[uint32][]uint32
	// unreadable counts the installed rings that were reinstalled because
	// they could not be read back.
	unreadable int
}

// applyRing queues a VIP's ring unless the installed one is already right.
func (r *Reconciler) applyRing(vp *vipPlan, batch *ringBatch) error {
	defer func() {
		if vp.ring.users--; vp.ring.users == 0 {
			vp.ring.table = nil
		}
	}()
	if vp.newID {
		// Whatever this id held before belongs to no VIP any more.
		delete(r.rings, vp.id)
		if err := r.dp.ResetVIPStats(vp.id); err != nil {
			return fmt.Errorf("reconcile: reset statistics of VIP id %d for new VIP %s: %w", vp.id, vp.vip, err)
		}
		return r.queueRing(vp, batch)
	}
	if fp, known := r.rings[vp.id]; known {
		if fp.backends == vp.ring.fp {
			return nil
		}
		return r.queueRing(vp, batch)
	}

	// Unknown since this reconciler started: compare with what is there,
	// so that a restarted agent leaves correct rings alone instead of
	// swapping every one of them.
	installed, err := r.dp.Ring(vp.id)
	if errors.Is(err, dataplane.ErrRingUnreadable) {
		// Installing the ring again is safe: a ring of the same
		// backend set has the same content, so no flow moves.
		batch.unreadable++
		return r.queueRing(vp, batch)
	}
	if err != nil {
		return fmt.Errorf("reconcile: read installed ring of VIP %s (id %d): %w", vp.vip, vp.id, err)
	}
	table, err := r.table(vp.ring)
	if err != nil {
		return err
	}
	if slices.Equal(installed, table) {
		r.rings[vp.id] = vp.ring.installed()
		return nil
	}
	return r.queueRing(vp, batch)
}

func (r *Reconciler) queueRing(vp *vipPlan, batch *ringBatch) error {
	table, err := r.table(vp.ring)
	if err != nil {
		return err
	}
	batch.vips = append(batch.vips, vp)
	batch.rings[vp.id] = table
	return nil
}

// flushRings installs the queued rings and empties the batch.
func (r *Reconciler) flushRings(batch *ringBatch, res *Result) error {
	if len(batch.vips) == 0 {
		return nil
	}
	defer func() {
		batch.vips = batch.vips[:0]
		clear(batch.rings)
	}()
	if err := r.dp.SetRings(batch.rings); err != nil {
		// Some swaps may have happened: make the next reconcile read
		// those rings back rather than trust either version.
		names := make([]string, 0, len(batch.vips))
		for _, vp := range batch.vips {
			delete(r.rings, vp.id)
			names = append(names, fmt.Sprintf("%s (id %d, pool %q)", vp.vip, vp.id, vp.pool))
		}
		return fmt.Errorf("reconcile: install rings of %s: %w", strings.Join(names, ", "), err)
	}
	for _, vp := range batch.vips {
		r.rings[vp.id] = vp.ring.installed()
	}
	res.RingsRebuilt += len(batch.vips)
	return nil
}

func realEqual(a, b dataplane.Real) bool {
	return a.Addr == b.Addr && a.State == b.State && bytes.Equal(a.MAC, b.MAC)
}

func cloneReal(r dataplane.Real) dataplane.Real {
	r.MAC = bytes.Clone(r.MAC)
	return r
}
