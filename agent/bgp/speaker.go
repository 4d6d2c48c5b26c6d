// Package bgp announces VeloFlux's VIPs to upstream routers. It embeds a
// GoBGP speaker behind a small interface of its own, so that the rest of the
// agent deals in netip prefixes and plain structs and never in GoBGP's types.
//
// The speaker is the active side only: it dials its peers and listens on no
// port, BGP or gRPC. Peers are added, changed and removed one by one, so a
// change to one peer never resets the sessions of the others. Routes are
// set as a whole; the speaker announces what is new and withdraws what is
// gone, and sends nothing for routes that did not change.
//
// Graceful restart (RFC 4724) keeps traffic flowing across an agent
// restart: Stop with KeepRoutes closes the sessions without a NOTIFICATION,
// so the routers keep the routes as stale for the restart time, and a
// speaker started with Restarting set tells them that forwarding went on,
// so they keep the stale routes until it has sent its own.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	api "github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	gbgp "github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"
)

// DefaultPort is the BGP port peers listen on.
const DefaultPort = 179

// Options are the speaker's global settings. Changing any of them needs a
// new speaker (Stop, then Start), which resets every session.
type Options struct {
	ASN      uint32
	RouterID netip.Addr // an IPv4 address
	// GracefulRestart advertises the graceful restart capability with
	// RestartTime, the time a peer keeps our routes after the session drops.
	GracefulRestart bool
	RestartTime     time.Duration
	// Restarting sets the restart and forwarding bits: the data path kept
	// forwarding while no speaker ran, so peers keep the routes they hold
	// until this speaker has sent its own (End-of-RIB).
	Restarting bool
	Logger     *slog.Logger
	// OnPeerChange is called, from the speaker's own goroutine, after the
	// session with a peer went up or down.
	OnPeerChange func(PeerStatus)
}

// Equal reports whether two option sets configure the same speaker
// (callbacks and loggers aside).
func (o Options) Equal(p Options) bool {
	return o.ASN == p.ASN && o.RouterID == p.RouterID && o.GracefulRestart == p.GracefulRestart &&
		o.RestartTime == p.RestartTime
}

// Peer is one BGP neighbour the speaker dials.
type Peer struct {
	Address netip.Addr
	ASN     uint32
	// Port is the peer's port; 0 means 179.
	Port      uint16
	HoldTime  time.Duration
	Keepalive time.Duration
	// Password turns on TCP MD5 signatures (RFC 2385).
	Password string
	// Multihop is the TTL of packets to an eBGP peer that is not directly
	// connected; 0 keeps the default of 1.
	Multihop uint8
}

func (p Peer) port() uint16 {
	if p.Port == 0 {
		return DefaultPort
	}
	return p.Port
}

// Route is one prefix the speaker announces, with its attributes.
type Route struct {
	Prefix      netip.Prefix
	NextHop     netip.Addr
	Communities []uint32 // RFC 1997, high 16 bits the AS
	LocalPref   *uint32  // sent to iBGP peers only
	MED         *uint32
}

// Equal reports whether two routes are announced identically.
func (r Route) Equal(o Route) bool {
	eq := func(a, b *uint32) bool { return (a == nil) == (b == nil) && (a == nil || *a == *b) }
	return r.Prefix == o.Prefix && r.NextHop == o.NextHop && slices.Equal(r.Communities, o.Communities) &&
		eq(r.LocalPref, o.LocalPref) && eq(r.MED, o.MED)
}

// PeerStatus is what the speaker knows of one peer's session.
type PeerStatus struct {
	Address netip.Addr
	ASN     uint32
	// State is the BGP FSM state: idle, connect, active, opensent,
	// openconfirm or established.
	State string
	Up    bool
	// Since is when the session entered its current up or down state.
	Since time.Time
	// Transitions counts how often the session went up or down.
	Transitions uint64
	// LastError is why the session last went down, if it did.
	LastError string
	// RoutesSent are the prefixes in the peer's Adj-RIB-Out.
	RoutesSent []netip.Prefix
}

// Speaker is a running BGP speaker. It is safe for concurrent use.
type Speaker struct {
	srv    *server.BgpServer
	opts   Options
	log    *slog.Logger
	cancel context.CancelFunc

	mu     sync.Mutex // serializes changes to peers and routes
	peers  map[netip.Addr]Peer
	routes map[netip.Prefix]Route

	stateMu sync.Mutex
	states  map[netip.Addr]*PeerStatus
}

// Start runs a speaker with no peers and no routes.
func Start(ctx context.Context, opts Options) (*Speaker, error) {
	if opts.ASN == 0 {
		return nil, errors.New("bgp: the local AS number must not be 0")
	}
	if !opts.RouterID.Is4() {
		return nil, fmt.Errorf("bgp: router id %s is not an IPv4 address", opts.RouterID)
	}
	if opts.GracefulRestart && (opts.RestartTime < time.Second || opts.RestartTime > 4095*time.Second) {
		return nil, fmt.Errorf("bgp: restart time %s is outside 1s..4095s", opts.RestartTime)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	level := &slog.LevelVar{}
	level.Set(slog.LevelWarn) // GoBGP's info records are per message; ours say what matters
	srv := server.NewBgpServer(server.LoggerOption(log.With("component", "gobgp"), level))
	go srv.Serve()
	global := &api.Global{
		Asn:        opts.ASN,
		RouterId:   opts.RouterID.String(),
		ListenPort: -1, // the active side only: no listener
	}
	if err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: global}); err != nil {
		srv.Stop()
		return nil, fmt.Errorf("bgp: start speaker (AS %d, router id %s): %w", opts.ASN, opts.RouterID, err)
	}
	s := &Speaker{
		srv: srv, opts: opts, log: log,
		peers:  map[netip.Addr]Peer{},
		routes: map[netip.Prefix]Route{},
		states: map[netip.Addr]*PeerStatus{},
	}
	watchCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.cancel = cancel
	err := srv.WatchEvent(watchCtx, server.WatchEventMessageCallbacks{OnPeerUpdate: s.onPeerEvent}, server.WatchPeer())
	if err != nil {
		cancel()
		srv.Stop()
		return nil, fmt.Errorf("bgp: watch peer events: %w", err)
	}
	return s, nil
}

// Options returns the options the speaker runs with.
func (s *Speaker) Options() Options { return s.opts }

func (s *Speaker) onPeerEvent(ev *apiutil.WatchEventMessage_PeerEvent, at time.Time) {
	if ev.Type != apiutil.PEER_EVENT_STATE {
		return
	}
	addr := ev.Peer.State.NeighborAddress
	up := ev.Peer.State.SessionState == gbgp.BGP_FSM_ESTABLISHED
	s.stateMu.Lock()
	st, ok := s.states[addr]
	if !ok { // a peer removed meanwhile
		s.stateMu.Unlock()
		return
	}
	st.State = stateName(ev.Peer.State.SessionState)
	changed := st.Up != up
	if changed {
		st.Up, st.Since = up, at
		st.Transitions++
		if !up {
			st.LastError = ev.Peer.State.DisconnectMessage
		}
	}
	snapshot := *st
	s.stateMu.Unlock()
	if !changed {
		return
	}
	if up {
		s.log.Info("BGP session established", "peer", addr, "asn", snapshot.ASN)
	} else {
		s.log.Warn("BGP session down", "peer", addr, "asn", snapshot.ASN, "reason", snapshot.LastError)
	}
	if s.opts.OnPeerChange != nil {
		s.opts.OnPeerChange(snapshot)
	}
}

func stateName(st gbgp.FSMState) string {
	switch st {
	case gbgp.BGP_FSM_IDLE:
		return "idle"
	case gbgp.BGP_FSM_CONNECT:
		return "connect"
	case gbgp.BGP_FSM_ACTIVE:
		return "active"
	case gbgp.BGP_FSM_OPENSENT:
		return "opensent"
	case gbgp.BGP_FSM_OPENCONFIRM:
		return "openconfirm"
	case gbgp.BGP_FSM_ESTABLISHED:
		return "established"
	}
	return "unknown"
}

// SetPeers makes the speaker's peers exactly peers: new ones are added,
// missing ones removed, changed ones re-created; the sessions of the others
// are left alone. On failure the peers handled so far keep their new
// setting and the error names every peer that failed.
func (s *Speaker) SetPeers(ctx context.Context, peers []Peer) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	want := make(map[netip.Addr]Peer, len(peers))
	for _, p := range peers {
		if _, dup := want[p.Address]; dup {
			return fmt.Errorf("bgp: peer %s is listed twice", p.Address)
		}
		want[p.Address] = p
	}
	var errs []error
	for addr, old := range s.peers {
		if p, keep := want[addr]; keep && p == old {
			continue
		}
		if err := s.deletePeer(ctx, addr); err != nil {
			errs = append(errs, err)
		}
	}
	for _, addr := range slices.SortedFunc(maps.Keys(want), netip.Addr.Compare) {
		p := want[addr]
		if _, has := s.peers[addr]; has {
			continue
		}
		if err := s.addPeer(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (s *Speaker) deletePeer(ctx context.Context, addr netip.Addr) error {
	if err := s.srv.DeletePeer(ctx, &api.DeletePeerRequest{Address: addr.String()}); err != nil {
		return fmt.Errorf("bgp: remove peer %s: %w", addr, err)
	}
	delete(s.peers, addr)
	s.stateMu.Lock()
	delete(s.states, addr)
	s.stateMu.Unlock()
	s.log.Info("BGP peer removed", "peer", addr)
	return nil
}

func (s *Speaker) addPeer(ctx context.Context, p Peer) error {
	s.stateMu.Lock()
	s.states[p.Address] = &PeerStatus{Address: p.Address, ASN: p.ASN, State: "idle", Since: time.Now()}
	s.stateMu.Unlock()
	if err := s.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: s.apiPeer(p)}); err != nil {
		s.stateMu.Lock()
		delete(s.states, p.Address)
		s.stateMu.Unlock()
		return fmt.Errorf("bgp: add peer %s (AS %d): %w", p.Address, p.ASN, err)
	}
	s.peers[p.Address] = p
	s.log.Info("BGP peer added", "peer", p.Address, "asn", p.ASN, "port", p.port())
	return nil
}

func (s *Speaker) apiPeer(p Peer) *api.Peer {
	family := api.Family_AFI_IP
	if p.Address.Is6() {
		family = api.Family_AFI_IP6
	}
	// Both families on every session: a VIP of the other family is sent
	// over it too (with an extended next hop for IPv6 over IPv4).
	afiSafis := []*api.AfiSafi{}
	for _, afi := range []api.Family_Afi{family, otherFamily(family)} {
		afiSafis = append(afiSafis, &api.AfiSafi{
			Config: &api.AfiSafiConfig{Family: &api.Family{Afi: afi, Safi: api.Family_SAFI_UNICAST}, Enabled: true},
			MpGracefulRestart: &api.MpGracefulRestart{
				Config: &api.MpGracefulRestartConfig{Enabled: s.opts.GracefulRestart},
			},
		})
	}
	keepalive := p.Keepalive
	if keepalive <= 0 {
		keepalive = p.HoldTime / 3
	}
	ap := &api.Peer{
		Conf: &api.PeerConf{
			NeighborAddress: p.Address.String(),
			PeerAsn:         p.ASN,
			AuthPassword:    p.Password,
		},
		Timers: &api.Timers{Config: &api.TimersConfig{
			HoldTime:          uint64(p.HoldTime / time.Second),
			KeepaliveInterval: uint64(max(keepalive/time.Second, 1)),
			// A dropped session is dialled again soon (GoBGP's
			// shortest retry): the router holds no route of ours
			// meanwhile.
			ConnectRetry:           2,
			IdleHoldTimeAfterReset: 1,
		}},
		Transport: &api.Transport{RemotePort: uint32(p.port())},
		AfiSafis:  afiSafis,
	}
	if p.Multihop > 0 {
		ap.EbgpMultihop = &api.EbgpMultihop{Enabled: true, MultihopTtl: uint32(p.Multihop)}
	}
	if s.opts.GracefulRestart {
		ap.GracefulRestart = &api.GracefulRestart{
			Enabled:         true,
			RestartTime:     uint32(s.opts.RestartTime / time.Second),
			LocalRestarting: s.opts.Restarting,
			// Do not hold our routes back for long waiting for the
			// peer's End-of-RIB after a restart.
			DeferralTime: 1,
		}
	}
	return ap
}

func otherFamily(f api.Family_Afi) api.Family_Afi {
	if f == api.Family_AFI_IP {
		return api.Family_AFI_IP6
	}
	return api.Family_AFI_IP
}

// SetRoutes makes the announced routes exactly routes: routes that are new
// or changed are announced, routes no longer listed are withdrawn. On
// failure the routes handled so far stay as they are and the next call
// retries the rest.
func (s *Speaker) SetRoutes(ctx context.Context, routes []Route) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	want := make(map[netip.Prefix]Route, len(routes))
	for _, r := range routes {
		if _, dup := want[r.Prefix]; dup {
			return fmt.Errorf("bgp: route %s is listed twice", r.Prefix)
		}
		if r.Prefix.Addr().Is4() != r.NextHop.Is4() {
			return fmt.Errorf("bgp: route %s has next hop %s of the other address family", r.Prefix, r.NextHop)
		}
		want[r.Prefix] = r
	}
	var errs []error
	// Withdrawals first: a VIP that must go is the urgent change.
	for _, pfx := range slices.SortedFunc(maps.Keys(s.routes), netip.Prefix.Compare) {
		if _, keep := want[pfx]; keep {
			continue
		}
		path, err := apiPath(s.routes[pfx])
		if err == nil {
			err = s.srv.DeletePath(apiutil.DeletePathRequest{Paths: []*apiutil.Path{path}})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bgp: withdraw %s: %w", pfx, err))
			continue
		}
		delete(s.routes, pfx)
	}
	for _, pfx := range slices.SortedFunc(maps.Keys(want), netip.Prefix.Compare) {
		r := want[pfx]
		if old, has := s.routes[pfx]; has && old.Equal(r) {
			continue
		}
		path, err := apiPath(r)
		if err == nil {
			_, err = s.srv.AddPath(apiutil.AddPathRequest{Paths: []*apiutil.Path{path}})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bgp: announce %s via %s: %w", pfx, r.NextHop, err))
			continue
		}
		s.routes[pfx] = r
	}
	return errors.Join(errs...)
}

// apiPath builds GoBGP's path for a route.
func apiPath(r Route) (*apiutil.Path, error) {
	nlri, err := gbgp.NewIPAddrPrefix(r.Prefix)
	if err != nil {
		return nil, err
	}
	attrs := []gbgp.PathAttributeInterface{gbgp.NewPathAttributeOrigin(gbgp.BGP_ORIGIN_ATTR_TYPE_IGP)}
	family := gbgp.RF_IPv4_UC
	if r.Prefix.Addr().Is4() {
		nh, err := gbgp.NewPathAttributeNextHop(r.NextHop)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, nh)
	} else {
		family = gbgp.RF_IPv6_UC
		mp, err := gbgp.NewPathAttributeMpReachNLRI(family, []gbgp.PathNLRI{{NLRI: nlri}}, r.NextHop)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, mp)
	}
	if len(r.Communities) > 0 {
		attrs = append(attrs, gbgp.NewPathAttributeCommunities(slices.Clone(r.Communities)))
	}
	if r.LocalPref != nil {
		attrs = append(attrs, gbgp.NewPathAttributeLocalPref(*r.LocalPref))
	}
	if r.MED != nil {
		attrs = append(attrs, gbgp.NewPathAttributeMultiExitDisc(*r.MED))
	}
	return &apiutil.Path{Family: family, Nlri: nlri, Attrs: attrs}, nil
}

// Routes returns the announced routes, in prefix order.
func (s *Speaker) Routes() []Route {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Route, 0, len(s.routes))
	for _, pfx := range slices.SortedFunc(maps.Keys(s.routes), netip.Prefix.Compare) {
		out = append(out, s.routes[pfx])
	}
	return out
}

// Peers returns the configured peers, in address order.
func (s *Speaker) Peers() []Peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Peer, 0, len(s.peers))
	for _, addr := range slices.SortedFunc(maps.Keys(s.peers), netip.Addr.Compare) {
		out = append(out, s.peers[addr])
	}
	return out
}

// Status reports every peer's session, with the routes in its Adj-RIB-Out
// when it is established, in address order.
func (s *Speaker) Status() []PeerStatus {
	s.stateMu.Lock()
	out := make([]PeerStatus, 0, len(s.states))
	for _, addr := range slices.SortedFunc(maps.Keys(s.states), netip.Addr.Compare) {
		out = append(out, *s.states[addr])
	}
	s.stateMu.Unlock()
	for i := range out {
		if !out[i].Up {
			continue
		}
		for _, family := range []gbgp.Family{gbgp.RF_IPv4_UC, gbgp.RF_IPv6_UC} {
			req := apiutil.ListPathRequest{TableType: api.TableType_TABLE_TYPE_ADJ_OUT, Name: out[i].Address.String(), Family: family}
			err := s.srv.ListPath(req, func(nlri gbgp.NLRI, _ []*apiutil.Path) {
				if pfx, err := netip.ParsePrefix(nlri.String()); err == nil {
					out[i].RoutesSent = append(out[i].RoutesSent, pfx)
				}
			})
			if err != nil {
				// A family the peer did not negotiate has no table.
				continue
			}
		}
		slices.SortFunc(out[i].RoutesSent, netip.Prefix.Compare)
	}
	return out
}

// StopMode says what the peers should do with the routes of a stopping
// speaker.
type StopMode int

const (
	// KeepRoutes closes the sessions without a NOTIFICATION: peers that
	// negotiated graceful restart keep the routes for the restart time.
	KeepRoutes StopMode = iota
	// WithdrawRoutes withdraws every route and closes the sessions with a
	// Cease NOTIFICATION, so peers drop the routes at once.
	WithdrawRoutes
)

// Stop ends the speaker. It must not be used afterwards.
func (s *Speaker) Stop(ctx context.Context, mode StopMode) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	if mode == WithdrawRoutes && len(s.routes) > 0 {
		if err := s.srv.DeletePath(apiutil.DeletePathRequest{DeleteAll: true}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: withdraw every route: %w", err))
		}
		clear(s.routes)
	}
	if err := s.srv.StopBgp(ctx, &api.StopBgpRequest{AllowGracefulRestart: mode == KeepRoutes}); err != nil {
		errs = append(errs, fmt.Errorf("bgp: stop speaker: %w", err))
	}
	s.cancel()
	return errors.Join(errs...)
}
