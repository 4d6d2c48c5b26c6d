package lab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/veloflux/veloflux/tests/testenv"
)

// Documentation-range VIPs: they only ever exist inside lab namespaces.
var testVIPs = []netip.Addr{netip.MustParseAddr("198.51.100.10"), netip.MustParseAddr("2001:db8::10")}

func TestLab(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Options{Backends: 3, VIPs: testVIPs})
	ctx := t.Context()
	if err := l.StartBackendServers(ctx); err != nil {
		t.Fatal(err)
	}
	client := l.Client.HTTPClient()
	defer client.CloseIdleConnections()

	t.Run("HTTPToEachBackend", func(t *testing.T) {
		for _, b := range l.Backends {
			if got := httpGet(t, client, "http://"+b.Addr4.String()+"/some/path", http.StatusOK); got != b.Name+"\n" {
				t.Errorf("GET %s: body %q, want %q", b.Addr4, got, b.Name+"\n")
			}
			if got := httpGet(t, client, "http://"+b.Addr4.String()+"/healthz", http.StatusOK); got != "ok\n" {
				t.Errorf("GET %s/healthz: body %q", b.Addr4, got)
			}
		}
	})

	t.Run("IPv6", func(t *testing.T) {
		b := l.Backends[1]
		url := "http://" + netip.AddrPortFrom(b.Addr6, HTTPPort).String() + "/"
		if got := httpGet(t, client, url, http.StatusOK); got != b.Name+"\n" {
			t.Errorf("GET %s: body %q, want %q", url, got, b.Name+"\n")
		}
		echoTCP(t, l.Client, netip.AddrPortFrom(b.Addr6, TCPEchoPort))
		echoUDP(t, l.Client, netip.AddrPortFrom(b.Addr6, UDPEchoPort))
	})

	t.Run("Echo", func(t *testing.T) {
		for _, b := range l.Backends {
			echoTCP(t, l.Client, netip.AddrPortFrom(b.Addr4, TCPEchoPort))
			echoUDP(t, l.Client, netip.AddrPortFrom(b.Addr4, UDPEchoPort))
		}
	})

	t.Run("ClientToBalancer", func(t *testing.T) {
		balancerRoundTrip(t, l)
	})

	t.Run("Wiring", func(t *testing.T) {
		checkWiring(t, l)
	})

	t.Run("Command", func(t *testing.T) {
		out, err := l.Backends[0].Command(ctx, "ip", "-o", "addr", "show", "dev", "lo").CombinedOutput()
		if err != nil {
			t.Fatalf("ip netns exec %s: %v\n%s", l.Backends[0].NetNS, err, out)
		}
		for _, v := range l.VIPs {
			if !strings.Contains(string(out), v.String()+"/") {
				t.Errorf("VIP %s not on %s lo according to ip:\n%s", v, l.Backends[0].Name, out)
			}
		}
	})

	t.Run("StopStartBackend", func(t *testing.T) {
		b := l.Backends[2]
		addr := netip.AddrPortFrom(b.Addr4, HTTPPort).String()
		if err := l.StopBackend(2); err != nil {
			t.Fatal(err)
		}
		c, err := l.Client.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			t.Fatalf("dial %s after StopBackend: connected, want refused", addr)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial %s after StopBackend: %v, want connection refused", addr, err)
		}
		if err := l.StartBackend(ctx, 2); err != nil {
			t.Fatal(err)
		}
		if err := l.StartBackend(ctx, 2); err == nil {
			t.Error("second StartBackend(2) succeeded, want already-running error")
		}
		if got := httpGet(t, client, "http://"+addr+"/", http.StatusOK); got != b.Name+"\n" {
			t.Errorf("GET %s after restart: body %q", addr, got)
		}
	})

	client.CloseIdleConnections()
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	assertNoLeftovers(t, l.Prefix)
}

func TestLabBalancerInRoot(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Options{Backends: 1, VIPs: testVIPs, BalancerInRoot: true})
	if l.Balancer.NetNS != "" {
		t.Fatalf("balancer netns %q, want the test's own", l.Balancer.NetNS)
	}
	link, err := netlink.LinkByName(l.Balancer.IfName)
	if err != nil {
		t.Fatalf("balancer link %s not in own netns: %v", l.Balancer.IfName, err)
	}
	if link.Attrs().Index != l.Balancer.Ifindex {
		t.Errorf("balancer ifindex %d, recorded %d", link.Attrs().Index, l.Balancer.Ifindex)
	}
	if err := l.StartBackendServers(t.Context()); err != nil {
		t.Fatal(err)
	}
	balancerRoundTrip(t, l)
	client := l.Client.HTTPClient()
	b := l.Backends[0]
	if got := httpGet(t, client, "http://"+b.Addr4.String()+"/", http.StatusOK); got != b.Name+"\n" {
		t.Errorf("GET %s: body %q", b.Addr4, got)
	}
	client.CloseIdleConnections()

	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	assertNoLeftovers(t, l.Prefix)
}

// Environment of the child process used by TestLabFailingTestCleansUp.
const (
	childModeEnv   = "VF_LAB_CHILD_MODE"
	childPrefixEnv = "VF_LAB_CHILD_PREFIX"
)

// TestLabFailingTestCleansUp runs a test that builds a lab and then fails
// (t.Fatal) or panics, in a child process, and checks nothing is left.
func TestLabFailingTestCleansUp(t *testing.T) {
	testenv.RequireRoot(t, "build network namespaces")
	t.Parallel()
	for _, mode := range []string{"fatal", "panic"} {
		t.Run(mode, func(t *testing.T) {
			prefix := fmt.Sprintf("vfx%04x", rand.N(0x10000))
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestLabChildProcess$", "-test.count=1", "-test.v")
			cmd.Env = append(os.Environ(), childModeEnv+"="+mode, childPrefixEnv+"="+prefix)
			out, err := cmd.CombinedOutput()
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) {
				t.Fatalf("child: err %v, want a failing exit\n%s", err, out)
			}
			if !strings.Contains(string(out), "LAB-BUILT "+prefix) {
				t.Fatalf("child never built its lab\n%s", out)
			}
			if !strings.Contains(string(out), "lab removed") {
				t.Errorf("child did not log lab removal\n%s", out)
			}
			assertNoLeftovers(t, prefix)
			if t.Failed() {
				t.Logf("child output:\n%s", out)
				if err := Purge(prefix); err != nil {
					t.Logf("purge %s: %v", prefix, err)
				}
			}
		})
	}
}

// TestLabChildProcess is the child half of TestLabFailingTestCleansUp; it
// fails on purpose and is skipped unless that test started it.
func TestLabChildProcess(t *testing.T) {
	mode := os.Getenv(childModeEnv)
	if mode == "" {
		t.Skip("helper for TestLabFailingTestCleansUp")
	}
	l := ForTest(t, Options{Backends: 2, VIPs: testVIPs, Prefix: os.Getenv(childPrefixEnv)})
	if err := l.StartBackendServers(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Logf("LAB-BUILT %s", l.Prefix)
	switch mode {
	case "panic":
		panic("intentional panic with a lab up")
	default:
		t.Fatal("intentional failure with a lab up")
	}
}

func TestAddressing(t *testing.T) {
	for _, tc := range []struct {
		x    byte
		host int
		v4   string
		v6   string
	}{
		{7, 2, "10.7.0.2", "fd00:7::2"},
		{7, 12, "10.7.0.12", "fd00:7::12"},
		{200, 254, "10.200.0.254", "fd00:200::254"},
	} {
		if got := addr4(tc.x, tc.host).String(); got != tc.v4 {
			t.Errorf("addr4(%d, %d) = %s, want %s", tc.x, tc.host, got, tc.v4)
		}
		if got := addr6(tc.x, tc.host).String(); got != tc.v6 {
			t.Errorf("addr6(%d, %d) = %s, want %s", tc.x, tc.host, got, tc.v6)
		}
	}
}

func TestOptionsValidation(t *testing.T) {
	for name, opts := range map[string]Options{
		"too many backends": {Backends: MaxBackends + 1},
		"bad prefix":        {Prefix: "VF/x"},
		"long prefix":       {Prefix: "abcdefghijk"},
		"zero VIP":          {VIPs: []netip.Addr{{}}},
	} {
		if _, err := New(t.Context(), opts); err == nil {
			t.Errorf("%s: New succeeded, want error", name)
		}
	}
}

func httpGet(t *testing.T, c *http.Client, url string, wantStatus int) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", url, err)
	}
	if resp.StatusCode != wantStatus {
		t.Fatalf("GET %s: status %d, want %d", url, resp.StatusCode, wantStatus)
	}
	return string(body)
}

func echoTCP(t *testing.T, from *Host, to netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, err := from.DialContext(ctx, "tcp", to.String())
	if err != nil {
		t.Fatalf("tcp echo %s: %v", to, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := "hello " + to.String() + "\n"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("tcp echo %s: write: %v", to, err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != msg {
		t.Fatalf("tcp echo %s: got %q, %v; want %q", to, got, err, msg)
	}
}

// echoUDP checks the UDP echo at to answers from the address it was sent to
// (a connected UDP socket drops anything else).
func echoUDP(t *testing.T, from *Host, to netip.AddrPort) {
	t.Helper()
	c, err := from.DialContext(t.Context(), "udp", to.String())
	if err != nil {
		t.Fatalf("udp echo %s: %v", to, err)
	}
	defer c.Close()
	if err := udpRoundTrip(c, []byte("ping "+to.String())); err != nil {
		t.Fatalf("udp echo %s: %v", to, err)
	}
}

// udpRoundTrip sends msg and waits for it to come back, a few times: UDP
// may lose a datagram while a neighbour entry is being resolved.
func udpRoundTrip(c net.Conn, msg []byte) error {
	buf := make([]byte, 1500)
	var lastErr error
	for range 3 {
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err == nil {
			if !bytes.Equal(buf[:n], msg) {
				return fmt.Errorf("got %q, want %q", buf[:n], msg)
			}
			return nil
		}
		lastErr = err
	}
	return fmt.Errorf("no reply: %w", lastErr)
}

// balancerRoundTrip listens on the balancer and connects from the client
// over IPv4 and IPv6.
func balancerRoundTrip(t *testing.T, l *Lab) {
	t.Helper()
	for _, a := range []netip.Addr{l.Balancer.Addr4, l.Balancer.Addr6} {
		ln, err := l.Balancer.Listen(t.Context(), "tcp", netip.AddrPortFrom(a, 0).String())
		if err != nil {
			t.Fatalf("listen on balancer %s: %v", a, err)
		}
		accepted := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				_, err = io.WriteString(c, "balancer\n")
				c.Close()
			}
			accepted <- err
		}()
		c, err := l.Client.DialContext(t.Context(), "tcp", ln.Addr().String())
		if err != nil {
			ln.Close()
			t.Fatalf("client -> balancer %s: %v", ln.Addr(), err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		ln.Close()
		if err != nil || string(got) != "balancer\n" {
			t.Fatalf("client <- balancer %s: %q, %v", ln.Addr(), got, err)
		}
		if err := <-accepted; err != nil {
			t.Fatalf("balancer accept: %v", err)
		}
	}
}

// checkWiring inspects what the data path depends on but the
// connectivity checks above cannot see.
func checkWiring(t *testing.T, l *Lab) {
	t.Helper()
	for _, h := range append([]*Host{l.Client, l.Balancer}, l.Backends...) {
		err := h.Do(func() error {
			on, err := txChecksumEnabled(h.IfName)
			if err != nil {
				return err
			}
			if on {
				return fmt.Errorf("tx checksumming still on for %s", h.IfName)
			}
			for _, key := range []string{"net.ipv4.conf.all.rp_filter", "net.ipv4.conf." + h.IfName + ".rp_filter"} {
				if h.NetNS == "" && strings.Contains(key, ".all.") {
					continue // the caller's namespace-wide settings are left alone
				}
				if v, err := readSysctl(key); err != nil || v != "0" {
					return fmt.Errorf("%s = %q (%v), want 0", key, v, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: %v", h.Name, err)
		}
		err = l.Switch.Do(func() error {
			on, err := txChecksumEnabled(h.PeerName)
			if err == nil && on {
				err = fmt.Errorf("tx checksumming still on for %s", h.PeerName)
			}
			return err
		})
		if err != nil {
			t.Error(err)
		}
	}

	peer, err := l.Switch.nl.LinkByName(l.Balancer.PeerName)
	if err != nil {
		t.Fatal(err)
	}
	if x := peer.Attrs().Xdp; x == nil || !x.Attached {
		t.Errorf("no XDP program on balancer peer %s: %+v", l.Balancer.PeerName, x)
	}
	if peer.Attrs().MasterIndex != l.Switch.Ifindex {
		t.Errorf("%s master %d, want bridge %d", peer.Attrs().Name, peer.Attrs().MasterIndex, l.Switch.Ifindex)
	}

	for _, b := range l.Backends {
		err := b.Do(func() error {
			for _, key := range []string{"net.ipv4.conf.all.arp_ignore", "net.ipv4.conf." + b.IfName + ".arp_ignore"} {
				if v, err := readSysctl(key); err != nil || v != "1" {
					return fmt.Errorf("%s = %q (%v), want 1", key, v, err)
				}
			}
			for _, key := range []string{"net.ipv4.conf.all.arp_announce", "net.ipv4.conf." + b.IfName + ".arp_announce"} {
				if v, err := readSysctl(key); err != nil || v != "2" {
					return fmt.Errorf("%s = %q (%v), want 2", key, v, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: %v", b.Name, err)
		}
		lo, err := b.nl.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		addrs, err := b.nl.AddrList(lo, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range l.VIPs {
			found := false
			for _, a := range addrs {
				ones, _ := a.Mask.Size()
				if a.IP.Equal(net.IP(v.AsSlice())) && ones == v.BitLen() {
					found = true
				}
			}
			if !found {
				t.Errorf("%s: VIP %s/%d not on lo (have %v)", b.Name, v, v.BitLen(), addrs)
			}
		}
	}

	// Route lookups only: no packet is sent to the VIPs here.
	for _, v := range l.VIPs {
		routes, err := l.Client.nl.RouteGet(net.IP(v.AsSlice()))
		if err != nil || len(routes) == 0 {
			t.Fatalf("client route to %s: %v %v", v, routes, err)
		}
		want := l.Balancer.Addr4
		if v.Is6() {
			want = l.Balancer.Addr6
		}
		if gw, _ := netip.AddrFromSlice(routes[0].Gw); gw.Unmap() != want || routes[0].LinkIndex != l.Client.Ifindex {
			t.Errorf("client route to %s: via %s dev %d, want via %s dev %d", v, routes[0].Gw, routes[0].LinkIndex, want, l.Client.Ifindex)
		}
	}
}

// assertNoLeftovers checks named namespaces, `ip netns list` and the
// test's own namespace for anything carrying prefix.
func assertNoLeftovers(t *testing.T, prefix string) {
	t.Helper()
	names, err := namedNSWithPrefix(prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(names) > 0 {
		t.Errorf("namespaces left in %s: %v", netnsRunDir, names)
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		t.Logf("ip netns list: %v (%s)", err, out) // ip is optional for this check
	} else if strings.Contains(string(out), prefix) {
		t.Errorf("ip netns list still shows %s:\n%s", prefix, out)
	}
	self, err := currentNS()
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	h, err := netlink.NewHandleAt(self)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, lk := range links {
		if strings.HasPrefix(lk.Attrs().Name, prefix) {
			t.Errorf("link %s (%s) left in own namespace", lk.Attrs().Name, lk.Type())
		}
	}
}

// TestNewFailureCleansUp interrupts a build half-way (the context is
// already cancelled, which New notices after the switch exists) and checks
// the partial lab is gone; a build that collides with a live lab's prefix
// must fail without touching that lab.
func TestNewFailureCleansUp(t *testing.T) {
	testenv.RequireRoot(t, "build network namespaces")
	t.Parallel()
	prefix := fmt.Sprintf("vfy%04x", rand.N(0x10000))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := New(ctx, Options{Prefix: prefix, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("New with cancelled context: %v, want context.Canceled", err)
	}
	assertNoLeftovers(t, prefix)

	l := ForTest(t, Options{Backends: 1, Prefix: prefix})
	if _, err := New(t.Context(), Options{Prefix: prefix}); err == nil {
		t.Fatal("second lab with the same prefix was built")
	}
	if _, err := os.Stat(netnsRunDir + "/" + l.Client.NetNS); err != nil {
		t.Fatalf("live lab damaged by the refused build: %v", err)
	}
}
