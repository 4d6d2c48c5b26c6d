package lab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// MaxBackends is the most backends a lab can hold: backend i is
// 10.X.0.(10+i) and the last usable host byte is 254.
const MaxBackends = 244

// Options configures New. The zero value is a usable three-backend lab.
type Options struct {
	// Backends is the number of backend namespaces; 0 means 3.
	Backends int
	// VIPs are put on every backend's loopback and routed by the client via
	// the balancer. IPv4 and IPv6 may be mixed.
	VIPs []netip.Addr
	// PlainBackends leaves the VIPs off the backends: the client still
	// routes them via the balancer, which must translate (mode nat).
	PlainBackends bool
	// BalancerInRoot puts the balancer's veth end in the namespace of the
	// calling process (for `make demo`, so localhost reaches the agent)
	// instead of a namespace of its own.
	BalancerInRoot bool
	// Prefix names everything the lab creates: namespaces "<Prefix>-role",
	// links "<Prefix>role". 2-10 characters [a-z0-9]; empty picks a free
	// "vf" + 4 random hex digits.
	Prefix string
	// Subnet is X in 10.X.0.0/24 and fd00:X::/64 (X written with the same
	// digits, as hex); 0 picks one. With BalancerInRoot a random pick
	// avoids subnets the caller's namespace already routes.
	Subnet uint8
	// Logger receives progress at Debug and a summary at Info; nil means
	// slog.Default().
	Logger *slog.Logger
}

// Lab is a built topology. All fields are read-only after New.
type Lab struct {
	Prefix string
	// Subnet4 and Subnet6 are the shared L2 segment's prefixes.
	Subnet4, Subnet6 netip.Prefix
	VIPs             []netip.Addr
	// BridgeName is the bridge inside Switch (equal to Switch.IfName).
	BridgeName string
	Switch     *Host
	Client     *Host
	Balancer   *Host
	Backends   []*Host

	log   *slog.Logger
	hosts []*Host // creation order, so Close can tear down partial labs

	mu      sync.Mutex
	closed  bool
	servers map[int]*serverSet
}

var prefixRE = regexp.MustCompile(`^[a-z0-9]{2,10}$`)

// New builds the lab described by opts. ctx bounds the build only; the
// lab lives until Close. On failure everything already created is removed.
func New(ctx context.Context, opts Options) (_ *Lab, err error) {
	if opts.Backends == 0 {
		opts.Backends = 3
	}
	if opts.Backends < 0 || opts.Backends > MaxBackends {
		return nil, fmt.Errorf("lab: Backends=%d out of range 1..%d", opts.Backends, MaxBackends)
	}
	if opts.Prefix != "" && !prefixRE.MatchString(opts.Prefix) {
		return nil, fmt.Errorf("lab: Prefix %q must match %s", opts.Prefix, prefixRE)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}

	// The caller's namespace is used for collision checks and, with
	// BalancerInRoot, hosts the balancer end.
	rootNS, err := currentNS()
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	defer rootNS.Close()
	rootNL, err := netlink.NewHandleAt(rootNS)
	if err != nil {
		return nil, fmt.Errorf("lab: netlink handle in own netns: %w", err)
	}
	defer rootNL.Close()

	prefix, err := pickPrefix(opts.Prefix, rootNL)
	if err != nil {
		return nil, err
	}
	x, err := pickSubnet(opts.Subnet, opts.BalancerInRoot, rootNL)
	if err != nil {
		return nil, err
	}

	l := &Lab{
		Prefix:     prefix,
		Subnet4:    netip.PrefixFrom(addr4(x, 0), 24),
		Subnet6:    netip.PrefixFrom(addr6(x, 0), 64),
		BridgeName: prefix + "br",
		log:        log.With("lab", prefix),
	}
	if err := l.setVIPs(opts.VIPs, opts.Backends); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("lab %s: clean up after failed build: %w", prefix, cerr))
			}
		}
	}()
	if err := l.build(ctx, x, opts); err != nil {
		return nil, fmt.Errorf("lab %s: %w", prefix, err)
	}
	l.log.Info("lab ready", "switch", l.Switch.NetNS, "bridge", l.BridgeName,
		"client", l.Client.String(), "balancer", l.Balancer.String(),
		"backends", len(l.Backends), "vips", l.VIPs)
	return l, nil
}

func (l *Lab) setVIPs(vips []netip.Addr, backends int) error {
	used := map[netip.Addr]bool{}
	for _, a := range l.hostAddrs(backends) {
		used[a] = true
	}
	for _, v := range vips {
		if !v.IsValid() {
			return errors.New("lab: invalid (zero) VIP")
		}
		v = v.Unmap()
		if used[v] {
			return fmt.Errorf("lab: VIP %s duplicates a lab or VIP address", v)
		}
		used[v] = true
		l.VIPs = append(l.VIPs, v)
	}
	return nil
}

// hostAddrs lists the interface addresses the lab assigns.
func (l *Lab) hostAddrs(backends int) []netip.Addr {
	x := l.Subnet4.Addr().As4()[1]
	hostBytes := []int{1, 2}
	for i := range backends {
		hostBytes = append(hostBytes, 10+i)
	}
	var out []netip.Addr
	for _, h := range hostBytes {
		out = append(out, addr4(x, h), addr6(x, h))
	}
	return out
}

func (l *Lab) build(ctx context.Context, x byte, opts Options) error {
	if err := prepareRunDir(); err != nil {
		return err
	}

	l.Switch = &Host{Name: "switch", NetNS: l.Prefix + "-switch", IfName: l.BridgeName, ns: netns.None()}
	l.hosts = append(l.hosts, l.Switch)
	if err := l.initNS(l.Switch, [][2]string{
		// Pure L2: no addresses, so no IPv6 link-locals, RS or MLD noise.
		{"net.ipv6.conf.all.disable_ipv6", "1"},
		{"net.ipv6.conf.default.disable_ipv6", "1"},
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf.default.rp_filter", "0"},
	}); err != nil {
		return err
	}
	snooping := false // flood multicast so NDP works without an MLD querier
	if err := l.Switch.nl.LinkAdd(&netlink.Bridge{
		LinkAttrs:         netlink.LinkAttrs{Name: l.BridgeName},
		MulticastSnooping: &snooping,
	}); err != nil {
		return fmt.Errorf("add bridge %s in %s: %w", l.BridgeName, l.Switch.NetNS, err)
	}
	br, err := l.Switch.nl.LinkByName(l.BridgeName)
	if err != nil {
		return fmt.Errorf("find bridge %s: %w", l.BridgeName, err)
	}
	if err := l.Switch.nl.LinkSetUp(br); err != nil {
		return fmt.Errorf("set bridge %s up: %w", l.BridgeName, err)
	}
	l.Switch.Ifindex, l.Switch.MAC = br.Attrs().Index, br.Attrs().HardwareAddr

	// Load before creating hosts: fail early if BPF is unavailable.
	pass, err := loadXDPPass()
	if err != nil {
		return err
	}
	defer pass.Close() // the kernel keeps its own reference once attached

	l.Client = l.newHost("client", "client", "c", x, 2)
	balNS := "balancer"
	if opts.BalancerInRoot {
		balNS = ""
	}
	l.Balancer = l.newHost("balancer", balNS, "lb", x, 1)
	for i := range opts.Backends {
		l.Backends = append(l.Backends, l.newHost(
			"backend-"+strconv.Itoa(i), "backend"+strconv.Itoa(i), "b"+strconv.Itoa(i), x, 10+i))
	}

	for _, h := range l.hosts[1:] {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("build interrupted: %w", err)
		}
		backend := strings.HasPrefix(h.Name, "backend-")
		if err := l.addHost(h, br.Attrs().Index, backend); err != nil {
			return err
		}
	}

	peer, err := l.Switch.nl.LinkByName(l.Balancer.PeerName)
	if err != nil {
		return fmt.Errorf("find balancer peer %s: %w", l.Balancer.PeerName, err)
	}
	// Netlink attach (not a bpf_link) so the program stays attached without
	// an open fd and goes away with the interface.
	if err := l.Switch.Do(func() error {
		return netlink.LinkSetXdpFdWithFlags(peer, pass.FD(), unix.XDP_FLAGS_DRV_MODE)
	}); err != nil {
		return fmt.Errorf("attach XDP_PASS to %s: %w", l.Balancer.PeerName, err)
	}

	for _, b := range l.Backends {
		if opts.PlainBackends {
			break
		}
		if err := l.addVIPs(b); err != nil {
			return err
		}
	}
	return l.routeVIPs()
}

// newHost records a host before anything is created for it so that Close
// can remove whatever part of it exists.
func (l *Lab) newHost(name, nsRole, ifRole string, x byte, hostByte int) *Host {
	h := &Host{
		Name:     name,
		IfName:   l.Prefix + ifRole,
		PeerName: l.Prefix + ifRole + "p",
		Addr4:    addr4(x, hostByte),
		Addr6:    addr6(x, hostByte),
		ns:       netns.None(),
	}
	if nsRole != "" {
		h.NetNS = l.Prefix + "-" + nsRole
	}
	l.hosts = append(l.hosts, h)
	return h
}

// initNS creates h's named namespace (or opens the caller's when NetNS is
// empty), opens a netlink handle in it and applies namespace-wide sysctls.
func (l *Lab) initNS(h *Host, sysctls [][2]string) error {
	var err error
	if h.NetNS == "" {
		if h.ns, err = currentNS(); err != nil {
			return fmt.Errorf("%s: %w", h.Name, err)
		}
	} else if h.ns, err = createNamedNS(h.NetNS); err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	if h.nl, err = netlink.NewHandleAt(h.ns); err != nil {
		return fmt.Errorf("%s: netlink handle in %s: %w", h.Name, h.NetNS, err)
	}
	if h.NetNS == "" {
		return nil // never change the caller's namespace-wide settings
	}
	lo, err := h.nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("%s: find lo: %w", h.Name, err)
	}
	if err := h.nl.LinkSetUp(lo); err != nil {
		return fmt.Errorf("%s: set lo up: %w", h.Name, err)
	}
	if err := h.Do(func() error { return writeSysctls(sysctls) }); err != nil {
		return err
	}
	l.log.Debug("namespace created", "host", h.Name, "netns", h.NetNS)
	return nil
}

// addHost creates h's namespace and its veth pair to the bridge, then
// configures both ends.
func (l *Lab) addHost(h *Host, bridgeIndex int, backend bool) error {
	nsSysctls := [][2]string{
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf.default.rp_filter", "0"},
		{"net.ipv4.conf.lo.rp_filter", "0"},
		// Before any address exists, so addresses are usable at once.
		{"net.ipv6.conf.all.accept_dad", "0"},
		{"net.ipv6.conf.default.accept_dad", "0"},
	}
	ifSysctls := [][2]string{
		{"net.ipv4.conf." + h.IfName + ".rp_filter", "0"},
		{"net.ipv6.conf." + h.IfName + ".accept_dad", "0"},
	}
	if backend {
		// The VIP is on lo: answer ARP only for addresses of the receiving
		// interface and never use the VIP as ARP source, so the client's
		// VIP traffic keeps going to the balancer.
		nsSysctls = append(nsSysctls,
			[2]string{"net.ipv4.conf.all.arp_ignore", "1"},
			[2]string{"net.ipv4.conf.all.arp_announce", "2"})
		ifSysctls = append(ifSysctls,
			[2]string{"net.ipv4.conf." + h.IfName + ".arp_ignore", "1"},
			[2]string{"net.ipv4.conf." + h.IfName + ".arp_announce", "2"})
	}
	if err := l.initNS(h, nsSysctls); err != nil {
		return err
	}

	// Created from the switch side with the far end placed straight into
	// h's namespace, so no interface ever appears in a third namespace.
	if err := l.Switch.nl.LinkAdd(&netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: h.PeerName, MasterIndex: bridgeIndex},
		PeerName:      h.IfName,
		PeerNamespace: netlink.NsFd(h.ns),
	}); err != nil {
		return fmt.Errorf("%s: add veth %s (switch) <-> %s: %w", h.Name, h.PeerName, h.IfName, err)
	}
	peer, err := l.Switch.nl.LinkByName(h.PeerName)
	if err != nil {
		return fmt.Errorf("%s: find %s: %w", h.Name, h.PeerName, err)
	}
	if err := l.Switch.Do(func() error { return disableTxChecksum(h.PeerName) }); err != nil {
		return err
	}
	if err := l.Switch.nl.LinkSetUp(peer); err != nil {
		return fmt.Errorf("%s: set %s up: %w", h.Name, h.PeerName, err)
	}

	link, err := h.nl.LinkByName(h.IfName)
	if err != nil {
		return fmt.Errorf("%s: find %s: %w", h.Name, h.IfName, err)
	}
	h.Ifindex, h.MAC = link.Attrs().Index, link.Attrs().HardwareAddr
	if err := h.Do(func() error {
		if err := writeSysctls(ifSysctls); err != nil {
			return err
		}
		return disableTxChecksum(h.IfName)
	}); err != nil {
		return err
	}
	for _, a := range []*netlink.Addr{
		{IPNet: ipNet(h.Addr4, 24)},
		{IPNet: ipNet(h.Addr6, 64), Flags: unix.IFA_F_NODAD},
	} {
		if err := h.nl.AddrAdd(link, a); err != nil {
			return fmt.Errorf("%s: add %s to %s: %w", h.Name, a.IPNet, h.IfName, err)
		}
	}
	if err := h.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("%s: set %s up: %w", h.Name, h.IfName, err)
	}
	l.log.Debug("host ready", "host", h.String(), "mac", h.MAC, "peer", h.PeerName)
	return nil
}

// addVIPs puts the VIPs on b's loopback as host routes. IPv6 ones are
// nodad, and since Linux answers neighbour solicitations only for addresses
// of the receiving interface, a /128 on lo is never advertised on the veth.
func (l *Lab) addVIPs(b *Host) error {
	lo, err := b.nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("%s: find lo: %w", b.Name, err)
	}
	for _, v := range l.VIPs {
		a := &netlink.Addr{IPNet: ipNet(v, v.BitLen())}
		if v.Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := b.nl.AddrAdd(lo, a); err != nil {
			return fmt.Errorf("%s: add VIP %s to lo: %w", b.Name, v, err)
		}
	}
	return nil
}

// routeVIPs makes the client send VIP traffic to the balancer's MAC.
func (l *Lab) routeVIPs() error {
	for _, v := range l.VIPs {
		gw := l.Balancer.Addr4
		if v.Is6() {
			gw = l.Balancer.Addr6
		}
		r := &netlink.Route{
			LinkIndex: l.Client.Ifindex,
			Dst:       ipNet(v, v.BitLen()),
			Gw:        net.IP(gw.AsSlice()),
		}
		if err := l.Client.nl.RouteAdd(r); err != nil {
			return fmt.Errorf("client: route %s via %s: %w", v, gw, err)
		}
	}
	return nil
}

// Close stops the backend servers and removes every namespace and link of
// the lab. It is idempotent and copes with a partially built lab. Sockets
// the caller opened inside lab namespaces keep those (then nameless and
// link-less) namespaces alive until the sockets are closed.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	servers := l.servers
	l.servers = nil
	l.mu.Unlock()

	for _, s := range servers {
		s.stop()
	}

	var errs []error
	// Delete veths explicitly rather than relying on namespace teardown:
	// that is asynchronous, and the balancer end may sit in the caller's
	// namespace where a stale name would block the next lab.
	if sw := l.Switch; sw != nil && sw.nl != nil {
		for _, h := range l.hosts {
			if h.PeerName != "" {
				errs = append(errs, deleteLink(sw.nl, h.PeerName))
			}
		}
		errs = append(errs, deleteLink(sw.nl, l.BridgeName))
	}
	for _, h := range l.hosts {
		if h.NetNS == "" && h.nl != nil && h.IfName != "" {
			errs = append(errs, deleteLink(h.nl, h.IfName))
		}
	}
	for i := len(l.hosts) - 1; i >= 0; i-- {
		h := l.hosts[i]
		if h.nl != nil {
			h.nl.Close()
			h.nl = nil
		}
		if h.ns.IsOpen() {
			errs = append(errs, h.ns.Close())
			h.ns = netns.None()
		}
		if h.NetNS != "" {
			errs = append(errs, deleteNamedNS(h.NetNS))
		}
	}
	err := errors.Join(errs...)
	if err != nil {
		l.log.Warn("lab removed with errors", "err", err)
	} else {
		l.log.Info("lab removed")
	}
	return err
}

// Purge removes leftovers of labs that were never closed (for example a
// killed `make demo`): namespaces named "<prefix>-*" and links named
// "<prefix>*" in the caller's namespace. Links inside purged namespaces go
// with them.
func Purge(prefix string) error {
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("lab: purge: prefix %q must match %s", prefix, prefixRE)
	}
	var errs []error
	names, err := namedNSWithPrefix(prefix + "-")
	errs = append(errs, err)
	for _, n := range names {
		errs = append(errs, deleteNamedNS(n))
	}
	self, err := currentNS()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("lab: purge: %w", err))...)
	}
	defer self.Close()
	nl, err := netlink.NewHandleAt(self)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("lab: purge: netlink handle: %w", err))...)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		errs = append(errs, fmt.Errorf("lab: purge: list links: %w", err))
	}
	for _, lk := range links {
		if strings.HasPrefix(lk.Attrs().Name, prefix) {
			if err := nl.LinkDel(lk); err != nil {
				errs = append(errs, fmt.Errorf("lab: purge: delete link %s: %w", lk.Attrs().Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

func deleteLink(h *netlink.Handle, name string) error {
	link, err := h.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find link %s for deletion: %w", name, err)
	}
	if err := h.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

// pickPrefix validates a requested prefix or draws a random free one. A
// prefix is in use if any namespace or caller-namespace link carries it;
// refusing those keeps Close from deleting anything it did not create.
func pickPrefix(want string, rootNL *netlink.Handle) (string, error) {
	inUse := func(p string) (bool, error) {
		names, err := namedNSWithPrefix(p + "-")
		if err != nil || len(names) > 0 {
			return true, err
		}
		links, err := rootNL.LinkList()
		if err != nil {
			return true, fmt.Errorf("list links: %w", err)
		}
		for _, lk := range links {
			if strings.HasPrefix(lk.Attrs().Name, p) {
				return true, nil
			}
		}
		return false, nil
	}
	if want != "" {
		used, err := inUse(want)
		if err != nil {
			return "", fmt.Errorf("lab: check prefix %q: %w", want, err)
		}
		if used {
			return "", fmt.Errorf("lab: prefix %q already in use (leftover? see Purge)", want)
		}
		return want, nil
	}
	for range 32 {
		p := fmt.Sprintf("vf%04x", rand.N(0x10000))
		used, err := inUse(p)
		if err != nil {
			return "", fmt.Errorf("lab: check prefix %q: %w", p, err)
		}
		if !used {
			return p, nil
		}
	}
	return "", errors.New("lab: no free random prefix after 32 tries")
}

// pickSubnet returns X. Only with the balancer in the caller's namespace
// can the lab's subnet clash with existing routes, so only then is it
// checked.
func pickSubnet(want uint8, inRoot bool, rootNL *netlink.Handle) (byte, error) {
	clashes := func(x byte) (bool, error) {
		if !inRoot {
			return false, nil
		}
		for fam, p := range map[int]netip.Prefix{
			netlink.FAMILY_V4: netip.PrefixFrom(addr4(x, 0), 24),
			netlink.FAMILY_V6: netip.PrefixFrom(addr6(x, 0), 64),
		} {
			routes, err := rootNL.RouteList(nil, fam)
			if err != nil {
				return true, fmt.Errorf("list routes: %w", err)
			}
			for _, r := range routes {
				if r.Dst == nil {
					continue // default route
				}
				rp, ok := netipPrefix(r.Dst)
				if ok && rp.Bits() > 0 && rp.Overlaps(p) {
					return true, nil
				}
			}
		}
		return false, nil
	}
	if want != 0 {
		bad, err := clashes(want)
		if err != nil {
			return 0, fmt.Errorf("lab: check subnet %d: %w", want, err)
		}
		if bad {
			return 0, fmt.Errorf("lab: subnet 10.%d.0.0/24 or its IPv6 twin is already routed here", want)
		}
		return want, nil
	}
	for range 64 {
		x := byte(1 + rand.N(254))
		bad, err := clashes(x)
		if err != nil {
			return 0, fmt.Errorf("lab: check subnet %d: %w", x, err)
		}
		if !bad {
			return x, nil
		}
	}
	return 0, errors.New("lab: no free 10.X.0.0/24 subnet after 64 tries")
}

// addr4 is 10.x.0.host.
func addr4(x byte, host int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, x, 0, byte(host)})
}

// addr6 is fd00:x::host with x and host written in the same digits as in
// addr4 (10.7.0.12 <-> fd00:7::12), which is what people expect to read.
func addr6(x byte, host int) netip.Addr {
	var b [16]byte
	b[0] = 0xfd
	g := sameDigitsHex(int(x))
	b[2], b[3] = byte(g>>8), byte(g)
	g = sameDigitsHex(host)
	b[14], b[15] = byte(g>>8), byte(g)
	return netip.AddrFrom16(b)
}

// sameDigitsHex reinterprets n's decimal digits as hex: 12 -> 0x12.
func sameDigitsHex(n int) uint16 {
	v, _ := strconv.ParseUint(strconv.Itoa(n), 16, 16) // n <= 255 always fits
	return uint16(v)
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, a.BitLen())}
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

var roleRE = regexp.MustCompile(`^[a-z0-9]{1,4}$`)

// AddHost adds a host on the lab's segment in a namespace of its own,
// "<Prefix>-<role>", with the veth "<Prefix><role>" addressed 10.X.0.h/24
// and fd00:X::h/64 for h = hostByte. It is for topologies beyond one
// client and one balancer (more balancers, a router); Close removes it
// with the rest of the lab. hostByte must be 3..9 or above the backends,
// and not taken. Like the balancer's, its veth can transmit from XDP.
func (l *Lab) AddHost(role string, hostByte int) (*Host, error) {
	if !roleRE.MatchString(role) {
		return nil, fmt.Errorf("lab: AddHost role %q must match %s", role, roleRE)
	}
	for _, a := range l.hostAddrs(len(l.Backends)) {
		if a.Is4() && int(a.As4()[3]) == hostByte {
			return nil, fmt.Errorf("lab: AddHost(%s): host byte %d is taken", role, hostByte)
		}
	}
	if hostByte < 3 || hostByte > 254 {
		return nil, fmt.Errorf("lab: AddHost(%s): host byte %d out of 3..254", role, hostByte)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("lab: AddHost(%s): lab is closed", role)
	}
	for _, h := range l.hosts {
		if h.Addr4.IsValid() && int(h.Addr4.As4()[3]) == hostByte || h.NetNS == l.Prefix+"-"+role {
			return nil, fmt.Errorf("lab: AddHost(%s): %s already has host byte %d or the role", role, h.Name, hostByte)
		}
	}
	x := l.Subnet4.Addr().As4()[1]
	h := l.newHost(role, role, role, x, hostByte)
	if err := l.addHost(h, l.Switch.Ifindex, false); err != nil {
		return nil, fmt.Errorf("lab %s: %w", l.Prefix, err)
	}
	// As for the balancer: frames a host sends with XDP_TX reach the
	// bridge only when the peer end runs an XDP program.
	pass, err := loadXDPPass()
	if err != nil {
		return nil, err
	}
	defer pass.Close()
	peer, err := l.Switch.nl.LinkByName(h.PeerName)
	if err != nil {
		return nil, fmt.Errorf("lab %s: find %s: %w", l.Prefix, h.PeerName, err)
	}
	if err := l.Switch.Do(func() error {
		return netlink.LinkSetXdpFdWithFlags(peer, pass.FD(), unix.XDP_FLAGS_DRV_MODE)
	}); err != nil {
		return nil, fmt.Errorf("lab %s: attach XDP_PASS to %s: %w", l.Prefix, h.PeerName, err)
	}
	return h, nil
}
