package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// DefaultDecapPinPath is where `veloflux decap` pins the decapsulator's
// maps and links: a directory of its own, so that a backend that is also a
// balancer keeps the two apart, and `veloflux detach` can remove either.
const DefaultDecapPinPath = "/sys/fs/bpf/veloflux-decap"

// DefaultGUEPort is the UDP port GUE packets are sent to (as Katran does).
const DefaultGUEPort = uint16(decapVfDecapDefaultVF_DECAP_DEFAULT_GUE_PORT)

// MaxDecapLocals is how many local addresses the decapsulator accepts.
const MaxDecapLocals = int(balancerVfSizeVF_DECAP_MAX_LOCAL)

// decapPins are the decapsulator's pinned maps. All of them are rewritten
// whole on every start (the locals and the GUE port) or only count, so a
// layout an upgrade changed is replaced rather than refused.
var decapPins = []string{"vf_decap_local", "vf_decap_config", "vf_decap_stats"}

// DecapOptions configure LoadDecap.
type DecapOptions struct {
	// PinPath is the BPF filesystem directory for the maps and links; ""
	// pins nothing, and the program stops with the process (tests).
	PinPath string
}

// Decap is the backend-side program that strips IPIP, IP6IP6 and GUE
// headers addressed to the host, for hosts without the kernel tunnel
// modules (or that would rather not configure them).
type Decap struct {
	pinPath string
	objs    decapObjects
	links   map[string]link.Link // by interface name
	// readOnly: opened from pins by OpenPinnedDecap, with no program.
	readOnly bool
}

// DecapStats are the decapsulator's counters summed over CPUs. The fields
// are those of struct vf_decap_counters (bpf/include/vf_decap.h).
type DecapStats struct {
	IPIP4Packets       uint64 `json:"ipip4_packets"`
	IPIP6Packets       uint64 `json:"ipip6_packets"`
	GUE4Packets        uint64 `json:"gue4_packets"`
	GUE6Packets        uint64 `json:"gue6_packets"`
	DecapBytes         uint64 `json:"decap_bytes"`
	PassNotTunnel      uint64 `json:"pass_not_tunnel"`
	PassNotLocal       uint64 `json:"pass_not_local"`
	PassGUEControl     uint64 `json:"pass_gue_control"`
	DropTruncated      uint64 `json:"drop_truncated"`
	DropBadLength      uint64 `json:"drop_bad_length"`
	DropBadInner       uint64 `json:"drop_bad_inner"`
	DropGUEVariant     uint64 `json:"drop_gue_variant"`
	DropGUEUnsupported uint64 `json:"drop_gue_unsupported"`
}

// Decapsulated is the number of packets decapsulated, of every kind.
func (s DecapStats) Decapsulated() uint64 {
	return s.IPIP4Packets + s.IPIP6Packets + s.GUE4Packets + s.GUE6Packets
}

// Dropped is the number of tunnel packets dropped, for every reason.
func (s DecapStats) Dropped() uint64 {
	return s.DropTruncated + s.DropBadLength + s.DropBadInner + s.DropGUEVariant + s.DropGUEUnsupported
}

// LoadDecap loads the decapsulator. With a pin path, maps already pinned
// there are reused, counters included, so a restarted `veloflux decap`
// adopts what the previous one left.
func LoadDecap(opts DecapOptions) (*Decap, error) {
	spec, err := loadDecap()
	if err != nil {
		return nil, fmt.Errorf("parse embedded decap object: %w", err)
	}
	if opts.PinPath == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	} else {
		if err := ensureBPFFS(opts.PinPath); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(opts.PinPath, 0o700); err != nil {
			return nil, explainPrivilege(fmt.Errorf("create pin directory %s: %w", opts.PinPath, err))
		}
		if _, err := replaceIncompatiblePins(spec, opts.PinPath, decapPins); err != nil {
			return nil, explainPrivilege(err)
		}
	}
	d := &Decap{pinPath: opts.PinPath, links: map[string]link.Link{}}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: opts.PinPath}})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, explainPrivilege(&programError{name: "decap", verr: verr})
		}
		return nil, explainPrivilege(fmt.Errorf("load decap objects: %w", err))
	}
	return d, nil
}

// OpenPinnedDecap opens the maps a `veloflux decap` pinned under pinPath,
// without loading a program, for tools that only read them.
func OpenPinnedDecap(pinPath string) (*Decap, error) {
	d := &Decap{pinPath: pinPath, links: map[string]link.Link{}, readOnly: true}
	targets := []struct {
		name string
		dst  **ebpf.Map
	}{
		{"vf_decap_local", &d.objs.VfDecapLocal}, {"vf_decap_config", &d.objs.VfDecapConfig},
		{"vf_decap_stats", &d.objs.VfDecapStats},
	}
	for _, target := range targets {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, target.name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			d.objs.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("no pinned map %s under %s: is `veloflux decap` running with this pin path?",
					target.name, pinPath)
			}
			return nil, explainPrivilege(fmt.Errorf("open pinned map %s: %w", target.name, err))
		}
		*target.dst = m
	}
	return d, nil
}

// PinPath is the directory the decapsulator pins under ("" when unpinned).
func (d *Decap) PinPath() string { return d.pinPath }

// SetLocals makes addrs the set of outer destination addresses accepted.
// Addresses in both the old and the new set are never touched, so they
// never stop being accepted; those no longer wanted go first, which leaves
// room for the new ones in a full map.
func (d *Decap) SetLocals(addrs []netip.Addr) error {
	if len(addrs) > MaxDecapLocals {
		return fmt.Errorf("decap: %d local addresses, at most %d fit", len(addrs), MaxDecapLocals)
	}
	want := make(map[decapVfLocalKey]bool, len(addrs))
	for _, a := range addrs {
		if !a.IsValid() || a.Zone() != "" {
			return fmt.Errorf("decap: local address %q: want an IP address without a zone", a)
		}
		words, family := addrWords(a.Unmap())
		want[decapVfLocalKey{Addr: words, Family: uint32(family)}] = true
	}
	have, err := d.localKeys()
	if err != nil {
		return err
	}
	for _, key := range have {
		if want[key] {
			continue
		}
		if err := d.objs.VfDecapLocal.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("decap: remove local address %v: %w", localKeyAddr(key), err)
		}
	}
	for key := range want {
		if err := d.objs.VfDecapLocal.Put(&key, uint32(1)); err != nil {
			return fmt.Errorf("decap: add local address %v: %w", localKeyAddr(key), err)
		}
	}
	return nil
}

// Locals lists the accepted outer destination addresses, sorted.
func (d *Decap) Locals() ([]netip.Addr, error) {
	keys, err := d.localKeys()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(keys))
	for _, k := range keys {
		out = append(out, localKeyAddr(k))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

func (d *Decap) localKeys() ([]decapVfLocalKey, error) {
	var (
		key  decapVfLocalKey
		val  uint32
		keys []decapVfLocalKey
	)
	it := d.objs.VfDecapLocal.Iterate()
	for it.Next(&key, &val) {
		keys = append(keys, key)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("decap: read local addresses: %w", err)
	}
	return keys, nil
}

func localKeyAddr(k decapVfLocalKey) netip.Addr { return wordsAddr(k.Addr, uint8(k.Family)) }

// SetGUEPort sets the UDP port GUE packets arrive on; 0 turns GUE off
// (only IPIP and IP6IP6 are decapsulated then).
func (d *Decap) SetGUEPort(port uint16) error {
	if err := d.objs.VfDecapConfig.Put(uint32(0), &decapVfDecapConfigT{GuePort: port}); err != nil {
		return fmt.Errorf("decap: set the GUE port to %d: %w", port, err)
	}
	return nil
}

// GUEPort is the UDP port GUE packets are accepted on, 0 when GUE is off.
func (d *Decap) GUEPort() (uint16, error) {
	var cfg decapVfDecapConfigT
	if err := d.objs.VfDecapConfig.Lookup(uint32(0), &cfg); err != nil {
		return 0, fmt.Errorf("decap: read the GUE port: %w", err)
	}
	return cfg.GuePort, nil
}

func (d *Decap) linkPin(ifname string) string {
	return filepath.Join(d.pinPath, linkPinPrefix+ifname)
}

// Attach puts the decapsulator on an interface. A link a previous run
// pinned for it is adopted: the program is swapped on the live link, so
// the interface is never without one. It reports whether it adopted one.
// A link that lost its interface (the interface was deleted, or is another
// one now) or runs in another XDP mode than mode asks is replaced.
func (d *Decap) Attach(ifname string, mode XDPMode) (adopted bool, err error) {
	if d.readOnly {
		return false, errors.New("decap: opened read-only from pins")
	}
	flags, err := mode.flags()
	if err != nil {
		return false, err
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return false, fmt.Errorf("decap: attach to %q: %w", ifname, err)
	}
	if held, ok := d.links[ifname]; ok {
		info, err := held.Info()
		if err != nil {
			return false, fmt.Errorf("decap: read the XDP link of %s: %w", ifname, err)
		}
		if x := info.XDP(); x != nil && int(x.Ifindex) == iface.Index && d.inMode(iface.Index, mode) {
			return true, nil // already there, with this program
		}
		// Severed, or asked for another mode: a link keeps the mode it
		// was made in, so it is replaced.
		delete(d.links, ifname)
		if err := d.closeLink(ifname, held, true); err != nil {
			return false, err
		}
	}
	if d.pinPath != "" {
		adopted, err := d.adopt(ifname, iface.Index, mode)
		if adopted || err != nil {
			return adopted, err
		}
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: d.objs.VfDecap, Interface: iface.Index, Flags: flags})
	if err != nil {
		return false, explainPrivilege(fmt.Errorf("decap: attach XDP (%s) to %s: %w", mode, ifname, err))
	}
	if d.pinPath != "" {
		if err := l.Pin(d.linkPin(ifname)); err != nil {
			l.Close()
			return false, explainPrivilege(fmt.Errorf("decap: pin the XDP link of %s: %w", ifname, err))
		}
	}
	d.links[ifname] = l
	return false, nil
}

// adopt takes over the link pinned for ifname when it still holds the
// interface with index ifindex in a mode that suits mode. A pinned link
// that does not is unpinned, so that Attach makes a new one.
func (d *Decap) adopt(ifname string, ifindex int, mode XDPMode) (bool, error) {
	pinned, err := link.LoadPinnedLink(d.linkPin(ifname), nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, explainPrivilege(fmt.Errorf("decap: open the pinned link %s: %w", d.linkPin(ifname), err))
	}
	info, err := pinned.Info()
	if err != nil {
		pinned.Close()
		return false, fmt.Errorf("decap: read the pinned link %s: %w", d.linkPin(ifname), err)
	}
	if x := info.XDP(); x != nil && int(x.Ifindex) == ifindex && d.inMode(ifindex, mode) {
		err := pinned.Update(d.objs.VfDecap)
		if err == nil {
			d.links[ifname] = pinned
			return true, nil
		}
		if !errors.Is(err, unix.ENOLINK) {
			pinned.Close()
			return false, fmt.Errorf("decap: replace the program on the pinned link %s: %w", d.linkPin(ifname), err)
		}
	}
	// Severed, on another interface of that name, or in the wrong mode.
	return false, d.closeLink(ifname, pinned, true)
}

// inMode reports whether the XDP program on the interface runs in the
// mode asked for; auto accepts either.
func (d *Decap) inMode(ifindex int, mode XDPMode) bool {
	if mode == XDPAuto || mode == "" {
		return true
	}
	have, err := attachedMode(ifindex)
	return err == nil && have == mode
}

// Detach removes the decapsulator from an interface, pinned link included.
func (d *Decap) Detach(ifname string) error {
	l, ok := d.links[ifname]
	if !ok {
		if d.pinPath == "" {
			return fmt.Errorf("decap: detach %s: not attached", ifname)
		}
		var err error
		if l, err = link.LoadPinnedLink(d.linkPin(ifname), nil); err != nil {
			return fmt.Errorf("decap: detach %s: %w", ifname, err)
		}
	}
	delete(d.links, ifname)
	return d.closeLink(ifname, l, true)
}

// closeLink closes a link, unpinning it first when asked (which detaches
// it once this was the last reference).
func (d *Decap) closeLink(ifname string, l link.Link, unpin bool) error {
	if unpin && d.pinPath != "" {
		if err := l.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
			l.Close()
			return fmt.Errorf("decap: unpin the XDP link of %s: %w", ifname, err)
		}
	}
	if err := l.Close(); err != nil {
		return fmt.Errorf("decap: close the XDP link of %s: %w", ifname, err)
	}
	return nil
}

// Attached lists the interfaces this Decap holds a link for, sorted.
func (d *Decap) Attached() []string {
	names := make([]string, 0, len(d.links))
	for name := range d.links {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// PinnedLinks describes every XDP link pinned under the pin path.
func (d *Decap) PinnedLinks() ([]AttachedLink, error) {
	if d.pinPath == "" {
		return nil, nil
	}
	return pinnedLinks(d.pinPath)
}

// Severed lists the interfaces this Decap holds a link for whose interface
// went away (deleted, or its namespace), so that a new one of that name can
// be attached to.
func (d *Decap) Severed() ([]string, error) {
	var out []string
	for name, l := range d.links {
		info, err := l.Info()
		if err != nil {
			return nil, fmt.Errorf("decap: read the XDP link of %s: %w", name, err)
		}
		if x := info.XDP(); x == nil || x.Ifindex == 0 {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out, nil
}

// Unpinned lists the interfaces this Decap holds a link for whose pin was
// removed behind its back (`veloflux decap detach` while it runs): the
// link lives on only through this process's handle.
func (d *Decap) Unpinned() []string {
	if d.pinPath == "" {
		return nil
	}
	var out []string
	for name := range d.links {
		if _, err := os.Stat(d.linkPin(name)); errors.Is(err, os.ErrNotExist) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// Stats sums the per-CPU counters.
func (d *Decap) Stats() (DecapStats, error) {
	var per []decapVfDecapCounters
	if err := d.objs.VfDecapStats.Lookup(uint32(0), &per); err != nil {
		return DecapStats{}, fmt.Errorf("read decap stats: %w", err)
	}
	var out DecapStats
	for _, c := range per {
		out.IPIP4Packets += c.Ipip4Packets
		out.IPIP6Packets += c.Ipip6Packets
		out.GUE4Packets += c.Gue4Packets
		out.GUE6Packets += c.Gue6Packets
		out.DecapBytes += c.DecapBytes
		out.PassNotTunnel += c.PassNotTunnel
		out.PassNotLocal += c.PassNotLocal
		out.PassGUEControl += c.PassGueControl
		out.DropTruncated += c.DropTruncated
		out.DropBadLength += c.DropBadLength
		out.DropBadInner += c.DropBadInner
		out.DropGUEVariant += c.DropGueVariant
		out.DropGUEUnsupported += c.DropGueUnsupported
	}
	return out, nil
}

// Close releases this process's handles. Pinned links and maps stay, so
// decapsulation goes on while no `veloflux decap` runs; without a pin path
// the program leaves every interface.
func (d *Decap) Close() error {
	var errs []error
	for name, l := range d.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("decap: close the link of %s: %w", name, err))
		}
	}
	d.links = map[string]link.Link{}
	if err := d.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close decap objects: %w", err))
	}
	return errors.Join(errs...)
}
