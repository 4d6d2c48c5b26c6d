package reconcile

import (
	"context"
	"errors"
	"net/netip"
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
