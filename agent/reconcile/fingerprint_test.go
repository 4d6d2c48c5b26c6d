package reconcile

import (
	"slices"
	"testing"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// slotsByAddress is a ring as the backends its slots send flows to, which
// is what has to agree between nodes (real ids are each node's own).
func slotsByAddress(e *env, vip dataplane.VIP) []string {
	e.t.Helper()
	id := e.dp.vips[vip].ID
	out := make([]string, 0, len(e.dp.rings[id]))
	for _, real := range e.dp.rings[id] {
		out = append(out, e.dp.reals[real].Addr.String())
	}
	return out
}

// Two nodes given the same configuration and health verdicts must build
// the same table for every VIP, whatever the order of the backends in
// their files and whatever ids their reals have, or a flow that the router
// moves from one node to the other changes backend.
func TestNodesBuildIdenticalTables(t *testing.T) {
	a, b := newEnv(t), newEnv(t)
	for _, p := range b.cfg.Pools {
		slices.Reverse(p.Backends)
	}
	slices.Reverse(b.cfg.Pools)
	slices.Reverse(b.cfg.VIPs)
	// Node b once served another pool, so its reals got other ids.
	b.cfg.Pools[0].Backends = append(b.cfg.Pools[0].Backends, be("10.0.0.9", 8080))
	b.reconcile()
	b.cfg.Pools[0].Backends = b.cfg.Pools[0].Backends[:len(b.cfg.Pools[0].Backends)-1]
	b.health["web/10.0.0.3:80"] = false // the same verdicts as a: absent counts as down
	a.reconcile()
	b.reconcile()
	if a.realID("10.0.1.1") == b.realID("10.0.1.1") {
		t.Fatal("the test wants the nodes to number their reals differently")
	}

	ia, ib := a.r.Installed(), b.r.Installed()
	for _, vip := range []dataplane.VIP{webVIP, apiVIP} {
		if got, want := slotsByAddress(b, vip), slotsByAddress(a, vip); !slices.Equal(got, want) {
			t.Errorf("%s: the nodes' tables send flows to different backends", vip)
		}
		fa, fb := ia.Rings[ia.VIPs[vip].ID], ib.Rings[ib.VIPs[vip].ID]
		if fa != fb || fa.Fingerprint == 0 {
			t.Errorf("%s: ring info %+v on one node, %+v on the other; want equal and non-zero", vip, fa, fb)
		}
	}
	if got := ia.Rings[ia.VIPs[webVIP].ID].Backends; got != 2 {
		t.Errorf("web ring spreads over %d backends, want the 2 healthy ones", got)
	}

	// A node with another backend set shows another fingerprint.
	b.health["web/10.0.0.2:80"] = false
	b.reconcile()
	ib = b.r.Installed()
	if fa, fb := ia.Rings[ia.VIPs[webVIP].ID], ib.Rings[ib.VIPs[webVIP].ID]; fa.Fingerprint == fb.Fingerprint || fb.Backends != 1 {
		t.Errorf("after a backend went down on one node: %+v and %+v, want different fingerprints", fa, fb)
	}
}

// A restarted agent reads its rings back instead of rebuilding them, and
// reports the same fingerprints as before.
func TestFingerprintSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	before := e.r.Installed().Rings
	e.r = e.newReconciler()
	_, calls := e.reconcile()
	if ws := writes(calls); len(ws) != 0 {
		t.Fatalf("restart rewrote %q", ws)
	}
	if after := e.r.Installed().Rings; len(after) != 2 || after[e.dp.vips[webVIP].ID] != before[e.dp.vips[webVIP].ID] ||
		after[e.dp.vips[apiVIP].ID] != before[e.dp.vips[apiVIP].ID] {
		t.Errorf("rings after restart %+v, before %+v", after, before)
	}
}
