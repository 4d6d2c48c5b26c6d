package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/lab"
)

// TestUDPVIP: a dsr UDP VIP on the backends' UDP echo port. From 16
// client sockets (16 source ports), every datagram comes back echoed, and
// from the VIP address and port (the backends answer from the address the
// datagram was sent to).
func TestUDPVIP(t *testing.T) {
	e := newEnv(t, 3, vip4)
	e.writeConfig(e.render(cfgSpec{
		// The backends serve UDP on 7001; the check probes their HTTP.
		pools: []poolSpec{{name: "udp", addrs: e.addrs4(), port: lab.UDPEchoPort, checkPort: lab.HTTPPort}},
		vips:  []vipSpec{{addr: vip4, port: lab.UDPEchoPort, proto: "udp", mode: "dsr", pool: "udp"}},
	}))
	e.startAgent()
	vip := netip.AddrPortFrom(vip4, lab.UDPEchoPort)

	// Ready once one datagram is echoed.
	ready := time.Now()
	for {
		e.checkAgent()
		if err := udpEcho(e.lab.Client, vip, 1, 300*time.Millisecond); err == nil {
			break
		} else if time.Since(ready) > 10*time.Second {
			t.Fatalf("no UDP echo through %s within 10s: %v", vip, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("UDP VIP echoing %s after the agent started", time.Since(ready).Round(time.Millisecond))

	const sockets, perSocket = 16, 5
	var conns []net.PacketConn
	for i := range sockets {
		pc, err := e.lab.Client.ListenPacket(t.Context(), "udp4", "0.0.0.0:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		conns = append(conns, pc)
		for j := range perSocket {
			msg := fmt.Sprintf("socket %d datagram %d", i, j)
			from, err := roundTrip(pc, vip, msg, 3, time.Second)
			if err != nil {
				t.Errorf("socket %s: %v", pc.LocalAddr(), err)
				continue
			}
			if from != vip {
				t.Errorf("socket %s: echo of %q came from %s, want the VIP %s", pc.LocalAddr(), msg, from, vip)
			}
		}
	}

	// Which backend served which source port (not required to be spread,
	// but logged, and every flow must name a known backend).
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	flows, err := dp.Flows(0)
	if err != nil {
		t.Fatal(err)
	}
	reals, err := dp.Reals()
	if err != nil {
		t.Fatal(err)
	}
	per := map[string]int{}
	for _, pc := range conns {
		local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
		found := false
		for _, f := range flows {
			if f.Proto == dataplane.ProtoUDP && f.SrcPort == local.Port() && f.Dst == vip4 && f.DstPort == vip.Port() {
				found = true
				if i := e.backendIndex(reals[f.RealID].Addr); i >= 0 {
					per[e.lab.Backends[i].Name]++
				} else {
					t.Errorf("UDP flow from port %d names real %d (%v), not a backend", local.Port(), f.RealID, reals[f.RealID])
				}
			}
		}
		if !found {
			t.Errorf("no conntrack entry for the UDP flow from port %d", local.Port())
		}
	}
	t.Logf("%d UDP source ports × %d datagrams echoed from %s; flows per backend: %v", sockets, perSocket, vip, per)
	c := e.counters()
	t.Logf("data plane counters: %v", c)
}

// udpEcho sends n datagrams from a fresh socket and expects each back.
func udpEcho(h *lab.Host, dst netip.AddrPort, n int, timeout time.Duration) error {
	pc, err := h.ListenPacket(context.Background(), "udp4", "0.0.0.0:0")
	if err != nil {
		return err
	}
	defer pc.Close()
	for i := range n {
		if _, err := roundTrip(pc, dst, fmt.Sprintf("probe %d", i), 1, timeout); err != nil {
			return err
		}
	}
	return nil
}

// roundTrip sends msg to dst and waits for its echo, trying up to tries
// times (perTry each), and returns the echo's source.
func roundTrip(pc net.PacketConn, dst netip.AddrPort, msg string, tries int, perTry time.Duration) (netip.AddrPort, error) {
	buf := make([]byte, 2048)
	var lastErr error
	for range tries {
		if _, err := pc.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(dst)); err != nil {
			return netip.AddrPort{}, err
		}
		if err := pc.SetReadDeadline(time.Now().Add(perTry)); err != nil {
			return netip.AddrPort{}, err
		}
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				lastErr = err
				break
			}
			if string(buf[:n]) != msg {
				continue // a late echo of an earlier try
			}
			ap := from.(*net.UDPAddr).AddrPort()
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
		}
	}
	return netip.AddrPort{}, errors.Join(fmt.Errorf("no echo of %q from %s after %d tries", msg, dst, tries), lastErr)
}
