package bgp

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	api "github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	gbgp "github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"
)

const (
	speakerASN = 65001
	routerASN  = 65000
)

// router is a second, passive GoBGP instance standing in for the upstream
// router: it listens on addr and accepts the speaker from 127.0.0.1.
type router struct {
	srv  *server.BgpServer
	addr netip.Addr
	port uint16
}

func freePort(t *testing.T, addr netip.Addr) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

func startRouter(t *testing.T, addr netip.Addr, password string) *router {
	t.Helper()
	port := freePort(t, addr)
	srv := server.NewBgpServer()
	go srv.Serve()
	err := srv.StartBgp(context.Background(), &api.StartBgpRequest{Global: &api.Global{
		Asn: routerASN, RouterId: "192.0.2.254", ListenPort: int32(port), ListenAddresses: []string{addr.String()},
	}})
	if err != nil {
		t.Fatalf("start router: %v", err)
	}
	t.Cleanup(srv.Stop)
	afiSafis := []*api.AfiSafi{}
	for _, afi := range []api.Family_Afi{api.Family_AFI_IP, api.Family_AFI_IP6} {
		afiSafis = append(afiSafis, &api.AfiSafi{
			Config:            &api.AfiSafiConfig{Family: &api.Family{Afi: afi, Safi: api.Family_SAFI_UNICAST}, Enabled: true},
			MpGracefulRestart: &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}},
		})
	}
	err = srv.AddPeer(context.Background(), &api.AddPeerRequest{Peer: &api.Peer{
		Conf:            &api.PeerConf{NeighborAddress: "127.0.0.1", PeerAsn: speakerASN, AuthPassword: password},
		Transport:       &api.Transport{PassiveMode: true},
		Timers:          &api.Timers{Config: &api.TimersConfig{HoldTime: 3, KeepaliveInterval: 1, IdleHoldTimeAfterReset: 1}},
		GracefulRestart: &api.GracefulRestart{Enabled: true, RestartTime: 120},
		AfiSafis:        afiSafis,
	}})
	if err != nil {
		t.Fatalf("router: add peer: %v", err)
	}
	return &router{srv: srv, addr: addr, port: port}
}

func (r *router) peer() Peer {
	return Peer{Address: r.addr, ASN: routerASN, Port: r.port, HoldTime: 3 * time.Second, Keepalive: time.Second}
}

// learned is what the router holds for one prefix.
type learned struct {
	nextHop     netip.Addr
	communities []uint32
	med         *uint32
	stale       bool
}

func (r *router) rib(t *testing.T) map[netip.Prefix]learned {
	t.Helper()
	out := map[netip.Prefix]learned{}
	for _, family := range []gbgp.Family{gbgp.RF_IPv4_UC, gbgp.RF_IPv6_UC} {
		err := r.srv.ListPath(apiutil.ListPathRequest{TableType: api.TableType_TABLE_TYPE_GLOBAL, Family: family},
			func(nlri gbgp.NLRI, paths []*apiutil.Path) {
				pfx := netip.MustParsePrefix(nlri.String())
				for _, p := range paths {
					var l learned
					l.stale = p.Stale
					for _, a := range p.Attrs {
						switch a := a.(type) {
						case *gbgp.PathAttributeNextHop:
							l.nextHop = a.Value
						case *gbgp.PathAttributeMpReachNLRI:
							l.nextHop = a.Nexthop
						case *gbgp.PathAttributeCommunities:
							l.communities = a.Value
						case *gbgp.PathAttributeMultiExitDisc:
							med := a.Value
							l.med = &med
						}
					}
					out[pfx] = l
				}
			})
		if err != nil {
			t.Fatalf("router: list paths: %v", err)
		}
	}
	return out
}

func (r *router) established(t *testing.T) bool {
	t.Helper()
	up := false
	err := r.srv.ListPeer(context.Background(), &api.ListPeerRequest{}, func(p *api.Peer) {
		up = p.State.SessionState == api.PeerState_SESSION_STATE_ESTABLISHED
	})
	if err != nil {
		t.Fatal(err)
	}
	return up
}

func eventually(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startSpeaker(t *testing.T, restarting bool) *Speaker {
	t.Helper()
	s, err := Start(context.Background(), Options{
		ASN: speakerASN, RouterID: netip.MustParseAddr("192.0.2.1"),
		GracefulRestart: true, RestartTime: 120 * time.Second, Restarting: restarting,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func u32(v uint32) *uint32 { return &v }

var (
	lo1 = netip.MustParseAddr("127.0.0.1")
	lo2 = netip.MustParseAddr("127.0.0.2")
)

func TestAnnounceAndWithdraw(t *testing.T) {
	t.Parallel()
	r := startRouter(t, lo1, "")
	s := startSpeaker(t, false)
	t.Cleanup(func() { _ = s.Stop(context.Background(), WithdrawRoutes) })
	if err := s.SetPeers(context.Background(), []Peer{r.peer()}); err != nil {
		t.Fatal(err)
	}
	v4 := Route{Prefix: netip.MustParsePrefix("198.51.100.10/32"), NextHop: netip.MustParseAddr("192.0.2.1"),
		Communities: []uint32{65001<<16 | 100}, MED: u32(50)}
	v6 := Route{Prefix: netip.MustParsePrefix("2001:db8::10/128"), NextHop: netip.MustParseAddr("2001:db8::1")}
	if err := s.SetRoutes(context.Background(), []Route{v4, v6}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both routes at the router", 10*time.Second, func() bool { return len(r.rib(t)) == 2 })
	got := r.rib(t)[v4.Prefix]
	if got.nextHop != v4.NextHop || !slices.Equal(got.communities, v4.Communities) || got.med == nil || *got.med != 50 {
		t.Errorf("router holds %s as %+v, want next hop %s, communities %v, med 50", v4.Prefix, got, v4.NextHop, v4.Communities)
	}
	if got := r.rib(t)[v6.Prefix]; got.nextHop != v6.NextHop {
		t.Errorf("router holds %s via %s, want %s", v6.Prefix, got.nextHop, v6.NextHop)
	}
	st := s.Status()
	if len(st) != 1 || !st[0].Up || !slices.Equal(st[0].RoutesSent, []netip.Prefix{v4.Prefix, v6.Prefix}) {
		t.Errorf("status = %+v, want one established peer that was sent both prefixes", st)
	}

	if err := s.SetRoutes(context.Background(), []Route{v6}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "withdrawal at the router", 10*time.Second, func() bool {
		rib := r.rib(t)
		_, has := rib[v4.Prefix]
		return !has && len(rib) == 1
	})
}

func TestPeersChangeWithoutResettingOthers(t *testing.T) {
	t.Parallel()
	r1 := startRouter(t, lo1, "")
	r2 := startRouter(t, lo2, "")
	s := startSpeaker(t, false)
	t.Cleanup(func() { _ = s.Stop(context.Background(), WithdrawRoutes) })
	if err := s.SetPeers(context.Background(), []Peer{r1.peer()}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "session with the first router", 10*time.Second, func() bool {
		st := s.Status()
		return len(st) == 1 && st[0].Up && r1.established(t)
	})
	first := s.Status()[0]
	untouched := func(when string) {
		t.Helper()
		for _, st := range s.Status() {
			if st.Address == lo1 && (!st.Up || st.Transitions != first.Transitions || !st.Since.Equal(first.Since)) {
				t.Errorf("%s touched the first peer: was %+v, now %+v", when, first, st)
			}
		}
	}

	p2 := r2.peer()
	if err := s.SetPeers(context.Background(), []Peer{r1.peer(), p2}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "session with the second router", 10*time.Second, func() bool { return r2.established(t) })
	untouched("adding a second peer")

	p2.HoldTime = 6 * time.Second
	if err := s.SetPeers(context.Background(), []Peer{r1.peer(), p2}); err != nil {
		t.Fatal(err)
	}
	// The changed peer is a new session: its count starts again. It may
	// take a connect retry (2 s) or more on a loaded machine to come up.
	eventually(t, "changed peer re-established", 30*time.Second, func() bool {
		st := s.Status()
		return len(st) == 2 && st[1].Up && st[1].Transitions >= 1 && r2.established(t)
	})
	untouched("changing the second peer")

	if err := s.SetPeers(context.Background(), []Peer{r1.peer()}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second router's session closed", 5*time.Second, func() bool { return !r2.established(t) })
	untouched("removing the second peer")
	if st := s.Status(); len(st) != 1 {
		t.Errorf("status after removing a peer = %+v, want the first peer only", st)
	}
}

func TestMD5Password(t *testing.T) {
	t.Parallel()
	r := startRouter(t, lo1, "s3cret")
	s := startSpeaker(t, false)
	t.Cleanup(func() { _ = s.Stop(context.Background(), WithdrawRoutes) })
	p := r.peer()
	p.Password = "wrong"
	if err := s.SetPeers(context.Background(), []Peer{p}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if r.established(t) {
		t.Fatal("a session with the wrong TCP MD5 password came up")
	}
	p.Password = "s3cret"
	if err := s.SetPeers(context.Background(), []Peer{p}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "session with the right password", 10*time.Second, func() bool { return r.established(t) })
}

func TestStopKeepsOrWithdrawsRoutes(t *testing.T) {
	t.Parallel()
	route := Route{Prefix: netip.MustParsePrefix("198.51.100.20/32"), NextHop: netip.MustParseAddr("192.0.2.1")}
	for _, tc := range []struct {
		mode StopMode
		kept bool
	}{{KeepRoutes, true}, {WithdrawRoutes, false}} {
		t.Run(fmt.Sprint(tc.mode), func(t *testing.T) {
			t.Parallel()
			r := startRouter(t, lo1, "")
			s := startSpeaker(t, false)
			if err := s.SetPeers(context.Background(), []Peer{r.peer()}); err != nil {
				t.Fatal(err)
			}
			if err := s.SetRoutes(context.Background(), []Route{route}); err != nil {
				t.Fatal(err)
			}
			eventually(t, "route at the router", 10*time.Second, func() bool { return len(r.rib(t)) == 1 })
			if err := s.Stop(context.Background(), tc.mode); err != nil {
				t.Fatal(err)
			}
			eventually(t, "session down", 5*time.Second, func() bool { return !r.established(t) })
			time.Sleep(200 * time.Millisecond)
			rib := r.rib(t)
			if got := len(rib) == 1; got != tc.kept {
				t.Fatalf("router holds %v after Stop(%d), want the route kept: %v", rib, tc.mode, tc.kept)
			}
			if !tc.kept {
				return
			}
			if !rib[route.Prefix].stale {
				t.Errorf("kept route is not marked stale: %+v", rib[route.Prefix])
			}
			// A new speaker that says forwarding went on replaces the
			// stale route without a gap.
			s2 := startSpeaker(t, true)
			t.Cleanup(func() { _ = s2.Stop(context.Background(), WithdrawRoutes) })
			if err := s2.SetRoutes(context.Background(), []Route{route}); err != nil {
				t.Fatal(err)
			}
			if err := s2.SetPeers(context.Background(), []Peer{r.peer()}); err != nil {
				t.Fatal(err)
			}
			eventually(t, "route refreshed by the restarted speaker", 10*time.Second, func() bool {
				rib := r.rib(t)
				if len(rib) == 0 {
					t.Fatal("the router dropped the route during the restart")
				}
				return r.established(t) && !rib[route.Prefix].stale
			})
		})
	}
}

func TestStartRejectsBadOptions(t *testing.T) {
	t.Parallel()
	for _, o := range []Options{
		{ASN: 0, RouterID: netip.MustParseAddr("192.0.2.1")},
		{ASN: 1, RouterID: netip.MustParseAddr("2001:db8::1")},
		{ASN: 1, RouterID: netip.MustParseAddr("192.0.2.1"), GracefulRestart: true, RestartTime: 5000 * time.Second},
	} {
		if s, err := Start(context.Background(), o); err == nil {
			_ = s.Stop(context.Background(), WithdrawRoutes)
			t.Errorf("Start(%+v) succeeded", o)
		}
	}
}

// After an agent stopped with graceful restart, CloseSessions makes the
// router drop the routes it kept, without waiting for the restart time.
func TestCloseSessionsFlushesKeptRoutes(t *testing.T) {
	t.Parallel()
	r := startRouter(t, lo1, "pw")
	s := startSpeaker(t, false)
	p := r.peer()
	p.Password = "pw"
	route := Route{Prefix: netip.MustParsePrefix("198.51.100.30/32"), NextHop: netip.MustParseAddr("192.0.2.1")}
	if err := s.SetRoutes(context.Background(), []Route{route}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPeers(context.Background(), []Peer{p}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "route at the router", 10*time.Second, func() bool { return len(r.rib(t)) == 1 })
	if err := s.Stop(context.Background(), KeepRoutes); err != nil {
		t.Fatal(err)
	}
	eventually(t, "session down, route kept", 5*time.Second, func() bool { return !r.established(t) && len(r.rib(t)) == 1 })

	// GoBGP, as the router here, refuses connections for 5 s after a
	// session dropped; CloseSessions tries again meanwhile.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := CloseSessions(ctx, speakerASN, netip.MustParseAddr("192.0.2.1"), []Peer{p}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "kept route dropped", 10*time.Second, func() bool { return len(r.rib(t)) == 0 })

	p.Password = "wrong"
	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := CloseSessions(ctx, speakerASN, netip.MustParseAddr("192.0.2.1"), []Peer{p}); err == nil {
		t.Error("CloseSessions with the wrong password succeeded")
	}
}
