package dataplane

import (
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// DefaultPinPath is where the maps and XDP links live between agent runs.
const DefaultPinPath = "/sys/fs/bpf/veloflux"

// The map sizes Load uses for a zero Options field: enum vf_size of
// bpf/include/vf_types.h, as bpf2go exports it.
const (
	DefaultMaxVIPs       = uint32(balancerVfSizeVF_DEFAULT_MAX_VIPS)
	DefaultMaxReals      = uint32(balancerVfSizeVF_DEFAULT_MAX_REALS)
	DefaultRingSize      = uint32(balancerVfSizeVF_DEFAULT_RING_SIZE)
	DefaultConntrackSize = uint32(balancerVfSizeVF_DEFAULT_CT_SIZE)
	DefaultNewFlowTable  = uint32(balancerVfSizeVF_DEFAULT_FLOW_LIMIT_SIZE)
	DefaultNATTableSize  = uint32(balancerVfSizeVF_DEFAULT_NAT_SIZE)
)

// linkPinPrefix names pinned XDP links: link_xdp_<ifname>.
const linkPinPrefix = "link_xdp_"

// XDPMode selects how the program is attached.
type XDPMode string

const (
	XDPAuto    XDPMode = "auto"    // let the kernel pick: native when the driver supports it
	XDPNative  XDPMode = "native"  // driver mode; fails if the driver lacks XDP
	XDPGeneric XDPMode = "generic" // skb mode; works everywhere, slower
)

func (m XDPMode) flags() (link.XDPAttachFlags, error) {
	switch m {
	case XDPAuto, "":
		return 0, nil
	case XDPNative:
		return link.XDPDriverMode, nil
	case XDPGeneric:
		return link.XDPGenericMode, nil
	}
	return 0, fmt.Errorf("xdp mode %q: want auto, native or generic", string(m))
}

// Options size the maps. A size only takes effect when the maps are created;
// pinned maps of another size are refused rather than silently reused.
type Options struct {
	PinPath       string // "" = no pinning (tests, benchmarks)
	MaxVIPs       uint32
	MaxReals      uint32
	RingSize      uint32 // must be prime; agent/maglev builds the rings
	ConntrackSize uint32 // flows per address family
	// NewFlowTable is how many new-flow buckets (source and CPU) the
	// per-source limit keeps, shared out among the CPUs. Its map is not
	// pinned, so a new size only needs a restart.
	NewFlowTable uint32
	// NATTableSize is how many nat flows each direction's table holds
	// (both families together).
	NATTableSize uint32
}

func (o *Options) applyDefaults() {
	if o.MaxVIPs == 0 {
		o.MaxVIPs = DefaultMaxVIPs
	}
	if o.MaxReals == 0 {
		o.MaxReals = DefaultMaxReals
	}
	if o.RingSize == 0 {
		o.RingSize = DefaultRingSize
	}
	if o.ConntrackSize == 0 {
		o.ConntrackSize = DefaultConntrackSize
	}
	if o.NewFlowTable == 0 {
		o.NewFlowTable = DefaultNewFlowTable
	}
	if o.NATTableSize == 0 {
		o.NATTableSize = DefaultNATTableSize
	}
}

// Dataplane is a loaded balancer: its program, its maps and its links.
type Dataplane struct {
	opts  Options
	objs  balancerObjects
	inner *ebpf.MapSpec // template for new rings
	clock *kernelClock
	// replacedPins names the pinned maps Load replaced because an upgrade
	// changed their layout (see rebuiltPins).
	replacedPins []string

	mu    sync.Mutex
	links map[string]link.Link // by interface name

	// vipMu serialises the VIP writes, which keep vf_vip_filter's counts
	// in step with vf_vips by reading before they write.
	vipMu sync.Mutex

	// What Load moved from a conntrack of the older layout.
	movedFlows4, droppedFlows4 int
}

// Load loads the balancer. With a pin path, maps already pinned there are
// reused (with their contents), so a restarted agent keeps every flow.
func Load(opts Options) (*Dataplane, error) {
	opts.applyDefaults()
	spec, err := loadBalancer()
	if err != nil {
		return nil, fmt.Errorf("parse embedded balancer object: %w", err)
	}
	sizes := map[string]uint32{
		"vf_vips":       opts.MaxVIPs,
		"vf_vips_by_id": opts.MaxVIPs,
		"vf_rings":      opts.MaxVIPs,
		"vf_stats_vip":  opts.MaxVIPs,
		"vf_reals":      opts.MaxReals,
		"vf_stats_real": opts.MaxReals,
		"vf_ct4":        ct4Sets(opts.ConntrackSize),
		"vf_ct6":        opts.ConntrackSize,
		"vf_flow_limit": opts.NewFlowTable,
		"vf_nat_vips":   opts.MaxVIPs,
		"vf_nat_fwd":    opts.NATTableSize,
		"vf_nat_rev":    opts.NATTableSize,
	}
	for name, size := range sizes {
		spec.Maps[name].MaxEntries = size
	}
	if err := spec.Variables["vf_ct4_sets"].Set(ct4Sets(opts.ConntrackSize)); err != nil {
		return nil, fmt.Errorf("size the IPv4 conntrack: %w", err)
	}
	inner := spec.Maps["vf_rings"].InnerMap
	inner.MaxEntries = opts.RingSize

	mapOpts := ebpf.MapOptions{PinPath: opts.PinPath}
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
	}

	d := &Dataplane{opts: opts, inner: inner.Copy(), links: map[string]link.Link{}}
	var legacy *legacyConntrack4
	if opts.PinPath != "" {
		retired, err := removeRetiredPins(opts.PinPath)
		if err != nil {
			return nil, explainPrivilege(err)
		}
		stale, err := replaceStalePins(spec, opts.PinPath)
		if err != nil {
			return nil, explainPrivilege(err)
		}
		d.replacedPins = append(retired, stale...)
		if legacy, err = takeLegacyConntrack4(opts.PinPath); err != nil {
			return nil, explainPrivilege(err)
		}
	}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: mapOpts})
	if err != nil {
		legacy.restore()
	}
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return nil, &IncompatiblePinError{Map: incompatiblePin(spec, opts.PinPath), PinDir: opts.PinPath, Err: err}
	}
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, explainPrivilege(&programError{name: "balancer", verr: verr})
		}
		return nil, explainPrivilege(fmt.Errorf("load balancer objects: %w", err))
	}
	if legacy != nil {
		if d.movedFlows4, d.droppedFlows4, err = legacy.moveInto(d.objs.VfCt4); err != nil {
			d.objs.Close()
			return nil, err
		}
	}
	if err := d.initSettings(); err != nil {
		d.objs.Close()
		return nil, err
	}
	if err := d.rebuildVIPIndexes(); err != nil {
		d.objs.Close()
		return nil, err
	}
	return d, nil
}

// initSettings refuses pinned rings of another size (the kernel does not
// compare inner map sizes, and the program indexes with settings.ring_size)
// and sets up the jiffies clock, reusing the tick rate a previous agent
// measured on this boot.
func (d *Dataplane) initSettings() error {
	s, err := d.readSettings()
	if err != nil {
		return err
	}
	if s.RingSize != 0 && s.RingSize != d.opts.RingSize {
		return fmt.Errorf("rings pinned under %s have %d slots, configured ring size is %d "+
			"(keep %d or run `veloflux detach` first)", d.opts.PinPath, s.RingSize, d.opts.RingSize, s.RingSize)
	}
	if d.clock, err = newKernelClock(s.Hz); err != nil {
		return err
	}
	if s.RingSize != d.opts.RingSize || s.Hz != d.clock.hz {
		s.RingSize, s.Hz = d.opts.RingSize, d.clock.hz
		if err := d.writeSettings(s); err != nil {
			return err
		}
	}
	// The lookup flags and the SNAT address bits derive from the other
	// maps. Settings replaced by an upgrade (rebuiltPins) start without
	// them, and a reconcile that finds the VIPs as they were writes none.
	return d.refreshFlags()
}

// RingSize is the number of slots in every ring.
func (d *Dataplane) RingSize() uint32 { return d.opts.RingSize }

// MaxVIPs is the number of VIP ids available.
func (d *Dataplane) MaxVIPs() uint32 { return d.opts.MaxVIPs }

// ct4Ways is the number of flows in one set of the IPv4 conntrack.
const ct4Ways = uint32(len(balancerVfCt4Set{}.Way))

// ct4Sets is the number of sets that hold size IPv4 flows (rounded up).
func ct4Sets(size uint32) uint32 { return max(1, (size+ct4Ways-1)/ct4Ways) }

// ConntrackSize is the flow capacity of each family's conntrack table.
func (d *Dataplane) ConntrackSize() uint32 { return d.opts.ConntrackSize }

// NATTableSize is the flow capacity of each nat table.
func (d *Dataplane) NATTableSize() uint32 { return d.opts.NATTableSize }

// MaxReals is the number of real ids available (id 0 is reserved).
func (d *Dataplane) MaxReals() uint32 { return d.opts.MaxReals }

// MovedFlows4 says how many IPv4 flows Load moved from a conntrack of the
// layout before the table of sets, and how many of them did not fit their
// set (0, 0 when there was none).
func (d *Dataplane) MovedFlows4() (moved, dropped int) { return d.movedFlows4, d.droppedFlows4 }

// ReplacedPins names the pinned maps Load replaced because this version
// lays them out differently (their counters start again from zero).
func (d *Dataplane) ReplacedPins() []string { return d.replacedPins }

// ProgramID is the kernel's id of the loaded balancer program.
func (d *Dataplane) ProgramID() (uint32, error) {
	info, err := d.objs.VfBalancer.Info()
	if err != nil {
		return 0, fmt.Errorf("read balancer program info: %w", err)
	}
	id, _ := info.ID()
	return uint32(id), nil
}

func (d *Dataplane) linkPin(ifname string) string {
	return filepath.Join(d.opts.PinPath, linkPinPrefix+ifname)
}

// Attach puts the balancer on an interface. If a link is already pinned for
// it (a previous agent), the program is swapped on that live link, so there
// is no moment without a program and the maps stay as they are. Every path
// registers the interface's MAC first (see RegisterInterface).
func (d *Dataplane) Attach(ifname string, mode XDPMode) error {
	flags, err := mode.flags()
	if err != nil {
		return err
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("attach to %q: %w", ifname, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.registerInterface(iface); err != nil {
		return err
	}
	if old, ok := d.links[ifname]; ok {
		err := old.Update(d.objs.VfBalancer)
		if err == nil {
			return d.keepOrSwitchMode(ifname, iface.Index, old, mode)
		}
		if !errors.Is(err, unix.ENOLINK) {
			return fmt.Errorf("replace program on %s: %w", ifname, err)
		}
		// Severed: detached behind our back (bpftool link detach) or
		// its interface was deleted. Drop it and attach afresh.
		delete(d.links, ifname)
		if err := d.dropSeveredLink(ifname, old); err != nil {
			return err
		}
	} else if d.opts.PinPath != "" {
		pinned, err := link.LoadPinnedLink(d.linkPin(ifname), nil)
		switch {
		case err == nil:
			err := pinned.Update(d.objs.VfBalancer)
			if err == nil {
				d.links[ifname] = pinned
				return d.keepOrSwitchMode(ifname, iface.Index, pinned, mode)
			}
			if !errors.Is(err, unix.ENOLINK) {
				pinned.Close()
				return fmt.Errorf("replace program on pinned link %s: %w", d.linkPin(ifname), err)
			}
			// A pin left by a link that was severed while no agent ran
			// would otherwise block every start.
			if err := d.dropSeveredLink(ifname, pinned); err != nil {
				return err
			}
		case !errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("open pinned link %s: %w", d.linkPin(ifname), err)
		}
	}
	return d.attachNewLocked(ifname, iface.Index, mode, flags)
}

// attachNewLocked creates and pins a new XDP link. Called with d.mu held.
func (d *Dataplane) attachNewLocked(ifname string, ifindex int, mode XDPMode, flags link.XDPAttachFlags) error {
	l, err := link.AttachXDP(link.XDPOptions{Program: d.objs.VfBalancer, Interface: ifindex, Flags: flags})
	if err != nil {
		return fmt.Errorf("attach XDP (%s) to %s: %w", mode, ifname, err)
	}
	if d.opts.PinPath != "" {
		if err := l.Pin(d.linkPin(ifname)); err != nil {
			l.Close()
			return fmt.Errorf("pin XDP link of %s: %w", ifname, err)
		}
	}
	d.links[ifname] = l
	return nil
}

// keepOrSwitchMode checks that a link whose program was just swapped runs in
// the mode asked for. A link keeps the mode it was created in, and the
// kernel lets a program run natively or generically on an interface but
// never both, so a change of xdp_mode (by reload, or across a restart that
// adopted the pins) means a new link: the old one goes, then the new one is
// created. Packets arriving between the two take the host's stack; the
// maps, and so every flow, stay. If the new mode fails, the old mode is put
// back. "auto" accepts whatever mode the link has. Called with d.mu held.
func (d *Dataplane) keepOrSwitchMode(ifname string, ifindex int, l link.Link, mode XDPMode) error {
	if mode == XDPAuto || mode == "" {
		return nil
	}
	have, err := attachedMode(ifindex)
	if err != nil {
		return fmt.Errorf("read the XDP mode of %s: %w", ifname, err)
	}
	if have == mode {
		return nil
	}
	flags, err := mode.flags()
	if err != nil {
		return err
	}
	delete(d.links, ifname)
	if err := d.dropSeveredLink(ifname, l); err != nil {
		return fmt.Errorf("switch %s from %s to %s XDP: %w", ifname, have, mode, err)
	}
	err = d.attachNewLocked(ifname, ifindex, mode, flags)
	if err == nil {
		return nil
	}
	if oldFlags, ferr := have.flags(); ferr == nil {
		if rerr := d.attachNewLocked(ifname, ifindex, have, oldFlags); rerr != nil {
			return fmt.Errorf("switch %s from %s to %s XDP: %w; restoring %s failed too, the interface has no program: %w",
				ifname, have, mode, err, have, rerr)
		}
	}
	return fmt.Errorf("switch %s from %s to %s XDP (kept %s): %w", ifname, have, mode, have, err)
}

// attachedMode asks the kernel in which mode an interface runs XDP now.
func attachedMode(ifindex int) (XDPMode, error) {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return "", err
	}
	x := l.Attrs().Xdp
	if x == nil || !x.Attached {
		return "", fmt.Errorf("no XDP program on ifindex %d", ifindex)
	}
	switch x.AttachMode {
	case nl.XDP_ATTACHED_DRV:
		return XDPNative, nil
	case nl.XDP_ATTACHED_SKB:
		return XDPGeneric, nil
	}
	return "", fmt.Errorf("XDP on ifindex %d is attached in kernel mode %d, neither native nor generic", ifindex, x.AttachMode)
}

// RegisterInterface tells the program an interface's own MAC and MTU: the
// program forwards only frames addressed to the MAC and sends with it as
// the source, and answers ipip and gue packets that would exceed the MTU
// once encapsulated (Settings.ICMPTooBig). Attach does this; call it again
// when the interface's MAC or MTU changes. A VIP
// packet on an interface without an entry is passed to the stack
// (ReasonPassIfaceUnknown), and so is every VIP packet on an interface that
// has no Ethernet MAC (loopback, an L3 tunnel): it gets no entry, since the
// balancer has no frame to forward there.
func (d *Dataplane) RegisterInterface(ifname string) error {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("register interface %q: %w", ifname, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.registerInterface(iface)
}

func (d *Dataplane) registerInterface(iface *net.Interface) error {
	// net reports no hardware address for an all-zero one (loopback).
	if len(iface.HardwareAddr) != 6 {
		return d.forgetIndex(iface.Name, iface.Index)
	}
	return d.setInterfaceMAC(iface.Index, iface.HardwareAddr, iface.MTU)
}

// setInterfaceMAC writes the interface's entry into its slot of
// vf_iface_slots, or into the overflow hash vf_ifaces when another
// interface holds the slot. The program reads the slot first, so an entry
// there must never be left in the hash as well (a stale MAC would win
// after the slot is freed); the hash entry is removed once the slot is
// written.
func (d *Dataplane) setInterfaceMAC(ifindex int, mac net.HardwareAddr, mtu int) error {
	if ifindex <= 0 || ifindex > math.MaxUint32 {
		return fmt.Errorf("register MAC %s: interface index %d out of range", mac, ifindex)
	}
	if mtu < 0 {
		return fmt.Errorf("register MAC %s: interface %d has MTU %d", mac, ifindex, mtu)
	}
	// Loopback's 65536 does not fit the field; no encapsulated packet
	// reaches 65535 bytes either (the program drops those as drop_encap).
	val := balancerVfIface{Ifindex: uint32(ifindex), Mtu: uint16(min(mtu, math.MaxUint16))}
	copy(val.Mac[:], mac)
	slot := ifaceSlot(uint32(ifindex))
	var held balancerVfIface
	if err := d.objs.VfIfaceSlots.Lookup(slot, &held); err != nil {
		return fmt.Errorf("read interface slot %d: %w", slot, err)
	}
	if held.Ifindex != 0 && held.Ifindex != uint32(ifindex) {
		if err := d.objs.VfIfaces.Put(uint32(ifindex), &val); err != nil {
			return fmt.Errorf("register MAC %s of interface %d: %w", mac, ifindex, err)
		}
		return nil
	}
	if err := d.objs.VfIfaceSlots.Put(slot, &val); err != nil {
		return fmt.Errorf("register MAC %s of interface %d: %w", mac, ifindex, err)
	}
	if err := d.objs.VfIfaces.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove the overflow entry of interface %d: %w", ifindex, err)
	}
	return nil
}

// interfaceMAC returns the MAC the program holds for ifindex, or nil.
func (d *Dataplane) interfaceMAC(ifindex int) (net.HardwareAddr, error) {
	var val balancerVfIface
	if err := d.objs.VfIfaceSlots.Lookup(ifaceSlot(uint32(ifindex)), &val); err != nil {
		return nil, fmt.Errorf("read interface slot of %d: %w", ifindex, err)
	}
	if val.Ifindex == uint32(ifindex) {
		return net.HardwareAddr(val.Mac[:]), nil
	}
	err := d.objs.VfIfaces.Lookup(uint32(ifindex), &val)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read overflow entry of interface %d: %w", ifindex, err)
	}
	return net.HardwareAddr(val.Mac[:]), nil
}

// ifaceSlot is the slot of vf_iface_slots the program reads for ifindex.
func ifaceSlot(ifindex uint32) uint32 { return ifindex % uint32(balancerVfSizeVF_MAX_IFACES) }

// forgetInterface removes the MAC entry of an interface the program left,
// so that a later interface given the same index starts unregistered.
func (d *Dataplane) forgetInterface(ifname string) error {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil // gone: nothing can arrive on its index any more
	}
	return d.forgetIndex(ifname, iface.Index)
}

func (d *Dataplane) forgetIndex(ifname string, ifindex int) error {
	slot := ifaceSlot(uint32(ifindex))
	var held balancerVfIface
	if err := d.objs.VfIfaceSlots.Lookup(slot, &held); err != nil {
		return fmt.Errorf("read interface slot %d: %w", slot, err)
	}
	if held.Ifindex == uint32(ifindex) {
		if err := d.objs.VfIfaceSlots.Put(slot, &balancerVfIface{}); err != nil {
			return fmt.Errorf("forget MAC of interface %s: %w", ifname, err)
		}
	}
	if err := d.objs.VfIfaces.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget MAC of interface %s: %w", ifname, err)
	}
	return nil
}

// dropSeveredLink unpins and closes a link that no longer holds an
// interface, so that a fresh one can take its pin. Called with d.mu held.
func (d *Dataplane) dropSeveredLink(ifname string, l link.Link) error {
	if d.opts.PinPath != "" {
		if err := l.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
			l.Close()
			return fmt.Errorf("unpin severed XDP link of %s: %w", ifname, err)
		}
	}
	return l.Close()
}

// Attached lists the interfaces this Dataplane holds a link for.
func (d *Dataplane) Attached() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	names := make([]string, 0, len(d.links))
	for name := range d.links {
		names = append(names, name)
	}
	return names
}

// AdoptPinnedLinks opens every link pinned under the pin path, so that a new
// agent knows which interfaces a previous one served. It does not touch the
// program on them; Attach does that.
func (d *Dataplane) AdoptPinnedLinks() ([]string, error) {
	if d.opts.PinPath == "" {
		return nil, nil
	}
	entries, err := os.ReadDir(d.opts.PinPath)
	if err != nil {
		return nil, fmt.Errorf("list pins in %s: %w", d.opts.PinPath, err)
	}
	var names []string
	for _, e := range entries {
		ifname, ok := strings.CutPrefix(e.Name(), linkPinPrefix)
		if ok {
			names = append(names, ifname)
		}
	}
	return names, nil
}

// Detach removes the balancer from an interface, pinned link included.
func (d *Dataplane) Detach(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	l, ok := d.links[ifname]
	if !ok {
		if d.opts.PinPath == "" {
			return fmt.Errorf("detach %s: not attached", ifname)
		}
		var err error
		if l, err = link.LoadPinnedLink(d.linkPin(ifname), nil); err != nil {
			return fmt.Errorf("detach %s: %w", ifname, err)
		}
	}
	delete(d.links, ifname)
	if d.opts.PinPath != "" {
		if err := l.Unpin(); err != nil {
			l.Close()
			return fmt.Errorf("unpin XDP link of %s: %w", ifname, err)
		}
	}
	if err := l.Close(); err != nil {
		return fmt.Errorf("close XDP link of %s: %w", ifname, err)
	}
	return d.forgetInterface(ifname)
}

// Close releases this process's handles. Pinned links and maps stay, so
// forwarding continues while no agent runs.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	var errs []error
	for name, l := range d.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close link of %s: %w", name, err))
		}
	}
	d.links = map[string]link.Link{}
	d.mu.Unlock()
	if err := d.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close balancer objects: %w", err))
	}
	if err := d.clock.close(); err != nil {
		errs = append(errs, fmt.Errorf("close jiffies probe: %w", err))
	}
	return errors.Join(errs...)
}

// RemovePins detaches every XDP link and deletes every map VeloFlux pinned
// under pinPath, then the directory itself once nothing else is in it. It
// needs no loaded Dataplane, so it works after a crash. A directory that is
// not on a BPF filesystem is refused untouched: a mistyped --pin-path must
// not empty /etc. Entries VeloFlux did not pin stay where they are and are
// named in a *ForeignPinsError.
func RemovePins(pinPath string) error {
	if pinPath == "" {
		return errors.New("refusing to remove pins: no pin path given")
	}
	if _, err := os.Stat(pinPath); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if _, err := checkBPFFS(pinPath); err != nil {
		return fmt.Errorf("refusing to remove pins under %s: %w", pinPath, err)
	}
	entries, err := os.ReadDir(pinPath)
	if err != nil {
		return explainPrivilege(fmt.Errorf("list pins in %s: %w", pinPath, err))
	}
	var errs []error
	var foreign []string
	for _, e := range entries {
		if !isOwnPin(e) {
			foreign = append(foreign, e.Name())
			continue
		}
		// Unlinking a link's last pin destroys the link, which detaches
		// the program from its interface.
		if err := os.Remove(filepath.Join(pinPath, e.Name())); err != nil {
			errs = append(errs, explainPrivilege(err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if len(foreign) > 0 {
		return &ForeignPinsError{Dir: pinPath, Names: foreign}
	}
	// A BPF filesystem mounted right at the pin path stays mounted (EBUSY):
	// emptying it is all detaching asks for.
	if err := os.Remove(pinPath); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("remove pin directory %s: %w", pinPath, err)
	}
	return nil
}
