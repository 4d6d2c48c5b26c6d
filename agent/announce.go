package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/veloflux/veloflux/agent/api"
	"github.com/veloflux/veloflux/agent/bgp"
	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/metrics"
	"github.com/veloflux/veloflux/agent/reconcile"
	"github.com/veloflux/veloflux/agent/statefile"
)

// nodeDrainFile keeps the node drain across restarts, in the state dir.
const nodeDrainFile = "node-drained.json"

// bgpPlan is the bgp section resolved against the host: the router id and
// next hops that default to interface addresses are filled in, and the
// communities parsed. It is built before anything changes, so a section
// that cannot be put in force fails without side effects.
type bgpPlan struct {
	opts     bgp.Options // without Logger, Restarting and OnPeerChange
	peers    []bgp.Peer
	nextHop4 netip.Addr // invalid when there is none
	nextHop6 netip.Addr
	attrs    routeAttrs
	perVIP   map[netip.Addr]routeAttrs
}

type routeAttrs struct {
	communities []uint32
	localPref   *uint32
	med         *uint32
}

// resolveBGP builds the plan for cfg; nil when cfg has no bgp section.
func resolveBGP(cfg *config.Config) (*bgpPlan, error) {
	b := cfg.BGP
	if b == nil {
		return nil, nil
	}
	var ifname string
	if len(cfg.Dataplane.Interfaces) > 0 {
		ifname = cfg.Dataplane.Interfaces[0]
	}
	addr4, addr6, ifErr := interfaceAddrs(ifname)
	pick := func(path, set string, found netip.Addr) (netip.Addr, error) {
		if set != "" {
			return netip.ParseAddr(set) // validated
		}
		if found.IsValid() {
			return found, nil
		}
		return netip.Addr{}, fmt.Errorf("%s: not set, and the interface gives none: %w", path, ifErr)
	}
	routerID, err := pick("bgp.router_id", b.RouterID, addr4)
	if err != nil {
		return nil, err
	}
	p := &bgpPlan{
		opts: bgp.Options{ASN: b.ASN, RouterID: routerID, GracefulRestart: b.GracefulRestart.Enabled,
			RestartTime: b.GracefulRestart.RestartTime.Std()},
		perVIP: map[netip.Addr]routeAttrs{},
	}
	// A missing next hop is an error only for a family some VIP uses.
	var has4, has6 bool
	for _, v := range cfg.VIPs {
		a, _ := netip.ParseAddr(v.Address)
		has4, has6 = has4 || a.Is4(), has6 || a.Is6()
	}
	if p.nextHop4, err = pick("bgp.next_hop", b.NextHop, addr4); err != nil && has4 {
		return nil, err
	}
	if p.nextHop6, err = pick("bgp.next_hop_v6", b.NextHopV6, addr6); err != nil && has6 {
		return nil, err
	}
	for _, peer := range b.Peers {
		addr, _ := netip.ParseAddr(peer.Address)
		p.peers = append(p.peers, bgp.Peer{Address: addr, ASN: peer.ASN, Port: uint16(peer.Port),
			HoldTime: peer.HoldTime.Std(), Keepalive: peer.Keepalive.Std(), Password: peer.Password,
			Multihop: uint8(peer.Multihop)})
	}
	p.attrs = attrsOf(b.Communities, b.LocalPreference, b.MED)
	for _, o := range b.VIPs {
		addr, _ := netip.ParseAddr(o.Address)
		a := attrsOf(o.Communities, o.LocalPreference, o.MED)
		// An override replaces what it sets and inherits the rest.
		if o.Communities == nil {
			a.communities = p.attrs.communities
		}
		if o.LocalPreference == nil {
			a.localPref = p.attrs.localPref
		}
		if o.MED == nil {
			a.med = p.attrs.med
		}
		p.perVIP[addr] = a
	}
	return p, nil
}

func attrsOf(communities []string, localPref, med *uint32) routeAttrs {
	a := routeAttrs{localPref: localPref, med: med}
	for _, s := range communities {
		c, _ := config.ParseCommunity(s) // validated
		a.communities = append(a.communities, c)
	}
	return a
}

// interfaceAddrs returns the first global IPv4 and IPv6 addresses of an
// interface.
func interfaceAddrs(ifname string) (v4, v6 netip.Addr, err error) {
	if ifname == "" {
		return v4, v6, errors.New("no data path interface is configured")
	}
	ifc, err := net.InterfaceByName(ifname)
	if err != nil {
		return v4, v6, fmt.Errorf("interface %s: %w", ifname, err)
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		return v4, v6, fmt.Errorf("addresses of interface %s: %w", ifname, err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		if !ok || !ip.IsGlobalUnicast() {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() && !v4.IsValid() {
			v4 = ip
		} else if ip.Is6() && !v6.IsValid() {
			v6 = ip
		}
	}
	if !v4.IsValid() || !v6.IsValid() {
		err = fmt.Errorf("interface %s has no global address of that family", ifname)
	}
	return v4, v6, err
}

// announcer runs the BGP speaker and decides what it announces: a VIP
// address while XDP is on every configured interface, some VIP on the
// address has a ring with a live backend, and the node is not drained.
type announcer struct {
	log *slog.Logger
	// onChange is called after a session or the announced set changed.
	onChange func()

	mu         sync.Mutex // serializes speaker changes and announcements
	speaker    *bgp.Speaker
	plan       *bgpPlan
	restarting bool // the next speaker says that forwarding went on
	// live remembers, per VIP address, whether a ring had a live backend
	// at the last reconcile that succeeded.
	live map[netip.Addr]bool
	// announced is, per VIP address, whether it is announced now.
	announced map[netip.Addr]bool
	changedAt time.Time
}

// announceInput is the state an announcement is decided from.
type announceInput struct {
	cfg       *config.Config
	attached  bool
	drained   bool
	installed *reconcile.Installed // nil after a failed reconcile
}

// reconfigure puts plan in force: a speaker is started, stopped or
// replaced when the global settings change, else only the peers that
// changed are touched. On failure the previous speaker and peers are back
// and the error says what failed. undo, on success, restores the previous
// state; the announced routes follow at the next announce.
func (an *announcer) reconfigure(ctx context.Context, next *bgpPlan) (undo func(), err error) {
	an.mu.Lock()
	defer an.mu.Unlock()
	cur := an.plan
	if err := an.switchTo(ctx, next); err != nil {
		if rerr := an.switchTo(context.WithoutCancel(ctx), cur); rerr != nil {
			an.log.Error("roll back: BGP speaker", "err", rerr)
		}
		return nil, err
	}
	return func() {
		an.mu.Lock()
		defer an.mu.Unlock()
		if err := an.switchTo(context.WithoutCancel(ctx), cur); err != nil {
			an.log.Error("roll back: BGP speaker", "err", err)
		}
	}, nil
}

// switchTo changes the running speaker to next's settings. Called with
// an.mu held.
func (an *announcer) switchTo(ctx context.Context, next *bgpPlan) error {
	if next == nil {
		if an.speaker != nil {
			if err := an.speaker.Stop(ctx, bgp.WithdrawRoutes); err != nil {
				an.log.Warn("stop BGP speaker", "err", err)
			}
			an.speaker = nil
			clear(an.announced)
		}
		an.plan = nil
		return nil
	}
	if an.speaker != nil && an.speaker.Options().Equal(next.opts) {
		if err := an.speaker.SetPeers(ctx, next.peers); err != nil {
			return err
		}
		an.plan = next
		return nil
	}
	opts := next.opts
	opts.Logger = an.log
	opts.Restarting = an.restarting
	opts.OnPeerChange = func(bgp.PeerStatus) { an.onChange() }
	s, err := bgp.Start(ctx, opts)
	if err != nil {
		return err
	}
	if an.speaker != nil {
		// New global settings reset every session anyway: tell the
		// routers now rather than let them time out.
		if err := an.speaker.Stop(ctx, bgp.WithdrawRoutes); err != nil {
			an.log.Warn("stop BGP speaker", "err", err)
		}
		clear(an.announced)
	}
	an.speaker, an.plan, an.restarting = s, next, false
	// Routes before peers: a restarted agent has its routes ready when
	// the sessions come up, so the routers see them in the first update.
	if err := an.speaker.SetRoutes(ctx, an.routesLocked()); err != nil {
		an.log.Warn("announce", "err", err)
	}
	return an.speaker.SetPeers(ctx, next.peers)
}

// announce brings the announced routes in line with in.
func (an *announcer) announce(ctx context.Context, in announceInput) {
	an.mu.Lock()
	defer an.mu.Unlock()
	if in.installed != nil {
		an.live = liveAddrs(in.cfg, in.installed)
	}
	want := map[netip.Addr]bool{}
	for _, v := range in.cfg.VIPs {
		addr, _ := netip.ParseAddr(v.Address)
		want[addr] = in.attached && !in.drained && an.live[addr]
	}
	if maps.Equal(want, an.announced) {
		return
	}
	changed := make([]string, 0)
	for addr, on := range want {
		if an.announced[addr] != on {
			changed = append(changed, fmt.Sprintf("%s=%t", addr, on))
		}
	}
	slices.Sort(changed)
	prev := an.announced
	an.announced = want
	if an.speaker != nil {
		if err := an.speaker.SetRoutes(ctx, an.routesLocked()); err != nil {
			an.log.Error("update BGP announcements; will retry", "err", err)
			an.announced = prev // so the next call tries again
			return
		}
		an.log.Info("BGP announcements changed", "vips", changed, "xdp_attached", in.attached, "node_drained", in.drained)
	}
	an.changedAt = time.Now()
	go an.onChange()
}

// routesLocked is the routes to announce: one per announced address.
func (an *announcer) routesLocked() []bgp.Route {
	if an.plan == nil {
		return nil
	}
	var out []bgp.Route
	for _, addr := range slices.SortedFunc(maps.Keys(an.announced), netip.Addr.Compare) {
		if !an.announced[addr] {
			continue
		}
		nh := an.plan.nextHop4
		if addr.Is6() {
			nh = an.plan.nextHop6
		}
		attrs, ok := an.plan.perVIP[addr]
		if !ok {
			attrs = an.plan.attrs
		}
		out = append(out, bgp.Route{Prefix: netip.PrefixFrom(addr, addr.BitLen()), NextHop: nh,
			Communities: attrs.communities, LocalPref: attrs.localPref, MED: attrs.med})
	}
	return out
}

// liveAddrs reports, per VIP address, whether the ring of some VIP on it
// has a live backend.
func liveAddrs(cfg *config.Config, in *reconcile.Installed) map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	for vip, meta := range in.VIPs {
		out[vip.Addr] = out[vip.Addr] || in.Rings[meta.ID].Backends > 0
	}
	return out
}

// stop ends the speaker when the agent stops. With graceful restart the
// sessions close without a NOTIFICATION, so the routers keep the routes
// while the pinned data path goes on forwarding and the next agent starts.
func (an *announcer) stop(ctx context.Context) {
	an.mu.Lock()
	defer an.mu.Unlock()
	if an.speaker == nil {
		return
	}
	mode := bgp.WithdrawRoutes
	if an.plan.opts.GracefulRestart {
		mode = bgp.KeepRoutes
	}
	if err := an.speaker.Stop(ctx, mode); err != nil {
		an.log.Warn("stop BGP speaker", "err", err)
	}
	an.speaker = nil
}

// snapshot is what the API, the status channel and the metrics show.
type bgpSnapshot struct {
	enabled   bool
	asn       uint32
	routerID  netip.Addr
	peers     []bgp.PeerStatus
	announced map[netip.Addr]bool
	changedAt time.Time
}

func (an *announcer) snapshot() bgpSnapshot {
	an.mu.Lock()
	s := an.speaker
	snap := bgpSnapshot{announced: maps.Clone(an.announced), changedAt: an.changedAt}
	if an.plan != nil {
		snap.enabled, snap.asn, snap.routerID = true, an.plan.opts.ASN, an.plan.opts.RouterID
	}
	an.mu.Unlock()
	if s != nil {
		snap.peers = s.Status()
	}
	return snap
}

// announceInput reads what an announcement depends on now.
func (a *Agent) announceInput() announceInput {
	cfg := a.config()
	in := announceInput{cfg: cfg, drained: a.nodeDrained.Load()}
	if a.rec != nil {
		in.installed = a.rec.Installed()
	}
	if a.dp != nil && len(cfg.Dataplane.Interfaces) > 0 {
		atts, err := a.xdpAttachments()
		in.attached = err == nil && len(atts) == len(cfg.Dataplane.Interfaces)
		for _, at := range atts {
			in.attached = in.attached && at.Attached
		}
	}
	return in
}

// announce re-decides what the node announces; cheap when nothing changed.
func (a *Agent) announce(ctx context.Context) {
	if a.bgp == nil {
		return
	}
	a.bgp.announce(ctx, a.announceInput())
}

// SetNodeDrained drains or undrains the whole node: a drained node
// withdraws every VIP while its data path keeps forwarding, so the routers
// move new flows to the other nodes. The drain survives restarts.
func (a *Agent) SetNodeDrained(ctx context.Context, drained bool) error {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	if err := a.saveNodeDrained(drained); err != nil {
		return err
	}
	prev := a.nodeDrained.Swap(drained)
	if prev != drained {
		a.log.Info("node drain changed", "drained", drained)
	}
	a.announce(ctx)
	a.publishStatus()
	return nil
}

// nodeDrainState is the form of nodeDrainFile.
type nodeDrainState struct {
	Version int  `json:"version"`
	Drained bool `json:"drained"`
}

func (a *Agent) saveNodeDrained(drained bool) error {
	if a.opts.StateDir == "" {
		return nil
	}
	data, err := json.Marshal(nodeDrainState{Version: 1, Drained: drained})
	if err != nil {
		return err
	}
	if err := statefile.Write(filepath.Join(a.opts.StateDir, nodeDrainFile), data, statefile.Options{}); err != nil {
		return fmt.Errorf("save node drain: %w", err)
	}
	return nil
}

// loadNodeDrained restores the node drain. A file that does not parse is
// moved aside by statefile.Read and the node starts undrained.
func (a *Agent) loadNodeDrained() error {
	if a.opts.StateDir == "" {
		return nil
	}
	var st nodeDrainState
	_, err := statefile.Read(filepath.Join(a.opts.StateDir, nodeDrainFile), a.log, func(data []byte) error {
		if err := json.Unmarshal(data, &st); err != nil {
			return fmt.Errorf("%w: node drain: %w", statefile.ErrCorrupt, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("load node drain: %w", err)
	}
	a.nodeDrained.Store(st.Drained)
	return nil
}

// vipRings reports each VIP's installed ring, by the dataplane VIP.
func (a *Agent) vipRings() map[dataplane.VIP]reconcile.RingInfo {
	in := a.rec.Installed()
	if in == nil {
		return nil
	}
	out := make(map[dataplane.VIP]reconcile.RingInfo, len(in.VIPs))
	for vip, meta := range in.VIPs {
		out[vip] = in.Rings[meta.ID]
	}
	return out
}

// BGP is GET /api/bgp.
func (a *Agent) BGP() api.BGPView {
	v := api.BGPView{NodeDrained: a.nodeDrained.Load(), Peers: []api.BGPPeerView{}, VIPs: []api.BGPAnnounceView{}}
	if a.bgp == nil {
		return v
	}
	snap := a.bgp.snapshot()
	if !snap.enabled {
		return v
	}
	v.Enabled, v.ASN, v.RouterID = true, snap.asn, snap.routerID.String()
	now := time.Now()
	for _, p := range snap.peers {
		pv := api.BGPPeerView{Address: p.Address.String(), ASN: p.ASN, State: p.State, Up: p.Up,
			UptimeSeconds: now.Sub(p.Since).Seconds(), Transitions: p.Transitions, LastError: p.LastError,
			RoutesSent: make([]string, 0, len(p.RoutesSent))}
		for _, r := range p.RoutesSent {
			pv.RoutesSent = append(pv.RoutesSent, r.String())
		}
		v.Peers = append(v.Peers, pv)
	}
	for _, addr := range slices.SortedFunc(maps.Keys(snap.announced), netip.Addr.Compare) {
		v.VIPs = append(v.VIPs, api.BGPAnnounceView{Address: addr.String(), Announced: snap.announced[addr]})
	}
	return v
}

// VIPRings is the ring of each VIP, by the API's VIP id.
func (a *Agent) VIPRings() map[string]api.RingView {
	out := map[string]api.RingView{}
	if a.rec == nil {
		return out
	}
	for vip, ring := range a.vipRings() {
		out[fmt.Sprintf("%s:%s:%d", vip.Proto, vip.Addr, vip.Port)] = api.RingView{
			Fingerprint: fmt.Sprintf("%013x", ring.Fingerprint), LiveBackends: ring.Backends}
	}
	return out
}

// bgpMetrics is what the veloflux_bgp_* families report at a scrape.
func (a *Agent) bgpMetrics() (metrics.BGPState, bool) {
	if a.bgp == nil {
		return metrics.BGPState{}, false
	}
	snap := a.bgp.snapshot()
	if !snap.enabled {
		return metrics.BGPState{}, false
	}
	st := metrics.BGPState{Announced: make(map[string]bool, len(snap.announced))}
	for _, p := range snap.peers {
		st.Peers = append(st.Peers, metrics.BGPPeer{Peer: p.Address.String(), Up: p.Up, Transitions: p.Transitions})
	}
	for addr, on := range snap.announced {
		st.Announced[addr.String()] = on
	}
	return st, true
}

// ringMetrics is veloflux_vip_ring_fingerprint at a scrape.
func (a *Agent) ringMetrics() []metrics.VIPRing {
	if a.rec == nil {
		return nil
	}
	rings := a.vipRings()
	out := make([]metrics.VIPRing, 0, len(rings))
	for vip, ring := range rings {
		out = append(out, metrics.VIPRing{VIP: vip.String(), Fingerprint: ring.Fingerprint})
	}
	return out
}

// CloseBGPSessions makes the routers of cfg's bgp section drop every route
// of this node now, for `veloflux detach`: after an agent stopped with
// graceful restart they would keep the routes for the restart time, and
// send traffic to a node whose data path is gone. Without a bgp section it
// does nothing.
func CloseBGPSessions(ctx context.Context, cfg *config.Config) error {
	plan, err := resolveBGP(cfg)
	if err != nil || plan == nil {
		return err
	}
	return bgp.CloseSessions(ctx, plan.opts.ASN, plan.opts.RouterID, plan.peers)
}
