package reconcile

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/maglev"
)

const testRingSize = 257

func w(n uint32) *uint32 { return &n }

func be(addr string, port int) config.Backend {
	return config.Backend{Address: addr, Port: port, Weight: w(1)}
}

// baseConfig has a tcp-checked pool "web" behind a dsr VIP and an unchecked
// pool "api" behind an ipip VIP.
func baseConfig() *config.Config {
	return &config.Config{
		Pools: []config.Pool{
			{
				Name:        "web",
				HealthCheck: config.HealthCheck{Type: config.HealthCheckTCP},
				Backends:    []config.Backend{be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80)},
			},
			{
				Name:        "api",
				HealthCheck: config.HealthCheck{Type: config.HealthCheckNone},
				Backends:    []config.Backend{be("10.0.1.1", 8080), be("10.0.1.2", 8080)},
			},
		},
		VIPs: []config.VIP{
			{Address: "192.0.2.1", Port: 80, Protocol: config.ProtocolTCP, Mode: config.VIPModeDSR, Pool: "web"},
			{Address: "192.0.2.2", Port: 443, Protocol: config.ProtocolTCP, Mode: config.VIPModeIPIP, Pool: "api"},
		},
		Security: config.SecurityConfig{Denylist: []string{"198.51.100.0/24", "2001:db8:bad::/48"}},
	}
}

var (
	webVIP = dataplane.VIP{Addr: netip.MustParseAddr("192.0.2.1"), Port: 80, Proto: dataplane.ProtoTCP}
	apiVIP = dataplane.VIP{Addr: netip.MustParseAddr("192.0.2.2"), Port: 443, Proto: dataplane.ProtoTCP}
)

// env is one reconciler over a fake data plane, with health verdicts and a
// drain set the test edits between reconciles.
type env struct {
	t       testing.TB
	dp      *fakeDP
	macs    *fakeMACs
	r       *Reconciler
	cfg     *config.Config
	health  map[string]bool // absent = no verdict
	drained map[string]bool
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{
		t:       t,
		dp:      newFakeDP(testRingSize),
		macs:    &fakeMACs{table: map[netip.Addr]net.HardwareAddr{}},
		cfg:     baseConfig(),
		health:  map[string]bool{"web/10.0.0.1:80": true, "web/10.0.0.2:80": true},
		drained: map[string]bool{},
	}
	for _, s := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9", "10.0.1.1", "10.0.1.2"} {
		a := netip.MustParseAddr(s)
		e.macs.table[a] = macFor(a)
	}
	e.r = e.newReconciler()
	return e
}

func (e *env) newReconciler() *Reconciler {
	e.t.Helper()
	r, err := New(e.dp, e.macs, Options{})
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	return r
}

func (e *env) desired() Desired {
	return Desired{
		Config: e.cfg,
		Healthy: func(key string) (bool, bool) {
			h, ok := e.health[key]
			return h, ok
		},
		Drained: e.drained,
	}
}

// reconcile runs one reconcile, fails the test on error or on a dangling
// reference in the data plane, and returns the result and the calls made.
func (e *env) reconcile() (Result, []string) {
	e.t.Helper()
	res, err := e.r.Reconcile(context.Background(), e.desired())
	if err != nil {
		e.t.Fatalf("Reconcile: %v", err)
	}
	e.checkConsistent()
	return res, e.dp.takeCalls()
}

func (e *env) checkConsistent() {
	e.t.Helper()
	if len(e.dp.violations) > 0 {
		e.t.Fatalf("data plane saw dangling references:\n%s", strings.Join(e.dp.violations, "\n"))
	}
}

func (e *env) realID(addr string) uint32 {
	e.t.Helper()
	a := netip.MustParseAddr(addr)
	for id, r := range e.dp.reals {
		if r.Addr == a {
			return id
		}
	}
	e.t.Fatalf("no real %s in the data plane", addr)
	return 0
}

func (e *env) real(addr string) dataplane.Real {
	return e.dp.reals[e.realID(addr)]
}

func (e *env) vipID(v dataplane.VIP) uint32 {
	e.t.Helper()
	meta, ok := e.dp.vips[v]
	if !ok {
		e.t.Fatalf("no VIP %s in the data plane", v)
	}
	return meta.ID
}

// ringIDs returns the distinct real ids in a VIP's ring, sorted.
func (e *env) ringIDs(v dataplane.VIP) []uint32 {
	e.t.Helper()
	ring, ok := e.dp.rings[e.vipID(v)]
	if !ok {
		e.t.Fatalf("VIP %s has no ring", v)
	}
	if len(ring) != testRingSize {
		e.t.Fatalf("ring of %s has %d slots, want %d", v, len(ring), testRingSize)
	}
	var ids []uint32
	for _, id := range ring {
		if !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

func (e *env) ids(addrs ...string) []uint32 {
	var out []uint32
	for _, a := range addrs {
		out = append(out, e.realID(a))
	}
	slices.Sort(out)
	return out
}

func index(calls []string, prefix string) int {
	return slices.IndexFunc(calls, func(c string) bool { return strings.HasPrefix(c, prefix) })
}

func lastIndex(calls []string, prefix string) int {
	for i := len(calls) - 1; i >= 0; i-- {
		if strings.HasPrefix(calls[i], prefix) {
			return i
		}
	}
	return -1
}

func mustBuild(t testing.TB, bs []maglev.Backend) []uint32 {
	t.Helper()
	table, err := maglev.Build(bs, testRingSize)
	if err != nil {
		t.Fatal(err)
	}
	return table
}

func TestFirstReconcileFromEmpty(t *testing.T) {
	e := newEnv(t)
	res, calls := e.reconcile()

	// Ids follow address order on a fresh data plane.
	for i, a := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "10.0.1.2"} {
		if got := e.realID(a); got != uint32(i+1) {
			t.Errorf("real %s has id %d, want %d", a, got, i+1)
		}
	}
	if got := e.vipID(webVIP); got != 1 {
		t.Errorf("web VIP id = %d, want 1", got)
	}
	if got := e.vipID(apiVIP); got != 2 {
		t.Errorf("api VIP id = %d, want 2", got)
	}
	if meta := e.dp.vips[webVIP]; meta.Mode != dataplane.ModeDSR || meta.SourceAffinity {
		t.Errorf("web VIP meta = %+v", meta)
	}
	if meta := e.dp.vips[apiVIP]; meta.Mode != dataplane.ModeIPIP {
		t.Errorf("api VIP meta = %+v", meta)
	}

	// 10.0.0.3 has no verdict yet: down, and out of the ring.
	wantState := map[string]dataplane.RealState{
		"10.0.0.1": dataplane.RealUp, "10.0.0.2": dataplane.RealUp, "10.0.0.3": dataplane.RealDown,
		"10.0.1.1": dataplane.RealUp, "10.0.1.2": dataplane.RealUp,
	}
	for a, st := range wantState {
		if got := e.real(a).State; got != st {
			t.Errorf("real %s state = %s, want %s", a, got, st)
		}
	}
	if got, want := e.ringIDs(webVIP), []uint32{1, 2}; !slices.Equal(got, want) {
		t.Errorf("web ring holds %v, want %v", got, want)
	}
	if got, want := e.ringIDs(apiVIP), []uint32{4, 5}; !slices.Equal(got, want) {
		t.Errorf("api ring holds %v, want %v", got, want)
	}
	want := mustBuild(t, []maglev.Backend{{ID: 1, Key: "10.0.0.1:80", Weight: 1}, {ID: 2, Key: "10.0.0.2:80", Weight: 1}})
	if !slices.Equal(e.dp.rings[1], want) {
		t.Error("web ring differs from maglev.Build over its live backends")
	}

	// dsr reals that take traffic have their MAC; the down one is not
	// resolved; ipip reals need none.
	for _, a := range []string{"10.0.0.1", "10.0.0.2"} {
		if got := e.real(a).MAC.String(); got != macFor(netip.MustParseAddr(a)).String() {
			t.Errorf("real %s MAC = %q", a, got)
		}
	}
	for _, a := range []string{"10.0.0.3", "10.0.1.1", "10.0.1.2"} {
		if mac := e.real(a).MAC; mac != nil {
			t.Errorf("real %s MAC = %s, want none", a, mac)
		}
	}

	for _, p := range []string{"198.51.100.0/24", "2001:db8:bad::/48"} {
		if !e.dp.deny[netip.MustParsePrefix(p)] {
			t.Errorf("denylist lacks %s", p)
		}
	}

	wantRes := Result{VIPsAdded: 2, RealsAdded: 5, RingsRebuilt: 2, DenyAdded: 2}
	res.Duration = 0
	if fmt.Sprint(res) != fmt.Sprint(wantRes) {
		t.Errorf("result = %+v, want %+v", res, wantRes)
	}

	// Reals, then rings, then VIPs; each new id's statistics reset first.
	if lastIndex(calls, "SetReal") > index(calls, "SetRing") || lastIndex(calls, "SetRing") > index(calls, "SetVIP") {
		t.Errorf("writes out of order:\n%s", strings.Join(calls, "\n"))
	}
	for id := 1; id <= 5; id++ {
		if r, s := index(calls, fmt.Sprintf("ResetRealStats %d", id)), index(calls, fmt.Sprintf("SetReal %d ", id)); r < 0 || r > s {
			t.Errorf("real %d: stats reset at %d, written at %d", id, r, s)
		}
	}
	for id := 1; id <= 2; id++ {
		if r, s := index(calls, fmt.Sprintf("ResetVIPStats %d", id)), index(calls, fmt.Sprintf("SetRing %d", id)); r < 0 || r > s {
			t.Errorf("VIP %d: stats reset at %d, ring written at %d", id, r, s)
		}
	}
}

func TestIdempotent(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	for i := range 3 {
		res, calls := e.reconcile()
		if len(calls) != 0 || res.Changed() || len(res.Warnings) != 0 {
			t.Fatalf("reconcile %d of an unchanged state: %v, calls %v", i+2, res, calls)
		}
	}
}

// populateByHand fills the fake as an earlier agent with its own id choices
// would have left it.
func populateByHand(e *env) {
	mac := func(s string) net.HardwareAddr { return macFor(netip.MustParseAddr(s)) }
	real := func(s string, st dataplane.RealState, m net.HardwareAddr) dataplane.Real {
		return dataplane.Real{Addr: netip.MustParseAddr(s), MAC: m, State: st}
	}
	e.dp.reals[7] = real("10.0.0.1", dataplane.RealUp, mac("10.0.0.1"))
	e.dp.reals[3] = real("10.0.0.2", dataplane.RealUp, mac("10.0.0.2"))
	e.dp.reals[9] = real("10.0.0.3", dataplane.RealDown, nil)
	e.dp.reals[12] = real("10.0.1.1", dataplane.RealUp, nil)
	e.dp.reals[5] = real("10.0.1.2", dataplane.RealUp, nil)
	e.dp.vips[webVIP] = dataplane.VIPMeta{ID: 4, Mode: dataplane.ModeDSR}
	e.dp.vips[apiVIP] = dataplane.VIPMeta{ID: 9, Mode: dataplane.ModeIPIP}
	e.dp.rings[4] = mustBuild(e.t, []maglev.Backend{{ID: 7, Key: "10.0.0.1:80", Weight: 1}, {ID: 3, Key: "10.0.0.2:80", Weight: 1}})
	e.dp.rings[9] = mustBuild(e.t, []maglev.Backend{{ID: 12, Key: "10.0.1.1:8080", Weight: 1}, {ID: 5, Key: "10.0.1.2:8080", Weight: 1}})
	e.dp.deny[netip.MustParsePrefix("198.51.100.0/24")] = true
	e.dp.deny[netip.MustParsePrefix("2001:db8:bad::/48")] = true
}

func TestAdoptExistingIDs(t *testing.T) {
	e := newEnv(t)
	populateByHand(e)
	before := e.dp.rings[4]

	res, calls := e.reconcile()
	if w := writes(calls); len(w) != 0 || res.Changed() {
		t.Fatalf("restart over a matching data plane wrote %v (%v)", w, res)
	}
	// Rings are read back once to be verified, not rewritten.
	if !slices.Contains(calls, "Ring 4") || !slices.Contains(calls, "Ring 9") {
		t.Errorf("installed rings were not verified: %v", calls)
	}
	for addr, id := range map[string]uint32{"10.0.0.1": 7, "10.0.0.2": 3, "10.0.0.3": 9, "10.0.1.1": 12, "10.0.1.2": 5} {
		if got := e.realID(addr); got != id {
			t.Errorf("real %s id changed to %d, want %d", addr, got, id)
		}
	}
	if e.vipID(webVIP) != 4 || e.vipID(apiVIP) != 9 {
		t.Errorf("VIP ids changed: %v", e.dp.vips)
	}
	if !slices.Equal(e.dp.rings[4], before) {
		t.Error("web ring changed")
	}

	// Verified once, remembered after: the next reconcile reads nothing.
	if _, calls := e.reconcile(); len(calls) != 0 {
		t.Errorf("second reconcile made calls %v", calls)
	}

	// A new backend gets the lowest id that no adopted real holds.
	e.cfg.Pools[0].Backends = append(e.cfg.Pools[0].Backends, be("10.0.0.4", 80))
	e.health["web/10.0.0.4:80"] = true
	e.reconcile()
	if got := e.realID("10.0.0.4"); got != 1 {
		t.Errorf("new real id = %d, want 1", got)
	}
}

func TestRestartedAgentRewritesOnlyWrongRings(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	want := slices.Clone(e.dp.rings[2])
	// Something moved a slot of one ring to the other real while no
	// agent ran.
	e.dp.rings[2][0] = 4 + 5 - e.dp.rings[2][0]

	e.r = e.newReconciler()
	res, calls := e.reconcile()
	if got := writes(calls); !slices.Equal(got, []string{"SetRing 2"}) {
		t.Errorf("writes = %v, want only the wrong ring", got)
	}
	if res.RingsRebuilt != 1 || !slices.Equal(e.dp.rings[2], want) {
		t.Errorf("ring not restored (%v)", res)
	}
}

// An agent without CAP_SYS_ADMIN (a container with CAP_BPF) cannot open
// the installed rings by id: it reinstalls them, with the same content,
// says so in a warning, and remembers them like any ring it wrote.
func TestRestartWithUnreadableRings(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	before := map[uint32][]uint32{1: slices.Clone(e.dp.rings[1]), 2: slices.Clone(e.dp.rings[2])}

	e.dp.ringReadErr = fmt.Errorf("open ring of VIP 1: %w (%w)", dataplane.ErrRingUnreadable, syscall.EPERM)
	e.r = e.newReconciler()
	res, calls := e.reconcile()
	if got := writes(calls); !slices.Equal(got, []string{"SetRing 1", "SetRing 2"}) {
		t.Errorf("writes = %v, want both rings reinstalled", got)
	}
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "CAP_SYS_ADMIN") {
		t.Errorf("warnings = %q, want one naming CAP_SYS_ADMIN", res.Warnings)
	}
	for id, ring := range before {
		if !slices.Equal(e.dp.rings[id], ring) {
			t.Errorf("ring %d changed content on reinstall", id)
		}
	}
	if _, calls := e.reconcile(); len(calls) != 0 {
		t.Errorf("the next reconcile made calls %v", calls)
	}

	// Any other read error still fails the reconcile.
	e.dp.ringReadErr = errors.New("read ring: bad address")
	e.r = e.newReconciler()
	if _, err := e.r.Reconcile(context.Background(), e.desired()); err == nil {
		t.Error("a ring read error other than a permission error was ignored")
	}
}

func TestAddBackend(t *testing.T) {
	e := newEnv(t)
	// A second VIP on the same pool shares its ring; a VIP on another pool
	// must be left alone.
	e.cfg.VIPs = append(e.cfg.VIPs, config.VIP{Address: "192.0.2.1", Port: 443, Protocol: config.ProtocolTCP, Mode: config.VIPModeDSR, Pool: "web"})
	e.reconcile()
	before := map[string]uint32{}
	for _, a := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "10.0.1.2"} {
		before[a] = e.realID(a)
	}

	e.cfg.Pools[0].Backends = append(e.cfg.Pools[0].Backends, be("10.0.0.4", 80))
	e.health["web/10.0.0.4:80"] = true
	res, calls := e.reconcile()

	for a, id := range before {
		if got := e.realID(a); got != id {
			t.Errorf("real %s moved from id %d to %d", a, id, got)
		}
	}
	want := []string{
		"ResetRealStats 6",
		"SetReal 6 10.0.0.4 up mac=" + macFor(netip.MustParseAddr("10.0.0.4")).String(),
		"SetRing 1",
		"SetRing 3",
	}
	if got := writes(calls); !slices.Equal(got, want) {
		t.Errorf("writes:\n got %q\nwant %q", got, want)
	}
	if res.RealsAdded != 1 || res.RingsRebuilt != 2 || res.VIPsUpdated+res.VIPsAdded != 0 {
		t.Errorf("result = %v", res)
	}
	if got, want := e.ringIDs(webVIP), e.ids("10.0.0.1", "10.0.0.2", "10.0.0.4"); !slices.Equal(got, want) {
		t.Errorf("web ring holds %v, want %v", got, want)
	}
	if slices.Contains(calls, "SetRing 2") {
		t.Error("the api VIP's ring was rewritten")
	}
}

func TestHealthDownAndUp(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	orig := slices.Clone(e.dp.rings[1])
	mac2 := macFor(netip.MustParseAddr("10.0.0.2")).String()

	e.health["web/10.0.0.2:80"] = false
	res, calls := e.reconcile()
	// The ring lets go of the real before the real is marked down.
	if got, want := writes(calls), []string{"SetRing 1", "SetReal 2 10.0.0.2 down mac=" + mac2}; !slices.Equal(got, want) {
		t.Errorf("down: writes %q, want %q", got, want)
	}
	if res.RealsUpdated != 1 || res.RingsRebuilt != 1 {
		t.Errorf("down: result %v", res)
	}
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{1}) {
		t.Errorf("down: ring holds %v, want [1]", got)
	}

	e.health["web/10.0.0.2:80"] = true
	_, calls = e.reconcile()
	if got, want := writes(calls), []string{"SetReal 2 10.0.0.2 up mac=" + mac2, "SetRing 1"}; !slices.Equal(got, want) {
		t.Errorf("up: writes %q, want %q", got, want)
	}
	if !slices.Equal(e.dp.rings[1], orig) {
		t.Error("ring after recovery differs from the original")
	}

	// A verdict that disappears (backend no longer checked yet) counts as
	// unhealthy.
	delete(e.health, "web/10.0.0.1:80")
	e.reconcile()
	if e.real("10.0.0.1").State != dataplane.RealDown {
		t.Error("real without a verdict is not down")
	}
}

func TestDrain(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	orig := slices.Clone(e.dp.rings[1])

	e.drained["web/10.0.0.2:80"] = true
	_, calls := e.reconcile()
	mac2 := macFor(netip.MustParseAddr("10.0.0.2")).String()
	if got, want := writes(calls), []string{"SetRing 1", "SetReal 2 10.0.0.2 draining mac=" + mac2}; !slices.Equal(got, want) {
		t.Errorf("drain: writes %q, want %q", got, want)
	}
	// The real keeps its slot, id and MAC, so conntrack keeps its flows.
	if got := e.realID("10.0.0.2"); got != 2 {
		t.Errorf("drained real id = %d", got)
	}
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{1}) {
		t.Errorf("drain: ring holds %v, want [1]", got)
	}

	delete(e.drained, "web/10.0.0.2:80")
	e.reconcile()
	if e.real("10.0.0.2").State != dataplane.RealUp || !slices.Equal(e.dp.rings[1], orig) {
		t.Error("undrain did not restore the real and the ring")
	}

	// A drained real that is also unhealthy is down.
	e.drained["web/10.0.0.2:80"] = true
	e.health["web/10.0.0.2:80"] = false
	e.reconcile()
	if got := e.real("10.0.0.2").State; got != dataplane.RealDown {
		t.Errorf("drained and unhealthy real is %s, want down", got)
	}
}

func TestRemoveBackend(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	e.cfg.Pools[0].Backends = slices.Delete(e.cfg.Pools[0].Backends, 0, 1) // 10.0.0.1, id 1

	res, calls := e.reconcile()
	if got, want := writes(calls), []string{"SetRing 1", "DeleteReal 1"}; !slices.Equal(got, want) {
		t.Errorf("writes %q, want %q (ring first, then the real)", got, want)
	}
	if res.RealsRemoved != 1 || res.RingsRebuilt != 1 {
		t.Errorf("result %v", res)
	}
	if _, ok := e.dp.reals[1]; ok {
		t.Error("real 1 still present")
	}
}

func TestRemoveVIP(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	e.cfg.VIPs = e.cfg.VIPs[:1]

	res, calls := e.reconcile()
	if got, want := writes(calls), []string{"DeleteVIP " + apiVIP.String(), "DeleteRing 2"}; !slices.Equal(got, want) {
		t.Errorf("writes %q, want %q", got, want)
	}
	if res.VIPsRemoved != 1 {
		t.Errorf("result %v", res)
	}
	// The pool is still configured, so its reals keep their ids.
	e.realID("10.0.1.1")

	// Removing the pool too clears its reals.
	e.cfg.Pools = e.cfg.Pools[:1]
	_, calls = e.reconcile()
	if got, want := writes(calls), []string{"DeleteReal 4", "DeleteReal 5"}; !slices.Equal(got, want) {
		t.Errorf("writes %q, want %q", got, want)
	}
}

func TestWeights(t *testing.T) {
	e := newEnv(t)
	e.reconcile()

	e.cfg.Pools[0].Backends[0].Weight = w(3)
	res, calls := e.reconcile()
	if got := writes(calls); !slices.Equal(got, []string{"SetRing 1"}) {
		t.Errorf("weight change: writes %q, want only the ring", got)
	}
	if res.RingsRebuilt != 1 {
		t.Errorf("result %v", res)
	}
	n := map[uint32]int{}
	for _, id := range e.dp.rings[1] {
		n[id]++
	}
	if ratio := float64(n[1]) / float64(n[2]); ratio < 2.9 || ratio > 3.1 {
		t.Errorf("weight 3:1 gave %d:%d slots", n[1], n[2])
	}

	// Weight 0 takes the backend out of the ring but keeps the real up.
	e.cfg.Pools[0].Backends[0].Weight = w(0)
	_, calls = e.reconcile()
	if got := writes(calls); !slices.Equal(got, []string{"SetRing 1"}) {
		t.Errorf("weight 0: writes %q", got)
	}
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{2}) {
		t.Errorf("weight 0: ring holds %v", got)
	}
	if e.real("10.0.0.1").State != dataplane.RealUp {
		t.Error("weight 0 changed the real's state")
	}

	// A nil weight means the default of 1.
	e.cfg.Pools[0].Backends[0].Weight = nil
	e.cfg.Pools[0].Backends[1].Weight = nil
	e.reconcile()
	want := mustBuild(t, []maglev.Backend{{ID: 1, Key: "10.0.0.1:80", Weight: 1}, {ID: 2, Key: "10.0.0.2:80", Weight: 1}})
	if !slices.Equal(e.dp.rings[1], want) {
		t.Error("default weights did not give the equal-weight ring")
	}
}

func TestEmptyPoolGetsZeroRing(t *testing.T) {
	e := newEnv(t)
	clear(e.health)
	e.reconcile()
	ring := e.dp.rings[e.vipID(webVIP)]
	if len(ring) != testRingSize || slices.ContainsFunc(ring, func(id uint32) bool { return id != 0 }) {
		t.Errorf("web VIP with no live backend: ring %v, want %d zeros", ring[:8], testRingSize)
	}
}

func TestIDReuseResetsStats(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	e.dp.realStats[1] = 1000
	e.dp.vipStats[1] = 2000

	// Remove 10.0.0.1 (real 1) and the web VIP (VIP 1)...
	e.cfg.Pools[0].Backends = slices.Delete(e.cfg.Pools[0].Backends, 0, 1)
	e.cfg.VIPs = e.cfg.VIPs[1:]
	_, calls := e.reconcile()
	if !slices.Contains(calls, "DeleteReal 1") || !slices.Contains(calls, "DeleteRing 1") {
		t.Fatalf("removal calls %v", calls)
	}
	if dv, dr := index(calls, "DeleteVIP"), index(calls, "DeleteRing 1"); dv < 0 || dv > dr {
		t.Errorf("VIP deleted at %d, ring at %d: want the VIP first", dv, dr)
	}

	// ...then add others, which take the freed ids.
	e.cfg.Pools[0].Backends = append(e.cfg.Pools[0].Backends, be("10.0.0.9", 80))
	e.health["web/10.0.0.9:80"] = true
	vip := config.VIP{Address: "192.0.2.9", Port: 53, Protocol: config.ProtocolUDP, Mode: config.VIPModeDSR, Pool: "web", SourceAffinity: true}
	e.cfg.VIPs = append(e.cfg.VIPs, vip)
	_, calls = e.reconcile()

	if got := e.realID("10.0.0.9"); got != 1 {
		t.Fatalf("new real id = %d, want the freed 1", got)
	}
	if r, s := index(calls, "ResetRealStats 1"), index(calls, "SetReal 1 "); r < 0 || r > s {
		t.Errorf("real 1 reused: stats reset at %d, written at %d", r, s)
	}
	if e.dp.realStats[1] != 0 {
		t.Error("reused real id kept its predecessor's stats")
	}
	v9 := dataplane.VIP{Addr: netip.MustParseAddr("192.0.2.9"), Port: 53, Proto: dataplane.ProtoUDP}
	if got := e.vipID(v9); got != 1 {
		t.Fatalf("new VIP id = %d, want the freed 1", got)
	}
	if !e.dp.vips[v9].SourceAffinity {
		t.Error("source affinity not written")
	}
	if r, s := index(calls, "ResetVIPStats 1"), index(calls, "SetRing 1"); r < 0 || r > s {
		t.Errorf("VIP 1 reused: stats reset at %d, ring at %d", r, s)
	}
	if e.dp.vipStats[1] != 0 {
		t.Error("reused VIP id kept its predecessor's stats")
	}
}

func TestRemovedIDNotReusedInSameReconcile(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	// Replace 10.0.0.1 by 10.0.0.9 in one go: the old id is still named
	// by the old ring until the end of this reconcile.
	e.cfg.Pools[0].Backends[0] = be("10.0.0.9", 80)
	e.health["web/10.0.0.9:80"] = true
	_, calls := e.reconcile()
	if got := e.realID("10.0.0.9"); got != 6 {
		t.Errorf("replacement real id = %d, want 6", got)
	}
	if s, d := index(calls, "SetRing 1"), index(calls, "DeleteReal 1"); s < 0 || s > d {
		t.Errorf("calls %v", calls)
	}
}

func TestFailingSetRingIsRetried(t *testing.T) {
	e := newEnv(t)
	e.reconcile()

	e.health["web/10.0.0.2:80"] = false
	failures := 0
	e.dp.fail = func(call string) error {
		if call == "SetRing 1" {
			failures++
			return errors.New("map update: no memory")
		}
		return nil
	}
	res, err := e.r.Reconcile(context.Background(), e.desired())
	if err == nil {
		t.Fatal("Reconcile succeeded despite a failing SetRing")
	}
	for _, part := range []string{"ring", webVIP.String(), "no memory"} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("error %q does not mention %q", err, part)
		}
	}
	// The real going down is written after its rings, so a failed ring
	// swap leaves it as it was too.
	if res.RealsUpdated != 0 || res.RingsRebuilt != 0 {
		t.Errorf("partial result %v", res)
	}
	e.dp.takeCalls()

	e.dp.fail = nil
	res, calls := e.reconcile()
	if !slices.Contains(calls, "SetRing 1") || res.RingsRebuilt != 1 {
		t.Errorf("retry did not rewrite the ring: %v, %v", calls, res)
	}
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{1}) {
		t.Errorf("ring holds %v after retry", got)
	}
	if _, calls := e.reconcile(); len(writes(calls)) != 0 {
		t.Errorf("reconcile after the retry wrote %v", writes(calls))
	}
	if failures != 1 {
		t.Errorf("%d failures", failures)
	}
}

func TestFailingWritesAreRetried(t *testing.T) {
	// Every kind of write fails once; each time the next reconcile must
	// finish the job, and the one after must find nothing to do.
	for _, target := range []string{"ResetRealStats", "SetReal", "ResetVIPStats", "SetRing", "SetVIP", "AddDeny"} {
		t.Run(target, func(t *testing.T) {
			e := newEnv(t)
			failed := false
			e.dp.fail = func(call string) error {
				if !failed && strings.HasPrefix(call, target+" ") {
					failed = true
					return errors.New("injected")
				}
				return nil
			}
			if _, err := e.r.Reconcile(context.Background(), e.desired()); err == nil || !strings.Contains(err.Error(), "injected") {
				t.Fatalf("first reconcile: err = %v", err)
			}
			e.checkConsistent()
			e.reconcile()
			if _, calls := e.reconcile(); len(writes(calls)) != 0 {
				t.Errorf("third reconcile wrote %v", writes(calls))
			}
			fresh := newEnv(t)
			fresh.reconcile()
			if fmt.Sprint(e.dp.reals) != fmt.Sprint(fresh.dp.reals) || fmt.Sprint(e.dp.vips) != fmt.Sprint(fresh.dp.vips) ||
				fmt.Sprint(e.dp.rings) != fmt.Sprint(fresh.dp.rings) || len(e.dp.deny) != len(fresh.dp.deny) {
				t.Error("state after recovery differs from a clean run")
			}
		})
	}

	for _, target := range []string{"DeleteVIP", "DeleteRing", "DeleteReal", "RemoveDeny"} {
		t.Run(target, func(t *testing.T) {
			e := newEnv(t)
			e.reconcile()
			e.cfg.VIPs = e.cfg.VIPs[:1]
			e.cfg.Pools = e.cfg.Pools[:1]
			e.cfg.Security.Denylist = nil
			failed := false
			e.dp.fail = func(call string) error {
				if !failed && strings.HasPrefix(call, target+" ") {
					failed = true
					return errors.New("injected")
				}
				return nil
			}
			if _, err := e.r.Reconcile(context.Background(), e.desired()); err == nil {
				t.Fatal("first reconcile succeeded")
			}
			e.checkConsistent()
			e.reconcile()
			if len(e.dp.vips) != 1 || len(e.dp.rings) != 1 || len(e.dp.reals) != 3 || len(e.dp.deny) != 0 {
				t.Errorf("after retry: %d VIPs, %d rings, %d reals, %d deny", len(e.dp.vips), len(e.dp.rings), len(e.dp.reals), len(e.dp.deny))
			}
			if _, calls := e.reconcile(); len(writes(calls)) != 0 {
				t.Errorf("third reconcile wrote %v", writes(calls))
			}
		})
	}
}

func TestMACResolutionFailure(t *testing.T) {
	e := newEnv(t)
	delete(e.macs.table, netip.MustParseAddr("10.0.0.2"))
	res, _ := e.reconcile()

	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "10.0.0.2") || !strings.Contains(res.Warnings[0], "without") {
		t.Fatalf("warnings = %q", res.Warnings)
	}
	if r := e.real("10.0.0.2"); r.MAC != nil || r.State != dataplane.RealUp {
		t.Errorf("real written as %+v, want up without a MAC", r)
	}
	// It stays in the ring: the data path drops its share as no route,
	// which is what the warning tells the operator.
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{1, 2}) {
		t.Errorf("ring holds %v", got)
	}

	// Once resolvable, the MAC is filled in without touching the ring.
	a := netip.MustParseAddr("10.0.0.2")
	e.macs.table[a] = macFor(a)
	res, calls := e.reconcile()
	if got, want := writes(calls), []string{"SetReal 2 10.0.0.2 up mac=" + macFor(a).String()}; !slices.Equal(got, want) || len(res.Warnings) != 0 {
		t.Errorf("writes %q (want %q), warnings %q", got, want, res.Warnings)
	}
}

func TestMACRefresh(t *testing.T) {
	e := newEnv(t)
	now := time.Unix(1_000_000, 0)
	e.r.now = func() time.Time { return now }
	e.reconcile()
	calls := e.macs.calls

	// Within the refresh period nothing is resolved again.
	now = now.Add(30 * time.Second)
	e.reconcile()
	if e.macs.calls != calls {
		t.Errorf("resolved %d MACs within the refresh period", e.macs.calls-calls)
	}

	// After it, a changed MAC is picked up.
	a := netip.MustParseAddr("10.0.0.1")
	newMAC := net.HardwareAddr{0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee}
	e.macs.table[a] = newMAC
	now = now.Add(time.Minute)
	_, got := e.reconcile()
	if want := []string{"SetReal 1 10.0.0.1 up mac=" + newMAC.String()}; !slices.Equal(writes(got), want) {
		t.Errorf("writes %q, want %q", writes(got), want)
	}

	// A failed refresh keeps the last known MAC and warns.
	delete(e.macs.table, a)
	now = now.Add(2 * time.Minute)
	res, got := e.reconcile()
	if len(writes(got)) != 0 || len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "keeping") {
		t.Errorf("writes %q, warnings %q", writes(got), res.Warnings)
	}
	if e.real("10.0.0.1").MAC.String() != newMAC.String() {
		t.Error("last known MAC lost")
	}
}

func TestNoMACResolver(t *testing.T) {
	e := newEnv(t)
	r, err := New(e.dp, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	e.r = r
	res, _ := e.reconcile()
	if len(res.Warnings) != 2 {
		t.Errorf("warnings = %q, want one per live dsr real", res.Warnings)
	}
}

func TestModeChange(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	e.cfg.VIPs[0].Mode = config.VIPModeIPIP
	res, calls := e.reconcile()
	// The VIP is updated in place, its ring untouched; its reals lose
	// the MACs only dsr needs.
	want := []string{
		"SetReal 1 10.0.0.1 up mac=",
		"SetReal 2 10.0.0.2 up mac=",
		"SetVIP " + webVIP.String() + " id=1 ipip aff=false",
	}
	if got := writes(calls); !slices.Equal(got, want) {
		t.Errorf("writes:\n got %q\nwant %q", got, want)
	}
	if res.VIPsUpdated != 1 || res.RealsUpdated != 2 || res.RingsRebuilt != 0 {
		t.Errorf("result %v", res)
	}
}

func TestPoolChangeRebuildsRing(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	e.cfg.VIPs[0].Pool = "api"
	_, calls := e.reconcile()
	if !slices.Contains(calls, "SetRing 1") || slices.Contains(calls, "SetRing 2") {
		t.Errorf("calls %v", calls)
	}
	if !slices.Equal(e.dp.rings[1], e.dp.rings[2]) {
		t.Error("VIPs on the same pool have different rings")
	}
}

func TestRealSharedAcrossPools(t *testing.T) {
	e := newEnv(t)
	// 10.0.0.1 also serves the unchecked api pool.
	e.cfg.Pools[1].Backends = append(e.cfg.Pools[1].Backends, be("10.0.0.1", 8080))
	e.health["web/10.0.0.1:80"] = false
	e.reconcile()
	r := e.real("10.0.0.1")
	if r.State != dataplane.RealUp {
		t.Errorf("real healthy in one pool is %s, want up", r.State)
	}
	// Used by the dsr VIP too, so it needs its MAC even though the api
	// VIP is ipip.
	if r.MAC == nil {
		t.Error("shared dsr real has no MAC")
	}
	if slices.Contains(e.ringIDs(webVIP), e.realID("10.0.0.1")) {
		t.Error("real unhealthy in web is in web's ring")
	}
	if !slices.Contains(e.ringIDs(apiVIP), e.realID("10.0.0.1")) {
		t.Error("real healthy in api is missing from api's ring")
	}

	// Drained in one pool only: still up.
	e.health["web/10.0.0.1:80"] = true
	e.drained["web/10.0.0.1:80"] = true
	e.reconcile()
	if got := e.real("10.0.0.1").State; got != dataplane.RealUp {
		t.Errorf("drained in one of two pools: %s, want up", got)
	}
	e.drained["api/10.0.0.1:8080"] = true
	e.reconcile()
	if got := e.real("10.0.0.1").State; got != dataplane.RealDraining {
		t.Errorf("drained in both pools: %s, want draining", got)
	}
}

func TestSameAddressTwoPorts(t *testing.T) {
	e := newEnv(t)
	e.cfg.Pools[1].Backends = []config.Backend{
		be("10.0.1.1", 8080), be("10.0.1.1", 8081),
		{Address: "10.0.1.2", Port: 8080, Weight: w(2)},
	}
	e.reconcile()
	if len(e.dp.reals) != 5 {
		t.Errorf("%d reals, want 5: one per address", len(e.dp.reals))
	}
	n := map[uint32]int{}
	for _, id := range e.dp.rings[2] {
		n[id]++
	}
	if d := n[4] - n[5]; d < -1 || d > 1 {
		t.Errorf("two ports of weight 1 vs one of weight 2: %d vs %d slots", n[4], n[5])
	}
}

func TestIPv6(t *testing.T) {
	e := newEnv(t)
	e.cfg.Pools = append(e.cfg.Pools, config.Pool{
		Name:        "v6",
		HealthCheck: config.HealthCheck{Type: config.HealthCheckNone},
		Backends:    []config.Backend{be("2001:db8::1", 80), be("2001:db8::2", 80)},
	})
	e.cfg.VIPs = append(e.cfg.VIPs, config.VIP{Address: "2001:db8:f::1", Port: 0, Protocol: config.ProtocolTCP, Mode: config.VIPModeIPIP, Pool: "v6"})
	e.reconcile()
	v := dataplane.VIP{Addr: netip.MustParseAddr("2001:db8:f::1"), Port: 0, Proto: dataplane.ProtoTCP}
	if got, want := e.ringIDs(v), e.ids("2001:db8::1", "2001:db8::2"); !slices.Equal(got, want) {
		t.Errorf("ring holds %v, want %v", got, want)
	}
	if _, calls := e.reconcile(); len(calls) != 0 {
		t.Errorf("second reconcile: %v", calls)
	}
}

func TestDenylistDiff(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	e.cfg.Security.Denylist = []string{"2001:db8:bad::/48", "203.0.113.7"}
	res, calls := e.reconcile()
	want := []string{"AddDeny 203.0.113.7/32", "RemoveDeny 198.51.100.0/24"}
	if got := writes(calls); !slices.Equal(got, want) {
		t.Errorf("writes %q, want %q", got, want)
	}
	if res.DenyAdded != 1 || res.DenyRemoved != 1 {
		t.Errorf("result %v", res)
	}
}

func TestInvalidDesiredWritesNothing(t *testing.T) {
	cases := map[string]func(c *config.Config){
		"backend address": func(c *config.Config) { c.Pools[0].Backends[0].Address = "10.0.0.300" },
		"backend port":    func(c *config.Config) { c.Pools[0].Backends[0].Port = 0 },
		"duplicate pool":  func(c *config.Config) { c.Pools[1].Name = "web" },
		"unknown pool":    func(c *config.Config) { c.VIPs[1].Pool = "nope" },
		"vip protocol":    func(c *config.Config) { c.VIPs[0].Protocol = "sctp" },
		"vip mode":        func(c *config.Config) { c.VIPs[0].Mode = "nat" },
		"duplicate vip":   func(c *config.Config) { c.VIPs[1] = c.VIPs[0] },
		"denylist":        func(c *config.Config) { c.Security.Denylist = []string{"10.0.0.0/33"} },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			mutate(e.cfg)
			_, err := e.r.Reconcile(context.Background(), e.desired())
			if err == nil {
				t.Fatal("no error")
			}
			if w := writes(e.dp.takeCalls()); len(w) != 0 {
				t.Errorf("wrote %v before rejecting: %v", w, err)
			}
		})
	}
	e := newEnv(t)
	if _, err := e.r.Reconcile(context.Background(), Desired{}); err == nil {
		t.Error("nil config accepted")
	}
}

func TestOutOfIDs(t *testing.T) {
	e := newEnv(t)
	e.dp.maxReals = 5 // ids 1..4 for 5 reals
	e.r = e.newReconciler()
	_, err := e.r.Reconcile(context.Background(), e.desired())
	if err == nil || !strings.Contains(err.Error(), "no free real id") {
		t.Fatalf("err = %v", err)
	}
	if w := writes(e.dp.takeCalls()); len(w) != 0 {
		t.Errorf("wrote %v", w)
	}
}

func TestCanceledContext(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.r.Reconcile(ctx, e.desired()); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	if len(e.dp.takeCalls()) != 0 {
		t.Error("canceled reconcile touched the data plane")
	}
}

func TestResync(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	// Something else removed a real behind the reconciler's back.
	delete(e.dp.reals, 3)
	if _, calls := e.reconcile(); len(calls) != 0 {
		t.Fatalf("reconcile without resync made calls %v", calls)
	}
	e.r.Resync()
	_, calls := e.reconcile()
	if !slices.Contains(writes(calls), "SetReal 3 10.0.0.3 down mac=") {
		t.Errorf("resync did not restore real 3: %v", calls)
	}
}

func TestConcurrentReconciles(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex // guards the env's maps, which the Healthy func reads
	health := func(key string) (bool, bool) {
		mu.Lock()
		defer mu.Unlock()
		h, ok := e.health[key]
		return h, ok
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 20 {
				mu.Lock()
				e.health["web/10.0.0.2:80"] = (i+j)%2 == 0
				mu.Unlock()
				if _, err := e.r.Reconcile(context.Background(), Desired{Config: e.cfg, Healthy: health}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	e.checkConsistent()
	e.health["web/10.0.0.2:80"] = true
	e.reconcile()
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{1, 2}) {
		t.Errorf("ring holds %v", got)
	}
}

func TestNewRejectsBadDataplane(t *testing.T) {
	dp := newFakeDP(256)
	if _, err := New(dp, nil, Options{}); err == nil || !strings.Contains(err.Error(), "prime") {
		t.Errorf("ring size 256: err = %v", err)
	}
	if _, err := New(nil, nil, Options{}); err == nil {
		t.Error("nil data plane accepted")
	}
}

// BenchmarkReconcile1000VIPs: 100 pools of 10 backends, 10 VIPs per pool
// (half dsr, half ipip), rings of 65537 slots.
func BenchmarkReconcile1000VIPs(b *testing.B) {
	cfg := &config.Config{}
	macs := &fakeMACs{table: map[netip.Addr]net.HardwareAddr{}}
	for p := range 100 {
		pool := config.Pool{Name: fmt.Sprintf("pool-%d", p), HealthCheck: config.HealthCheck{Type: config.HealthCheckTCP}}
		for i := range 10 {
			a := netip.AddrFrom4([4]byte{10, byte(p / 250), byte(p % 250), byte(i + 1)})
			macs.table[a] = macFor(a)
			pool.Backends = append(pool.Backends, be(a.String(), 80))
		}
		cfg.Pools = append(cfg.Pools, pool)
		for v := range 10 {
			mode := config.VIPModeDSR
			if v%2 == 1 {
				mode = config.VIPModeIPIP
			}
			cfg.VIPs = append(cfg.VIPs, config.VIP{
				Address: netip.AddrFrom4([4]byte{192, 0, byte(p), byte(v + 1)}).String(), Port: 80,
				Protocol: config.ProtocolTCP, Mode: mode, Pool: pool.Name,
			})
		}
	}
	d := Desired{Config: cfg, Healthy: func(string) (bool, bool) { return true, true }}
	newDP := func() *fakeDP {
		dp := newFakeDP(maglev.DefaultTableSize)
		dp.maxVIPs, dp.maxReals = dataplane.DefaultMaxVIPs, dataplane.DefaultMaxReals
		dp.record, dp.checkRefs, dp.shareRings = false, false, true
		return dp
	}
	ctx := context.Background()

	b.Run("first-apply", func(b *testing.B) {
		for b.Loop() {
			r, err := New(newDP(), macs, Options{})
			if err != nil {
				b.Fatal(err)
			}
			res, err := r.Reconcile(ctx, d)
			if err != nil {
				b.Fatal(err)
			}
			if res.VIPsAdded != 1000 || res.RealsAdded != 1000 || res.RingsRebuilt != 1000 {
				b.Fatalf("result %v", res)
			}
		}
	})
	b.Run("no-op", func(b *testing.B) {
		r, err := New(newDP(), macs, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := r.Reconcile(ctx, d); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			res, err := r.Reconcile(ctx, d)
			if err != nil {
				b.Fatal(err)
			}
			if res.Changed() {
				b.Fatalf("no-op reconcile changed %v", res)
			}
		}
	})
	b.Run("one-backend-down", func(b *testing.B) {
		r, err := New(newDP(), macs, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := r.Reconcile(ctx, d); err != nil {
			b.Fatal(err)
		}
		down := false
		flap := Desired{Config: cfg, Healthy: func(key string) (bool, bool) {
			return !(down && key == "pool-0/10.0.0.1:80"), true
		}}
		for b.Loop() {
			down = !down
			res, err := r.Reconcile(ctx, flap)
			if err != nil {
				b.Fatal(err)
			}
			if res.RingsRebuilt != 10 {
				b.Fatalf("result %v", res)
			}
		}
	})
}

// Three undrains racing used to leave a backend draining: each caller took
// its snapshot of the drain set before waiting for the reconcile in
// progress, so an older snapshot could run last. ReconcileLatest reads the
// state only once it holds the lock, so the last reconcile installs the
// newest state whatever the order.
func TestReconcileLatestReadsStateUnderLock(t *testing.T) {
	e := newEnv(t)
	e.reconcile()
	key := "web/10.0.0.2:80"

	var mu sync.Mutex // guards drained, shared with the reconciling goroutines
	drained := map[string]bool{key: true}
	latest := func() Desired {
		mu.Lock()
		defer mu.Unlock()
		return Desired{Config: e.cfg, Healthy: e.desired().Healthy, Drained: maps.Clone(drained)}
	}

	// The first reconcile (the drain) stalls in its ring write while the
	// others queue behind it.
	release := make(chan struct{})
	var stalled sync.Once
	inWrite := make(chan struct{})
	e.dp.fail = func(call string) error {
		if strings.HasPrefix(call, "SetRing") {
			stalled.Do(func() { close(inWrite); <-release })
		}
		return nil
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := e.r.ReconcileLatest(context.Background(), latest); err != nil {
			t.Error(err)
		}
	})
	<-inWrite

	var asked atomic.Int32
	counted := func() Desired { asked.Add(1); return latest() }
	for range 3 {
		wg.Go(func() {
			if _, err := e.r.ReconcileLatest(context.Background(), counted); err != nil {
				t.Error(err)
			}
		})
	}
	// The undrain lands while every queued reconcile still waits: none of
	// them may have read the state yet.
	time.Sleep(50 * time.Millisecond)
	if n := asked.Load(); n != 0 {
		t.Errorf("%d queued reconciles read the desired state before taking the lock", n)
	}
	mu.Lock()
	delete(drained, key)
	mu.Unlock()
	close(release)
	wg.Wait()

	if got := e.real("10.0.0.2").State; got != dataplane.RealUp {
		t.Errorf("after the undrain the real is %s, want up", got)
	}
	if got := e.ringIDs(webVIP); !slices.Equal(got, []uint32{1, 2}) {
		t.Errorf("after the undrain the ring holds %v, want [1 2]", got)
	}
}

// config refuses what the data plane cannot hold without loading it; its
// limits must be the data plane's sizes less the reserved id 0, and its
// default sizes the data plane's. The data plane's figures are enum vf_size
// of bpf/include/vf_types.h, which config, free of cilium/ebpf, cannot read.
func TestConfigCapacityMatchesDataplane(t *testing.T) {
	if config.VIPCapacity != dataplane.DefaultMaxVIPs-1 || config.RealCapacity != dataplane.DefaultMaxReals-1 {
		t.Fatalf("config capacity %d VIPs / %d reals, the data plane holds %d / %d less id 0",
			config.VIPCapacity, config.RealCapacity, dataplane.DefaultMaxVIPs, dataplane.DefaultMaxReals)
	}
	d := config.Default().Dataplane
	for _, c := range []struct {
		name         string
		config, want uint32
	}{
		{"conntrack_size", uint32(d.ConntrackSize), dataplane.DefaultConntrackSize},
		{"ring_size", uint32(d.RingSize), dataplane.DefaultRingSize},
		{"new_flow_limit.table_size", uint32(d.NewFlowLimit.TableSize), dataplane.DefaultNewFlowTable},
	} {
		if c.config != c.want {
			t.Errorf("config's default %s is %d, the data plane's %d", c.name, c.config, c.want)
		}
	}
}
