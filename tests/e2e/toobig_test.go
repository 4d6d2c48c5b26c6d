package e2e

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/lab"
)

// TestICMPTooBigThroughTunnel: every link of the lab has a 1500-byte MTU,
// so a full-size TCP segment from the client cannot be encapsulated toward
// a backend. The balancer answers the first ones with ICMP "fragmentation
// needed"; the client's stack lowers its path MTU and its next segments
// fit, so 64 KiB echoed through an ipip and a gue VIP come back whole
// (without the answer they would be lost, and the echo would time out).
func TestICMPTooBigThroughTunnel(t *testing.T) {
	for _, mode := range []string{"ipip", "gue"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, 1, vip4)
			if err := setSysctl(e.lab.Balancer, "net.ipv4.ip_forward", "1"); err != nil {
				t.Fatal(err)
			}
			b := e.lab.Backends[0]
			d, err := dataplane.LoadDecap(dataplane.DecapOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := d.Close(); err != nil {
					t.Errorf("close decap on %s: %v", b.Name, err)
				}
			})
			if err := d.SetLocals([]netip.Addr{b.Addr4}); err != nil {
				t.Fatal(err)
			}
			if err := d.SetGUEPort(dataplane.DefaultGUEPort); err != nil {
				t.Fatal(err)
			}
			if err := b.Do(func() error { _, err := d.Attach(b.IfName, dataplane.XDPAuto); return err }); err != nil {
				t.Fatal(err)
			}
			e.writeConfig(e.render(cfgSpec{
				dataplane: []string{"nexthop: fib", "encap_source_v4: " + e.lab.Balancer.Addr4.String()},
				pools:     []poolSpec{{name: "echo", addrs: e.addrs4(), port: lab.TCPEchoPort, checkPort: lab.HTTPPort}},
				vips:      []vipSpec{{addr: vip4, port: lab.TCPEchoPort, proto: "tcp", mode: mode, pool: "echo"}},
			}))
			e.startAgent()

			addr := net.JoinHostPort(vip4.String(), strconv.Itoa(lab.TCPEchoPort))
			sent := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
			var got []byte
			deadline := time.Now().Add(15 * time.Second)
			for {
				got, err = vfgueEcho(t.Context(), e.lab.Client, addr, sent)
				if err == nil || time.Now().After(deadline) {
					break
				}
				time.Sleep(200 * time.Millisecond) // the agent may not have installed the VIP yet
			}
			if err != nil || !bytes.Equal(got, sent) {
				t.Logf("data plane counters: %v", e.counters())
				t.Fatalf("echo of %d bytes through the %s VIP: %d bytes back, %v", len(sent), mode, len(got), err)
			}
			c := e.counters()
			t.Logf("data plane counters: %v", c)
			if c["tx_icmp_too_big"] == 0 {
				t.Errorf("tx_icmp_too_big is 0: the full-size segments were not answered")
			}
			if c["tx_"+mode] == 0 {
				t.Errorf("tx_%s is 0: nothing was forwarded after the answer", mode)
			}
		})
	}
}

// vfgueEcho sends data to the TCP echo server at addr from h and reads as
// much back, within 5 seconds.
func vfgueEcho(ctx context.Context, h *lab.Host, addr string, data []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := h.DialContext(ctx, "tcp4", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Write(data); errc <- err }()
	got := make([]byte, len(data))
	n, err := io.ReadFull(c, got)
	if werr := <-errc; werr != nil && err == nil {
		err = werr
	}
	return got[:n], err
}
