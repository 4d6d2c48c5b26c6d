package lab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Host is one namespace of the lab and its veth towards the bridge.
type Host struct {
	// Name is the role: "client", "balancer", "backend-N" or "switch".
	Name string
	// NetNS is the namespace's name under /run/netns (for `ip netns exec`);
	// empty when the host is the namespace of the calling process.
	NetNS string
	// IfName is the host-side veth (for the switch: the bridge). For the
	// balancer this is where the XDP load balancer attaches.
	IfName string
	// PeerName is the bridge-side end of IfName, inside the switch namespace.
	PeerName string
	// Ifindex and MAC identify IfName inside NetNS.
	Ifindex int
	MAC     net.HardwareAddr
	// Addr4 and Addr6 are IfName's addresses (/24 and /64); invalid for the
	// switch.
	Addr4, Addr6 netip.Addr

	ns netns.NsHandle
	nl *netlink.Handle
}

// Do runs fn on an OS thread that is inside h's namespace, for code that
// needs the namespace at syscall time (sockets, sysctls, netlink package
// functions). Sockets created inside fn stay in h's namespace when used
// from other goroutines afterwards.
func (h *Host) Do(fn func() error) error {
	if !h.ns.IsOpen() {
		// runInNS would otherwise run fn in the caller's namespace.
		return fmt.Errorf("%s: namespace not open (lab closed?)", h.Name)
	}
	if err := runInNS(h.ns, fn); err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	return nil
}

// Command prepares name with args to run inside h's namespace via
// `ip netns exec`, so the process also sees the namespace's /sys. For a
// host in the caller's namespace it is a plain exec.CommandContext.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if h.NetNS == "" {
		return exec.CommandContext(ctx, name, args...)
	}
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NetNS, name}, args...)...)
}

// DialContext connects from inside h's namespace; it has the signature of
// net.Dialer.DialContext so it can back an http.Transport.
func (h *Host) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Listen opens a stream listener inside h's namespace.
func (h *Host) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	var l net.Listener
	err := h.Do(func() error {
		var err error
		l, err = (&net.ListenConfig{}).Listen(ctx, network, address)
		return err
	})
	return l, err
}

// ListenPacket opens a packet socket inside h's namespace.
func (h *Host) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := h.Do(func() error {
		var err error
		pc, err = (&net.ListenConfig{}).ListenPacket(ctx, network, address)
		return err
	})
	return pc, err
}

// HTTPClient returns a client whose connections originate in h's namespace.
// It ignores proxy environment variables. Call CloseIdleConnections when
// done: idle keep-alive sockets keep the namespace alive after Close.
func (h *Host) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: h.DialContext}}
}

func (h *Host) String() string {
	ns := h.NetNS
	if ns == "" {
		ns = "host netns"
	}
	return fmt.Sprintf("%s(%s %s %s %s)", h.Name, ns, h.IfName, h.Addr4, h.Addr6)
}
