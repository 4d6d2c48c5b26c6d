package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
	"github.com/veloflux/veloflux/tests/testenv"
)

func TestMain(m *testing.M) { agenttest.Main(m) }

const (
	binaryEnv  = "VELOFLUX_CLUSTER_BINARY"
	streamPort = StreamPort
	// holdTime is the agents' default, which the silent node's route
	// outlives at most.
	holdTime = 3 * time.Second
)

var (
	vip     = netip.MustParseAddr("198.51.100.77") // dsr
	ipipVIP = netip.MustParseAddr("198.51.100.78")
)

// node is one VeloFlux node: its namespace and its agent.
type node struct {
	name       string
	host       *lab.Host
	dir        string
	cfgPath    string
	pin        string
	api        string // host:port inside the node's namespace
	metrics    string
	agent      *agenttest.Process
	httpClient *http.Client
}

// cluster is the whole lab of the package's tests.
type cluster struct {
	// t is the test the cluster lives for: processes restarted by a
	// scenario belong to it, not to the scenario's subtest.
	t        *testing.T
	lab      *lab.Lab
	topo     *Topology
	router   *lab.Host
	client   *lab.Host
	nodes    []*node
	bin      string
	birdSock string
	routes   *routeWatch
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	testenv.RequireRoot(t, "build network namespaces and load XDP")
	testenv.RequireTool(t, "bird", "bird2")
	testenv.RequireTool(t, "iptables", "iptables")
	l := lab.ForTest(t, lab.Options{Backends: 3, VIPs: []netip.Addr{vip, ipipVIP}, Prefix: "vfc" + fmt.Sprintf("%04x", os.Getpid()&0xffff)})
	topo, err := Build(l)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, lab: l, topo: topo, router: topo.Router, client: topo.Client, bin: agenttest.BuildAgent(t, binaryEnv)}
	for i, h := range topo.Nodes {
		c.nodes = append(c.nodes, &node{name: NodeName(i), host: h,
			api: fmt.Sprintf("127.0.0.1:%d", 19090+i), metrics: fmt.Sprintf("127.0.0.1:%d", 18080+i)})
	}
	stopServers, err := topo.StartStreamServers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stopServers)
	// The ipip VIP's backends strip the tunnel with the decapsulator, run
	// as an operator would, but pinning nothing: the backends share this
	// host's BPF filesystem, and the decapsulator goes with its process.
	for _, b := range l.Backends {
		p, err := agenttest.Start(t, "decap-"+b.Name, b.Command(context.Background(), c.bin, "decap",
			"--interface", b.IfName, "--local", b.Addr4.String(), "--pin-path="))
		if err != nil {
			t.Fatalf("start the decapsulator on %s: %v", b.Name, err)
		}
		p.WaitLog("decapsulating", 0, 10*time.Second)
	}
	dir := t.TempDir()
	for i, n := range c.nodes {
		n.dir = filepath.Join(dir, n.name)
		if err := os.MkdirAll(filepath.Join(n.dir, "state"), 0o700); err != nil {
			t.Fatal(err)
		}
		n.pin = agenttest.MountBPFFS(t, n.dir)
		n.cfgPath = filepath.Join(n.dir, "veloflux.yaml")
		n.writeConfig(t, c, c.lab.Backends)
		n.httpClient = &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DialContext: n.host.DialContext}}
		t.Cleanup(n.httpClient.CloseIdleConnections)
		c.startAgent(t, i)
	}
	c.startBIRD(t, dir)
	c.routes = watchRoute(t, c.router, vip)
	c.waitNextHops(t, 3, 30*time.Second)
	return c
}

// writeConfig writes n's configuration with the given backends.
func (n *node) writeConfig(t *testing.T, c *cluster, backends []*lab.Host) {
	t.Helper()
	i := slices.Index(c.nodes, n)
	cfg := c.topo.NodeConfig(i, n.api, n.metrics, filepath.Join(n.dir, "state", "api.token"), backends)
	if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// startAgent runs node i's agent and waits for its API.
func (c *cluster) startAgent(t *testing.T, i int) {
	t.Helper()
	n := c.nodes[i]
	p, err := agenttest.Start(c.t, n.name, n.host.Command(context.Background(), c.bin, "--config", n.cfgPath,
		"--pin-path", n.pin, "--state-dir", filepath.Join(n.dir, "state"), "--log-format", "text"))
	if err != nil {
		t.Fatalf("start %s's agent: %v", n.name, err)
	}
	n.agent = p
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := n.httpClient.Get("http://" + n.api + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) || p.Exited() {
			t.Fatalf("%s's agent not healthy: %v", n.name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startBIRD runs BIRD 2 in the router namespace with its own configuration
// and control socket: passive sessions to the three nodes, graceful restart
// helper, and the kernel protocol merging equal routes into one ECMP route.
func (c *cluster) startBIRD(t *testing.T, dir string) {
	t.Helper()
	conf := filepath.Join(dir, "bird.conf")
	if err := os.WriteFile(conf, []byte(c.topo.BIRDConfig()), 0o600); err != nil {
		t.Fatal(err)
	}
	c.birdSock = filepath.Join(dir, "bird.ctl")
	p, err := agenttest.Start(t, "bird", c.router.Command(context.Background(), "bird", "-f", "-c", conf, "-s", c.birdSock,
		"-P", filepath.Join(dir, "bird.pid")))
	if err != nil {
		t.Fatalf("start BIRD: %v", err)
	}
	_ = p
}

// birdc runs a BIRD CLI command, for the log of a failing test.
func (c *cluster) birdc(args ...string) string {
	out, err := exec.Command("birdc", append([]string{"-s", c.birdSock}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("birdc %v: %v: %s", args, err, out)
	}
	return string(out)
}

func (c *cluster) waitNextHops(t *testing.T, want int, within time.Duration) time.Time {
	t.Helper()
	at, ok := c.routes.waitFor(want, within)
	if !ok {
		t.Fatalf("the router's route to %s has %d next hops, want %d within %s\n%s", vip, c.routes.current(), want,
			within, c.birdc("show", "protocols", "all"))
	}
	return at
}

// --- the router's kernel route ---------------------------------------------

// routeWatch samples the router's kernel route to the VIP every few
// milliseconds: how many next hops it has, and when that changed.
type routeWatch struct {
	mu      sync.Mutex
	hops    int
	changes []routeChange
	wake    chan struct{}
}

type routeChange struct {
	at   time.Time
	hops int
}

const routeSampleEvery = 5 * time.Millisecond

func watchRoute(t *testing.T, router *lab.Host, dst netip.Addr) *routeWatch {
	t.Helper()
	w := &routeWatch{hops: -1, wake: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		err := router.Do(func() error {
			h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
			if err != nil {
				return err
			}
			defer h.Close()
			_, ipn, _ := net.ParseCIDR(dst.String() + "/32")
			filter := &netlink.Route{Dst: ipn}
			tick := time.NewTicker(routeSampleEvery)
			defer tick.Stop()
			for {
				routes, err := h.RouteListFiltered(netlink.FAMILY_V4, filter, netlink.RT_FILTER_DST)
				if err != nil {
					return err
				}
				hops := 0
				for _, r := range routes {
					if len(r.MultiPath) > 0 {
						hops += len(r.MultiPath)
					} else {
						hops++
					}
				}
				w.record(hops)
				select {
				case <-ctx.Done():
					return nil
				case <-tick.C:
				}
			}
		})
		if err != nil {
			w.record(-2)
		}
	}()
	return w
}

func (w *routeWatch) record(hops int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if hops == w.hops {
		return
	}
	w.hops = hops
	w.changes = append(w.changes, routeChange{at: time.Now(), hops: hops})
	close(w.wake)
	w.wake = make(chan struct{})
}

func (w *routeWatch) current() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.hops
}

// waitFor waits until the route has want next hops and returns when it
// got them.
func (w *routeWatch) waitFor(want int, within time.Duration) (time.Time, bool) {
	deadline := time.After(within)
	for {
		w.mu.Lock()
		hops, wake := w.hops, w.wake
		var at time.Time
		if n := len(w.changes); n > 0 {
			at = w.changes[n-1].at
		}
		w.mu.Unlock()
		if hops == want {
			return at, true
		}
		select {
		case <-wake:
		case <-deadline:
			return time.Time{}, false
		}
	}
}

// since returns the route's changes after from.
func (w *routeWatch) since(from time.Time) []routeChange {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []routeChange
	for _, ch := range w.changes {
		if ch.at.After(from) {
			out = append(out, ch)
		}
	}
	return out
}

// --- the client's streams ----------------------------------------------------

const (
	streamCount = 50
	exchangeGap = 50 * time.Millisecond
	// streamTimeout ends a stream that got no answer for this long: it is
	// broken, whatever TCP would still try.
	streamTimeout = 10 * time.Second
)

// stream is one long-lived TCP connection to the VIP.
type stream struct {
	id       int
	backends map[string]int // name -> answers
	err      error
	// maxGap is the longest time between two answers.
	maxGap time.Duration
	stalls int // gaps over 200 ms
	// lastAnswer is when the last answer came (Unix nanoseconds).
	lastAnswer atomic.Int64
	// done is closed when the stream ended.
	done chan struct{}
}

// streams runs streamCount streams until stop is closed, then reports them.
type streams struct {
	all  []*stream
	stop chan struct{}
	wg   sync.WaitGroup
}

func (c *cluster) openStreams(t *testing.T) *streams {
	t.Helper()
	return c.openStreamsTo(t, vip)
}

// openStreamsTo opens streamCount streams to dst.
func (c *cluster) openStreamsTo(t *testing.T, dst netip.Addr) *streams {
	t.Helper()
	s := &streams{stop: make(chan struct{})}
	for i := range streamCount {
		conn, err := c.client.DialContext(t.Context(), "tcp4", netip.AddrPortFrom(dst, streamPort).String())
		if err != nil {
			close(s.stop)
			s.wg.Wait()
			t.Fatalf("stream %d: connect: %v", i, err)
		}
		st := &stream{id: i, backends: map[string]int{}, done: make(chan struct{})}
		st.lastAnswer.Store(time.Now().UnixNano())
		s.all = append(s.all, st)
		s.wg.Go(func() { st.run(conn, s.stop) })
	}
	t.Cleanup(func() { s.finish() })
	return s
}

func (st *stream) run(conn net.Conn, stop <-chan struct{}) {
	defer close(st.done)
	defer conn.Close()
	r := bufio.NewReader(conn)
	last := time.Now()
	tick := time.NewTicker(exchangeGap)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		if err := conn.SetDeadline(time.Now().Add(streamTimeout)); err != nil {
			st.err = err
			return
		}
		msg := fmt.Sprintf("stream %d exchange %d\n", st.id, n)
		if _, err := io.WriteString(conn, msg); err != nil {
			st.err = fmt.Errorf("exchange %d: write: %w", n, err)
			return
		}
		line, err := r.ReadString('\n')
		if err != nil {
			st.err = fmt.Errorf("exchange %d: read: %w", n, err)
			return
		}
		name, echo, _ := strings.Cut(line, " ")
		if echo != msg {
			st.err = fmt.Errorf("exchange %d: echo %q, want %q", n, echo, msg)
			return
		}
		st.backends[name]++
		now := time.Now()
		st.lastAnswer.Store(now.UnixNano())
		if gap := now.Sub(last); gap > st.maxGap {
			st.maxGap = gap
		}
		if now.Sub(last) > 200*time.Millisecond {
			st.stalls++
		}
		last = now
	}
}

// answeredAfter waits until every stream that still runs got an answer
// after at, and reports whether they all did within the time given.
func (s *streams) answeredAfter(at time.Time, within time.Duration) bool {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		all := true
		for _, st := range s.all {
			select {
			case <-st.done:
				continue
			default:
			}
			if st.lastAnswer.Load() <= at.UnixNano() {
				all = false
			}
		}
		if all {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// finish stops every stream and waits for them; idempotent.
func (s *streams) finish() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
}

// report is what the streams went through.
type report struct {
	broken, moved, stalled int
	maxStall               time.Duration
	problems               []string
}

func (s *streams) report() report {
	s.finish()
	var r report
	for _, st := range s.all {
		if st.err != nil {
			r.broken++
			r.problems = append(r.problems, fmt.Sprintf("stream %d broke: %v", st.id, st.err))
		}
		if len(st.backends) > 1 {
			r.moved++
			r.problems = append(r.problems, fmt.Sprintf("stream %d changed backend: %v", st.id, st.backends))
		}
		if st.stalls > 0 {
			r.stalled++
		}
		r.maxStall = max(r.maxStall, st.maxGap)
	}
	return r
}

// requireIntact fails the test unless every stream survived on its backend.
func (c *cluster) requireIntact(t *testing.T, s *streams) report {
	t.Helper()
	r := s.report()
	t.Logf("streams: %d/%d survived, %d changed backend, %d stalled over 200 ms, longest gap %s",
		streamCount-r.broken, streamCount, r.moved, r.stalled, r.maxStall.Round(time.Millisecond))
	if r.broken > 0 || r.moved > 0 {
		t.Errorf("streams did not all survive on their backend:\n%s", strings.Join(r.problems, "\n"))
	}
	return r
}

// --- the agents' API ---------------------------------------------------------

func (n *node) token(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.dir, "state", "api.token"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (n *node) call(t *testing.T, method, path string, out any) {
	t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), method, "http://"+n.api+path, nil) // also from cleanups
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+n.token(t))
	resp, err := n.httpClient.Do(req)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", n.name, method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: %s %s: %s: %s", n.name, method, path, resp.Status, body)
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("%s: %s %s: %v", n.name, method, path, err)
		}
	}
}

// flows counts the node's conntrack entries toward the VIP.
func (n *node) flows(t *testing.T) int {
	t.Helper()
	var flows []struct {
		VIP string `json:"vip"`
	}
	n.call(t, http.MethodGet, "/api/flows?limit=10000", &flows)
	count := 0
	for _, f := range flows {
		if f.VIP == netip.AddrPortFrom(vip, streamPort).String() {
			count++
		}
	}
	return count
}

// fingerprint is the node's ring fingerprint of the VIP from /api/vips.
func (n *node) fingerprint(t *testing.T) string {
	t.Helper()
	var vips []struct {
		Address string `json:"address"`
		Ring    struct {
			Fingerprint string `json:"fingerprint"`
		} `json:"ring"`
	}
	n.call(t, http.MethodGet, "/api/vips", &vips)
	for _, v := range vips {
		if v.Address == vip.String() {
			return v.Ring.Fingerprint
		}
	}
	t.Fatalf("%s: no VIP %s in %+v", n.name, vip, vips)
	return ""
}

// scrape returns the node's veloflux_vip_ring_fingerprint sample line.
func (n *node) scrapeFingerprint(t *testing.T) string {
	t.Helper()
	resp, err := n.httpClient.Get("http://" + n.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), fmt.Sprintf("veloflux_vip_ring_fingerprint{vip=%q}", netip.AddrPortFrom(vip, streamPort).String()+"/tcp")) {
			return sc.Text()
		}
	}
	t.Fatalf("%s: no veloflux_vip_ring_fingerprint in the scrape", n.name)
	return ""
}
