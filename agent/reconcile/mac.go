package reconcile

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// resolveMACs decides the MAC of every wanted real. Only reals used by a dsr
// VIP get one; the data path ignores it for ipip, and leaving it empty there
// keeps the map honest about what is used.
//
// A MAC is resolved when the real has none yet, or when the last resolution
// is older than MACRefresh. A real that is down is not resolved: it takes no
// traffic, and resolving an unreachable host would cost a timeout and a
// warning on every reconcile. When resolution fails the last known MAC is
// kept, because a backend that briefly misses an ARP probe is far likelier
// than one that changed its MAC; with no MAC at all the real is written
// without one, and the data path drops its packets as drop_no_route rather
// than send them to a wrong host.
func (r *Reconciler) resolveMACs(ctx context.Context, p *plan, res *Result) {
	now := r.now()
	wanted := make(map[netip.Addr]bool, len(p.reals))
	var jobs []*realPlan
	for _, rp := range p.reals {
		if !rp.dsr {
			continue
		}
		wanted[rp.addr] = true
		if rp.has {
			rp.want.MAC = bytes.Clone(rp.installed.MAC)
		}
		if rp.want.State == dataplane.RealDown {
			continue
		}
		if len(rp.want.MAC) > 0 {
			rec, ok := r.resolved[rp.addr]
			if ok && bytes.Equal(rec.mac, rp.want.MAC) && now.Sub(rec.at) < r.opts.MACRefresh {
				continue
			}
		}
		jobs = append(jobs, rp)
	}
	for a := range r.resolved {
		if !wanted[a] {
			delete(r.resolved, a)
		}
	}
	if len(jobs) == 0 {
		return
	}

	errs := make([]error, len(jobs))
	macs := make([]net.HardwareAddr, len(jobs))
	if r.macs == nil {
		for i := range errs {
			errs[i] = fmt.Errorf("no MAC resolver is configured")
		}
	} else {
		var wg sync.WaitGroup
		sem := make(chan struct{}, r.opts.MACParallel)
		for i, rp := range jobs {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				rctx, cancel := context.WithTimeout(ctx, r.opts.MACTimeout)
				defer cancel()
				macs[i], errs[i] = r.macs.Resolve(rctx, rp.addr)
			})
		}
		wg.Wait()
	}

	for i, rp := range jobs {
		err := errs[i]
		if err == nil && !usableMAC(macs[i]) {
			err = fmt.Errorf("resolver returned %q, not a unicast Ethernet address", macs[i].String())
		}
		if err == nil {
			rp.want.MAC = bytes.Clone(macs[i])
			r.resolved[rp.addr] = macRecord{mac: rp.want.MAC, at: now}
			continue
		}
		if len(rp.want.MAC) > 0 {
			res.Warnings = append(res.Warnings, fmt.Sprintf(
				"real %d (%s): MAC not resolved, keeping the last known %s: %v", rp.id, rp.addr, rp.want.MAC, err))
		} else {
			res.Warnings = append(res.Warnings, fmt.Sprintf(
				"real %d (%s): MAC not resolved, written without one (its dsr packets drop as drop_no_route): %v", rp.id, rp.addr, err))
		}
	}
}

// usableMAC reports whether mac can be a dsr real's destination: six bytes,
// not all zero (the data path's "no MAC"), and unicast.
func usableMAC(mac net.HardwareAddr) bool {
	return len(mac) == 6 && !bytes.Equal(mac, make([]byte, 6)) && mac[0]&1 == 0
}
