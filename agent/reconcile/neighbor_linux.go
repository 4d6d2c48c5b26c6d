//go:build linux

package reconcile

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
)

// NeighborResolver is a MACResolver that reads the kernel's neighbour
// (ARP/NDP) table of one interface, and has the kernel resolve addresses
// that are missing from it.
//
// The balancer forwards dsr packets without the kernel's stack, so the
// kernel would never resolve the reals on its own; it is asked to, by
// marking the entry as in use (NTF_USE), which makes it probe exactly as if
// it had a packet to send, on the given interface, whatever the routing
// table says.
type NeighborResolver struct {
	// Interface is the name of the interface the dsr reals are reached on.
	Interface string
	// PollInterval is how often the table is read again while the kernel
	// probes a missing address; default 25ms. The wait as a whole is
	// bounded by the context.
	PollInterval time.Duration
	// Handle is the netlink handle to use, for another network namespace;
	// nil means the current one.
	Handle *netlink.Handle
}

var _ MACResolver = (*NeighborResolver)(nil)

// usableStates are the neighbour states whose link-layer address is known.
// STALE, DELAY and PROBE hold an address that has not been confirmed lately;
// it is still the best one there is, and the kernel re-confirms it itself.
const usableStates = netlink.NUD_REACHABLE | netlink.NUD_STALE | netlink.NUD_DELAY |
	netlink.NUD_PROBE | netlink.NUD_PERMANENT

// Resolve returns addr's MAC on the interface. If the table has no usable
// entry for it, it has the kernel probe, and waits for an answer until ctx
// ends (the reconciler gives each address its own timeout).
func (n *NeighborResolver) Resolve(ctx context.Context, addr netip.Addr) (net.HardwareAddr, error) {
	if n.Interface == "" {
		return nil, fmt.Errorf("resolve MAC of %s: no interface configured", addr)
	}
	if !addr.IsValid() {
		return nil, fmt.Errorf("resolve MAC on %s: invalid address", n.Interface)
	}
	addr = addr.Unmap()
	h := n.Handle
	if h == nil {
		h = &netlink.Handle{} // the zero Handle works in the current namespace
	}
	link, err := h.LinkByName(n.Interface)
	if err != nil {
		return nil, fmt.Errorf("resolve MAC of %s: interface %q: %w", addr, n.Interface, err)
	}
	ifindex := link.Attrs().Index
	family := netlink.FAMILY_V6
	if addr.Is4() {
		family = netlink.FAMILY_V4
	}

	mac, state, err := lookupNeighbor(h, ifindex, family, addr)
	if err != nil || mac != nil {
		return mac, err
	}

	use := &netlink.Neigh{
		LinkIndex: ifindex,
		Family:    family,
		IP:        addr.AsSlice(),
		State:     netlink.NUD_NONE,
		Flags:     netlink.NTF_USE,
	}
	if err := h.NeighSet(use); err != nil {
		return nil, fmt.Errorf("resolve MAC of %s on %s: ask the kernel to probe: %w", addr, n.Interface, err)
	}

	every := n.PollInterval
	if every <= 0 {
		every = 25 * time.Millisecond
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("resolve MAC of %s on %s: no answer (neighbour state %s): %w",
				addr, n.Interface, stateName(state), ctx.Err())
		case <-tick.C:
		}
		mac, state, err = lookupNeighbor(h, ifindex, family, addr)
		if err != nil || mac != nil {
			return mac, err
		}
		// NTF_USE turned the entry INCOMPLETE synchronously, so FAILED
		// now means the probes ran out, not a leftover from before.
		if state&netlink.NUD_FAILED != 0 {
			return nil, fmt.Errorf("resolve MAC of %s on %s: no answer to ARP/NDP probes (neighbour state FAILED)", addr, n.Interface)
		}
	}
}

// lookupNeighbor returns addr's MAC when the table has a usable entry, and
// otherwise the state of the entry it has (0 for none).
func lookupNeighbor(h *netlink.Handle, ifindex, family int, addr netip.Addr) (net.HardwareAddr, int, error) {
	neighs, err := h.NeighList(ifindex, family)
	if err != nil {
		return nil, 0, fmt.Errorf("resolve MAC of %s: read neighbour table: %w", addr, err)
	}
	for _, ne := range neighs {
		a, ok := netip.AddrFromSlice(ne.IP)
		if !ok || a.Unmap() != addr {
			continue
		}
		if ne.State&usableStates != 0 && len(ne.HardwareAddr) == 6 {
			return append(net.HardwareAddr(nil), ne.HardwareAddr...), ne.State, nil
		}
		return nil, ne.State, nil
	}
	return nil, 0, nil
}

func stateName(s int) string {
	names := []struct {
		bit  int
		name string
	}{
		{netlink.NUD_INCOMPLETE, "INCOMPLETE"},
		{netlink.NUD_REACHABLE, "REACHABLE"},
		{netlink.NUD_STALE, "STALE"},
		{netlink.NUD_DELAY, "DELAY"},
		{netlink.NUD_PROBE, "PROBE"},
		{netlink.NUD_FAILED, "FAILED"},
		{netlink.NUD_NOARP, "NOARP"},
		{netlink.NUD_PERMANENT, "PERMANENT"},
	}
	for _, n := range names {
		if s&n.bit != 0 {
			return n.name
		}
	}
	return "NONE"
}
