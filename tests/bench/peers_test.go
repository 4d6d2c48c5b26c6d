package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

// TestMain removes the agent binary the benchmarks build.
func TestMain(m *testing.M) { agenttest.Main(m) }

// agentEnv names a prebuilt veloflux binary to benchmark instead of building
// ./cmd/veloflux from this checkout.
const agentEnv = "VF_BENCH_AGENT"

// env is what every peer needs: the lab and a place for files.
type env struct {
	tb       testing.TB
	lab      *lab.Lab
	dir      string // scratch directory
	agentBin string
	pinPath  string // on a private bpffs; removed after every agent run
	starts   int    // agent starts so far, to name log files
}

// peer is one load balancer in front of the lab's backends.
type peer struct {
	name  string // short, for metrics and tables
	title string
	url   func(*env) string
	// start brings the peer up; stop takes it down and undoes everything
	// start did. pid is a user-space process whose CPU time is of interest.
	start func(ctx context.Context, e *env, url string) (stop func() error, pid int, err error)
}

var peers = []peer{
	{name: "veloflux-dsr", title: "VeloFlux dsr (XDP)", url: func(*env) string { return "http://" + vfVIP.String() + "/" },
		start: startVeloFlux},
	{name: "nftables-dnat", title: "nftables DNAT", url: func(*env) string { return "http://" + nftVIP.String() + "/" },
		start: startNFT},
	{name: "haproxy-tcp", title: "HAProxy TCP mode", url: func(e *env) string {
		return fmt.Sprintf("http://%s:%d/", e.lab.Balancer.Addr4, haproxyPort)
	}, start: startHAProxy},
}

// ---- VeloFlux ----

// process is a child process stopped at most once, by SIGTERM and then
// SIGKILL, whether by its owner or by the benchmark's cleanup.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string // its stdout and stderr
	done    chan struct{}
	err     error // from Wait, valid once done is closed
	once    sync.Once
}

func startProcess(tb testing.TB, name string, cmd *exec.Cmd, logPath string) (*process, error) {
	// Its own process group, so a Ctrl-C at the terminal reaches the test
	// only, and the cleanup decides how the child stops.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return runProcess(tb, name, cmd, logPath, (*exec.Cmd).Start)
}

// runProcess starts cmd with start, its output going to logPath, and has
// the test's cleanup stop it.
func runProcess(tb testing.TB, name string, cmd *exec.Cmd, logPath string, start func(*exec.Cmd) error) (*process, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := start(cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	tb.Cleanup(func() {
		if err := p.stop(); err != nil {
			tb.Logf("stop %s: %v", name, err)
		}
	})
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process by its pid: SIGTERM, and SIGKILL after 10 seconds.
func (p *process) stop() error {
	var err error
	p.once.Do(func() {
		if p.exited() {
			err = fmt.Errorf("%s had already exited: %v\n%s", p.name, p.err, logTail(p.logPath, 10))
			return
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
			err = fmt.Errorf("%s ignored SIGTERM for 10s; killed", p.name)
		}
	})
	return err
}

// logTail is the last n lines of a log file, for error messages.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type agentConfig struct {
	vips    []netip.Addr // port 80, tcp, all on pool "web"
	weights [3]int       // of backends 0, 1, 2
	// nat: the VIPs are mode nat from this SNAT address; zero: dsr.
	snat netip.Addr
}

func (e *env) agentYAML(c agentConfig) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# written by tests/bench
node:
  name: vf-bench
api:
  listen: 127.0.0.1:9090
  token_file: %s
metrics:
  listen: 127.0.0.1:9091
proxy:
  enabled: false
dataplane:
  interfaces: [%s]
  xdp_mode: native
  conntrack_size: 1048576
  ring_size: 65537
  nexthop: fib
%spools:
  - name: web
    algorithm: round_robin
    health_check: {type: http, path: /healthz, interval: 1s, timeout: 500ms, rise: 1, fall: 3}
    backends:
`, filepath.Join(e.dir, "api.token"), e.lab.Balancer.IfName, natYAML(c))
	for i, be := range e.lab.Backends {
		fmt.Fprintf(&b, "      - {address: %s, port: %d, weight: %d}\n", be.Addr4, lab.HTTPPort, c.weights[i])
	}
	b.WriteString("vips:\n")
	for _, v := range c.vips {
		if c.snat.IsValid() {
			fmt.Fprintf(&b, "  - {address: %s, port: 80, protocol: tcp, mode: nat, pool: web, snat_address: %s}\n", v, c.snat)
			continue
		}
		fmt.Fprintf(&b, "  - {address: %s, port: 80, protocol: tcp, mode: dsr, pool: web}\n", v)
	}
	return b.String()
}

// natYAML is the dataplane.nat section of a nat run: the whole port range
// above the well-known ports, and a closing timeout of 2 s. A nat flow
// holds its port until the timeout after its FIN, so the range over the
// timeout bounds the new connections per second toward one real: here
// 64,512 / 2 s, well above what the lab reaches, where the default 10 s
// would cap it near 6,500.
func natYAML(c agentConfig) string {
	if !c.snat.IsValid() {
		return ""
	}
	return "  nat: {port_min: 1024, port_max: 65535, closing_timeout: 2s}\n"
}

// writeFileAtomic replaces path in one rename, so a reload never reads a
// half-written configuration.
func writeFileAtomic(path, content string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// agentProc is a running agent in the balancer namespace.
type agentProc struct {
	*process
	cfgPath, logPath string
}

// startAgent runs the agent in the balancer namespace on a fresh pin path.
func (e *env) startAgent(c agentConfig) (*agentProc, error) {
	e.starts++
	cfgPath := filepath.Join(e.dir, "veloflux.yaml")
	if err := writeFileAtomic(cfgPath, e.agentYAML(c)); err != nil {
		return nil, err
	}
	stateDir := filepath.Join(e.dir, fmt.Sprintf("state-%d", e.starts))
	logPath := filepath.Join(e.dir, fmt.Sprintf("agent-%d.log", e.starts))
	// Not CommandContext: the agent is stopped with SIGTERM, never killed
	// outright unless it ignores that.
	cmd := e.lab.Balancer.Command(context.Background(), e.agentBin, "run", "--config", cfgPath,
		"--pin-path", e.pinPath, "--state-dir", stateDir, "--log-format", "text", "--log-level", "info")
	p, err := startProcess(e.tb, "veloflux agent", cmd, logPath)
	if err != nil {
		return nil, err
	}
	return &agentProc{process: p, cfgPath: cfgPath, logPath: logPath}, nil
}

// stopAgent stops the agent and removes its pins (the agent leaves the data
// path attached and pinned on SIGTERM by design), then checks that no XDP
// program is left on the balancer's veth.
func (e *env) stopAgent(a *agentProc) error {
	errs := []error{a.stop(), dataplane.RemovePins(e.pinPath)}
	errs = append(errs, e.checkNoXDP())
	return errors.Join(errs...)
}

// checkNoXDP waits up to 2 seconds for the balancer's veth to lose its XDP
// program: the kernel releases an unpinned link asynchronously.
func (e *env) checkNoXDP() error {
	deadline := time.Now().Add(2 * time.Second)
	for {
		var prog uint32
		err := e.lab.Balancer.Do(func() error {
			l, err := netlink.LinkByName(e.lab.Balancer.IfName)
			if err != nil {
				return err
			}
			if x := l.Attrs().Xdp; x != nil && x.Attached {
				prog = x.ProgId
			}
			return nil
		})
		if err != nil || prog == 0 {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("an XDP program (id %d) is still attached to %s 2s after the agent stopped and its pins were removed",
				prog, e.lab.Balancer.IfName)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startVeloFlux(ctx context.Context, e *env, url string) (func() error, int, error) {
	a, err := e.startAgent(agentConfig{vips: []netip.Addr{vfVIP}, weights: [3]int{1, 1, 1}})
	if err != nil {
		return nil, 0, err
	}
	stop := func() error { return e.stopAgent(a) }
	if err := e.waitAllBackends(ctx, url, a.process); err != nil {
		return nil, 0, errors.Join(fmt.Errorf("%w (agent log %s:\n%s)", err, a.logPath, logTail(a.logPath, 20)), stop())
	}
	// The agent's own CPU time (control plane: health checks, telemetry)
	// is accounted like HAProxy's; the XDP program's runs in softirq and
	// is charged to whatever it interrupted.
	return stop, a.pid(), nil
}

// ---- nftables ----

const (
	nftTable = "vfbench"
	// snatHost is the host byte of the balancer's second address, the
	// source of nftables' connections to the backends (10.X.0.3).
	snatHost = 3
)

func startNFT(ctx context.Context, e *env, url string) (func() error, int, error) {
	l := e.lab
	bal := l.Balancer
	ifc := bal.IfName
	// Forwarding on; no ICMP redirects, because the balancer sends every
	// forwarded packet out of the interface it came in on, to hosts of
	// the same segment.
	sysctls := [][2]string{
		{"net/ipv4/ip_forward", "1"},
		{"net/ipv4/conf/all/send_redirects", "0"},
		{"net/ipv4/conf/" + ifc + "/send_redirects", "0"},
	}
	restore, err := setSysctls(bal, sysctls)
	if err != nil {
		return nil, 0, err
	}
	// SNAT to an address of its own: the backends keep TIME_WAIT for 60s
	// on (backend:80, source:port), and HAProxy's connections from the
	// balancer's address must not collide with these (a SYN that meets a
	// TIME_WAIT socket with a newer timestamp stalls for a retransmit).
	snat := netip.AddrFrom4([4]byte{10, l.Subnet4.Addr().As4()[1], 0, snatHost})
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: snat.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	delAddr := func() error {
		return bal.Do(func() error {
			lk, err := netlink.LinkByName(ifc)
			if err != nil {
				return err
			}
			if err := netlink.AddrDel(lk, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return fmt.Errorf("remove %s from %s: %w", snat, ifc, err)
			}
			return nil
		})
	}
	if err := bal.Do(func() error {
		lk, err := netlink.LinkByName(ifc)
		if err != nil {
			return err
		}
		return netlink.AddrAdd(lk, addr)
	}); err != nil {
		return nil, 0, errors.Join(fmt.Errorf("add %s to %s: %w", snat, ifc, err), restore())
	}
	restoreSysctls := restore
	restore = func() error { return errors.Join(delAddr(), restoreSysctls()) }
	var backends []string
	var dmap []string
	for i, be := range l.Backends {
		backends = append(backends, be.Addr4.String())
		dmap = append(dmap, fmt.Sprintf("%d : %s", i, be.Addr4))
	}
	rules := fmt.Sprintf(`table ip %[1]s {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr %[2]s tcp dport 80 dnat to numgen inc mod %[3]d map { %[4]s }
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat ip daddr { %[5]s } tcp dport 80 snat to %[6]s
	}
}
`, nftTable, nftVIP, len(l.Backends), strings.Join(dmap, ", "), strings.Join(backends, ", "), snat)
	stop := func() error {
		out, err := bal.Command(context.Background(), "nft", "delete", "table", "ip", nftTable).CombinedOutput()
		var errs []error
		if err != nil {
			errs = append(errs, fmt.Errorf("nft delete table ip %s: %v: %s", nftTable, err, out))
		}
		return errors.Join(append(errs, restore())...)
	}
	e.tb.Cleanup(func() { // no-op when stop already ran: the table is gone
		bal.Command(context.Background(), "nft", "delete", "table", "ip", nftTable).Run()
	})
	cmd := bal.Command(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, 0, errors.Join(fmt.Errorf("nft -f: %v: %s\n%s", err, out, rules), stop())
	}
	if err := e.waitAllBackends(ctx, url, nil); err != nil {
		return nil, 0, errors.Join(err, stop())
	}
	return stop, 0, nil
}

// setSysctls writes sysctls in h's namespace and returns a function that
// puts the previous values back.
func setSysctls(h *lab.Host, kv [][2]string) (func() error, error) {
	var prev [][2]string
	restore := func() error {
		return h.Do(func() error {
			var errs []error
			for i := len(prev) - 1; i >= 0; i-- {
				errs = append(errs, os.WriteFile("/proc/sys/"+prev[i][0], []byte(prev[i][1]), 0o644))
			}
			return errors.Join(errs...)
		})
	}
	err := h.Do(func() error {
		for _, s := range kv {
			old, err := os.ReadFile("/proc/sys/" + s[0])
			if err != nil {
				return err
			}
			if err := os.WriteFile("/proc/sys/"+s[0], []byte(s[1]), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", s[0], s[1], err)
			}
			prev = append(prev, [2]string{s[0], strings.TrimSpace(string(old))})
		}
		return nil
	})
	if err != nil {
		return nil, errors.Join(err, restore())
	}
	return restore, nil
}

// ---- HAProxy ----

const (
	haproxyPort    = 80
	haproxyThreads = 1
	haproxyMaxconn = 4096
)

func startHAProxy(ctx context.Context, e *env, url string) (func() error, int, error) {
	l := e.lab
	var b strings.Builder
	fmt.Fprintf(&b, `# written by tests/bench
global
	nbthread %d
	maxconn %d

defaults
	mode tcp
	timeout connect 5s
	timeout client 30s
	timeout server 30s

frontend l4
	bind %s:%d
	maxconn %d
	default_backend web

backend web
	balance roundrobin
`, haproxyThreads, haproxyMaxconn, l.Balancer.Addr4, haproxyPort, haproxyMaxconn)
	for i, be := range l.Backends {
		fmt.Fprintf(&b, "\tserver b%d %s:%d\n", i, be.Addr4, lab.HTTPPort)
	}
	cfgPath := filepath.Join(e.dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(b.String()), 0o600); err != nil {
		return nil, 0, err
	}
	// -db: stay in the foreground, no master process.
	cmd := l.Balancer.Command(context.Background(), "haproxy", "-db", "-f", cfgPath)
	p, err := startProcess(e.tb, "haproxy", cmd, filepath.Join(e.dir, "haproxy.log"))
	if err != nil {
		return nil, 0, err
	}
	// An error only if haproxy had died before (its exit status on
	// SIGTERM is not looked at) or ignored SIGTERM.
	stop := p.stop
	if err := e.waitAllBackends(ctx, url, p); err != nil {
		return nil, 0, errors.Join(fmt.Errorf("%w (haproxy log:\n%s)", err, logTail(filepath.Join(e.dir, "haproxy.log"), 20)), stop())
	}
	return stop, p.pid(), nil
}

// ---- shared ----

// waitAllBackends waits until url answers from the client namespace and
// every backend has answered through it, each request on a new connection.
// proc, if not nil, must keep running meanwhile.
func (e *env) waitAllBackends(ctx context.Context, url string, proc *process) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DisableKeepAlives: true, DialContext: e.lab.Client.DialContext}}
	seen := map[string]bool{}
	var lastErr error
	for tries := 0; ; tries++ {
		if proc != nil && proc.exited() {
			return fmt.Errorf("%s exited: %v", proc.name, proc.err)
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err == nil {
			body, rerr := io.ReadAll(io.LimitReader(resp.Body, 256))
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				seen[strings.TrimSpace(string(body))] = true
				if len(seen) == len(e.lab.Backends) {
					return nil
				}
			} else {
				err = fmt.Errorf("status %d, read: %v", resp.StatusCode, rerr)
			}
		}
		if err != nil {
			lastErr = err
			select {
			case <-ctx.Done():
				return fmt.Errorf("%s: not every backend answered (saw %v; last error: %v)", url, keys(seen), lastErr)
			case <-time.After(50 * time.Millisecond):
			}
		} else if ctx.Err() != nil || tries > 300 {
			return fmt.Errorf("%s: not every backend answered (saw %v in %d tries)", url, keys(seen), tries)
		}
	}
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
