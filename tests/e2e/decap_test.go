package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
	"github.com/veloflux/veloflux/tests/testenv"
)

// newDecapEnv is newEnv with the lab named by prefix, so that this area's
// namespaces and links are told apart from other tests'.
func newDecapEnv(t *testing.T, prefix string, backends int, vips ...netip.Addr) *env {
	t.Helper()
	base := agenttest.NewEnv(t, lab.Options{Backends: backends, VIPs: vips, Prefix: prefix}, BinaryEnv)
	e := &env{t: t, lab: base.Lab, bin: base.Bin, dir: base.Dir, pin: base.Pin, state: base.State, cfg: base.Cfg}
	e.http = newHTTPClient(e.lab.Client, 5*time.Second)
	return e
}

// decapPin is backend b's pin path for its decapsulator, on the test's
// private BPF filesystem.
func (e *env) decapPin(b *lab.Host) string {
	return filepath.Join(filepath.Dir(e.pin), "decap-"+b.Name)
}

// startDecap runs `veloflux decap` in backend b's namespace, as an
// operator would, and waits until it says it is decapsulating.
func (e *env) startDecap(b *lab.Host, name string, extra ...string) *agenttest.Process {
	e.t.Helper()
	args := append([]string{"decap", "--interface", b.IfName, "--local", b.Addr4.String() + "," + b.Addr6.String(),
		"--pin-path", e.decapPin(b), "--log-format", "text"}, extra...)
	p, err := agenttest.Start(e.t, name, b.Command(e.t.Context(), e.bin, args...))
	if err != nil {
		e.t.Fatalf("start %s: %v", name, err)
	}
	p.WaitLog("decapsulating", 0, 10*time.Second)
	return p
}

// decapStats reads backend b's decapsulator counters from its pins.
func (e *env) decapStats(b *lab.Host) dataplane.DecapStats {
	e.t.Helper()
	d, err := dataplane.OpenPinnedDecap(e.decapPin(b))
	if err != nil {
		e.t.Fatal(err)
	}
	defer d.Close()
	s, err := d.Stats()
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// xdpOn reports the XDP state of backend b's interface.
func xdpOn(t *testing.T, b *lab.Host) *netlink.LinkXdp {
	t.Helper()
	var x *netlink.LinkXdp
	err := b.Do(func() error {
		l, err := netlink.LinkByName(b.IfName)
		if err != nil {
			return err
		}
		x = l.Attrs().Xdp
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// detachDecap runs a detach command in b's namespace and checks that the
// pins and the attachment are gone.
func (e *env) detachDecap(b *lab.Host, args ...string) {
	e.t.Helper()
	p, err := agenttest.Start(e.t, "detach-"+b.Name, b.Command(e.t.Context(), e.bin, args...))
	if err != nil {
		e.t.Fatal(err)
	}
	if code := p.Wait(10 * time.Second); code != 0 {
		e.t.Fatalf("%s: %v exited with %d", b.Name, args, code)
	}
	if _, err := os.Stat(e.decapPin(b)); !errors.Is(err, os.ErrNotExist) {
		e.t.Errorf("%s: the pins are still there after %v (%v)", b.Name, args, err)
	}
	// A running decapsulator lets its link go within its watch interval
	// (2s); the kernel may release the link a moment after.
	deadline := time.Now().Add(6 * time.Second)
	for x := xdpOn(e.t, b); x != nil && x.Attached; x = xdpOn(e.t, b) {
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: XDP program %d still attached 6s after %v", b.Name, x.ProgId, args)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// guePacket is what a balancer sends in GUE, less the outer IP and UDP
// headers the client's kernel adds: the inner packet, from the client to
// the VIP's UDP echo port, behind a variant 0 header when v0 is set
// (variant 1, as Katran sends, has none).
func guePacket(t *testing.T, client netip.AddrPort, vip netip.Addr, msg string, v0 bool) []byte {
	t.Helper()
	udp := &layers.UDP{SrcPort: layers.UDPPort(client.Port()), DstPort: lab.UDPEchoPort}
	var ip gopacket.SerializableLayer
	proto := layers.IPProtocolIPv4
	if vip.Is4() {
		ip4 := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: client.Addr().AsSlice(), DstIP: vip.AsSlice()}
		udp.SetNetworkLayerForChecksum(ip4)
		ip = ip4
	} else {
		ip6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: client.Addr().AsSlice(), DstIP: vip.AsSlice()}
		udp.SetNetworkLayerForChecksum(ip6)
		ip, proto = ip6, layers.IPProtocolIPv6
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		ip, udp, gopacket.Payload(msg)); err != nil {
		t.Fatal(err)
	}
	inner := buf.Bytes()
	if !v0 {
		return inner
	}
	hdr := make([]byte, 4, 4+len(inner))
	hdr[1] = byte(proto)
	binary.BigEndian.PutUint16(hdr[2:], 0)
	return append(hdr, inner...)
}

// gueRoundTrip sends msg to the VIP's UDP echo through backend b's
// decapsulator, as GUE from the client, and waits for the echo, which the
// backend sends the client directly from the VIP.
func gueRoundTrip(t *testing.T, e *env, b *lab.Host, vip netip.Addr, msg string, v0 bool, tries int) error {
	t.Helper()
	network, clientAddr, backendAddr := "udp4", e.lab.Client.Addr4, b.Addr4
	if vip.Is6() {
		network, clientAddr, backendAddr = "udp6", e.lab.Client.Addr6, b.Addr6
	}
	// The socket the echo comes back to: its port is the inner source.
	reply, err := e.lab.Client.ListenPacket(t.Context(), network, netip.AddrPortFrom(clientAddr, 0).String())
	if err != nil {
		return err
	}
	defer reply.Close()
	tunnel, err := e.lab.Client.ListenPacket(t.Context(), network, netip.AddrPortFrom(clientAddr, 0).String())
	if err != nil {
		return err
	}
	defer tunnel.Close()
	local := reply.LocalAddr().(*net.UDPAddr).AddrPort()
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(backendAddr, dataplane.DefaultGUEPort))
	pkt := guePacket(t, local, vip, msg, v0)
	buf := make([]byte, 2048)
	var lastErr error
	for range tries {
		if _, err := tunnel.WriteTo(pkt, to); err != nil {
			return err
		}
		reply.SetReadDeadline(time.Now().Add(400 * time.Millisecond))
		n, from, err := reply.ReadFrom(buf)
		if err != nil {
			lastErr = err
			continue
		}
		src := from.(*net.UDPAddr).AddrPort()
		if string(buf[:n]) != msg || src.Addr().Unmap() != vip || src.Port() != lab.UDPEchoPort {
			return fmt.Errorf("echo %q from %s, want %q from %s:%d", buf[:n], src, msg, vip, lab.UDPEchoPort)
		}
		return nil
	}
	return fmt.Errorf("no echo of %q through %s's decapsulator: %w", msg, b.Name, lastErr)
}

// TestDecapCommandGUE: two backends run `veloflux decap` as processes. The
// client sends each of them GUE built here (variant 1 as Katran sends it,
// and variant 0), over IPv4 and IPv6, with inner packets for the VIP's UDP
// echo; every datagram is echoed from the VIP, and the counters, read from
// the pins as vfctl reads them, show it by family. A malformed GUE packet
// is dropped and counted. A restarted decapsulator adopts its pinned link
// (same link, no gap); SIGTERM leaves it attached; `veloflux decap detach`
// and `veloflux detach --pin-path` each remove one backend's. Run as uid 0
// with only the capabilities the agent's container has, it works; with
// none, it names what it lacks.
func TestDecapCommandGUE(t *testing.T) {
	e := newDecapEnv(t, "vfdcg", 2, vip4, vip6)
	procs := make([]*agenttest.Process, len(e.lab.Backends))
	for i, b := range e.lab.Backends {
		procs[i] = e.startDecap(b, "decap-"+b.Name)
	}
	for _, b := range e.lab.Backends {
		for _, tc := range []struct {
			vip netip.Addr
			v0  bool
		}{{vip4, false}, {vip6, false}, {vip4, true}, {vip6, true}} {
			msg := fmt.Sprintf("gue variant %d to %s via %s", map[bool]int{false: 1, true: 0}[tc.v0], tc.vip, b.Name)
			if err := gueRoundTrip(t, e, b, tc.vip, msg, tc.v0, 5); err != nil {
				t.Error(err)
			}
		}
	}

	// GUE variant 2: no version defines it; dropped, counted, no crash.
	b0 := e.lab.Backends[0]
	bad, err := e.lab.Client.ListenPacket(t.Context(), "udp4", netip.AddrPortFrom(e.lab.Client.Addr4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	variant2 := guePacket(t, netip.AddrPortFrom(e.lab.Client.Addr4, 9), vip4, "bad", true)
	variant2[0] = 0x80
	if _, err := bad.WriteTo(variant2, net.UDPAddrFromAddrPort(netip.AddrPortFrom(b0.Addr4, dataplane.DefaultGUEPort))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for e.decapStats(b0).DropGUEVariant == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	for _, b := range e.lab.Backends {
		s := e.decapStats(b)
		t.Logf("%s decap counters: %+v", b.Name, s)
		if s.GUE4Packets < 2 || s.GUE6Packets < 2 {
			t.Errorf("%s: %d GUE packets over IPv4 and %d over IPv6 decapsulated, want at least 2 of each (variants 1 and 0)",
				b.Name, s.GUE4Packets, s.GUE6Packets)
		}
	}
	if s := e.decapStats(b0); s.DropGUEVariant != 1 {
		t.Errorf("%s: drop_gue_variant is %d after one GUE variant 2 packet, want 1", b0.Name, s.DropGUEVariant)
	}
	// bpftool names every counter, from the object's BTF.
	if bpftool, err := exec.LookPath("bpftool"); err == nil {
		out, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(e.decapPin(b0), "vf_decap_stats")).CombinedOutput()
		if err != nil {
			t.Errorf("bpftool map dump: %v\n%s", err, out)
		}
		for _, field := range []string{"ipip4_packets", "gue4_packets", "gue6_packets", "pass_not_local", "drop_bad_length",
			"drop_gue_variant"} {
			if !strings.Contains(string(out), `"`+field+`"`) {
				t.Errorf("bpftool map dump of vf_decap_stats does not name %s:\n%s", field, out)
			}
		}
	} else {
		t.Log("bpftool not installed: the dump's field names are not checked")
	}

	// Restart: the new process adopts the pinned link, which never left.
	link0 := xdpOn(t, b0)
	if code := procs[0].Stop(); code != 0 {
		t.Fatalf("decap exited with %d on SIGTERM, want 0", code)
	}
	if x := xdpOn(t, b0); x == nil || !x.Attached || x.ProgId != link0.ProgId {
		t.Fatalf("after SIGTERM the decapsulator left %s: %+v", b0.Name, x)
	}
	if err := gueRoundTrip(t, e, b0, vip4, "while no decap process runs", false, 5); err != nil {
		t.Errorf("GUE with the process stopped: %v", err)
	}
	again := e.startDecap(b0, "decap-"+b0.Name+"#2")
	if !strings.Contains(again.LogText(), "adopted the pinned link") {
		t.Errorf("the restarted decapsulator did not adopt the pinned link:\n%s", again.LogText())
	}
	if err := gueRoundTrip(t, e, b0, vip6, "after the restart", false, 5); err != nil {
		t.Errorf("GUE after the restart: %v", err)
	}
	again.Stop()
	procs[1].Stop()

	// The privilege story of the agent's container: uid 0 with only
	// CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN runs it (here adopting
	// backend-1's link); with none, it says which it lacks.
	b1 := e.lab.Backends[1]
	setpriv := testenv.RequireTool(t, "setpriv", "util-linux")
	withCaps := func(caps string) []string {
		return []string{"--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all" + caps, e.bin}
	}
	none, err := agenttest.Start(t, "decap-nocaps", b1.Command(t.Context(), setpriv, append(withCaps(""), "decap",
		"--interface", b1.IfName, "--local", b1.Addr4.String(), "--pin-path", e.decapPin(b1), "--log-format", "text")...))
	if err != nil {
		t.Fatal(err)
	}
	if code := none.Wait(10 * time.Second); code == 0 || !strings.Contains(none.LogText(), "lacks CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN") {
		t.Errorf("without capabilities: exit %d, want a failure naming the missing capabilities:\n%s", code, none.LogText())
	}
	capped, err := agenttest.Start(t, "decap-caps", b1.Command(t.Context(), setpriv, append(withCaps(",+bpf,+perfmon,+net_admin"), "decap",
		"--interface", b1.IfName, "--local", b1.Addr4.String()+","+b1.Addr6.String(), "--pin-path", e.decapPin(b1), "--log-format", "text")...))
	if err != nil {
		t.Fatal(err)
	}
	capped.WaitLog("decapsulating", 0, 10*time.Second)
	if err := gueRoundTrip(t, e, b1, vip4, "with three capabilities", false, 5); err != nil {
		t.Errorf("GUE through the decapsulator run with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN only: %v", err)
	}
	capped.Stop()

	e.detachDecap(b0, "decap", "detach", "--pin-path", e.decapPin(b0))
	e.detachDecap(e.lab.Backends[1], "detach", "--pin-path", e.decapPin(e.lab.Backends[1]), "--config", filepath.Join(e.dir, "none.yaml"))
	if err := gueRoundTrip(t, e, b0, vip4, "after detach", false, 1); err == nil {
		t.Error("GUE still decapsulated after detach")
	}
}

// TestIPIPVIPThroughDecapCommand: an ipip VIP whose backends run
// `veloflux decap` as processes; see testVIPThroughDecapCommand.
func TestIPIPVIPThroughDecapCommand(t *testing.T) {
	testVIPThroughDecapCommand(t, "vfdci", "ipip")
}

// TestGUEVIPThroughDecapCommand: a gue VIP whose backends run `veloflux
// decap` as processes; see testVIPThroughDecapCommand.
func TestGUEVIPThroughDecapCommand(t *testing.T) {
	testVIPThroughDecapCommand(t, "vfdcu", "gue")
}

// testVIPThroughDecapCommand: a VIP in mode (ipip or gue) whose backends
// run `veloflux decap`. HTTP requests all succeed over every backend, the
// backends' counters show the encapsulation, and `veloflux decap detach`
// removes each decapsulator while its process runs, which then exits.
func testVIPThroughDecapCommand(t *testing.T, prefix, mode string) {
	spec := func(e *env) string {
		return e.render(cfgSpec{
			dataplane: []string{"nexthop: fib", "encap_source_v4: " + e.lab.Balancer.Addr4.String()},
			pools:     []poolSpec{{name: "web", addrs: e.addrs4(), port: lab.HTTPPort}},
			vips:      []vipSpec{{addr: vip4, port: lab.HTTPPort, proto: "tcp", mode: mode, pool: "web"}},
		})
	}
	e := newDecapEnv(t, prefix, 3, vip4)
	if _, err := config.Parse([]byte(spec(e))); err != nil {
		var verr *config.ValidationError
		if errors.As(err, &verr) && len(verr.Errors) == 1 && strings.HasSuffix(verr.Errors[0].Path, ".mode") {
			t.Skipf("the configuration does not accept mode: %s yet: %v", mode, err)
		}
		t.Fatalf("the test's configuration is invalid: %v", err)
	}
	if err := setSysctl(e.lab.Balancer, "net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	procs := make([]*agenttest.Process, len(e.lab.Backends))
	for i, b := range e.lab.Backends {
		procs[i] = e.startDecap(b, "decap-"+b.Name)
	}
	e.writeConfig(spec(e))
	e.startAgent()
	ready := e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
	t.Logf("all 3 backends served through the %s VIP %s after the agent started", mode, ready.Round(time.Millisecond))
	tl := load(t.Context(), e.http, vipURL(vip4), 90, 0, 30*time.Second, nil)
	t.Logf("%s load: %s", mode, tl)
	if tl.n != 90 || tl.fails != 0 || len(tl.counts) != 3 {
		t.Errorf("want 90 successful requests over all 3 backends, got %s", tl)
	}
	for _, b := range e.lab.Backends {
		s := e.decapStats(b)
		t.Logf("%s decap counters: %+v", b.Name, s)
		got := s.IPIP4Packets
		if mode == "gue" {
			got = s.GUE4Packets
		}
		if got == 0 || s.Dropped() != 0 {
			t.Errorf("%s: %d %s packets decapsulated and %d dropped, want some and none", b.Name, got, mode, s.Dropped())
		}
	}
	// Detached while they run: each process lets its link go and exits.
	for i, b := range e.lab.Backends {
		e.detachDecap(b, "decap", "detach", "--pin-path", e.decapPin(b))
		if code := procs[i].Wait(10 * time.Second); code != 0 {
			t.Errorf("%s: veloflux decap exited with %d after its pins were removed, want 0", b.Name, code)
		}
	}
}
