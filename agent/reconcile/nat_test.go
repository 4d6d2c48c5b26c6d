package reconcile

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
)

// A nat VIP reaches the data plane with its translation: the configured
// SNAT address or, without one, the interface's address of its family,
// and the port its backends listen on. A change of either rewrites the VIP;
// an interface without an address fails the reconcile before any write.
func TestNATVIPTranslation(t *testing.T) {
	e := newEnv(t)
	e.cfg.VIPs = append(e.cfg.VIPs,
		config.VIP{Address: "192.0.2.3", Port: 80, Protocol: config.ProtocolTCP, Mode: config.VIPModeNAT, Pool: "api"},
		config.VIP{Address: "192.0.2.3", Port: 53, Protocol: config.ProtocolUDP, Mode: config.VIPModeNAT, Pool: "api",
			SNATAddress: "10.0.9.5"})
	ifaceAddr := netip.MustParseAddr("10.0.9.1")
	desired := func() Desired {
		d := e.desired()
		d.InterfaceAddress = func(v4 bool) (netip.Addr, error) {
			if !v4 || !ifaceAddr.IsValid() {
				return netip.Addr{}, errors.New("the interface has no address of that family")
			}
			return ifaceAddr, nil
		}
		return d
	}
	if _, err := e.r.Reconcile(context.Background(), desired()); err != nil {
		t.Fatal(err)
	}
	tcpVIP := dataplane.VIP{Addr: netip.MustParseAddr("192.0.2.3"), Port: 80, Proto: dataplane.ProtoTCP}
	udpVIP := dataplane.VIP{Addr: netip.MustParseAddr("192.0.2.3"), Port: 53, Proto: dataplane.ProtoUDP}
	want := map[dataplane.VIP]dataplane.NATTarget{
		tcpVIP: {SNAT: ifaceAddr, RealPort: 8080},
		udpVIP: {SNAT: netip.MustParseAddr("10.0.9.5"), RealPort: 8080},
	}
	for v, nat := range want {
		if got := e.dp.vips[v]; got.Mode != dataplane.ModeNAT || got.NAT != nat {
			t.Errorf("VIP %v installed as %+v, want nat %+v", v, got, nat)
		}
	}
	e.dp.takeCalls()

	// The interface's address changes: the VIP that uses it is rewritten.
	ifaceAddr = netip.MustParseAddr("10.0.9.2")
	if _, err := e.r.Reconcile(context.Background(), desired()); err != nil {
		t.Fatal(err)
	}
	if got := e.dp.vips[tcpVIP].NAT.SNAT; got != ifaceAddr {
		t.Errorf("after the address change the VIP uses %v, want %v", got, ifaceAddr)
	}
	e.dp.takeCalls()

	// No address at all: refused before anything is written.
	ifaceAddr = netip.Addr{}
	_, err := e.r.Reconcile(context.Background(), desired())
	if err == nil || !strings.Contains(err.Error(), "snat_address") {
		t.Fatalf("Reconcile without an interface address = %v, want an snat_address error", err)
	}
	if calls := e.dp.takeCalls(); len(calls) != 0 {
		t.Errorf("a refused reconcile wrote %v", calls)
	}
}

// Each real of a nat VIP gets its own backend's port, written before a ring
// names the real and removed once none does, when the backend leaves the
// pool or the VIP goes; a restarted reconciler reads them back and leaves
// them alone, and one address on two ports is refused before any write.
func TestNATRealPorts(t *testing.T) {
	e := newEnv(t)
	e.cfg.Pools[1].Backends = []config.Backend{be("10.0.1.1", 8080), be("10.0.1.2", 9090)}
	e.cfg.VIPs = append(e.cfg.VIPs, config.VIP{Address: "192.0.2.3", Port: 80, Protocol: config.ProtocolTCP,
		Mode: config.VIPModeNAT, Pool: "api", SNATAddress: "10.0.9.5"})
	natVIP := dataplane.VIP{Addr: netip.MustParseAddr("192.0.2.3"), Port: 80, Proto: dataplane.ProtoTCP}
	key := func(addr string) dataplane.NATRealKey {
		return dataplane.NATRealKey{VIPID: e.vipID(natVIP), RealID: e.realID(addr)}
	}

	_, calls := e.reconcile()
	want := map[dataplane.NATRealKey]uint16{key("10.0.1.1"): 8080, key("10.0.1.2"): 9090}
	if !maps.Equal(e.dp.natPorts, want) {
		t.Fatalf("nat real ports %v, want %v (the ipip VIP on the same pool has none)", e.dp.natPorts, want)
	}
	if set, ring := lastIndex(calls, "SetNATRealPort"), index(calls, "SetRing "); set < 0 || set > ring {
		t.Errorf("ports must be written before the rings name the reals: %v", calls)
	}
	if _, calls := e.reconcile(); len(calls) != 0 {
		t.Errorf("a second reconcile wrote %v", calls)
	}
	e.r = e.newReconciler()
	if _, calls := e.reconcile(); slices.ContainsFunc(calls, isWrite) {
		t.Errorf("a restarted reconciler wrote %v", calls)
	}

	// 10.0.1.1 leaves, 10.0.1.2 moves to another port.
	gone := key("10.0.1.1")
	e.cfg.Pools[1].Backends = []config.Backend{be("10.0.1.2", 9191)}
	_, calls = e.reconcile()
	want = map[dataplane.NATRealKey]uint16{key("10.0.1.2"): 9191}
	if !maps.Equal(e.dp.natPorts, want) {
		t.Fatalf("after the pool change nat real ports %v, want %v", e.dp.natPorts, want)
	}
	del := fmt.Sprintf("DeleteNATRealPort %d/%d", gone.VIPID, gone.RealID)
	if d, ring := index(calls, del), lastIndex(calls, "SetRing "); d < ring {
		t.Errorf("a port must be removed after the rings stop naming its real: %v", calls)
	}

	// Unvalidated, one address on two ports is refused with nothing written.
	e.cfg.Pools[1].Backends = []config.Backend{be("10.0.1.2", 9191), be("10.0.1.2", 9292)}
	if _, err := e.r.Reconcile(context.Background(), e.desired()); err == nil ||
		!strings.Contains(err.Error(), "10.0.1.2") {
		t.Fatalf("Reconcile with 10.0.1.2 on two ports = %v, want an error naming it", err)
	}
	if calls := e.dp.takeCalls(); len(calls) != 0 {
		t.Errorf("a refused reconcile wrote %v", calls)
	}

	// The VIP goes: so do its ports.
	e.cfg.Pools[1].Backends = []config.Backend{be("10.0.1.2", 9191)}
	e.cfg.VIPs = e.cfg.VIPs[:len(e.cfg.VIPs)-1]
	e.reconcile()
	if len(e.dp.natPorts) != 0 {
		t.Errorf("after the nat VIP went the ports are %v", e.dp.natPorts)
	}
}

// isWrite tells a write call of the fake's log from a read.
func isWrite(call string) bool {
	return strings.HasPrefix(call, "Set") || strings.HasPrefix(call, "Delete") ||
		strings.HasPrefix(call, "Reset") || strings.HasPrefix(call, "Add") || strings.HasPrefix(call, "Remove")
}
