package live

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

// Where the agent listens, inside the balancer namespace.
const (
	apiAddr     = "127.0.0.1:9090"
	metricsAddr = "127.0.0.1:8080"
	apiBase     = "http://" + apiAddr
	metricsURL  = "http://" + metricsAddr + "/metrics"
)

// python is Debian's interpreter, the one that sees python3-websockets.
const python = "/usr/bin/python3"

// ---------------------------------------------------------------------------
// The binary, built once per run (tests/agenttest)

func TestMain(m *testing.M) { agenttest.Main(m) }

// binaryEnv names a prebuilt veloflux binary to test instead of building
// ./cmd/veloflux from this checkout.
const binaryEnv = "VELOFLUX_LIVE_BINARY"

// ---------------------------------------------------------------------------
// The environment: a lab with its servers, a private bpffs, the agent

type env struct {
	tb      testing.TB
	lab     *lab.Lab
	bin     string
	dir     string
	pin     string // --pin-path, on a private bpffs
	state   string // --state-dir
	cfg     string // --config
	args    []string
	agent   *agenttest.Process // the last one started
	started int                // agents started so far, to name them
	api     *http.Client       // through the balancer namespace
}

// newEnv builds a lab with 3 backends (servers running) and the given VIPs
// and mounts a private bpffs. Nothing runs yet.
func newEnv(tb testing.TB, vips ...netip.Addr) *env {
	tb.Helper()
	base := agenttest.NewEnv(tb, lab.Options{Backends: 3, VIPs: vips}, binaryEnv)
	e := &env{tb: tb, lab: base.Lab, bin: base.Bin, dir: base.Dir, pin: base.Pin, state: base.State, cfg: base.Cfg}
	tr := &http.Transport{DialContext: e.lab.Balancer.DialContext, MaxIdleConnsPerHost: 8}
	e.api = &http.Client{Transport: tr, Timeout: 20 * time.Second}
	tb.Cleanup(tr.CloseIdleConnections) // idle sockets would keep the namespace alive
	return e
}

func (e *env) tokenFile() string { return filepath.Join(e.state, "api.token") }

// writeConfig replaces the configuration file in one rename.
func (e *env) writeConfig(text string) {
	e.tb.Helper()
	agenttest.WriteFileAtomic(e.tb, e.cfg, text)
}

// configHead is the part of every configuration before pools and VIPs.
func (e *env) configHead(extraDataplane ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node:\n  name: live-%s\n", e.lab.Prefix)
	fmt.Fprintf(&b, "dataplane:\n  interfaces: [%s]\n  xdp_mode: native\n  conntrack_size: 65536\n", e.lab.Balancer.IfName)
	for _, l := range extraDataplane {
		fmt.Fprintf(&b, "  %s\n", l)
	}
	fmt.Fprintf(&b, "api:\n  listen: %q\n  token_file: %s\n", ":9090", e.tokenFile())
	fmt.Fprintf(&b, "metrics:\n  listen: %q\n", ":8080")
	return b.String()
}

// startAgent runs the agent in the balancer namespace and waits until
// /health answers 200 and the token file exists. tb fails the caller (it
// may be a subtest); the agent's log and its stop in Cleanup belong to the
// environment's test, so a restarted agent outlives the subtest.
func (e *env) startAgent(tb testing.TB, extraArgs ...string) *agenttest.Process {
	tb.Helper()
	e.started++
	name := fmt.Sprintf("agent#%d", e.started)
	args := append([]string{"--config", e.cfg, "--pin-path", e.pin, "--state-dir", e.state, "--log-format", "text"},
		extraArgs...)
	e.args = extraArgs
	a, err := agenttest.Start(e.tb, name, e.lab.Balancer.Command(context.Background(), e.bin, args...))
	if err != nil {
		tb.Fatalf("start %s: %v", name, err)
	}
	e.agent = a
	e.waitReady(tb, a, 30*time.Second)
	return a
}

// waitReady polls /health until 200.
func (e *env) waitReady(tb testing.TB, a *agenttest.Process, timeout time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		if a.Exited() {
			tb.Fatalf("%s exited (%v) before /health answered 200", a.Name, a.Err())
		}
		code, body, err := e.call(http.MethodGet, "/health", nil, false)
		if err == nil && code == http.StatusOK {
			if _, err := os.Stat(e.tokenFile()); err == nil {
				return
			}
		}
		last = fmt.Sprintf("%d %s %v", code, body, err)
		time.Sleep(100 * time.Millisecond)
	}
	tb.Fatalf("%s: /health not 200 within %s (last: %s)", a.Name, timeout, last)
}

// restartAgent stops the agent with SIGTERM (it must exit 0) and starts it
// again with the same configuration, pin path, state and arguments.
func (e *env) restartAgent(tb testing.TB) {
	tb.Helper()
	if code := e.agent.Stop(); code != 0 {
		tb.Fatalf("%s exited with %d after SIGTERM", e.agent.Name, code)
	}
	e.startAgent(tb, e.args...)
}

func (e *env) token(tb testing.TB) string {
	tb.Helper()
	b, err := os.ReadFile(e.tokenFile())
	if err != nil {
		tb.Fatalf("read the API token: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// call makes one API request; body may be nil, a string or any JSON value.
func (e *env) call(method, path string, body any, auth bool) (int, []byte, error) {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, apiBase+path, rd)
	if err != nil {
		return 0, nil, err
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if auth {
		b, err := os.ReadFile(e.tokenFile())
		if err != nil {
			return 0, nil, err
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(b)))
	}
	resp, err := e.api.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return resp.StatusCode, data, err
}

// mustCall is call that fails the test on a transport error or an
// unexpected status, and decodes the JSON answer into out (when not nil).
func (e *env) mustCall(tb testing.TB, method, path string, body any, auth bool, want int, out any) []byte {
	tb.Helper()
	code, data, err := e.call(method, path, body, auth)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, path, err)
	}
	if code != want {
		tb.Fatalf("%s %s: status %d, want %d: %s", method, path, code, want, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			tb.Fatalf("%s %s: decode %s: %v", method, path, data, err)
		}
	}
	return data
}

// dialWS opens a WebSocket on channel from inside the balancer namespace.
func (e *env) dialWS(ctx context.Context, channel string) (*websocket.Conn, error) {
	d := websocket.Dialer{NetDialContext: e.lab.Balancer.DialContext, HandshakeTimeout: 10 * time.Second}
	c, resp, err := d.DialContext(ctx, "ws://"+apiAddr+"/api/ws/"+channel, nil)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	return c, err
}

// ---------------------------------------------------------------------------
// The agent process

// procStat reads a process's CPU time (utime+stime) and resident set.
type procSample struct {
	at      time.Time
	cpu     time.Duration // utime + stime
	rss     int64         // bytes, VmRSS
	hwm     int64         // bytes, VmHWM
	threads int
}

// clockTick is USER_HZ, 100 on every Linux architecture Go supports.
const clockTick = 100

func readProc(pid int) (procSample, error) {
	s := procSample{at: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name may hold spaces: fields count from after its ")".
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state); utime is field 14, stime 15.
	if len(f) < 13 {
		return s, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return s, err
	}
	s.cpu = time.Duration(ut+st) * time.Second / clockTick
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fs[0], 10, 64)
		switch k {
		case "VmRSS":
			s.rss = n << 10
		case "VmHWM":
			s.hwm = n << 10
		case "Threads":
			s.threads = int(n)
		}
	}
	return s, nil
}

// ---------------------------------------------------------------------------
// Background traffic: HTTP GETs through the VIP, each on a new connection

type traffic struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	per        map[string]int // answers per backend
	errs       []string       // the first few failures
	stop       context.CancelFunc
	done       chan struct{}
}

// startTraffic sends rate requests a second to url from the client
// namespace, each on its own connection (a new flow for the balancer), for
// at most maxDur. It waits until the first answer before counting.
func startTraffic(tb testing.TB, client *lab.Host, url string, rate int, maxDur time.Duration) *traffic {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), maxDur)
	tr := &traffic{per: map[string]int{}, stop: cancel, done: make(chan struct{})}
	hc := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{DialContext: client.DialContext, DisableKeepAlives: true},
	}
	get := func() (string, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 256))
		if err != nil {
			return "", err
		}
		if resp.StatusCode != http.StatusOK || !strings.HasPrefix(string(body), "backend-") {
			return "", fmt.Errorf("status %d, body %q", resp.StatusCode, body)
		}
		return strings.TrimSpace(string(body)), nil
	}
	// Readiness, synchronously: the backends are up once their checks rise.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := get(); err == nil {
			break
		} else if time.Now().After(deadline) {
			cancel()
			tb.Fatalf("%s does not answer within 20s: %v", url, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	go func() {
		defer close(tr.done)
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			name, err := get()
			if ctx.Err() != nil {
				return // stopped mid-request: not the balancer's failure
			}
			tr.mu.Lock()
			if err != nil {
				tr.failed.Add(1)
				if len(tr.errs) < 5 {
					tr.errs = append(tr.errs, err.Error())
				}
			} else {
				tr.ok.Add(1)
				tr.per[name]++
			}
			tr.mu.Unlock()
		}
	}()
	tb.Cleanup(tr.finish)
	return tr
}

func (tr *traffic) finish() {
	tr.stop()
	<-tr.done
}

func (tr *traffic) String() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	s := fmt.Sprintf("%d answered, %d failed; per backend %v", tr.ok.Load(), tr.failed.Load(), tr.per)
	if len(tr.errs) > 0 {
		s += "; first failures: " + strings.Join(tr.errs, " | ")
	}
	return s
}

// ---------------------------------------------------------------------------
// UDP through a VIP

// udpRoundTrips sends n datagrams to dst from `sockets` fresh sockets in
// the client namespace, one at a time, each answered by the backends' echo
// before the next (so no queue anywhere overflows). It returns how many
// datagrams it wrote, retries included.
func udpRoundTrips(h *lab.Host, dst netip.AddrPort, n, sockets int) (int, error) {
	sent := 0
	buf := make([]byte, 2048)
	for s := range sockets {
		pc, err := h.ListenPacket(context.Background(), "udp4", "0.0.0.0:0")
		if err != nil {
			return sent, err
		}
		for i := s; i < n; i += sockets {
			msg := fmt.Sprintf("live datagram %d", i)
			var lastErr error
			got := false
			for try := 0; try < 3 && !got; try++ {
				if _, err := pc.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(dst)); err != nil {
					pc.Close()
					return sent, err
				}
				sent++
				pc.SetReadDeadline(time.Now().Add(time.Second))
				for {
					m, _, err := pc.ReadFrom(buf)
					if err != nil {
						lastErr = err
						break
					}
					if string(buf[:m]) == msg {
						got = true
						break
					}
				}
			}
			if !got {
				pc.Close()
				return sent, fmt.Errorf("no echo of %q from %s: %v", msg, dst, lastErr)
			}
		}
		pc.Close()
	}
	return sent, nil
}
