package lab

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestLabVIPPathWithStubBalancer stands in for the real balancer with the
// least one can do — XDP_TX every frame for a VIP to one backend's MAC —
// to prove the wiring the balancer relies on: the client's VIP traffic
// reaches the balancer's veth, XDP_TX frames get through the bridge, the
// backend serves the VIP from lo and answers the client directly (UDP from
// the VIP too), and XDP_TX needs the XDP_PASS program on the peer.
func TestLabVIPPathWithStubBalancer(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Options{Backends: 2, VIPs: testVIPs})
	if err := l.StartBackendServers(t.Context()); err != nil {
		t.Fatal(err)
	}
	be := l.Backends[1]
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "vf_lab_stub",
		Type:         ebpf.XDP,
		Instructions: stubBalancer(l.VIPs, l.Balancer.MAC, be.MAC),
		License:      "GPL",
	})
	if err != nil {
		t.Fatalf("load stub balancer: %v", err)
	}
	defer prog.Close()
	if err := setXDP(l.Balancer, l.Balancer.IfName, prog.FD()); err != nil {
		t.Fatal(err)
	}

	client := l.Client.HTTPClient()
	defer client.CloseIdleConnections()
	for _, vip := range l.VIPs {
		url := "http://" + netip.AddrPortFrom(vip, HTTPPort).String() + "/"
		if got := httpGet(t, client, url, http.StatusOK); got != be.Name+"\n" {
			t.Errorf("GET %s: body %q, want %q", url, got, be.Name+"\n")
		}
		echoTCP(t, l.Client, netip.AddrPortFrom(vip, TCPEchoPort))
		echoUDP(t, l.Client, netip.AddrPortFrom(vip, UDPEchoPort))
	}

	// The quirk behind the XDP_PASS program on the peer: without it the
	// XDP_TX'd frames vanish.
	if err := setXDP(l.Switch, l.Balancer.PeerName, -1); err != nil {
		t.Fatal(err)
	}
	c, err := l.Client.DialContext(t.Context(), "udp", netip.AddrPortFrom(l.VIPs[0], UDPEchoPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := udpRoundTrip(c, []byte("no pass program")); err == nil {
		t.Log("XDP_TX worked without XDP_PASS on the peer; the kernel no longer needs it")
	} else {
		t.Logf("as expected without XDP_PASS on the peer: %v", err)
	}
}

func setXDP(h *Host, ifName string, fd int) error {
	link, err := h.nl.LinkByName(ifName)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", ifName, h.Name, err)
	}
	return h.Do(func() error {
		if err := netlink.LinkSetXdpFdWithFlags(link, fd, unix.XDP_FLAGS_DRV_MODE); err != nil {
			return fmt.Errorf("set XDP fd %d on %s: %w", fd, ifName, err)
		}
		return nil
	})
}

// stubBalancer returns XDP code that rewrites Ethernet addresses of frames
// to any of vips to src -> dst and bounces them with XDP_TX; everything
// else (ARP, NDP, traffic to the balancer itself) passes. vips must not be
// empty.
func stubBalancer(vips []netip.Addr, src, dst net.HardwareAddr) asm.Instructions {
	le32 := func(b []byte) int32 { return int32(binary.LittleEndian.Uint32(b)) }
	le16 := func(b []byte) int64 { return int64(binary.LittleEndian.Uint16(b)) }
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // xdp_md->data
		asm.LoadMem(asm.R3, asm.R1, 4, asm.Word), // xdp_md->data_end
	}
	for i, vip := range vips {
		next := fmt.Sprintf("next%d", i)
		ethType, dstOff, hdrEnd := int32(0x0008), int16(14+16), int32(14+20) // IPv4, big endian read as LE
		if vip.Is6() {
			ethType, dstOff, hdrEnd = 0xdd86, 14+24, 14+40
		}
		block := asm.Instructions{
			asm.Mov.Reg(asm.R4, asm.R2),
			asm.Add.Imm(asm.R4, hdrEnd),
			asm.JGT.Reg(asm.R4, asm.R3, next),
			asm.LoadMem(asm.R5, asm.R2, 12, asm.Half),
			asm.JNE.Imm(asm.R5, ethType, next),
		}
		b := vip.AsSlice()
		for w := 0; w < len(b); w += 4 {
			block = append(block,
				asm.LoadMem(asm.R5, asm.R2, dstOff+int16(w), asm.Word),
				asm.JNE.Imm32(asm.R5, le32(b[w:w+4]), next))
		}
		block = append(block, asm.Ja.Label("tx"))
		if i > 0 {
			block[0] = block[0].WithSymbol(fmt.Sprintf("next%d", i-1))
		}
		insns = append(insns, block...)
	}
	return append(insns,
		asm.Mov.Imm(asm.R0, 2).WithSymbol(fmt.Sprintf("next%d", len(vips)-1)), // XDP_PASS
		asm.Return(),
		asm.StoreImm(asm.R2, 0, int64(le32(dst[0:4])), asm.Word).WithSymbol("tx"),
		asm.StoreImm(asm.R2, 4, le16(dst[4:6]), asm.Half),
		asm.StoreImm(asm.R2, 6, int64(le32(src[0:4])), asm.Word),
		asm.StoreImm(asm.R2, 10, le16(src[4:6]), asm.Half),
		asm.Mov.Imm(asm.R0, 3), // XDP_TX
		asm.Return(),
	)
}
