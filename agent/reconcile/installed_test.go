package reconcile

import (
	"context"
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// TestInstalledMirrorsTheDataPlane: after every successful reconcile,
// Installed equals what the data plane holds (VIPs and reals, states
// included); after a failed one it is nil, so readers go to the maps.
func TestInstalledMirrorsTheDataPlane(t *testing.T) {
	e := newEnv(t)
	if e.r.Installed() != nil {
		t.Fatal("Installed before any reconcile")
	}
	same := func(what string) {
		t.Helper()
		inst := e.r.Installed()
		if inst == nil {
			t.Fatalf("%s: Installed is nil after a successful reconcile", what)
		}
		if !maps.Equal(inst.VIPs, e.dp.vips) {
			t.Errorf("%s: Installed VIPs %v, data plane %v", what, inst.VIPs, e.dp.vips)
		}
		if !maps.EqualFunc(inst.Reals, e.dp.reals, realEqual) {
			t.Errorf("%s: Installed reals %v, data plane %v", what, inst.Reals, e.dp.reals)
		}
	}
	e.reconcile()
	same("first reconcile")

	e.drained["web/10.0.0.2:80"] = true
	e.reconcile()
	same("drain")
	if got := e.r.Installed().Reals[e.realID("10.0.0.2")].State; got != dataplane.RealDraining {
		t.Errorf("drained real is %s in Installed", got)
	}

	e.cfg.VIPs = e.cfg.VIPs[:1]
	e.reconcile()
	same("VIP removed")

	e.dp.fail = func(call string) error {
		if strings.HasPrefix(call, "SetReal") {
			return errors.New("injected")
		}
		return nil
	}
	e.health["web/10.0.0.3:80"] = true
	if _, err := e.r.Reconcile(context.Background(), e.desired()); err == nil {
		t.Fatal("reconcile with a failing write succeeded")
	}
	if e.r.Installed() != nil {
		t.Error("Installed is not nil after a failed reconcile")
	}
	e.dp.fail = nil
	e.reconcile()
	same("after recovery")
}
