package agent

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/metrics"
)

// natMetrics is what veloflux_nat_flows reports at a scrape.
func (a *Agent) natMetrics() (metrics.NATState, error) {
	if a.dp == nil {
		return metrics.NATState{}, errors.New("the data plane is not loaded yet")
	}
	st, err := a.dp.NATStats()
	if err != nil {
		return metrics.NATState{}, err
	}
	return metrics.NATState{Flows: st.Flows, Capacity: st.Capacity}, nil
}

// primaryAddress is the SNAT address of a nat VIP that names none: the
// first global, non-secondary address of the family on the interface.
// Replies come back to it, so it must be this node's own.
func primaryAddress(ifname string, v4 bool) (netip.Addr, error) {
	family, name := netlink.FAMILY_V6, "IPv6"
	if v4 {
		family, name = netlink.FAMILY_V4, "IPv4"
	}
	link, err := netlink.LinkByName(ifname)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("read interface %s for its %s address: %w", ifname, name, err)
	}
	addrs, err := netlink.AddrList(link, family)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list the %s addresses of %s: %w", name, ifname, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || a.Flags&(unix.IFA_F_SECONDARY|unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		ip = ip.Unmap()
		if ip.IsGlobalUnicast() && ip.Is4() == v4 {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("interface %s has no global %s address to use as SNAT address", ifname, name)
}
