package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Documentation-range VIPs. They exist only inside lab namespaces (the
// client's routes and the backends' loopbacks), so every lab can use them.
var (
	vip4 = netip.MustParseAddr("198.51.100.10")
	vip6 = netip.MustParseAddr("2001:db8::10")
)

// Health check settings of every test pool: short, so that verdicts change
// within a second or two.
const (
	checkInterval = 500 * time.Millisecond
	checkTimeout  = 200 * time.Millisecond
	checkRise     = 1
	checkFall     = 2
)

// ---------------------------------------------------------------------------
// The binary

func TestMain(m *testing.M) { agenttest.Main(m) }

// BinaryEnv names a prebuilt veloflux binary to test instead of building
// ./cmd/veloflux from this checkout.
const BinaryEnv = "VELOFLUX_E2E_BINARY"

// ---------------------------------------------------------------------------
// The environment: a lab, a private bpffs, a config file, the agent

type env struct {
	t     *testing.T
	lab   *lab.Lab
	bin   string
	dir   string // t.TempDir()
	pin   string // --pin-path, on the private bpffs
	state string // --state-dir
	cfg   string // --config
	http  *http.Client
	seq   int                // agent processes started
	agent *agenttest.Process // the last one started
}

// with returns a copy of e bound to t (a subtest), so that its helpers
// fail, log and clean up on the right test.
func (e *env) with(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

// newEnv builds a lab with the given backends (servers running) and VIPs,
// mounts a private bpffs and builds the binary.
func newEnv(t *testing.T, backends int, vips ...netip.Addr) *env {
	t.Helper()
	base := agenttest.NewEnv(t, lab.Options{Backends: backends, VIPs: vips}, BinaryEnv)
	e := &env{t: t, lab: base.Lab, bin: base.Bin, dir: base.Dir, pin: base.Pin, state: base.State, cfg: base.Cfg}
	e.http = newHTTPClient(e.lab.Client, 5*time.Second)
	return e
}

// newHTTPClient makes a client whose every request opens its own connection
// from h's namespace, so every request is a new flow for the balancer.
func newHTTPClient(h *lab.Host, timeout time.Duration) *http.Client {
	return &http.Client{
		Transport: &http.Transport{DialContext: h.DialContext, DisableKeepAlives: true},
		Timeout:   timeout,
	}
}

// ---------------------------------------------------------------------------
// Configuration

type poolSpec struct {
	name      string
	addrs     []netip.Addr
	port      int
	checkPort int // 0: the backend port
}

type vipSpec struct {
	addr  netip.Addr
	port  int
	proto string // tcp | udp
	mode  string // dsr | ipip
	pool  string
}

type cfgSpec struct {
	dataplane []string // extra "key: value" lines under dataplane:
	pools     []poolSpec
	vips      []vipSpec
}

// render writes a configuration in the documented schema. Addresses are
// quoted: an unquoted IPv6 literal is not a plain YAML scalar everywhere.
func (e *env) render(c cfgSpec) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node:\n  name: e2e-%s\n", e.lab.Prefix)
	fmt.Fprintf(&b, "dataplane:\n  interfaces: [%s]\n  xdp_mode: native\n  conntrack_size: 65536\n", e.lab.Balancer.IfName)
	for _, l := range c.dataplane {
		fmt.Fprintf(&b, "  %s\n", l)
	}
	fmt.Fprintf(&b, "api:\n  token_file: %s\n", filepath.Join(e.state, "api.token"))
	b.WriteString("pools:\n")
	for _, p := range c.pools {
		fmt.Fprintf(&b, "  - name: %s\n    backends:\n", p.name)
		for _, a := range p.addrs {
			fmt.Fprintf(&b, "      - {address: %q, port: %d}\n", a.String(), p.port)
		}
		fmt.Fprintf(&b, "    health_check: {type: http, path: /healthz, interval: %s, timeout: %s, rise: %d, fall: %d",
			checkInterval, checkTimeout, checkRise, checkFall)
		if p.checkPort != 0 {
			fmt.Fprintf(&b, ", port: %d", p.checkPort)
		}
		b.WriteString("}\n")
	}
	b.WriteString("vips:\n")
	for _, v := range c.vips {
		fmt.Fprintf(&b, "  - {address: %q, port: %d, protocol: %s, mode: %s, pool: %s}\n",
			v.addr.String(), v.port, v.proto, v.mode, v.pool)
	}
	return b.String()
}

// writeConfig replaces the config file atomically (the agent may read it at
// any SIGHUP).
func (e *env) writeConfig(text string) {
	e.t.Helper()
	agenttest.WriteFileAtomic(e.t, e.cfg, text)
}

// addrs4/addrs6 list the IPv4/IPv6 addresses of backends idx (all when
// none given).
func (e *env) addrs4(idx ...int) []netip.Addr { return e.addrs(false, idx) }
func (e *env) addrs6(idx ...int) []netip.Addr { return e.addrs(true, idx) }

func (e *env) addrs(v6 bool, idx []int) []netip.Addr {
	if len(idx) == 0 {
		for i := range e.lab.Backends {
			idx = append(idx, i)
		}
	}
	var out []netip.Addr
	for _, i := range idx {
		if v6 {
			out = append(out, e.lab.Backends[i].Addr6)
		} else {
			out = append(out, e.lab.Backends[i].Addr4)
		}
	}
	return out
}

// backendIndex maps a backend address or name ("backend-2") to its index.
func (e *env) backendIndex(addr netip.Addr) int {
	for i, b := range e.lab.Backends {
		if b.Addr4 == addr.Unmap() || b.Addr6 == addr {
			return i
		}
	}
	return -1
}

func (e *env) backendByName(name string) int {
	for i, b := range e.lab.Backends {
		if b.Name == name {
			return i
		}
	}
	return -1
}

// ---------------------------------------------------------------------------
// The agent process

// startAgent runs the agent with the env's config, pin path and state dir,
// inside the balancer namespace. It is stopped (SIGTERM, then SIGKILL) in
// t.Cleanup if still running.
func (e *env) startAgent() *agenttest.Process {
	e.t.Helper()
	e.seq++
	e.agent = e.runBinary(fmt.Sprintf("agent#%d", e.seq),
		"--config", e.cfg, "--pin-path", e.pin, "--state-dir", e.state, "--log-format", "text")
	return e.agent
}

// runBinary starts the binary with args in the balancer namespace.
func (e *env) runBinary(name string, args ...string) *agenttest.Process {
	e.t.Helper()
	p, err := agenttest.Start(e.t, name, e.lab.Balancer.Command(context.Background(), e.bin, args...))
	if err != nil {
		e.t.Fatalf("start %s: %v", name, err)
	}
	return p
}

// ---------------------------------------------------------------------------
// HTTP traffic

// get fetches url over a new connection and returns the backend's name.
func get(ctx context.Context, c *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if err != nil {
		return "", fmt.Errorf("GET %s: read body: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: status %s", url, resp.Status)
	}
	name := strings.TrimSpace(string(body))
	if !strings.HasPrefix(name, "backend-") {
		return "", fmt.Errorf("GET %s: unexpected body %q", url, body)
	}
	return name, nil
}

func vipURL(vip netip.Addr) string {
	return "http://" + netip.AddrPortFrom(vip, lab.HTTPPort).String() + "/"
}

// tally is the outcome of a load.
type tally struct {
	n       int
	ok      int
	fails   int
	counts  map[string]int
	errs    []string // the first few failures
	elapsed time.Duration
}

func (tl *tally) add(name string, err error) {
	tl.n++
	if err != nil {
		tl.fails++
		if len(tl.errs) < 5 {
			tl.errs = append(tl.errs, err.Error())
		}
		return
	}
	tl.ok++
	tl.counts[name]++
}

func (tl tally) share(name string) float64 {
	if tl.ok == 0 {
		return 0
	}
	return float64(tl.counts[name]) / float64(tl.ok)
}

func (tl tally) String() string {
	names := make([]string, 0, len(tl.counts))
	for n := range tl.counts {
		names = append(names, n)
	}
	slices.Sort(names)
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("%s=%d (%.1f%%)", n, tl.counts[n], 100*tl.share(n)))
	}
	s := fmt.Sprintf("%d requests in %s: %d ok, %d failed; %s", tl.n, tl.elapsed.Round(time.Millisecond),
		tl.ok, tl.fails, strings.Join(parts, ", "))
	if len(tl.errs) > 0 {
		s += "; first errors: " + strings.Join(tl.errs, " | ")
	}
	return s
}

// load sends n GETs, each over its own connection, one after the other,
// with pause between them, and stops early at budget.
func load(ctx context.Context, c *http.Client, url string, n int, pause, budget time.Duration, progress *atomic.Int64) tally {
	tl := tally{counts: map[string]int{}}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	for i := 0; i < n && ctx.Err() == nil; i++ {
		name, err := get(ctx, c, url)
		if ctx.Err() != nil && err != nil {
			break // the budget ran out mid-request: not the balancer's failure
		}
		tl.add(name, err)
		if progress != nil {
			progress.Add(1)
		}
		if pause > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(pause):
			}
		}
	}
	tl.elapsed = time.Since(start)
	return tl
}

// waitServing polls url until every backend in want has answered, and
// returns how long that took. It fails the test at timeout.
func (e *env) waitServing(url string, want []int, timeout time.Duration) time.Duration {
	e.t.Helper()
	start := time.Now()
	c := newHTTPClient(e.lab.Client, 500*time.Millisecond)
	seen := map[int]bool{}
	var lastErr error
	for time.Since(start) < timeout {
		e.checkAgent()
		name, err := get(e.t.Context(), c, url)
		if err != nil {
			lastErr = err
			time.Sleep(50 * time.Millisecond)
			continue
		}
		seen[e.backendByName(name)] = true
		all := true
		for _, i := range want {
			all = all && seen[i]
		}
		if all {
			return time.Since(start)
		}
	}
	e.t.Fatalf("%s: backends %v not all serving within %s (seen %v, last error %v)", url, want, timeout, seen, lastErr)
	return 0
}

// checkAgent fails the test if the last agent started has exited.
func (e *env) checkAgent() {
	e.t.Helper()
	if a := e.agent; a != nil && !a.StoppedByTest() && a.Exited() {
		e.t.Fatalf("%s exited: %v", a.Name, a.Err())
	}
}

// waitReals polls the pinned reals until ok accepts them and returns how
// long that took. It fails the test at timeout or if the agent exits.
func (e *env) waitReals(what string, timeout time.Duration, ok func(map[netip.Addr]dataplane.Real) bool) time.Duration {
	e.t.Helper()
	start := time.Now()
	var last map[netip.Addr]dataplane.Real
	for time.Since(start) < timeout {
		e.checkAgent()
		if dp, err := dataplane.OpenPinned(e.pin); err == nil {
			reals, err := dp.Reals()
			dp.Close()
			if err == nil {
				last = map[netip.Addr]dataplane.Real{}
				for _, r := range reals {
					last[r.Addr] = r
				}
				if ok(last) {
					return time.Since(start)
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.t.Fatalf("%s: not within %s (reals: %v)", what, timeout, last)
	return 0
}

// ---------------------------------------------------------------------------
// A long-lived TCP echo stream

// echoStream writes a line every period and expects it back, until stopped.
type echoStream struct {
	conn   net.Conn
	local  netip.AddrPort
	remote netip.AddrPort
	stopc  chan struct{}
	done   chan struct{}
	once   sync.Once
	echoes atomic.Int64
	err    error // valid after done
}

func startEchoStream(t *testing.T, h *lab.Host, dst netip.AddrPort, period, maxDur time.Duration) *echoStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, err := h.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		t.Fatalf("dial echo stream to %s: %v", dst, err)
	}
	s := &echoStream{conn: c, remote: dst, stopc: make(chan struct{}), done: make(chan struct{})}
	s.local = c.LocalAddr().(*net.TCPAddr).AddrPort()
	s.local = netip.AddrPortFrom(s.local.Addr().Unmap(), s.local.Port())
	go s.run(period, maxDur)
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *echoStream) run(period, maxDur time.Duration) {
	defer close(s.done)
	r := bufio.NewReader(s.conn)
	tick := time.NewTicker(period)
	defer tick.Stop()
	end := time.Now().Add(maxDur)
	for i := 0; time.Now().Before(end); i++ {
		msg := fmt.Sprintf("veloflux e2e line %d at %s\n", i, time.Now().Format(time.RFC3339Nano))
		if err := s.conn.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
			s.err = err
			return
		}
		if _, err := io.WriteString(s.conn, msg); err != nil {
			s.err = fmt.Errorf("write line %d (after %d echoes): %w", i, s.echoes.Load(), err)
			return
		}
		got, err := r.ReadString('\n')
		if err != nil {
			s.err = fmt.Errorf("read echo of line %d (after %d echoes): %w", i, s.echoes.Load(), err)
			return
		}
		if got != msg {
			s.err = fmt.Errorf("line %d: echo %q, want %q", i, got, msg)
			return
		}
		s.echoes.Add(1)
		select {
		case <-s.stopc:
			return
		case <-tick.C:
		}
	}
}

// stop ends the stream and returns its first error, if any.
func (s *echoStream) stop() error {
	s.once.Do(func() {
		close(s.stopc)
		<-s.done
		s.conn.Close()
	})
	return s.err
}

// failed reports a stream error without stopping the stream.
func (s *echoStream) failed() error {
	select {
	case <-s.done:
		if s.err == nil {
			return errors.New("stream ended early (max duration)")
		}
		return s.err
	default:
		return nil
	}
}

// tcpEstablished is TCP_ESTABLISHED in include/net/tcp_states.h.
const tcpEstablished = 1

// socketOwner finds the backend holding the established server side of the
// client connection local -> vip (served from the VIP on its loopback). It
// returns -1 when no backend has it.
func (e *env) socketOwner(local, vip netip.AddrPort) (int, error) {
	family := uint8(unix.AF_INET)
	if vip.Addr().Is6() {
		family = unix.AF_INET6
	}
	owner := -1
	for i, b := range e.lab.Backends {
		var socks []*netlink.Socket
		err := b.Do(func() error {
			var err error
			for range 3 { // a dump interrupted by a concurrent change is retried
				if socks, err = netlink.SocketDiagTCP(family); !errors.Is(err, netlink.ErrDumpInterrupted) {
					break
				}
			}
			return err
		})
		if err != nil {
			return -1, fmt.Errorf("%s: list TCP sockets: %w", b.Name, err)
		}
		for _, s := range socks {
			src, _ := netip.AddrFromSlice(s.ID.Source)
			dst, _ := netip.AddrFromSlice(s.ID.Destination)
			if s.State == tcpEstablished && src.Unmap() == vip.Addr() && s.ID.SourcePort == vip.Port() &&
				dst.Unmap() == local.Addr() && s.ID.DestinationPort == local.Port() {
				if owner >= 0 {
					return -1, fmt.Errorf("connection %s -> %s established on %s and %s", local, vip,
						e.lab.Backends[owner].Name, b.Name)
				}
				owner = i
			}
		}
	}
	return owner, nil
}

// flowReal looks the flow local -> vip up in the pinned conntrack map and
// returns the real id and the backend index it names.
func (e *env) flowReal(local, vip netip.AddrPort, proto dataplane.Protocol) (uint32, int, error) {
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		return 0, -1, err
	}
	defer dp.Close()
	flows, err := dp.Flows(0)
	if err != nil {
		return 0, -1, err
	}
	for _, f := range flows {
		if f.Proto == proto && f.Src == local.Addr() && f.SrcPort == local.Port() &&
			f.Dst == vip.Addr() && f.DstPort == vip.Port() {
			reals, err := dp.Reals()
			if err != nil {
				return 0, -1, err
			}
			r, ok := reals[f.RealID]
			if !ok {
				return f.RealID, -1, fmt.Errorf("flow %s -> %s names real %d, which is not installed", local, vip, f.RealID)
			}
			return f.RealID, e.backendIndex(r.Addr), nil
		}
	}
	return 0, -1, fmt.Errorf("no conntrack entry for %s -> %s/%v among %d flows", local, vip, proto, len(flows))
}

// vipID returns the data plane id of a VIP, read from the pinned map.
func vipID(dp *dataplane.Dataplane, v dataplane.VIP) (uint32, error) {
	vips, err := dp.VIPs()
	if err != nil {
		return 0, err
	}
	meta, ok := vips[v]
	if !ok {
		return 0, fmt.Errorf("VIP %s not in the data plane (have %v)", v, vips)
	}
	return meta.ID, nil
}

// counters reads the global per-reason counters from the pins.
func (e *env) counters() map[string]uint64 {
	e.t.Helper()
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		e.t.Fatalf("open pinned maps: %v", err)
	}
	defer dp.Close()
	cs, err := dp.Counters()
	if err != nil {
		e.t.Fatalf("read counters: %v", err)
	}
	out := map[string]uint64{}
	for i, c := range cs {
		if c.Packets > 0 {
			out[dataplane.Reason(i).String()] = c.Packets
		}
	}
	return out
}

// xdpOnBalancer reports the XDP program attached to the balancer interface,
// as netlink sees it inside the balancer namespace.
func (e *env) xdpOnBalancer() (*netlink.LinkXdp, error) {
	var x *netlink.LinkXdp
	err := e.lab.Balancer.Do(func() error {
		l, err := netlink.LinkByName(e.lab.Balancer.IfName)
		if err != nil {
			return err
		}
		x = l.Attrs().Xdp
		return nil
	})
	return x, err
}

// setSysctl writes one sysctl inside h's namespace.
func setSysctl(h *lab.Host, key, value string) error {
	return h.Do(func() error {
		return os.WriteFile("/proc/sys/"+strings.ReplaceAll(key, ".", "/"), []byte(value), 0o644)
	})
}
