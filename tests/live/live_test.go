package live

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

// vip exists only inside the lab: on the backends' loopbacks and in the
// client's routes.
var vip = netip.MustParseAddr("198.51.100.10")

// channels are the seven WebSocket channels of the API contract.
var channels = []string{"backends", "metrics", "status", "health", "security", "billing", "ai"}

// quickTest is the original project's quick test ("Teste Rápido"), verbatim but for the channel,
// which each run substitutes for "metrics".
const quickTest = `
import asyncio
import websockets

async def test():
    async with websockets.connect('ws://localhost:9090/api/ws/metrics') as ws:
        msg = await ws.recv()
        print('✅ WebSocket funcionando:', msg[:50])

asyncio.run(test())
`

// liveConfig: pool "web" (the three backends' HTTP) behind a tcp VIP on
// :80, pool "udp" (backends 0 and 1's UDP echo) behind a udp VIP on :7001.
// Backend 2 is only in "web", so draining it there drains its real.
func liveConfig(e *env, extraDataplane ...string) string {
	var b strings.Builder
	b.WriteString(e.configHead(extraDataplane...))
	check := "interval: 500ms, timeout: 200ms, rise: 1, fall: 2"
	b.WriteString("pools:\n  - name: web\n    backends:\n")
	for _, be := range e.lab.Backends {
		fmt.Fprintf(&b, "      - {address: %s, port: %d}\n", be.Addr4, lab.HTTPPort)
	}
	fmt.Fprintf(&b, "    health_check: {type: http, path: /healthz, %s}\n", check)
	b.WriteString("  - name: udp\n    backends:\n")
	for _, be := range e.lab.Backends[:2] {
		fmt.Fprintf(&b, "      - {address: %s, port: %d}\n", be.Addr4, lab.UDPEchoPort)
	}
	fmt.Fprintf(&b, "    health_check: {type: http, path: /healthz, port: %d, %s}\n", lab.HTTPPort, check)
	b.WriteString("vips:\n")
	fmt.Fprintf(&b, "  - {address: %s, port: %d, protocol: tcp, mode: dsr, pool: web}\n", vip, lab.HTTPPort)
	fmt.Fprintf(&b, "  - {address: %s, port: %d, protocol: udp, mode: dsr, pool: udp}\n", vip, lab.UDPEchoPort)
	return b.String()
}

// TestLive: one lab, one agent, HTTP traffic through the dsr VIP all along
// (10 new connections a second), and real clients against the API.
func TestLive(t *testing.T) {
	e := newEnv(t, vip)
	e.writeConfig(liveConfig(e))
	e.startAgent(t)
	// Right after start (likely before the first 1 s telemetry tick) the
	// snapshot already lists the VIPs.
	var mv struct {
		At   time.Time `json:"at"`
		VIPs []any     `json:"vips"`
	}
	e.mustCall(t, http.MethodGet, "/api/metrics", nil, false, http.StatusOK, &mv)
	if mv.At.IsZero() || len(mv.VIPs) != 2 {
		t.Errorf("GET /api/metrics right after start: at %s, %d VIPs; want a sample of the 2 VIPs", mv.At, len(mv.VIPs))
	}
	url := "http://" + netip.AddrPortFrom(vip, lab.HTTPPort).String() + "/"
	tr := startTraffic(t, e.lab.Client, url, 10, 5*time.Minute)
	t.Logf("traffic: 10 GET/s on new connections to %s", url)
	mw := watchMetrics(t, e)

	t.Run("QuickTest", func(t *testing.T) { testQuickTest(t, e) })
	t.Run("ValidationScript", func(t *testing.T) { testValidationScript(t, e) })
	t.Run("ValidationScriptInterrupted", func(t *testing.T) { testValidationScriptInterrupted(t, e) })
	t.Run("PrometheusLint", func(t *testing.T) { testPrometheusLint(t, e) })
	t.Run("CountersMatchTraffic", func(t *testing.T) { testCountersMatchTraffic(t, e, mw) })
	t.Run("BadBodyChangesNothing", func(t *testing.T) { testBadBodyChangesNothing(t, e) })
	t.Run("ConcurrentDrains", func(t *testing.T) { testConcurrentDrains(t, e) })
	t.Run("WritesSurviveRestart", func(t *testing.T) { testWritesSurviveRestart(t, e, tr) })

	tr.finish()
	t.Logf("background traffic through the VIP: %s", tr)
	if ok, failed := tr.ok.Load(), tr.failed.Load(); ok == 0 || failed*100 > ok+failed {
		t.Errorf("background traffic: %d answered, %d failed; want at most 1%% failures", ok, failed)
	}
}

// testQuickTest runs that snippet with Debian's python3 and
// python3-websockets in the balancer namespace, once per channel.
func testQuickTest(t *testing.T, e *env) {
	for _, ch := range channels {
		t.Run(ch, func(t *testing.T) {
			code := strings.Replace(quickTest, "/api/ws/metrics", "/api/ws/"+ch, 1)
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			out, err := e.lab.Balancer.Command(ctx, python, "-c", code).CombinedOutput()
			line := strings.TrimSpace(string(out))
			t.Logf("%s: %s", ch, line)
			if err != nil {
				t.Fatalf("python snippet on %s: %v\n%s", ch, err, out)
			}
			if !strings.Contains(line, "✅ WebSocket funcionando:") || !strings.Contains(line, `"connected"`) {
				t.Errorf("python snippet on %s printed %q, want the success line with the connected message", ch, line)
			}
		})
	}
}

// testValidationScript runs tests/test_websockets_validation.sh in the
// balancer namespace with the token; it must pass 100% and leave the
// configuration as it found it.
func testValidationScript(t *testing.T, e *env) {
	root, err := agenttest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(root, "tests", "test_websockets_validation.sh")
	var before, after any
	e.mustCall(t, http.MethodGet, "/api/config", nil, false, http.StatusOK, &before)

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := e.lab.Balancer.Command(ctx, "bash", script)
	cmd.Env = append(os.Environ(), "VELOFLUX_TOKEN="+e.token(t), "PYTHON="+python)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		t.Log(line)
	}
	t.Logf("the script ran for %s", time.Since(start).Round(time.Millisecond))
	if err != nil {
		t.Errorf("%s: %v", script, err)
	}
	m := regexp.MustCompile(`(?m)^passed (\d+)/(\d+) \((\d+)%\)$`).FindStringSubmatch(string(out))
	switch {
	case m == nil:
		t.Errorf("no summary line \"passed N/M (P%%)\" in the output")
	case m[3] != "100" || m[1] != m[2]:
		t.Errorf("summary %q, want 100%%", m[0])
	}
	if n := strings.Count(string(out), "\nPASS  "); n < 60 {
		t.Errorf("only %d PASS lines; the script should check far more", n)
	}

	e.mustCall(t, http.MethodGet, "/api/config", nil, false, http.StatusOK, &after)
	if !reflect.DeepEqual(before, after) {
		t.Errorf("the script left the configuration changed:\nbefore %v\nafter  %v", before, after)
	}
	var backends []struct {
		ID      string `json:"id"`
		Drained bool   `json:"drained"`
	}
	e.mustCall(t, http.MethodGet, "/api/backends", nil, false, http.StatusOK, &backends)
	for _, b := range backends {
		if b.Drained {
			t.Errorf("the script left backend %s drained", b.ID)
		}
	}
}

// testValidationScriptInterrupted stops the script with SIGTERM right after
// it has created a pool, a backend and a VIP of its own: it must delete
// them on its way out. It reads the token with --token-file this time.
func testValidationScriptInterrupted(t *testing.T, e *env) {
	root, err := agenttest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(root, "tests", "test_websockets_validation.sh")
	var before, after any
	e.mustCall(t, http.MethodGet, "/api/config", nil, false, http.StatusOK, &before)

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := e.lab.Balancer.Command(ctx, "bash", script, "--token-file", e.tokenFile(), apiBase, "http://"+metricsAddr)
	cmd.Env = append(os.Environ(), "PYTHON="+python)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	signalled := false
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		t.Log(line)
		if !signalled && strings.HasPrefix(line, "PASS  PUT /api/vips/") {
			// `ip netns exec` execs bash: the pid is the script's.
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			signalled = true
		}
	}
	err = cmd.Wait()
	if !signalled {
		t.Fatalf("the script never reached PUT /api/vips (%v)", err)
	}
	if cmd.ProcessState.ExitCode() == 0 {
		t.Errorf("the interrupted script exited 0")
	}
	// The pool is deleted last in a full run, so only the cleanup can have
	// deleted it; the VIP is normally still there at the signal too, unless
	// the script ran on to its own DELETE first.
	text := out.String()
	if !strings.Contains(text, "cleanup: DELETE /api/pools/vfval-") {
		t.Errorf("no \"cleanup: DELETE /api/pools/vfval-...\" in the interrupted script's output")
	}
	if !strings.Contains(text, "cleanup: DELETE /api/vips/tcp:") && !strings.Contains(text, "PASS  DELETE /api/vips/tcp:") {
		t.Errorf("the interrupted script deleted its VIP neither in the cleanup nor before")
	}
	e.mustCall(t, http.MethodGet, "/api/config", nil, false, http.StatusOK, &after)
	if !reflect.DeepEqual(before, after) {
		t.Errorf("the interrupted script left the configuration changed:\nbefore %v\nafter  %v", before, after)
	}
}

// testPrometheusLint scrapes :8080/metrics, parses it with expfmt and lints
// it with promlint: zero problems.
func testPrometheusLint(t *testing.T, e *env) {
	resp, err := e.api.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	body := new(bytes.Buffer)
	_, err = body.ReadFrom(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", metricsURL, resp.StatusCode, err)
	}
	if f := expfmt.ResponseFormat(resp.Header); f.FormatType() != expfmt.TypeTextPlain {
		t.Errorf("Content-Type %q: format %v, want text", resp.Header.Get("Content-Type"), f)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body.Bytes()))
	if err != nil {
		t.Fatalf("expfmt: %v", err)
	}
	series := 0
	for name, mf := range families {
		series += len(mf.GetMetric())
		ok := false
		for _, p := range []string{"veloflux_", "go_", "process_", "promhttp_"} {
			ok = ok || strings.HasPrefix(name, p)
		}
		if !ok {
			t.Errorf("metric family %s: want the veloflux_ prefix (or the standard go_/process_/promhttp_)", name)
		}
	}
	t.Logf("%d bytes, %d families, %d series", body.Len(), len(families), series)
	for _, want := range []string{"veloflux_vip_packets_total", "veloflux_vip_bytes_total", "veloflux_backend_up",
		"veloflux_xdp_verdicts_total", "veloflux_ws_clients", "veloflux_build_info"} {
		if families[want] == nil {
			t.Errorf("no %s", want)
		}
	}
	if mf := families["veloflux_vip_packets_total"]; mf != nil {
		var vips []string
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "vip" {
					vips = append(vips, l.GetValue())
				}
			}
		}
		slices.Sort(vips)
		want := []string{
			netip.AddrPortFrom(vip, lab.HTTPPort).String() + "/tcp",
			netip.AddrPortFrom(vip, lab.UDPEchoPort).String() + "/udp",
		}
		slices.Sort(want)
		if !slices.Equal(vips, want) {
			t.Errorf("veloflux_vip_packets_total has vips %v, want %v", vips, want)
		}
	}
	problems, err := promlint.New(bytes.NewReader(body.Bytes())).Lint()
	if err != nil {
		t.Fatalf("promlint: %v", err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	if len(problems) == 0 {
		t.Logf("promlint: no problems")
	}
}

// testCountersMatchTraffic sends a known number of UDP datagrams to the udp
// VIP (dsr: each is exactly one packet at the balancer; the echoes go back
// directly) and reads the VIP's packet counter from the metrics channel.
func testCountersMatchTraffic(t *testing.T, e *env, mw *metricsWatch) {
	const n = 2000
	dst := netip.AddrPortFrom(vip, lab.UDPEchoPort)
	key := dst.String() + "/udp"

	// Ready once one datagram is echoed.
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := udpRoundTrips(e.lab.Client, dst, 1, 1)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no UDP echo through %s within 15s: %v", dst, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	probed := time.Now()
	base, err := mw.after(probed.Add(50*time.Millisecond), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	p0, ok := base.Packets[key]
	if !ok {
		t.Fatalf("metrics_update at %s has no VIP %s: %v", base.At, key, base.Packets)
	}

	start := time.Now()
	sent, err := udpRoundTrips(e.lab.Client, dst, n, 8)
	if err != nil {
		t.Fatalf("after %d datagrams: %v", sent, err)
	}
	end := time.Now()
	time.Sleep(2 * time.Second)
	final, err := mw.after(end.Add(2*time.Second), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	delta := int64(final.Packets[key]) - int64(p0)
	diff := math.Abs(float64(delta-int64(sent))) / float64(sent)
	t.Logf("sent %d datagrams (%d echoed, %d retries) in %s; the metrics channel's %s packets went %d -> %d (%s -> %s): +%d, off by %.3f%%",
		sent, n, sent-n, end.Sub(start).Round(time.Millisecond), key, p0, final.Packets[key],
		base.At.Format("15:04:05.000"), final.At.Format("15:04:05.000"), delta, 100*diff)
	if diff > 0.01 {
		t.Errorf("VIP %s counter moved by %d, sent %d: off by %.2f%%, want within 1%%", key, delta, sent, 100*diff)
	}
	// The same counter on Prometheus, read afterwards, is at least as far.
	resp, err := e.api.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range families["veloflux_vip_packets_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "vip" && l.GetValue() == key {
				v := m.GetCounter().GetValue()
				t.Logf("Prometheus veloflux_vip_packets_total{vip=%q} = %.0f", key, v)
				if v < float64(final.Packets[key]) {
					t.Errorf("Prometheus counter %.0f is behind the WebSocket's %d", v, final.Packets[key])
				}
			}
		}
	}
}

// apiError is the error envelope.
type apiError struct {
	Error *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Field   string `json:"field"`
	} `json:"error"`
}

// testBadBodyChangesNothing: bad bodies get 422 with the error envelope and
// the field path, and leave the file (and its .bak), the configuration in
// force and its generation as they were.
func testBadBodyChangesNothing(t *testing.T, e *env) {
	var pools []any
	e.mustCall(t, http.MethodGet, "/api/pools", nil, false, http.StatusOK, &pools)
	var vips []any
	e.mustCall(t, http.MethodGet, "/api/vips", nil, false, http.StatusOK, &vips)
	file0, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	bak0, bakErr0 := os.ReadFile(e.cfg + ".bak")
	var cfg0, cfg1 any
	e.mustCall(t, http.MethodGet, "/api/config", nil, false, http.StatusOK, &cfg0)
	var st0, st1 struct {
		Generation uint64 `json:"config_generation"`
	}
	e.mustCall(t, http.MethodGet, "/api/status", nil, false, http.StatusOK, &st0)

	p, v := len(pools), len(vips)
	cases := []struct {
		name, path, body, field string
	}{
		{"port out of range", "/api/pools", `{"name":"live-bad","backends":[{"address":"10.0.0.1","port":70000}]}`,
			fmt.Sprintf("pools[%d].backends[0].port", p)},
		{"misspelt key", "/api/pools", `{"name":"live-bad","backends":[{"adress":"10.0.0.1","port":80}]}`,
			fmt.Sprintf("pools[%d].backends[0].adress", p)},
		{"unknown algorithm", "/api/pools", `{"name":"live-bad","algorithm":"fastest"}`,
			fmt.Sprintf("pools[%d].algorithm", p)},
		{"not JSON", "/api/pools", `{"name": `, fmt.Sprintf("pools[%d]", p)},
		{"VIP with an unknown pool", "/api/vips",
			`{"address":"198.51.100.20","port":80,"protocol":"tcp","pool":"nope"}`, fmt.Sprintf("vips[%d].pool", v)},
		{"VIP with a bad address", "/api/vips",
			`{"address":"198.51.100.300","port":80,"protocol":"tcp","pool":"web"}`, fmt.Sprintf("vips[%d].address", v)},
	}
	for _, c := range cases {
		code, data, err := e.call(http.MethodPost, c.path, c.body, true)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var env apiError
		var keys map[string]json.RawMessage
		decErr := json.Unmarshal(data, &env)
		json.Unmarshal(data, &keys)
		switch {
		case code != http.StatusUnprocessableEntity:
			t.Errorf("%s: POST %s %s: status %d, want 422: %s", c.name, c.path, c.body, code, data)
		case decErr != nil || env.Error == nil || len(keys) != 1:
			t.Errorf("%s: body %s is not {\"error\":{...}}", c.name, data)
		case env.Error.Code != "invalid_config" || env.Error.Message == "" || env.Error.Field != c.field:
			t.Errorf("%s: error %+v, want code invalid_config, a message, field %s", c.name, *env.Error, c.field)
		default:
			t.Logf("%s: 422 field=%s message=%q", c.name, env.Error.Field, env.Error.Message)
		}
	}

	file1, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file0, file1) {
		t.Errorf("the configuration file changed after rejected writes:\n%s\n---\n%s", file0, file1)
	}
	bak1, bakErr1 := os.ReadFile(e.cfg + ".bak")
	if !bytes.Equal(bak0, bak1) || (bakErr0 == nil) != (bakErr1 == nil) {
		t.Errorf("the .bak changed after rejected writes")
	}
	e.mustCall(t, http.MethodGet, "/api/config", nil, false, http.StatusOK, &cfg1)
	if !reflect.DeepEqual(cfg0, cfg1) {
		t.Errorf("the configuration in force changed after rejected writes")
	}
	e.mustCall(t, http.MethodGet, "/api/status", nil, false, http.StatusOK, &st1)
	if st0.Generation != st1.Generation {
		t.Errorf("config_generation went %d -> %d after rejected writes", st0.Generation, st1.Generation)
	}
}

// backendView is what GET /api/backends lists.
type backendView struct {
	ID      string `json:"id"`
	State   string `json:"state"`
	Drained bool   `json:"drained"`
	Healthy bool   `json:"healthy"`
}

// testWritesSurviveRestart: a pool created through the API reaches the file
// (the previous file kept as .bak) and a drained backend stays drained; both
// survive a restart of the agent (SIGTERM, start again).
func testWritesSurviveRestart(t *testing.T, e *env, tr *traffic) {
	prev, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	b0 := e.lab.Backends[0].Addr4
	pool := map[string]any{
		"name":         "live-extra",
		"backends":     []any{map[string]any{"address": b0.String(), "port": lab.TCPEchoPort}},
		"health_check": map[string]any{"type": "tcp", "interval": "1s", "timeout": "500ms"},
	}
	e.mustCall(t, http.MethodPost, "/api/pools", pool, true, http.StatusCreated, nil)

	cur, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	saved, err := config.Load(e.cfg)
	if err != nil {
		t.Fatalf("the saved file does not load: %v\n%s", err, cur)
	}
	if i := slices.IndexFunc(saved.Pools, func(p config.Pool) bool { return p.Name == "live-extra" }); i < 0 {
		t.Errorf("the file has no pool live-extra:\n%s", cur)
	} else if bs := saved.Pools[i].Backends; len(bs) != 1 || bs[0].Address != b0.String() || bs[0].Port != lab.TCPEchoPort {
		t.Errorf("pool live-extra in the file has backends %+v", bs)
	}
	bak, err := os.ReadFile(e.cfg + ".bak")
	if err != nil {
		t.Errorf("no .bak after an API write: %v", err)
	} else if !bytes.Equal(bak, prev) {
		t.Errorf(".bak is not the file as it was before the write")
	}

	b2 := e.lab.Backends[2].Addr4
	id := fmt.Sprintf("web:%s:%d", b2, lab.HTTPPort)
	var drained backendView
	e.mustCall(t, http.MethodPost, "/api/backends/"+id+"/drain", nil, true, http.StatusOK, &drained)
	if !drained.Drained || drained.State != "draining" {
		t.Errorf("after drain: %+v, want drained, state draining", drained)
	}

	var st0 struct {
		StartedAt time.Time `json:"started_at"`
	}
	e.mustCall(t, http.MethodGet, "/api/status", nil, false, http.StatusOK, &st0)
	restartAt := time.Now()
	e.restartAgent(t)
	t.Logf("agent restarted in %s", time.Since(restartAt).Round(time.Millisecond))
	// The VIP kept serving: new connections are answered after the restart.
	ok0 := tr.ok.Load()
	time.Sleep(1500 * time.Millisecond)
	if n := tr.ok.Load() - ok0; n < 5 {
		t.Errorf("only %d requests answered through the VIP in the 1.5s after the restart", n)
	}
	t.Logf("background traffic so far: %s", tr)
	var st1 struct {
		StartedAt time.Time `json:"started_at"`
	}
	e.mustCall(t, http.MethodGet, "/api/status", nil, false, http.StatusOK, &st1)
	if !st1.StartedAt.After(st0.StartedAt) {
		t.Errorf("started_at %s -> %s: not a new agent process", st0.StartedAt, st1.StartedAt)
	}

	type named struct {
		Name string `json:"name"`
	}
	var pools []named
	e.mustCall(t, http.MethodGet, "/api/pools", nil, false, http.StatusOK, &pools)
	if !slices.ContainsFunc(pools, func(p named) bool { return p.Name == "live-extra" }) {
		t.Errorf("after the restart GET /api/pools has no live-extra: %+v", pools)
	}

	// The drain: the API view, and the real's state in the pinned data path.
	var last []backendView
	ok := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && !ok; {
		e.mustCall(t, http.MethodGet, "/api/backends", nil, false, http.StatusOK, &last)
		i := slices.IndexFunc(last, func(b backendView) bool { return b.ID == id })
		ok = i >= 0 && last[i].Drained && last[i].State == "draining"
		if !ok {
			time.Sleep(200 * time.Millisecond)
		}
	}
	if !ok {
		t.Errorf("after the restart backend %s is not draining: %+v", id, last)
	}
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	reals, err := dp.Reals()
	dp.Close()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for rid, r := range reals {
		if r.Addr == b2 {
			found = true
			t.Logf("real %d (%s) in the data path: %s", rid, r.Addr, r.State)
			if r.State != dataplane.RealDraining {
				t.Errorf("real %s is %s in the data path after the restart, want draining", b2, r.State)
			}
		}
	}
	if !found {
		t.Errorf("no real %s in the data path", b2)
	}

	// Put things back.
	e.mustCall(t, http.MethodDelete, "/api/backends/"+id+"/drain", nil, true, http.StatusOK, nil)
	e.mustCall(t, http.MethodDelete, "/api/pools/live-extra", nil, true, http.StatusNoContent, nil)
}

// ---------------------------------------------------------------------------
// A gorilla/websocket client on the metrics channel

type metricsSample struct {
	At      time.Time
	Packets map[string]uint64 // per VIP, "addr:port/proto"
}

type metricsWatch struct {
	conn    *websocket.Conn
	mu      sync.Mutex
	samples []metricsSample
	changed chan struct{}
	err     error
	done    chan struct{}
}

func watchMetrics(t *testing.T, e *env) *metricsWatch {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	conn, err := e.dialWS(ctx, "metrics")
	if err != nil {
		t.Fatalf("WebSocket metrics: %v", err)
	}
	w := &metricsWatch{conn: conn, changed: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	t.Cleanup(func() {
		conn.Close()
		<-w.done
	})
	return w
}

func (w *metricsWatch) run() {
	defer close(w.done)
	for {
		_, data, err := w.conn.ReadMessage()
		if err != nil {
			w.mu.Lock()
			w.err = err
			close(w.changed)
			w.mu.Unlock()
			return
		}
		var m struct {
			Type string `json:"type"`
			Data struct {
				At   time.Time `json:"at"`
				VIPs []struct {
					VIP     string `json:"vip"`
					Packets uint64 `json:"packets"`
				} `json:"vips"`
			} `json:"data"`
		}
		if json.Unmarshal(data, &m) != nil || m.Type != "metrics_update" {
			continue
		}
		s := metricsSample{At: m.Data.At, Packets: map[string]uint64{}}
		for _, v := range m.Data.VIPs {
			s.Packets[v.VIP] = v.Packets
		}
		w.mu.Lock()
		w.samples = append(w.samples, s)
		if len(w.samples) > 64 {
			w.samples = w.samples[len(w.samples)-64:]
		}
		close(w.changed)
		w.changed = make(chan struct{})
		w.mu.Unlock()
	}
}

// after returns the first sample taken after t.
func (w *metricsWatch) after(t time.Time, timeout time.Duration) (metricsSample, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		w.mu.Lock()
		for _, s := range w.samples {
			if s.At.After(t) {
				w.mu.Unlock()
				return s, nil
			}
		}
		changed, err := w.changed, w.err
		w.mu.Unlock()
		if err != nil {
			return metricsSample{}, fmt.Errorf("metrics channel closed: %w", err)
		}
		select {
		case <-changed:
		case <-deadline.C:
			return metricsSample{}, fmt.Errorf("no metrics_update sampled after %s within %s", t.Format("15:04:05.000"), timeout)
		}
	}
}
