package browser

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
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	cdpruntime "github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"

	"github.com/veloflux/veloflux/tests/testenv"
)

// The VIP is in a documentation range: it exists only on the lab's backends'
// loopbacks and in the client namespace's routes.
var vip = netip.MustParseAddr("198.51.100.10")

// Health checks short enough that a verdict changes within a second or two.
const (
	checkInterval = 500 * time.Millisecond
	checkTimeout  = 200 * time.Millisecond
	checkRise     = 1
	checkFall     = 2
	poolName      = "web"
)

// channels are the agent's seven WebSocket channels.
var channels = []string{"backends", "metrics", "status", "health", "security", "billing", "ai"}

// TestMain removes the agent binary that TestDashboard builds.
func TestMain(m *testing.M) { agenttest.Main(m) }

func TestDashboard(t *testing.T) {
	testenv.RequireRoot(t, "build network namespaces")
	chromium := requireChromium(t)
	began := time.Now()
	root, err := agenttest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	artifacts := filepath.Join(root, "tests", "artifacts")
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := agenttest.BuildAgent(t, "") // no override: always this checkout

	l := lab.ForTest(t, lab.Options{Backends: 3, VIPs: []netip.Addr{vip}, BalancerInRoot: true})
	if err := l.StartBackendServers(t.Context()); err != nil {
		t.Fatalf("start backend servers: %v", err)
	}
	ag := newAgent(t, l, bin)
	ag.start()
	ag.waitReady()
	backendIDs := make([]string, len(l.Backends))
	for i, b := range l.Backends {
		backendIDs[i] = fmt.Sprintf("%s:%s:%d", poolName, b.Addr4, lab.HTTPPort)
	}
	eventually(t, 15*time.Second, "every backend healthy (API)", func() (bool, string) {
		states := ag.backendStates()
		return len(states) == 3 && states[backendIDs[0]] == "up" && states[backendIDs[1]] == "up" &&
			states[backendIDs[2]] == "up", fmt.Sprint(states)
	})
	vipKey := ag.vipKey()

	tr := startTraffic(t, l.Client, vip)
	eventually(t, 10*time.Second, "traffic through the VIP", func() (bool, string) {
		ok, failed := tr.counts()
		return ok > 0, fmt.Sprintf("%d answered, %d failed", ok, failed)
	})

	p := newPage(t, chromium, ag.base)

	// ---- Landing page
	p.setViewport(1280, 900, false)
	p.navigate("/")
	p.waitJS(10*time.Second, "landing page shows the node's live status",
		fmt.Sprintf(`document.querySelector('#landing-status [data-field="node"]').textContent === %q &&
			document.querySelector('#status-socket').dataset.state === "connected" &&
			document.querySelector('#landing-status [data-field="status"]').dataset.state === "ok"`, ag.node))
	links := evalJS[map[string]string](p, `({
		dashboard: document.querySelector("#open-dashboard").href,
		openapi: document.querySelector("#openapi-link").href,
		metrics: document.querySelector("#metrics-link").href})`)
	wantMetrics := "http://127.0.0.1:" + ag.metricsPort + "/metrics"
	if links["dashboard"] != ag.base+"/dashboard" || links["openapi"] != ag.base+"/api/openapi.json" {
		t.Errorf("landing links = %v", links)
	}
	// The metrics link is built from metrics.listen, so it may lag the page
	// by one GET /api/config.
	p.waitJS(5*time.Second, "metrics link", fmt.Sprintf(`document.querySelector("#metrics-link").href === %q`, wantMetrics))
	if body := ag.getRaw(wantMetrics); !strings.Contains(body, "# TYPE") {
		t.Errorf("the landing page's metrics link %s does not serve Prometheus metrics: %.200q", wantMetrics, body)
	}
	p.screenshot(filepath.Join(artifacts, "landing-1280.png"))
	p.setViewport(390, 844, true)
	p.screenshot(filepath.Join(artifacts, "landing-390.png"))
	p.setViewport(1280, 900, false)

	// ---- Dashboard: sockets
	p.navigate("/dashboard")
	p.waitJS(15*time.Second, "all seven channels connected", `(() => {
		const pills = [...document.querySelectorAll('#sockets [data-channel]')];
		return pills.length === 7 && pills.every(p => p.dataset.state === "connected") &&
			document.querySelector('#sockets-summary').dataset.connected === "7";
	})()`)
	got := evalJS[[]string](p, `[...document.querySelectorAll('#sockets [data-channel][data-state="connected"]')].map(p => p.dataset.channel).sort()`)
	if want := slices.Sorted(slices.Values(channels)); !slices.Equal(got, want) {
		t.Errorf("connected channels = %v, want %v", got, want)
	}
	p.waitJS(10*time.Second, "header shows the node, version and attached data plane", fmt.Sprintf(
		`document.querySelector('#node-name').textContent === %q && document.querySelector('#dataplane').dataset.attached === "true" &&
		 document.querySelector('#dataplane').textContent.includes(%q) && document.querySelector('#config-gen').textContent !== "—"`,
		ag.node, l.Balancer.IfName))

	// ---- Packets/s follows the traffic
	ppsID := "vip-pps-" + domID(vipKey)
	pps := func() float64 {
		return evalJS[float64](p, fmt.Sprintf(`Number(document.getElementById(%q)?.dataset.value ?? -1)`, ppsID))
	}
	waitPPS := func(what string, timeout time.Duration, ok func(float64) bool) {
		t.Helper()
		eventually(t, timeout, what, func() (bool, string) {
			v := pps()
			return ok(v), fmt.Sprintf("#%s = %v", ppsID, v)
		})
	}
	waitPPS("packets/s non-zero with traffic", 10*time.Second, func(v float64) bool { return v > 0 })
	tr.pause()
	waitPPS("packets/s back to 0 once the traffic stops", 6*time.Second, func(v float64) bool { return v == 0 })
	tr.resume()
	waitPPS("packets/s non-zero again when the traffic resumes", 6*time.Second, func(v float64) bool { return v > 0 })
	if n := evalJS[int](p, `document.querySelector('#chart-pps canvas') ? 1 : 0`); n != 1 {
		t.Error("no packets/s chart drawn")
	}
	p.waitJS(3*time.Second, "L7 panel says the proxy is not running",
		`document.querySelector('#l7-panel').dataset.state === "absent" && document.querySelector('#l7-absent').offsetParent !== null`)

	// ---- Backends
	rowState := func(id string) string {
		return evalJS[string](p, fmt.Sprintf(`document.querySelector('tr[data-backend-id=%q]')?.dataset.state ?? "missing"`, id))
	}
	eventually(t, 10*time.Second, "the backend table lists every lab backend as up", func() (bool, string) {
		var states []string
		for _, id := range backendIDs {
			states = append(states, id+"="+rowState(id))
		}
		rows := evalJS[int](p, `document.querySelectorAll('#pools tr[data-backend-id]').length`)
		return rows == 3 && !slices.ContainsFunc(states, func(s string) bool { return !strings.HasSuffix(s, "=up") }),
			fmt.Sprintf("%d rows: %v", rows, states)
	})

	// A stopped backend turns down within fall × interval (plus the timeout,
	// one backend_update tick and a margin).
	downWithin := checkFall*checkInterval + checkTimeout + time.Second + 2*time.Second
	stopped := backendIDs[2]
	transitions := func(id string) int {
		return evalJS[int](p, fmt.Sprintf(`Number(document.querySelector('tr[data-backend-id=%q]').dataset.transitions)`, id))
	}
	before := transitions(stopped)
	stopAt := time.Now()
	if err := l.StopBackend(2); err != nil {
		t.Fatal(err)
	}
	eventually(t, downWithin, "the stopped backend's row turns down", func() (bool, string) {
		s := rowState(stopped)
		return s == "down", s
	})
	t.Logf("backend %s shown down %s after its server stopped (limit %s)", stopped, time.Since(stopAt).Round(10*time.Millisecond), downWithin)
	if after := transitions(stopped); after <= before {
		t.Errorf("row %s did not flash on its transition (transitions %d → %d)", stopped, before, after)
	}

	// ---- Actions: a wrong token shows the API's 401 message and changes
	// nothing; the right one drains.
	drained := backendIDs[0]
	drainBtn := fmt.Sprintf(`tr[data-backend-id=%q] button[data-action="drain"]`, drained)
	undrainBtn := fmt.Sprintf(`tr[data-backend-id=%q] button[data-action="undrain"]`, drained)
	p.typeToken("wrong-token-" + strings.Repeat("0", 20))
	p.click(drainBtn)
	p.waitToast("error", "wrong bearer token")
	if s := ag.backendStates()[drained]; s != "up" {
		t.Errorf("after a drain with a wrong token, GET /api/backends says %s is %q, want up", drained, s)
	}
	p.typeToken(ag.token)
	if v := evalJS[string](p, `sessionStorage.getItem("veloflux.apiToken")`); v != ag.token {
		t.Errorf("sessionStorage holds %q, want the token", v)
	}
	p.click(drainBtn)
	eventually(t, 5*time.Second, "the drained row shows draining", func() (bool, string) {
		s := rowState(drained)
		return s == "draining", s
	})
	if s := ag.backendStates()[drained]; s != "draining" {
		t.Errorf("after the UI drained %s, GET /api/backends says %q, want draining", drained, s)
	}
	p.waitJS(3*time.Second, "drain button turned into undrain", fmt.Sprintf(`!!document.querySelector(%q)`, undrainBtn))

	// Away from the plot, a chart's legend shows the newest value.
	p.waitJS(3*time.Second, "packets/s legend shows the latest rate",
		`[...document.querySelectorAll('#chart-pps .u-legend .u-value')].some(v => v.textContent.endsWith("pkt/s") && !v.textContent.startsWith("0 "))`)
	// The light theme redraws the charts; back to dark for the screenshots.
	p.click("#theme-toggle")
	p.waitJS(3*time.Second, "light theme", `document.documentElement.dataset.theme === "light" && !!document.querySelector('#chart-pps canvas')`)
	p.screenshot(filepath.Join(artifacts, "dashboard-1280-light.png"))
	p.click("#theme-toggle")
	p.waitJS(3*time.Second, "dark theme", `document.documentElement.dataset.theme === "dark"`)

	// ---- Screenshots at desktop and phone width (one backend down, one
	// draining, traffic flowing), notices dismissed.
	for evalJS[int](p, `document.querySelectorAll('#toasts .toast').length`) > 0 {
		p.click("#toasts .toast button")
	}
	time.Sleep(2 * time.Second) // a couple more chart samples
	p.screenshot(filepath.Join(artifacts, "dashboard-1280.png"))
	p.setViewport(390, 844, true)
	time.Sleep(1500 * time.Millisecond) // charts follow their container's width
	if w := evalJS[map[string]float64](p, `({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})`); w["scroll"] > w["inner"]+1 {
		t.Errorf("at 390 px the page is %v px wide: it scrolls sideways", w["scroll"])
	}
	p.screenshot(filepath.Join(artifacts, "dashboard-390.png"))
	p.setViewport(1280, 900, false)

	// ---- More actions: undrain, weight, denylist (with an API error).
	p.click(undrainBtn)
	eventually(t, 5*time.Second, "the undrained row shows up", func() (bool, string) {
		s := rowState(drained)
		return s == "up" && ag.backendStates()[drained] == "up", s
	})
	weightInput := fmt.Sprintf(`tr[data-backend-id=%q] input[data-field="weight"]`, backendIDs[1])
	p.retype(weightInput, "3")
	p.click(fmt.Sprintf(`tr[data-backend-id=%q] button[data-action="weight"]`, backendIDs[1]))
	p.waitToast("ok", "Weight of "+backendIDs[1])
	if w := ag.weightOf(l.Backends[1].Addr4.String()); w != 3 {
		t.Errorf("after setting weight 3 in the UI, GET /api/pools/web/backends has weight %d", w)
	}
	p.sendKeys("#deny-prefix", "not-a-prefix")
	p.click("#deny-add")
	p.waitToast("error", `invalid CIDR "not-a-prefix"`)
	const denied = "192.0.2.0/24"
	p.retype("#deny-prefix", denied)
	p.click("#deny-add")
	p.waitJS(5*time.Second, "denied prefix listed", fmt.Sprintf(`!!document.querySelector('#denylist li[data-prefix=%q]')`, denied))
	if list := ag.denylist(); !slices.Contains(list, denied) {
		t.Errorf("GET /api/security/denylist = %v, want %s in it", list, denied)
	}
	p.click(fmt.Sprintf(`#denylist li[data-prefix=%q] button`, denied))
	p.waitJS(5*time.Second, "lifted prefix gone", fmt.Sprintf(`!document.querySelector('#denylist li[data-prefix=%q]')`, denied))
	if list := ag.denylist(); slices.Contains(list, denied) {
		t.Errorf("GET /api/security/denylist = %v after lifting %s in the UI", list, denied)
	}
	// The failed authentication above is a security event.
	p.waitJS(5*time.Second, "auth failure in the security feed", `!!document.querySelector('#security-feed li[data-kind="auth_failure"][data-severity="warning"]')`)

	// ---- Every socket reconnects on its own when the agent comes back.
	ag.stop()
	p.waitJS(10*time.Second, "channels lose their connection with the agent",
		`[...document.querySelectorAll('#sockets [data-channel]')].every(p => p.dataset.state !== "connected")`)
	ag.start()
	ag.waitReady()
	p.waitJS(30*time.Second, "all seven channels reconnected", `document.querySelector('#sockets-summary').dataset.connected === "7"`)
	waitPPS("packets/s flowing after the reconnect", 10*time.Second, func(v float64) bool { return v > 0 })

	// ---- Nothing left the agent's origin, and the pages threw nothing.
	p.check()

	// ---- The L7 panel once metrics carry data.l7. The agent does not send
	// it yet, so two synthetic updates shaped like agent/proxy.Stats go to
	// the page's own module, in one synchronous evaluation (no real update
	// can interleave). Last step: it leaves the page's charts in the future.
	l7 := evalJS[map[string]string](p, `import("/assets/js/traffic.js").then(m => {
		const at = (s) => new Date(Date.now() + 3600e3 + s * 1000).toISOString();
		const base = {vips: [], xdp_verdicts_per_s: {}, drops_per_s: {}, drops: {}};
		m.onMetrics({...base, at: at(0), l7: {requests: 100, latency_p99_seconds: 0.012}});
		m.onMetrics({...base, at: at(1), l7: {requests: 150, latency_p99_seconds: 0.015}});
		return {state: document.querySelector("#l7-panel").dataset.state,
			rps: document.querySelector("#chart-l7-rps").dataset.empty,
			p99: document.querySelector("#chart-l7-p99").dataset.empty,
			note: document.querySelector("#l7-note").textContent};
	})`, chromedp.EvalAwaitPromise)
	if l7["state"] != "present" || l7["rps"] != "false" || l7["p99"] != "false" || l7["note"] != "" {
		t.Errorf("with data.l7 the L7 panel shows %v, want charts for requests/s and p99", l7)
	}
	ok, failed := tr.counts()
	t.Logf("client traffic: %d answered, %d failed; test body took %s", ok, failed, time.Since(began).Round(100*time.Millisecond))
}

// ---------------------------------------------------------------------------
// Environment

func requireChromium(t *testing.T) string {
	t.Helper()
	path := os.Getenv("VELOFLUX_CHROMIUM")
	if path == "" {
		path = "/usr/bin/chromium"
	}
	if _, err := os.Stat(path); err == nil {
		return path
	}
	testenv.SkipOrFail(t, fmt.Sprintf("no Chromium at %s (apt-get install chromium, or set VELOFLUX_CHROMIUM)", path))
	return ""
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// eventually polls f every 200 ms until it reports true, failing the test
// with f's last detail after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, f func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := f()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s (last: %s)", what, timeout, detail)
		}
		select {
		case <-t.Context().Done():
			t.Fatalf("%s: %v", what, t.Context().Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// domID is the dashboard's id-safe form of a string (live.js domId).
func domID(s string) string {
	var b strings.Builder
	dash := false
	for _, r := range s {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' {
			b.WriteRune(r)
			dash = false
		} else if !dash {
			b.WriteByte('-')
			dash = true
		}
	}
	return strings.Trim(b.String(), "-")
}

// ---------------------------------------------------------------------------
// The agent

type agent struct {
	t                    *testing.T
	bin, cfg, pin, state string
	base, node, token    string
	metricsPort          string
	http                 *http.Client
	cmd                  *exec.Cmd
	done                 chan struct{}
	runs                 int
	logMu                sync.Mutex
	logOpen              bool
}

func newAgent(t *testing.T, l *lab.Lab, bin string) *agent {
	t.Helper()
	dir := t.TempDir()
	// A private bpffs: pins never reach the host's. Mounted after
	// t.TempDir, so it is unmounted before the directory is removed.
	pin := agenttest.MountBPFFS(t, dir)
	a := &agent{t: t, bin: bin, pin: pin, state: filepath.Join(dir, "state"),
		cfg: filepath.Join(dir, "veloflux.yaml"), node: "browser-" + l.Prefix, metricsPort: freePort(t),
		http: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}}
	apiPort := freePort(t)
	a.base = "http://127.0.0.1:" + apiPort
	// Our own token, so the test knows it without reading the agent's file.
	a.token = fmt.Sprintf("%x", time.Now().UnixNano()) + strings.Repeat("7", 24)
	tokenFile := filepath.Join(dir, "api.token")
	if err := os.WriteFile(tokenFile, []byte(a.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "node:\n  name: %s\n", a.node)
	fmt.Fprintf(&cfg, "dataplane:\n  interfaces: [%s]\n  xdp_mode: native\n  conntrack_size: 65536\n", l.Balancer.IfName)
	fmt.Fprintf(&cfg, "api:\n  listen: 127.0.0.1:%s\n  token_file: %s\n", apiPort, tokenFile)
	fmt.Fprintf(&cfg, "metrics:\n  listen: 127.0.0.1:%s\n", a.metricsPort)
	fmt.Fprintf(&cfg, "pools:\n  - name: %s\n    backends:\n", poolName)
	for _, b := range l.Backends {
		fmt.Fprintf(&cfg, "      - {address: %q, port: %d}\n", b.Addr4.String(), lab.HTTPPort)
	}
	fmt.Fprintf(&cfg, "    health_check: {type: http, path: /healthz, interval: %s, timeout: %s, rise: %d, fall: %d}\n",
		checkInterval, checkTimeout, checkRise, checkFall)
	fmt.Fprintf(&cfg, "vips:\n  - {address: %q, port: %d, protocol: tcp, mode: dsr, pool: %s}\n", vip.String(), lab.HTTPPort, poolName)
	if err := os.WriteFile(a.cfg, []byte(cfg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.stop()
		a.logMu.Lock()
		a.logOpen = false
		a.logMu.Unlock()
	})
	return a
}

// Write copies the agent's output to the test log, line by line.
func (a *agent) Write(p []byte) (int, error) {
	a.logMu.Lock()
	defer a.logMu.Unlock()
	if a.logOpen {
		for line := range strings.Lines(string(p)) {
			a.t.Logf("agent#%d: %s", a.runs, strings.TrimRight(line, "\n"))
		}
	}
	return len(p), nil
}

func (a *agent) start() {
	a.t.Helper()
	a.runs++
	a.logMu.Lock()
	a.logOpen = true
	a.logMu.Unlock()
	// Not tied to the test's context: the test decides when it stops.
	a.cmd = exec.Command(a.bin, "--config", a.cfg, "--pin-path", a.pin, "--state-dir", a.state,
		"--log-format", "text", "--log-level", "warn")
	a.cmd.Stdout, a.cmd.Stderr = a, a
	a.cmd.WaitDelay = 5 * time.Second
	if err := a.cmd.Start(); err != nil {
		a.t.Fatalf("start the agent: %v", err)
	}
	a.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) {
		cmd.Wait()
		close(done)
	}(a.cmd, a.done)
}

// stop sends SIGTERM and waits (SIGKILL after 15 s); a no-op when stopped.
func (a *agent) stop() {
	if a.cmd == nil {
		return
	}
	select {
	case <-a.done:
	default:
		a.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.done:
		case <-time.After(15 * time.Second):
			a.t.Errorf("agent: no exit 15s after SIGTERM; killing it")
			a.cmd.Process.Kill()
			<-a.done
		}
	}
	a.cmd = nil
}

// waitReady waits until /health says the data plane is attached.
func (a *agent) waitReady() {
	a.t.Helper()
	eventually(a.t, 20*time.Second, "agent up with the data plane attached", func() (bool, string) {
		select {
		case <-a.done:
			a.t.Fatalf("the agent exited: %v", a.cmd.ProcessState)
		default:
		}
		resp, err := a.http.Get(a.base + "/health")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
}

// do calls the API; v (if not nil) receives the JSON answer.
func (a *agent) do(method, path string, v any) error {
	req, err := http.NewRequestWithContext(a.t.Context(), method, a.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(body))
	}
	if v != nil {
		return json.Unmarshal(body, v)
	}
	return nil
}

func (a *agent) get(path string, v any) {
	a.t.Helper()
	if err := a.do(http.MethodGet, path, v); err != nil {
		a.t.Fatal(err)
	}
}

func (a *agent) getRaw(u string) string {
	a.t.Helper()
	resp, err := a.http.Get(u)
	if err != nil {
		a.t.Errorf("GET %s: %v", u, err)
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return string(b)
}

// backendStates is GET /api/backends as id → state.
func (a *agent) backendStates() map[string]string {
	a.t.Helper()
	var list []struct{ ID, State string }
	a.get("/api/backends", &list)
	out := map[string]string{}
	for _, b := range list {
		out[b.ID] = b.State
	}
	return out
}

// vipKey is the metrics' name of the lab VIP ("198.51.100.10:80/tcp").
func (a *agent) vipKey() string {
	a.t.Helper()
	var m struct {
		VIPs []struct{ VIP, Address string }
	}
	eventually(a.t, 10*time.Second, "the VIP in GET /api/metrics", func() (bool, string) {
		a.get("/api/metrics", &m)
		return len(m.VIPs) == 1 && m.VIPs[0].Address == vip.String(), fmt.Sprint(m.VIPs)
	})
	return m.VIPs[0].VIP
}

func (a *agent) weightOf(addr string) int {
	a.t.Helper()
	var list []struct {
		Address string
		Weight  *int
	}
	a.get("/api/pools/"+poolName+"/backends", &list)
	for _, b := range list {
		if b.Address == addr {
			if b.Weight == nil {
				return 1
			}
			return *b.Weight
		}
	}
	return -1
}

func (a *agent) denylist() []string {
	a.t.Helper()
	var d struct{ Prefixes []string }
	a.get("/api/security/denylist", &d)
	return d.Prefixes
}

// ---------------------------------------------------------------------------
// Client traffic: HTTP requests to the VIP from the client namespace, each
// on a new connection (a new flow), 10 a second, until paused, for at most
// trafficMaxFor or trafficMaxRequests.

const (
	trafficEvery       = 100 * time.Millisecond
	trafficMaxFor      = 4 * time.Minute
	trafficMaxRequests = 2400
)

type traffic struct {
	on         atomic.Bool
	ok, failed atomic.Int64
	cancel     context.CancelFunc
	done       chan struct{}
}

func startTraffic(t *testing.T, client *lab.Host, addr netip.Addr) *traffic {
	ctx, cancel := context.WithTimeout(t.Context(), trafficMaxFor)
	tr := &traffic{cancel: cancel, done: make(chan struct{})}
	tr.on.Store(true)
	transport := &http.Transport{DialContext: client.DialContext, DisableKeepAlives: true, Proxy: nil}
	hc := &http.Client{Timeout: time.Second, Transport: transport}
	target := "http://" + netip.AddrPortFrom(addr, lab.HTTPPort).String() + "/"
	go func() {
		defer close(tr.done)
		defer transport.CloseIdleConnections()
		tick := time.NewTicker(trafficEvery)
		defer tick.Stop()
		for sent := 0; sent < trafficMaxRequests; {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if !tr.on.Load() {
				continue
			}
			sent++
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
			resp, err := hc.Do(req)
			if err != nil {
				tr.failed.Add(1)
				continue
			}
			io.Copy(io.Discard, io.LimitReader(resp.Body, 1024))
			resp.Body.Close()
			tr.ok.Add(1)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-tr.done
	})
	return tr
}

func (tr *traffic) pause()  { tr.on.Store(false) }
func (tr *traffic) resume() { tr.on.Store(true) }
func (tr *traffic) counts() (int64, int64) {
	return tr.ok.Load(), tr.failed.Load()
}

// ---------------------------------------------------------------------------
// The browser

type page struct {
	t      *testing.T
	ctx    context.Context
	base   *url.URL
	output *syncBuffer

	mu       sync.Mutex
	requests int
	sockets  map[string]bool // WebSocket URLs opened
	foreign  []string        // requests outside the agent's origin
	errs     []string        // exceptions, console errors, non-network log errors
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 1<<20 {
		return len(p), nil
	}
	return s.b.Write(p)
}

func newPage(t *testing.T, chromium, base string) *page {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	p := &page{t: t, base: u, sockets: map[string]bool{}, output: &syncBuffer{}}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox, // root
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("no-proxy-server", true),
		chromedp.WindowSize(1280, 900),
		chromedp.CombinedOutput(p.output),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(t.Context(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx, chromedp.WithListener(p.listen))
	p.ctx = ctx
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
		if t.Failed() {
			p.output.mu.Lock()
			var keep []string
			for line := range strings.Lines(p.output.b.String()) {
				if !strings.Contains(line, "dbus") { // no system bus here: harmless noise
					keep = append(keep, line)
				}
			}
			p.output.mu.Unlock()
			t.Logf("chromium output:\n%s", strings.Join(keep, ""))
		}
	})
	if err := chromedp.Do(ctx); err != nil { // start the browser and the tab
		t.Fatalf("start chromium: %v", err)
	}
	return p
}

// listen records what the page does. It runs on chromedp's reader
// goroutine: it only appends under the lock.
func (p *page) listen(ev any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch e := ev.(type) {
	case *network.EventRequestWillBeSent:
		p.requests++
		if !p.sameOrigin(e.Request.URL) {
			p.foreign = append(p.foreign, e.Request.Method+" "+e.Request.URL)
		}
	case *network.EventWebSocketCreated:
		p.sockets[e.URL] = true
		if !p.sameOrigin(e.URL) {
			p.foreign = append(p.foreign, "WebSocket "+e.URL)
		}
	case *cdpruntime.EventExceptionThrown:
		d := e.ExceptionDetails
		msg := d.Text
		if d.Exception != nil {
			msg += " " + d.Exception.Description
		}
		p.errs = append(p.errs, fmt.Sprintf("exception at %s:%d: %s", d.URL, d.LineNumber+1, msg))
	case *cdpruntime.EventConsoleAPICalled:
		if e.Type == cdpruntime.ConsoleAPICalledTypeError {
			var parts []string
			for _, a := range e.Args {
				parts = append(parts, string(a.Value)+a.Description)
			}
			p.errs = append(p.errs, "console.error: "+strings.Join(parts, " "))
		}
	case *log.EventEntryAdded:
		// Failed API calls (the 401 and 400 the test provokes) and sockets
		// refused while the agent restarts are network entries; anything
		// else at error level (CSP violations, script errors) is a bug.
		if e.Entry.Level == log.EntryLevelError && e.Entry.Source != log.EntrySourceNetwork {
			p.errs = append(p.errs, fmt.Sprintf("log %s: %s (%s)", e.Entry.Source, e.Entry.Text, e.Entry.URL))
		}
	}
}

// sameOrigin compares scheme (ws ↔ http, wss ↔ https), host and port.
func (p *page) sameOrigin(raw string) bool {
	u, err := url.Parse(raw)
	if err != nil {
		return false
	}
	scheme := u.Scheme
	switch scheme {
	case "data", "blob":
		return true
	case "ws":
		scheme = "http"
	case "wss":
		scheme = "https"
	}
	return scheme == p.base.Scheme && u.Host == p.base.Host
}

// check fails the test on foreign requests and page errors, and makes sure
// the listener saw the page's traffic at all.
func (p *page) check() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.foreign {
		p.t.Errorf("request outside the agent's origin %s: %s", p.base.Host, f)
	}
	for _, e := range p.errs {
		p.t.Errorf("page error: %s", e)
	}
	var paths []string
	for s := range p.sockets {
		if u, err := url.Parse(s); err == nil {
			paths = append(paths, u.Path)
		}
	}
	slices.Sort(paths)
	paths = slices.Compact(paths)
	if p.requests < 10 || len(paths) != len(channels) {
		p.t.Errorf("network listener saw %d requests and WebSockets %v: not the page's traffic", p.requests, paths)
	}
	p.t.Logf("network: %d requests, WebSockets %v, none outside %s", p.requests, paths, p.base.Host)
}

func (p *page) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		p.t.Fatalf("%s: %v", what, err)
	}
}

func (p *page) navigate(path string) {
	p.t.Helper()
	p.do("open "+path, chromedp.Navigate(p.base.String()+path))
}

func (p *page) setViewport(w, h int64, phone bool) {
	p.t.Helper()
	var opts []chromedp.EmulateViewportOption
	if phone {
		opts = append(opts, chromedp.EmulateScale(2), chromedp.EmulateMobile, chromedp.EmulateTouch, chromedp.EmulatePortrait)
	}
	p.do(fmt.Sprintf("viewport %dx%d", w, h), chromedp.EmulateViewport(w, h, opts...))
}

func (p *page) click(sel string) {
	p.t.Helper()
	p.do("click "+sel, chromedp.Click(chromedp.CSS(sel)))
}

func (p *page) sendKeys(sel, text string) {
	p.t.Helper()
	p.do("type into "+sel, chromedp.SendKeys(chromedp.CSS(sel), text))
}

// retype replaces an input's text the way a user does: focus, clear, type.
// Focus first, so that the once-a-second refresh leaves the field alone.
func (p *page) retype(sel, text string) {
	p.t.Helper()
	evalJS[bool](p, fmt.Sprintf(`(() => { const i = document.querySelector(%q); i.focus(); i.select(); i.value = ""; return true })()`, sel))
	p.sendKeys(sel, text)
}

// typeToken enters a token the way a user does: type, then Save.
func (p *page) typeToken(token string) {
	p.t.Helper()
	p.sendKeys("#token-input", token)
	p.click("#token-save")
	p.waitJS(3*time.Second, "token saved", `document.querySelector('#token-state').dataset.state === "set"`)
}

// waitToast waits for a notice of kind ("ok" or "error") containing text.
func (p *page) waitToast(kind, text string) {
	p.t.Helper()
	p.waitJS(5*time.Second, fmt.Sprintf("%s notice %q", kind, text), fmt.Sprintf(
		`[...document.querySelectorAll('#toasts .toast[data-kind=%q]')].some(t => t.textContent.includes(%q))`, kind, text))
}

func (p *page) screenshot(path string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 30*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Fatalf("screenshot %s: %v", path, err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		p.t.Fatal(err)
	}
	p.t.Logf("screenshot: %s", path)
}

// evalJS evaluates a JavaScript expression in the page.
func evalJS[T any](p *page, expr string, opts ...chromedp.EvaluateOption) T {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr, opts...))
	if err != nil {
		p.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitJS waits until a JavaScript expression is true.
func (p *page) waitJS(timeout time.Duration, what, expr string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, timeout)
	defer cancel()
	_, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingInterval(100*time.Millisecond)))
	if err != nil {
		// What the page showed, to tell why.
		shown, _ := chromedp.Run(p.ctx, chromedp.Evaluate[string](`document.body.innerText.slice(0, 3000)`))
		if errors.Is(err, context.DeadlineExceeded) {
			p.t.Fatalf("%s: not within %s (%s)\npage text:\n%s", what, timeout, expr, shown)
		}
		p.t.Fatalf("%s: %v\npage text:\n%s", what, err, shown)
	}
}
