package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Decap is the backend-side program that strips IPIP/IP6IP6 headers
// addressed to the host, for hosts without the kernel tunnel modules.
type Decap struct {
	objs  decapObjects
	links map[string]link.Link
}

// DecapStats are the decapsulator's counters summed over CPUs.
type DecapStats struct {
	DecapPackets, DecapBytes    uint64
	PassNotTunnel, PassNotLocal uint64
	DropMalformed               uint64
}

// LoadDecap loads the decapsulator. It is never pinned: it belongs to the
// backend host's life, not to the balancer's.
func LoadDecap() (*Decap, error) {
	d := &Decap{links: map[string]link.Link{}}
	if err := loadDecapObjects(&d.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load decap program: %+v", verr)
		}
		return nil, fmt.Errorf("load decap objects: %w", err)
	}
	return d, nil
}

// AddLocal accepts tunnel packets whose outer destination is addr.
func (d *Decap) AddLocal(addr netip.Addr) error {
	if !addr.IsValid() {
		return fmt.Errorf("decap: invalid local address")
	}
	words, family := addrWords(addr.Unmap())
	key := decapVfLocalKey{Addr: words, Family: uint32(family)}
	if err := d.objs.VfDecapLocal.Put(&key, uint32(1)); err != nil {
		return fmt.Errorf("decap: add local address %v: %w", addr, err)
	}
	return nil
}

// Attach puts the decapsulator on an interface (not pinned).
func (d *Decap) Attach(ifname string, mode XDPMode) error {
	flags, err := mode.flags()
	if err != nil {
		return err
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("decap attach to %q: %w", ifname, err)
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: d.objs.VfDecap, Interface: iface.Index, Flags: flags})
	if err != nil {
		return fmt.Errorf("decap attach XDP (%s) to %s: %w", mode, ifname, err)
	}
	d.links[ifname] = l
	return nil
}

// Stats sums the per-CPU counters.
func (d *Decap) Stats() (DecapStats, error) {
	var per []decapVfDecapCounters
	if err := d.objs.VfDecapStats.Lookup(uint32(0), &per); err != nil {
		return DecapStats{}, fmt.Errorf("read decap stats: %w", err)
	}
	var out DecapStats
	for _, c := range per {
		out.DecapPackets += c.DecapPackets
		out.DecapBytes += c.DecapBytes
		out.PassNotTunnel += c.PassNotTunnel
		out.PassNotLocal += c.PassNotLocal
		out.DropMalformed += c.DropMalformed
	}
	return out, nil
}

// Close detaches from every interface and releases the program and maps.
func (d *Decap) Close() error {
	var errs []error
	for name, l := range d.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("decap detach %s: %w", name, err))
		}
	}
	d.links = nil
	if err := d.objs.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
