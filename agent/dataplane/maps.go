package dataplane

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math/bits"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

func vipKey(v VIP) (balancerVfVipKey, error) {
	if !v.Addr.IsValid() {
		return balancerVfVipKey{}, fmt.Errorf("VIP %v: invalid address", v)
	}
	if v.Proto != ProtoTCP && v.Proto != ProtoUDP {
		return balancerVfVipKey{}, fmt.Errorf("VIP %v: protocol must be tcp or udp", v)
	}
	words, family := addrWords(v.Addr.Unmap())
	return balancerVfVipKey{Addr: words, Port: htons(v.Port), Proto: uint8(v.Proto), Family: family}, nil
}

// SetVIP creates or updates a VIP.
func (d *Dataplane) SetVIP(v VIP, meta VIPMeta) error {
	key, err := vipKey(v)
	if err != nil {
		return err
	}
	if meta.ID >= d.opts.MaxVIPs {
		return fmt.Errorf("VIP %v: id %d out of range [0,%d)", v, meta.ID, d.opts.MaxVIPs)
	}
	if meta.Mode != ModeDSR && meta.Mode != ModeIPIP && meta.Mode != ModeNAT && meta.Mode != ModeGUE {
		return fmt.Errorf("VIP %v: unknown mode %v", v, meta.Mode)
	}
	nat, err := natVIPValue(v, meta)
	if err != nil {
		return err
	}
	val := balancerVfVipMeta{VipId: meta.ID, Mode: balancerVfMode(meta.Mode)}
	if meta.SourceAffinity {
		val.Flags |= 1 // VF_VIP_F_SRC_AFFINITY
	}
	d.vipMu.Lock()
	defer d.vipMu.Unlock()
	var old balancerVfVipMeta
	err = d.objs.VfVips.Lookup(&key, &old)
	isNew := errors.Is(err, ebpf.ErrKeyNotExist)
	if err != nil && !isNew {
		return fmt.Errorf("read VIP %v: %w", v, err)
	}
	// Counted in the filter before it exists, so that no packet to it
	// is passed as not a VIP's.
	wasNAT := !isNew && Mode(old.Mode) == ModeNAT
	// The translation first: the VIP entry is what makes packets use it.
	if err := d.objs.VfNatVips.Put(meta.ID, &nat); err != nil {
		return fmt.Errorf("write the nat target of VIP %v: %w", v, err)
	}
	if isNew {
		if err := d.countInVIPFilter(key, +1); err != nil {
			return fmt.Errorf("VIP %v: %w", v, err)
		}
	}
	if err := d.objs.VfVips.Put(&key, &val); err != nil {
		if isNew {
			if undo := d.countInVIPFilter(key, -1); undo != nil {
				return fmt.Errorf("write VIP %v: %w (and undo its filter count: %v)", v, err, undo)
			}
		}
		return fmt.Errorf("write VIP %v: %w", v, err)
	}
	if !isNew && old.VipId != meta.ID {
		if err := d.clearVIPSlot(old.VipId, key); err != nil {
			return fmt.Errorf("VIP %v: %w", v, err)
		}
	}
	// An update in place (a new mode or flags under the same id) is not
	// atomic for a packet reading the slot meanwhile: it may see the old
	// mode with the new flags, each of them a state the VIP had or has.
	if err := d.objs.VfVipsById.Put(meta.ID, &balancerVfVipSlot{Key: key, Meta: val}); err != nil {
		return fmt.Errorf("write VIP %v under its id %d: %w", v, meta.ID, err)
	}
	if v.Port == 0 || meta.Mode == ModeNAT || wasNAT {
		return d.refreshFlags()
	}
	return nil
}

// natVIPValue is the vf_nat_vips entry of a VIP: zero unless it is nat.
func natVIPValue(v VIP, meta VIPMeta) (balancerVfNatVip, error) {
	var out balancerVfNatVip
	if meta.Mode != ModeNAT {
		return out, nil
	}
	snat := meta.NAT.SNAT.Unmap()
	switch {
	case !snat.IsValid():
		return out, fmt.Errorf("VIP %v: mode nat needs an SNAT address", v)
	case snat.Is4() != v.Addr.Unmap().Is4():
		return out, fmt.Errorf("VIP %v: SNAT address %v is of the other family (no NAT46/64)", v, snat)
	case meta.NAT.RealPort == 0:
		return out, fmt.Errorf("VIP %v: mode nat needs the reals' port", v)
	case v.Port == 0:
		return out, fmt.Errorf("VIP %v: mode nat needs a VIP port, not every port", v)
	}
	out.SnatAddr, out.Family = addrWords(snat)
	out.RealPort = htons(meta.NAT.RealPort)
	return out, nil
}

// DeleteVIP removes a VIP; a missing VIP is not an error.
func (d *Dataplane) DeleteVIP(v VIP) error {
	key, err := vipKey(v)
	if err != nil {
		return err
	}
	d.vipMu.Lock()
	defer d.vipMu.Unlock()
	var old balancerVfVipMeta
	err = d.objs.VfVips.Lookup(&key, &old)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		if v.Port == 0 {
			return d.refreshFlags()
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("read VIP %v: %w", v, err)
	}
	wasNAT := Mode(old.Mode) == ModeNAT
	// Out of the by-id slots first: until vf_vips forgets it, a flow
	// of the VIP still finds it there.
	if err := d.clearVIPSlot(old.VipId, key); err != nil {
		return fmt.Errorf("VIP %v: %w", v, err)
	}
	err = d.objs.VfVips.Delete(&key)
	switch {
	case err == nil:
		if err := d.countInVIPFilter(key, -1); err != nil {
			return fmt.Errorf("VIP %v: %w", v, err)
		}
	case !errors.Is(err, ebpf.ErrKeyNotExist):
		return fmt.Errorf("delete VIP %v: %w", v, err)
	}
	if wasNAT {
		// Its flows stay in the nat tables until they expire: replies of
		// flows still open are translated, new packets find no VIP.
		if err := d.objs.VfNatVips.Put(old.VipId, &balancerVfNatVip{}); err != nil {
			return fmt.Errorf("clear the nat target of VIP %v: %w", v, err)
		}
	}
	if v.Port == 0 || wasNAT {
		return d.refreshFlags()
	}
	return nil
}

// VIPs returns every VIP in the map.
func (d *Dataplane) VIPs() (map[VIP]VIPMeta, error) {
	out := map[VIP]VIPMeta{}
	var key balancerVfVipKey
	var val balancerVfVipMeta
	it := d.objs.VfVips.Iterate()
	for it.Next(&key, &val) {
		v := VIP{Addr: wordsAddr(key.Addr, key.Family), Port: ntohs(key.Port), Proto: Protocol(key.Proto)}
		meta := VIPMeta{ID: val.VipId, Mode: Mode(val.Mode), SourceAffinity: val.Flags&1 != 0}
		if meta.Mode == ModeNAT && d.objs.VfNatVips != nil {
			var nat balancerVfNatVip
			if err := d.objs.VfNatVips.Lookup(val.VipId, &nat); err != nil {
				return nil, fmt.Errorf("read the nat target of VIP %v: %w", v, err)
			}
			if nat.Family != 0 {
				meta.NAT = NATTarget{SNAT: wordsAddr(nat.SnatAddr, nat.Family), RealPort: ntohs(nat.RealPort)}
			}
		}
		out[v] = meta
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate VIPs: %w", err)
	}
	return out, nil
}

// SetReal writes a real under its id. Ids are stable for a real's lifetime,
// because conntrack remembers flows by id.
func (d *Dataplane) SetReal(id uint32, r Real) error {
	if id == 0 || id >= d.opts.MaxReals {
		return fmt.Errorf("real %v: id %d out of range [1,%d)", r.Addr, id, d.opts.MaxReals)
	}
	if !r.Addr.IsValid() {
		return fmt.Errorf("real %d: invalid address", id)
	}
	mac, err := macBytes(r.MAC)
	if err != nil {
		return fmt.Errorf("real %v: %w", r.Addr, err)
	}
	words, family := addrWords(r.Addr.Unmap())
	val := balancerVfReal{Addr: words, Mac: mac, Family: family, State: balancerVfRealState(r.State)}
	if err := d.objs.VfReals.Put(id, &val); err != nil {
		return fmt.Errorf("write real %d (%v): %w", id, r.Addr, err)
	}
	return nil
}

// DeleteReal frees an id. Conntrack entries still naming it re-select.
func (d *Dataplane) DeleteReal(id uint32) error {
	if id == 0 || id >= d.opts.MaxReals {
		return fmt.Errorf("real id %d out of range [1,%d)", id, d.opts.MaxReals)
	}
	if err := d.objs.VfReals.Put(id, &balancerVfReal{}); err != nil {
		return fmt.Errorf("clear real %d: %w", id, err)
	}
	return nil
}

// Reals returns every used real id.
func (d *Dataplane) Reals() (map[uint32]Real, error) {
	out := map[uint32]Real{}
	var id uint32
	var val balancerVfReal
	it := d.objs.VfReals.Iterate()
	for it.Next(&id, &val) {
		if val.Family == 0 {
			continue
		}
		r := Real{Addr: wordsAddr(val.Addr, val.Family), State: RealState(val.State)}
		if val.Mac != [6]uint8{} {
			r.MAC = append([]byte(nil), val.Mac[:]...)
		}
		out[id] = r
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate reals: %w", err)
	}
	return out, nil
}

// SetRing installs one VIP's Maglev ring (see SetRings).
func (d *Dataplane) SetRing(vipID uint32, ring []uint32) error {
	return d.SetRings(map[uint32][]uint32{vipID: ring})
}

// SetRings installs several rings with one update of the outer map. Each
// outer update waits for an RCU grace period (milliseconds) so that no
// program still uses a ring being replaced; batching pays it once instead
// of once per VIP. Every ring is still swapped whole.
func (d *Dataplane) SetRings(rings map[uint32][]uint32) error {
	if len(rings) == 0 {
		return nil
	}
	ids := slices.Sorted(maps.Keys(rings))
	// VIPs of one pool get the same table from the reconciler; they share
	// one inner map, which is filled once.
	shared := map[*uint32]*ebpf.Map{}
	defer func() {
		for _, m := range shared {
			m.Close() // the outer map keeps its own references
		}
	}()
	fds := make([]uint32, 0, len(ids))
	for _, id := range ids {
		ring := rings[id]
		if uint32(len(ring)) != d.opts.RingSize {
			return fmt.Errorf("ring of VIP %d has %d slots, want %d", id, len(ring), d.opts.RingSize)
		}
		if id >= d.opts.MaxVIPs {
			return fmt.Errorf("ring: VIP id %d out of range [0,%d)", id, d.opts.MaxVIPs)
		}
		inner, ok := shared[&ring[0]]
		if !ok {
			var err error
			if inner, err = d.newRing(ring); err != nil {
				return fmt.Errorf("ring for VIP %d: %w", id, err)
			}
			shared[&ring[0]] = inner
		}
		fds = append(fds, uint32(inner.FD()))
	}
	if n, err := d.objs.VfRings.BatchUpdate(ids, fds, nil); err != nil {
		return fmt.Errorf("install rings of %d VIPs (%d installed before the failure): %w", len(ids), n, err)
	}
	return nil
}

// newRing creates an inner ring map and fills it through a memory mapping:
// one copy of the whole table. Array slots are 8 bytes apart whatever the
// value size, so each 4-byte id sits at the start of its slot.
func (d *Dataplane) newRing(ring []uint32) (*ebpf.Map, error) {
	inner, err := ebpf.NewMap(d.inner)
	if err != nil {
		return nil, fmt.Errorf("create inner map: %w", err)
	}
	const slot = 8
	size := len(ring) * slot
	page := os.Getpagesize()
	size = (size + page - 1) / page * page
	mem, err := unix.Mmap(inner.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		inner.Close()
		return nil, fmt.Errorf("map inner ring into memory: %w", err)
	}
	for i, id := range ring {
		binary.NativeEndian.PutUint32(mem[i*slot:], id)
	}
	if err := unix.Munmap(mem); err != nil {
		inner.Close()
		return nil, fmt.Errorf("unmap inner ring: %w", err)
	}
	return inner, nil
}

// ErrRingUnreadable is what Ring returns when the kernel refuses to open an
// installed ring: opening a map by id (BPF_MAP_GET_FD_BY_ID) needs
// CAP_SYS_ADMIN, which a container given CAP_BPF alone lacks.
var ErrRingUnreadable = errors.New("opening a map by id needs CAP_SYS_ADMIN")

// Ring reads a VIP's installed ring, or nil when it has none.
func (d *Dataplane) Ring(vipID uint32) ([]uint32, error) {
	var innerID ebpf.MapID
	if err := d.objs.VfRings.Lookup(vipID, &innerID); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up ring of VIP %d: %w", vipID, err)
	}
	inner, err := ebpf.NewMapFromID(innerID)
	if errors.Is(err, fs.ErrPermission) {
		return nil, fmt.Errorf("open ring of VIP %d: %w (%w)", vipID, ErrRingUnreadable, err)
	}
	if err != nil {
		return nil, fmt.Errorf("open ring of VIP %d: %w", vipID, err)
	}
	defer inner.Close()
	ring := make([]uint32, d.opts.RingSize)
	var cursor ebpf.MapBatchCursor
	keys := make([]uint32, len(ring))
	n, err := inner.BatchLookup(&cursor, keys, ring, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read ring of VIP %d: %w", vipID, err)
	}
	return ring[:n], nil
}

// DeleteRing removes a VIP's ring; its packets then drop as "no real".
func (d *Dataplane) DeleteRing(vipID uint32) error {
	if err := d.objs.VfRings.Delete(vipID); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ring of VIP %d: %w", vipID, err)
	}
	return nil
}

func (d *Dataplane) readSettings() (balancerVfSettingsT, error) {
	var s balancerVfSettingsT
	if err := d.objs.VfSettings.Lookup(uint32(0), &s); err != nil {
		return s, fmt.Errorf("read settings: %w", err)
	}
	return s, nil
}

func (d *Dataplane) writeSettings(s balancerVfSettingsT) error {
	if err := d.objs.VfSettings.Put(uint32(0), &s); err != nil {
		return fmt.Errorf("write settings: %w", err)
	}
	return nil
}

// SetSettings writes the global knobs. The ring size and the lookup flags
// are owned by this package and kept as they are.
func (d *Dataplane) SetSettings(in Settings) error {
	cur, err := d.readSettings()
	if err != nil {
		return err
	}
	next := balancerVfSettingsT{
		RingSize:         d.opts.RingSize,
		EventSampleEvery: in.EventSampleEvery,
		Deny4Active:      cur.Deny4Active,
		Deny6Active:      cur.Deny6Active,
		WildcardActive:   cur.WildcardActive,
		Hz:               d.clock.hz,
		TcpTimeout:       d.clock.toJiffies(in.TCPIdleTimeoutNs),
		UdpTimeout:       d.clock.toJiffies(in.UDPIdleTimeoutNs),
		NatAddrBits:      cur.NatAddrBits,
		NatPortMin:       in.NAT.PortMin,
		NatPortMax:       in.NAT.PortMax,
	}
	if err := in.NAT.validate(); err != nil {
		return err
	}
	next.NatClosingTimeout = d.clock.toJiffies(in.NAT.ClosingTimeoutNs)
	if in.UseFIB {
		next.UseFib = 1
	}
	next.GuePort = htons(in.GUEPort)
	if in.ICMPTooBig {
		next.IcmpTooBig = 1
	}
	if err := in.NewFlowLimit.validate(); err != nil {
		return err
	}
	if rate := in.NewFlowLimit.RatePerSecond; rate > 0 {
		// Rounded down: the limit errs by at most 0.1% toward letting through.
		interval := uint32(time.Second) / rate
		next.NewFlowRate, next.NewFlowBurst = rate, in.NewFlowLimit.Burst
		next.NewFlowIntervalNs = interval
		next.NewFlowBurstNs = uint64(in.NewFlowLimit.Burst) * uint64(interval)
	}
	if next.GwMac, err = macBytes(in.GatewayMAC); err != nil {
		return fmt.Errorf("gateway MAC: %w", err)
	}
	if in.EncapSource4.IsValid() {
		if !in.EncapSource4.Is4() {
			return fmt.Errorf("encap source v4 %v is not IPv4", in.EncapSource4)
		}
		w, _ := addrWords(in.EncapSource4)
		next.EncapSrc4 = w[0]
	}
	if in.EncapSource6.IsValid() {
		if !in.EncapSource6.Is6() || in.EncapSource6.Is4In6() {
			return fmt.Errorf("encap source v6 %v is not IPv6", in.EncapSource6)
		}
		next.EncapSrc6, _ = addrWords(in.EncapSource6)
	}
	return d.writeSettings(next)
}

// Settings reads the global knobs back.
func (d *Dataplane) Settings() (Settings, error) {
	s, err := d.readSettings()
	if err != nil {
		return Settings{}, err
	}
	out := Settings{
		UseFIB:           s.UseFib != 0,
		GUEPort:          ntohs(s.GuePort),
		ICMPTooBig:       s.IcmpTooBig != 0,
		TCPIdleTimeoutNs: uint64(d.clock.toDuration(uint32(s.TcpTimeout))),
		UDPIdleTimeoutNs: uint64(d.clock.toDuration(uint32(s.UdpTimeout))),
		EventSampleEvery: s.EventSampleEvery,
		NewFlowLimit:     NewFlowLimit{RatePerSecond: s.NewFlowRate, Burst: s.NewFlowBurst},
		NAT: NATSettings{
			PortMin: s.NatPortMin, PortMax: s.NatPortMax,
			ClosingTimeoutNs: uint64(d.clock.toDuration(uint32(s.NatClosingTimeout))),
		},
	}
	if s.GwMac != [6]uint8{} {
		out.GatewayMAC = append([]byte(nil), s.GwMac[:]...)
	}
	if s.EncapSrc4 != 0 {
		out.EncapSource4 = wordsAddr([4]uint32{s.EncapSrc4}, afInet)
	}
	if s.EncapSrc6 != [4]uint32{} {
		out.EncapSource6 = wordsAddr(s.EncapSrc6, afInet6)
	}
	return out, nil
}

// AddDeny drops every packet from the prefix.
func (d *Dataplane) AddDeny(p netip.Prefix) error {
	return d.changeDeny(p, true)
}

// RemoveDeny lifts a prefix from the denylist; a missing one is not an error.
func (d *Dataplane) RemoveDeny(p netip.Prefix) error {
	return d.changeDeny(p, false)
}

func (d *Dataplane) changeDeny(p netip.Prefix, add bool) error {
	if !p.IsValid() {
		return fmt.Errorf("denylist: invalid prefix %v", p)
	}
	p = p.Masked()
	var m *ebpf.Map
	var key any
	if p.Addr().Is4() {
		w, _ := addrWords(p.Addr())
		m, key = d.objs.VfDeny4, &balancerVfLpm4Key{Prefixlen: uint32(p.Bits()), Addr: w[0]}
	} else {
		w, _ := addrWords(p.Addr())
		m, key = d.objs.VfDeny6, &balancerVfLpm6Key{Prefixlen: uint32(p.Bits()), Addr: w}
	}
	if add {
		if err := m.Put(key, uint32(1)); err != nil {
			return fmt.Errorf("denylist add %v: %w", p, err)
		}
	} else if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("denylist remove %v: %w", p, err)
	}
	return d.refreshFlags()
}

// refreshFlags derives the settings flags that let the data path skip a
// lookup per packet: an LPM lookup while a family's denylist is empty, and
// the all-ports VIP lookup while no VIP has port 0.
func (d *Dataplane) refreshFlags() error {
	list, err := d.DenyList()
	if err != nil {
		return err
	}
	vips, err := d.VIPs()
	if err != nil {
		return err
	}
	s, err := d.readSettings()
	if err != nil {
		return err
	}
	s.Deny4Active, s.Deny6Active, s.WildcardActive = 0, 0, 0
	for _, p := range list {
		if p.Addr().Is4() {
			s.Deny4Active = 1
		} else {
			s.Deny6Active = 1
		}
	}
	snat := map[balancerVfNatAddrKey]bool{}
	for v, meta := range vips {
		if v.Port == 0 {
			s.WildcardActive = 1
		}
		if meta.Mode == ModeNAT && meta.NAT.SNAT.IsValid() {
			words, family := addrWords(meta.NAT.SNAT.Unmap())
			snat[balancerVfNatAddrKey{Addr: words, Family: uint32(family)}] = true
		}
	}
	kept, err := d.syncNATAddrs(snat)
	if err != nil {
		return err
	}
	// Replies of flows whose VIP went are still translated while their
	// entries live, so the bits follow the addresses kept, not the VIPs.
	s.NatAddrBits = 0
	for _, k := range kept {
		s.NatAddrBits |= 1 << natAddrBit(k.Addr, uint8(k.Family))
	}
	return d.writeSettings(s)
}

// natAddrBit is vf_nat_addr_bit of vf_nat.h: which bit of the settings'
// nat_addr_bits an SNAT address sets.
func natAddrBit(words [4]uint32, family uint8) uint32 {
	h := words[0]
	if family == afInet6 {
		h ^= words[1] ^ words[2] ^ words[3]
	}
	return (h * 0x9E3779B1) >> 26
}

// syncNATAddrs makes vf_nat_addrs hold the SNAT addresses of the nat VIPs.
// An address no VIP uses any more is kept while nat flows still use it, so
// that a reload which drops a VIP does not cut its open connections.
// It returns the addresses the map holds afterwards.
func (d *Dataplane) syncNATAddrs(want map[balancerVfNatAddrKey]bool) ([]balancerVfNatAddrKey, error) {
	var key balancerVfNatAddrKey
	var one uint32
	var unwanted []balancerVfNatAddrKey
	it := d.objs.VfNatAddrs.Iterate()
	for it.Next(&key, &one) {
		if !want[key] {
			unwanted = append(unwanted, key)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate SNAT addresses: %w", err)
	}
	var kept []balancerVfNatAddrKey
	if len(unwanted) > 0 {
		// Only then walk the reverse table, which may be large.
		inUse, err := d.natAddrsInUse()
		if err != nil {
			return nil, err
		}
		for _, k := range unwanted {
			if inUse[k] {
				kept = append(kept, k)
				continue
			}
			if err := d.objs.VfNatAddrs.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return nil, fmt.Errorf("remove SNAT address %v: %w", wordsAddr(k.Addr, uint8(k.Family)), err)
			}
		}
	}
	for k := range want {
		if err := d.objs.VfNatAddrs.Put(&k, uint32(1)); err != nil {
			return nil, fmt.Errorf("add SNAT address %v (at most %d): %w",
				wordsAddr(k.Addr, uint8(k.Family)), balancerVfSizeVF_NAT_MAX_ADDRS, err)
		}
		kept = append(kept, k)
	}
	return kept, nil
}

// natAddrsInUse are the SNAT addresses some reverse nat entry names.
func (d *Dataplane) natAddrsInUse() (map[balancerVfNatAddrKey]bool, error) {
	out := map[balancerVfNatAddrKey]bool{}
	var key balancerVfFlowKey
	var val balancerVfNatEntry
	it := d.objs.VfNatRev.Iterate()
	for it.Next(&key, &val) {
		out[balancerVfNatAddrKey{Addr: key.Dst, Family: uint32(key.Family)}] = true
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate the nat reverse table: %w", err)
	}
	return out, nil
}

// DenyList returns every denied prefix.
func (d *Dataplane) DenyList() ([]netip.Prefix, error) {
	var out []netip.Prefix
	var k4 balancerVfLpm4Key
	var v uint32
	it := d.objs.VfDeny4.Iterate()
	for it.Next(&k4, &v) {
		a := wordsAddr([4]uint32{k4.Addr}, afInet)
		out = append(out, netip.PrefixFrom(a, int(k4.Prefixlen)))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate v4 denylist: %w", err)
	}
	var k6 balancerVfLpm6Key
	it = d.objs.VfDeny6.Iterate()
	for it.Next(&k6, &v) {
		out = append(out, netip.PrefixFrom(wordsAddr(k6.Addr, afInet6), int(k6.Prefixlen)))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate v6 denylist: %w", err)
	}
	return out, nil
}

// VIPStats sums a VIP's per-CPU counters.
func (d *Dataplane) VIPStats(vipID uint32) (VIPStats, error) {
	var per []balancerVfVipStats
	if err := d.objs.VfStatsVip.Lookup(vipID, &per); err != nil {
		return VIPStats{}, fmt.Errorf("read stats of VIP %d: %w", vipID, err)
	}
	var out VIPStats
	for _, c := range per {
		out.Packets += c.Packets
		out.Bytes += c.Bytes
		out.NewFlows += c.NewFlows
		out.Drops += c.Drops
	}
	return out, nil
}

// ResetVIPStats zeroes a VIP id's counters, so a new VIP given a freed id
// does not inherit its predecessor's totals.
func (d *Dataplane) ResetVIPStats(vipID uint32) error {
	zero := make([]balancerVfVipStats, ebpf.MustPossibleCPU())
	if err := d.objs.VfStatsVip.Put(vipID, zero); err != nil {
		return fmt.Errorf("reset stats of VIP %d: %w", vipID, err)
	}
	return nil
}

// RealStats sums a real's per-CPU counters.
func (d *Dataplane) RealStats(realID uint32) (RealStats, error) {
	var per []balancerVfRealStats
	if err := d.objs.VfStatsReal.Lookup(realID, &per); err != nil {
		return RealStats{}, fmt.Errorf("read stats of real %d: %w", realID, err)
	}
	var out RealStats
	for _, c := range per {
		out.Packets += c.Packets
		out.Bytes += c.Bytes
	}
	return out, nil
}

// ResetRealStats zeroes a real id's counters before the id is reused.
func (d *Dataplane) ResetRealStats(realID uint32) error {
	zero := make([]balancerVfRealStats, ebpf.MustPossibleCPU())
	if err := d.objs.VfStatsReal.Put(realID, zero); err != nil {
		return fmt.Errorf("reset stats of real %d: %w", realID, err)
	}
	return nil
}

// Counters sums the per-reason counters over CPUs, indexed by Reason.
func (d *Dataplane) Counters() ([]Counter, error) {
	out := make([]Counter, numReasons)
	var per []balancerVfCounter
	for i := range out {
		if err := d.objs.VfCounters.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read counter %v: %w", Reason(i), err)
		}
		for _, c := range per {
			out[i].Packets += c.Packets
			out[i].Bytes += c.Bytes
		}
	}
	return out, nil
}

// Flows returns up to limit conntrack entries, IPv4 first (limit <= 0: all).
func (d *Dataplane) Flows(limit int) ([]Flow, error) {
	now, err := d.clock.now()
	if err != nil {
		return nil, err
	}
	idle := func(lastSeen uint64) time.Duration { return d.clock.toDuration(now - uint32(lastSeen)) }
	var out []Flow
	full := func() bool { return limit > 0 && len(out) >= limit }
	// The table of sets is an array: read it in batches, not with one
	// lookup (and a next-key call) per set, which on an empty 1M table
	// took a second.
	const batch = 4096
	keys := make([]uint32, batch)
	sets := make([]balancerVfCt4Set, batch)
	var cursor ebpf.MapBatchCursor
	for !full() {
		n, err := d.objs.VfCt4.BatchLookup(&cursor, keys, sets, nil)
		for _, set := range sets[:n] {
			for _, w := range set.Way {
				k4, ok := slotFlow4(w)
				if !ok || full() {
					continue
				}
				out = append(out, Flow{
					Src: wordsAddr([4]uint32{k4.Src}, afInet), Dst: wordsAddr([4]uint32{k4.Dst}, afInet),
					SrcPort: ntohs(k4.Sport), DstPort: ntohs(k4.Dport), Proto: Protocol(k4.Proto),
					RealID: w.Entry.RealId, VIPID: w.Entry.VipId, Idle: idle(w.Entry.LastSeen),
				})
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break // the last batch
		}
		if err != nil {
			return nil, fmt.Errorf("read IPv4 conntrack: %w", err)
		}
	}
	var val balancerVfCtEntry
	var k6 balancerVfFlowKey
	it := d.objs.VfCt6.Iterate()
	for !full() && it.Next(&k6, &val) {
		out = append(out, Flow{
			Src: wordsAddr(k6.Src, k6.Family), Dst: wordsAddr(k6.Dst, k6.Family),
			SrcPort: ntohs(k6.Sport), DstPort: ntohs(k6.Dport), Proto: Protocol(k6.Proto),
			RealID: val.RealId, VIPID: val.VipId, Idle: idle(val.LastSeen),
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate IPv6 conntrack: %w", err)
	}
	return out, nil
}

// NATFlows returns up to limit live nat flows (limit <= 0: all), from the
// forward table: one row per flow.
func (d *Dataplane) NATFlows(limit int) ([]NATFlow, error) {
	if d.objs.VfNatFwd == nil {
		return nil, nil // pinned by an agent older than mode nat
	}
	now, err := d.clock.now()
	if err != nil {
		return nil, err
	}
	var out []NATFlow
	var key balancerVfFlowKey
	var val balancerVfNatEntry
	it := d.objs.VfNatFwd.Iterate()
	for (limit <= 0 || len(out) < limit) && it.Next(&key, &val) {
		p := val.Peer
		out = append(out, NATFlow{
			Client: netip.AddrPortFrom(wordsAddr(key.Src, key.Family), ntohs(key.Sport)),
			VIP:    netip.AddrPortFrom(wordsAddr(key.Dst, key.Family), ntohs(key.Dport)),
			SNAT:   netip.AddrPortFrom(wordsAddr(p.Dst, p.Family), ntohs(p.Dport)),
			Real:   netip.AddrPortFrom(wordsAddr(p.Src, p.Family), ntohs(p.Sport)),
			Proto:  Protocol(key.Proto), RealID: val.RealId, VIPID: val.VipId,
			Closing: val.Closing != 0, Idle: d.clock.toDuration(now - uint32(val.LastSeen)),
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate the nat forward table: %w", err)
	}
	return out, nil
}

// NATStats counts the live flows of the nat forward table: entries that
// the LRU still holds and whose idle timeout has not run out (expired ones
// wait there until the LRU or a new flow reuses them). It reads the table
// in batches, so a scrape of a full table costs few system calls.
func (d *Dataplane) NATStats() (NATStats, error) {
	if d.objs.VfNatFwd == nil {
		return NATStats{}, nil
	}
	out := NATStats{Capacity: int(d.objs.VfNatFwd.MaxEntries())}
	s, err := d.readSettings()
	if err != nil {
		return NATStats{}, err
	}
	now, err := d.clock.now()
	if err != nil {
		return NATStats{}, err
	}
	live := func(key *balancerVfFlowKey, e *balancerVfNatEntry) bool {
		timeout := s.TcpTimeout
		switch {
		case e.Closing != 0:
			timeout = s.NatClosingTimeout
		case Protocol(key.Proto) == ProtoUDP:
			timeout = s.UdpTimeout
		}
		return uint64(now-uint32(e.LastSeen)) <= timeout
	}
	const batch = 4096
	keys := make([]balancerVfFlowKey, batch)
	vals := make([]balancerVfNatEntry, batch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := d.objs.VfNatFwd.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			if live(&keys[i], &vals[i]) {
				out.Flows++
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil // the end of the table
		}
		if err != nil {
			return NATStats{}, fmt.Errorf("count nat flows: %w", err)
		}
	}
}

// ReadEvents delivers sampled drop events to fn until ctx ends.
func (d *Dataplane) ReadEvents(ctx context.Context, fn func(Event)) error {
	rd, err := ringbuf.NewReader(d.objs.VfEvents)
	if err != nil {
		return fmt.Errorf("open event ring buffer: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { rd.Close() })
	defer stop()
	defer rd.Close()
	for {
		rec, err := rd.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return ctx.Err()
		}
		if err != nil {
			return fmt.Errorf("read event: %w", err)
		}
		ev, err := decodeEvent(rec.RawSample)
		if err != nil {
			return err
		}
		fn(ev)
	}
}

func decodeEvent(raw []byte) (Event, error) {
	var e balancerVfEvent
	if _, err := binary.Decode(raw, binary.NativeEndian, &e); err != nil {
		return Event{}, fmt.Errorf("decode event of %d bytes: %w", len(raw), err)
	}
	return Event{
		MonotonicNs: e.TsNs,
		Reason:      Reason(e.Reason),
		PacketLen:   e.PktLen,
		Src:         wordsAddr(e.Src, e.Family),
		Dst:         wordsAddr(e.Dst, e.Family),
		SrcPort:     ntohs(e.Sport),
		DstPort:     ntohs(e.Dport),
		Proto:       e.Proto,
	}, nil
}

// NATRealKey names a real of a nat VIP in vf_nat_real_ports.
type NATRealKey struct {
	VIPID  uint32
	RealID uint32
}

// SetNATRealPort records the port a new flow of nat VIP vipID reaches real
// realID on. Without one the VIP's NATTarget.RealPort is used.
func (d *Dataplane) SetNATRealPort(k NATRealKey, port uint16) error {
	if port == 0 {
		return fmt.Errorf("nat port of real %d under VIP id %d: port 0", k.RealID, k.VIPID)
	}
	key := balancerVfNatRealKey{VipId: k.VIPID, RealId: k.RealID}
	if err := d.objs.VfNatRealPorts.Put(&key, htons(port)); err != nil {
		return fmt.Errorf("write nat port %d of real %d under VIP id %d: %w", port, k.RealID, k.VIPID, err)
	}
	return nil
}

// DeleteNATRealPort forgets a real's port under a nat VIP; a missing entry
// is not an error.
func (d *Dataplane) DeleteNATRealPort(k NATRealKey) error {
	key := balancerVfNatRealKey{VipId: k.VIPID, RealId: k.RealID}
	if err := d.objs.VfNatRealPorts.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete nat port of real %d under VIP id %d: %w", k.RealID, k.VIPID, err)
	}
	return nil
}

// NATRealPorts returns every real's port under every nat VIP.
func (d *Dataplane) NATRealPorts() (map[NATRealKey]uint16, error) {
	out := map[NATRealKey]uint16{}
	if d.objs.VfNatRealPorts == nil {
		return out, nil
	}
	var key balancerVfNatRealKey
	var port uint16
	it := d.objs.VfNatRealPorts.Iterate()
	for it.Next(&key, &port) {
		out[NATRealKey{VIPID: key.VipId, RealID: key.RealId}] = ntohs(port)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate nat real ports: %w", err)
	}
	return out, nil
}

// vfHashWords is vf_hash_flow (bpf/include/vf_hash.h) over the words it
// hashes, in its order: the source and destination address words, the
// ports word and the protocol, as the program reads them (addresses and
// ports in network order, read as little-endian words).
func vfHashWords(words ...uint32) uint32 {
	h := uint32(0x5646)
	for _, k := range words {
		k *= 0xcc9e2d51
		k = bits.RotateLeft32(k, 15)
		k *= 0x1b873593
		h ^= k
		h = bits.RotateLeft32(h, 13)
		h = h*5 + 0xe6546b64
	}
	h ^= uint32(len(words)) * 4
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// flowHash4 is vf_hash_flow of an IPv4 flow key.
func flowHash4(k balancerVfFlow4Key) uint32 {
	return vfHashWords(k.Src, k.Dst, uint32(k.Sport)<<16|uint32(k.Dport), uint32(k.Proto))
}

// ct4SetIndex is the set of vf_ct4 that holds an IPv4 flow (vf_ct4_set_of).
func ct4SetIndex(k balancerVfFlow4Key, sets uint32) uint32 {
	return uint32(uint64(flowHash4(k)*0x9e3779b1) * uint64(sets) >> 32)
}

// lookupFlow4 finds an IPv4 flow's conntrack entry.
func (d *Dataplane) lookupFlow4(k balancerVfFlow4Key) (balancerVfCtEntry, error) {
	var set balancerVfCt4Set
	idx := ct4SetIndex(k, d.objs.VfCt4.MaxEntries())
	if err := d.objs.VfCt4.Lookup(idx, &set); err != nil {
		return balancerVfCtEntry{}, fmt.Errorf("read conntrack set %d: %w", idx, err)
	}
	k.Pad = [3]uint8{}
	for _, w := range set.Way {
		if key, ok := slotFlow4(w); ok && key == k {
			return w.Entry, nil
		}
	}
	return balancerVfCtEntry{}, fmt.Errorf("flow not in conntrack set %d: %w", idx, ebpf.ErrKeyNotExist)
}

// slotFlow4 is the flow a slot of vf_ct4 holds, and whether it holds one:
// not an empty slot (last_seen 0), nor one whose entry fails its check (a
// slot two CPUs wrote at once).
func slotFlow4(w balancerVfCt4Slot) (balancerVfFlow4Key, bool) {
	k := w.Key
	k.Pad = [3]uint8{}
	return k, w.Entry.LastSeen != 0 && w.Key.Pad == ct4Check(flowHash4(k), w.Entry)
}

// ct4Check is vf_ct4_check: the 24 bits in a slot's key padding that bind
// its entry to its flow.
func ct4Check(hash uint32, e balancerVfCtEntry) [3]uint8 {
	c := hash ^ e.RealId*0x85ebca6b ^ e.VipId*0xc2b2ae35
	return [3]uint8{byte(c), byte(c >> 8), byte(c >> 16)}
}
