package api

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/veloflux/veloflux/agent/config"
)

const testToken = "0123456789abcdef0123456789abcdef"

const baseConfig = `
dataplane:
  interfaces: [eth0]
pools:
  - name: web
    backends:
      - {address: 10.0.0.11, port: 80}
      - {address: 10.0.0.12, port: 80}
vips:
  - {address: 10.0.0.100, port: 80, protocol: tcp, pool: web}
`

// fakeController keeps the configuration in memory and applies changes
// with the same config.Modify the agent uses.
type fakeController struct {
	mu      sync.Mutex
	cfg     *config.Config
	gen     uint64
	drained map[string]bool
	saves   int
	proxy   *ProxyView // what Status reports of the L7 proxy
	// nodeDrained is what SetNodeDrained last set.
	nodeDrained bool
}

func newFake(t *testing.T) *fakeController {
	cfg, err := config.Parse([]byte(baseConfig))
	if err != nil {
		t.Fatal(err)
	}
	return &fakeController{cfg: cfg, gen: 1, drained: map[string]bool{}}
}

func (f *fakeController) Status() StatusView {
	f.mu.Lock()
	defer f.mu.Unlock()
	return StatusView{Status: "ok", Version: "test", Attached: true, ConfigGeneration: f.gen, Proxy: f.proxy}
}

func (f *fakeController) Config() *config.Config {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cfg
}

func (f *fakeController) Update(_ context.Context, mutate func(*config.Config) error) (*config.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	next, err := f.cfg.Modify(mutate)
	if err != nil {
		return nil, err
	}
	f.cfg, f.gen, f.saves = next, f.gen+1, f.saves+1
	return next, nil
}

func (f *fakeController) ValidateConfig(data []byte) (*config.Config, error) {
	return config.Parse(data)
}
func (f *fakeController) Reload(context.Context) error { return nil }

func (f *fakeController) Backends() ([]BackendView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []BackendView
	for _, p := range f.cfg.Pools {
		for _, b := range p.Backends {
			key := fmt.Sprintf("%s:%s:%d", p.Name, b.Address, b.Port)
			st := "up"
			if f.drained[key] {
				st = "draining"
			}
			out = append(out, BackendView{ID: key, Pool: p.Name, Address: b.Address, Port: b.Port,
				Weight: b.EffectiveWeight(), State: st, Drained: f.drained[key]})
		}
	}
	return out, nil
}

func (f *fakeController) SetDrained(_ context.Context, pool, backend string, drained bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.drained[pool+":"+backend] = drained
	return nil
}

func (f *fakeController) SetNodeDrained(_ context.Context, drained bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nodeDrained = drained
	return nil
}

func (f *fakeController) BGP() BGPView {
	f.mu.Lock()
	defer f.mu.Unlock()
	return BGPView{Enabled: true, NodeDrained: f.nodeDrained, Peers: []BGPPeerView{},
		VIPs: []BGPAnnounceView{{Address: "10.0.0.100", Announced: !f.nodeDrained}}}
}

func (f *fakeController) VIPRings() map[string]RingView {
	return map[string]RingView{"tcp:10.0.0.100:80": {Fingerprint: "00000000000ab", LiveBackends: 2}}
}

func (f *fakeController) Metrics() MetricsView          { return MetricsView{At: time.Now()} }
func (f *fakeController) Flows(int) ([]FlowView, error) { return nil, nil }

type testServer struct {
	*httptest.Server
	ctl    *fakeController
	srv    *Server
	hub    *Hub
	events chan SecurityEvent
}

func newTestServer(t *testing.T, protectReads bool, hubOpts HubOptions) *testServer {
	t.Helper()
	ctl := newFake(t)
	hub := NewHub(hubOpts)
	events := make(chan SecurityEvent, 16)
	srv := New(Options{Controller: ctl, Hub: hub, Token: testToken, ProtectReads: protectReads, Version: "test",
		SecurityEvents: func(e SecurityEvent) { events <- e }})
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(func() { hub.Close(); ts.Close(); srv.Close() })
	return &testServer{Server: ts, ctl: ctl, srv: srv, hub: hub, events: events}
}

func (ts *testServer) do(t *testing.T, method, path, body string, token bool) (int, map[string]any, []any) {
	t.Helper()
	req, _ := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
	if token {
		req.Header.Set("Authorization", "Bearer "+testToken)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var obj map[string]any
	var arr []any
	if json.Unmarshal(data, &obj) != nil {
		json.Unmarshal(data, &arr)
	}
	return resp.StatusCode, obj, arr
}

func errorOf(t *testing.T, body map[string]any) (code, message, field string) {
	t.Helper()
	e, ok := body["error"].(map[string]any)
	if !ok {
		t.Fatalf("no error object in %v", body)
	}
	field, _ = e["field"].(string)
	return e["code"].(string), e["message"].(string), field
}

func TestOpenAPIMatchesRoutes(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	doc := ts.srv.OpenAPI()
	paths := doc["paths"].(map[string]any)
	documented := map[string]bool{}
	for p, item := range paths {
		for method := range item.(map[string]any) {
			documented[strings.ToUpper(method)+" "+p] = true
		}
	}
	registered := map[string]bool{}
	for _, r := range ts.srv.echo.Routes() {
		registered[r.Method+" "+openAPIPath(r.Path)] = true
	}
	for k := range registered {
		if !documented[k] {
			t.Errorf("registered route %s is missing from the OpenAPI document", k)
		}
	}
	for k := range documented {
		if !registered[k] {
			t.Errorf("OpenAPI documents %s, which is not registered", k)
		}
	}
	if status, body, _ := ts.do(t, "GET", "/api/openapi.json", "", false); status != 200 || body["openapi"] != "3.0.3" {
		t.Fatalf("GET /api/openapi.json: %d %v", status, body["openapi"])
	}
}

func TestAuth(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	pool := `{"name":"api","backends":[{"address":"10.0.1.1","port":8080}]}`
	if status, body, _ := ts.do(t, "POST", "/api/pools", pool, false); status != 401 {
		t.Fatalf("write without token: %d %v", status, body)
	} else if code, _, _ := errorOf(t, body); code != "unauthorized" {
		t.Fatalf("error code %q", code)
	}
	select {
	case e := <-ts.events:
		if e.Kind != "auth_failure" || e.Path != "/api/pools" || e.Method != "POST" {
			t.Fatalf("security event %+v", e)
		}
	case <-time.After(time.Second):
		t.Fatal("no security event for a failed authentication")
	}
	req, _ := http.NewRequest("POST", ts.URL+"/api/pools", strings.NewReader(pool))
	req.Header.Set("Authorization", "Bearer wrong-token")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 401 {
		t.Fatalf("wrong token: %v %v", resp.StatusCode, err)
	}
	resp.Body.Close()
	if status, _, _ := ts.do(t, "POST", "/api/pools", pool, true); status != 201 {
		t.Fatalf("write with token: %d", status)
	}
	if status, _, _ := ts.do(t, "GET", "/api/pools", "", false); status != 200 {
		t.Fatalf("open read: %d", status)
	}

	closed := newTestServer(t, true, HubOptions{})
	if status, _, _ := closed.do(t, "GET", "/api/pools", "", false); status != 401 {
		t.Fatalf("protected read without token: %d", status)
	}
	// A browser sends the token as a WebSocket subprotocol.
	wsURL := "ws" + strings.TrimPrefix(closed.URL, "http") + "/api/ws/status"
	if _, resp, err := websocket.DefaultDialer.Dial(wsURL, nil); err == nil || resp.StatusCode != 401 {
		t.Fatalf("protected WebSocket without token: %v", err)
	}
	dialer := websocket.Dialer{Subprotocols: []string{"veloflux", "bearer." + testToken}}
	conn, resp, err := dialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatalf("protected WebSocket with the token subprotocol: %v", err)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "veloflux" {
		t.Fatalf("server answered subprotocol %q, want veloflux (and never the token)", got)
	}
	conn.Close()
	if status, _, _ := closed.do(t, "GET", "/api/pools", "", true); status != 200 {
		t.Fatalf("protected read with token: %d", status)
	}
}

func TestCRUDAndValidation(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	// Unknown field: named with the path it would have in the file.
	status, body, _ := ts.do(t, "POST", "/api/pools/web/backends", `{"adress":"10.0.0.13","port":80}`, true)
	code, msg, field := errorOf(t, body)
	if status != 422 || code != "invalid_config" || field != "pools[0].backends[2].adress" || !strings.Contains(msg, "unknown field") {
		t.Fatalf("unknown field: %d %s %q %q", status, code, field, msg)
	}
	// A whole-config rule: the VIP's pool must exist.
	status, body, _ = ts.do(t, "POST", "/api/vips", `{"address":"10.0.0.101","port":443,"protocol":"tcp","pool":"nope"}`, true)
	if _, _, field := errorOf(t, body); status != 422 || field != "vips[1].pool" {
		t.Fatalf("unknown pool: %d field %q", status, field)
	}
	// Deleting a pool a VIP uses is refused whole.
	status, body, _ = ts.do(t, "DELETE", "/api/pools/web", "", true)
	if status != 422 {
		t.Fatalf("delete a used pool: %d %v", status, body)
	}
	if got := len(ts.ctl.Config().Pools); got != 1 {
		t.Fatalf("a refused change was half applied: %d pools", got)
	}

	// Create, read, replace, delete.
	if status, body, _ = ts.do(t, "POST", "/api/pools/web/backends", `{"address":"10.0.0.13","port":80,"weight":3}`, true); status != 201 || body["weight"] != float64(3) {
		t.Fatalf("add backend: %d %v", status, body)
	}
	if status, body, _ = ts.do(t, "PUT", "/api/pools/web/backends/10.0.0.13:80", `{"address":"10.0.0.13","port":80,"weight":5}`, true); status != 200 || body["weight"] != float64(5) {
		t.Fatalf("replace backend: %d %v", status, body)
	}
	if status, _, arr := ts.do(t, "GET", "/api/pools/web/backends", "", false); status != 200 || len(arr) != 3 {
		t.Fatalf("list backends: %d %v", status, arr)
	}
	if status, body, _ = ts.do(t, "POST", "/api/vips", `{"address":"10.0.0.100","port":80,"protocol":"tcp","pool":"web"}`, true); status != 409 {
		t.Fatalf("duplicate VIP: %d %v", status, body)
	}
	if status, body, _ = ts.do(t, "POST", "/api/vips", `{"address":"fd00::100","port":443,"protocol":"tcp","pool":"web","mode":"dsr"}`, true); status != 201 || body["id"] != "tcp:fd00::100:443" {
		t.Fatalf("create v6 VIP: %d %v", status, body)
	}
	if status, body, _ = ts.do(t, "GET", "/api/vips/tcp:fd00::100:443", "", false); status != 200 || body["address"] != "fd00::100" {
		t.Fatalf("get v6 VIP: %d %v", status, body)
	}
	if status, _, _ = ts.do(t, "DELETE", "/api/vips/tcp:fd00::100:443", "", true); status != 204 {
		t.Fatalf("delete VIP: %d", status)
	}
	if status, body, _ = ts.do(t, "GET", "/api/vips/tcp:fd00::100:443", "", false); status != 404 {
		t.Fatalf("deleted VIP: %d %v", status, body)
	}
	// A nat VIP through the API: its SNAT address goes in and comes back;
	// one of the other family is refused with its path.
	if status, body, _ = ts.do(t, "POST", "/api/vips", `{"address":"10.0.0.100","port":8080,"protocol":"tcp","pool":"web","mode":"nat","snat_address":"10.0.0.5"}`, true); status != 201 || body["snat_address"] != "10.0.0.5" || body["mode"] != "nat" {
		t.Fatalf("create nat VIP: %d %v", status, body)
	}
	status, body, _ = ts.do(t, "POST", "/api/vips", `{"address":"10.0.0.100","port":8081,"protocol":"tcp","pool":"web","mode":"nat","snat_address":"fd00::5"}`, true)
	if _, _, field := errorOf(t, body); status != 422 || field != "vips[2].snat_address" {
		t.Fatalf("nat VIP with an IPv6 SNAT address: %d field %q %v", status, field, body)
	}
	if status, _, _ = ts.do(t, "DELETE", "/api/vips/tcp:10.0.0.100:8080", "", true); status != 204 {
		t.Fatalf("delete nat VIP: %d", status)
	}
	if status, body, _ = ts.do(t, "POST", "/api/routes", `{"host":"*.example.com","pool":"web"}`, true); status != 201 || body["path_prefix"] != "/" {
		t.Fatalf("create route: %d %v", status, body)
	}
	if status, _, _ = ts.do(t, "DELETE", "/api/routes/0", "", true); status != 204 {
		t.Fatalf("delete route: %d", status)
	}

	// Denylist.
	if status, body, _ = ts.do(t, "POST", "/api/security/denylist", `{"prefix":"192.0.2.7/24"}`, true); status != 201 || body["prefix"] != "192.0.2.0/24" {
		t.Fatalf("deny: %d %v", status, body)
	}
	if status, body, _ = ts.do(t, "POST", "/api/security/denylist", `{"prefix":"not-an-ip"}`, true); status != 400 {
		t.Fatalf("bad prefix: %d %v", status, body)
	} else if _, _, field := errorOf(t, body); field != "prefix" {
		t.Fatalf("bad prefix field %q", field)
	}
	if status, _, _ = ts.do(t, "DELETE", "/api/security/denylist?prefix=192.0.2.0/24", "", true); status != 204 {
		t.Fatalf("undeny: %d", status)
	}

	// Drain.
	if status, body, _ = ts.do(t, "POST", "/api/backends/web:10.0.0.11:80/drain", "", true); status != 200 || body["state"] != "draining" {
		t.Fatalf("drain: %d %v", status, body)
	}
	if status, body, _ = ts.do(t, "POST", "/api/backends/garbage/drain", "", true); status != 400 {
		t.Fatalf("bad backend id: %d %v", status, body)
	}

	// Config validation endpoint.
	if status, body, _ = ts.do(t, "POST", "/api/config/validate", "pools:\n  - name: x\n    bogus: 1\n", true); status != 422 {
		t.Fatalf("validate bad config: %d %v", status, body)
	}
	if status, body, _ = ts.do(t, "GET", "/api/nope", "", false); status != 404 {
		t.Fatalf("unknown path: %d", status)
	} else if code, _, _ := errorOf(t, body); code != "not_found" {
		t.Fatalf("unknown path code %q", code)
	}
	if status, _, _ = ts.do(t, "GET", "/health", "", false); status != 200 {
		t.Fatalf("health: %d", status)
	}
}

// TestHealthReportsProxy: /health names the L7 proxy's listeners when it
// is enabled and says when one does not serve, still with 200: the node's
// VIPs are forwarded in XDP whatever the proxy does.
func TestHealthReportsProxy(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	status, body, _ := ts.do(t, "GET", "/health", "", false)
	if _, ok := body["proxy"]; status != 200 || ok {
		t.Fatalf("health without a proxy: %d %v; want 200 and no proxy field", status, body)
	}

	ts.ctl.mu.Lock()
	ts.ctl.proxy = &ProxyView{Listeners: []ListenerView{{Role: "http", Address: ":80"}}}
	ts.ctl.mu.Unlock()
	status, body, _ = ts.do(t, "GET", "/health", "", false)
	p, ok := body["proxy"].(map[string]any)
	if status != 200 || !ok || body["status"] != "ok" {
		t.Fatalf("health with a stopped proxy: %d %v; want 200, status ok and a proxy object", status, body)
	}
	listeners, _ := p["listeners"].([]any)
	if p["serving"] != false || len(listeners) != 1 {
		t.Fatalf("health proxy %v: want serving false and the http listener", p)
	}
	if l, _ := listeners[0].(map[string]any); l["role"] != "http" || l["address"] != ":80" || l["serving"] != false {
		t.Errorf("health proxy listener %v: want role http, address :80, serving false", l)
	}
}

// --- WebSockets ---

func dial(t *testing.T, ts *testServer, channel string, header http.Header) *websocket.Conn {
	t.Helper()
	url := "ws" + strings.TrimPrefix(ts.URL, "http") + "/api/ws/" + channel
	conn, resp, err := websocket.DefaultDialer.Dial(url, header)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (HTTP %d)", channel, err, status)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func readMsg(t *testing.T, conn *websocket.Conn) Message {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	var m Message
	if err := conn.ReadJSON(&m); err != nil {
		t.Fatalf("read: %v", err)
	}
	return m
}

var clientIDForm = regexp.MustCompile(`^\d{14}-[a-z0-9]{6}$`)

func TestWebSocketEnvelopeAndChannels(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{OnConnect: func(ch string) []Message {
		return []Message{NewMessage(ch+"_snapshot", map[string]any{"channel": ch})}
	}})
	conns := map[string]*websocket.Conn{}
	for _, ch := range Channels {
		conn := dial(t, ts, ch, nil)
		m := readMsg(t, conn)
		data := m.Data.(map[string]any)
		if m.Type != "connected" || data["status"] != "connected" || data["channel"] != ch ||
			!clientIDForm.MatchString(data["client_id"].(string)) {
			t.Fatalf("%s: first message %+v", ch, m)
		}
		if _, err := time.Parse(time.RFC3339, m.Timestamp); err != nil || !strings.HasSuffix(m.Timestamp, "Z") {
			t.Fatalf("%s: timestamp %q is not RFC 3339 UTC", ch, m.Timestamp)
		}
		if m := readMsg(t, conn); m.Type != ch+"_snapshot" {
			t.Fatalf("%s: second message %+v", ch, m)
		}
		conns[ch] = conn
	}
	ts.hub.Publish("metrics", NewMessage("metrics_update", map[string]any{"n": 1}))
	if m := readMsg(t, conns["metrics"]); m.Type != "metrics_update" {
		t.Fatalf("metrics got %+v", m)
	}
	// Each socket gets its own channel only: ping backends and expect pong,
	// not the metrics message.
	conns["backends"].WriteJSON(map[string]string{"type": "ping"})
	if m := readMsg(t, conns["backends"]); m.Type != "pong" {
		t.Fatalf("backends got %+v, want pong (and never metrics_update)", m)
	}
	conns["status"].WriteMessage(websocket.TextMessage, []byte("{not json"))
	if m := readMsg(t, conns["status"]); m.Type != "error" {
		t.Fatalf("bad frame answered %+v", m)
	}
	// A frame over the read limit ends the connection.
	conns["ai"].WriteMessage(websocket.TextMessage, []byte(`{"type":"ping","pad":"`+strings.Repeat("x", 5000)+`"}`))
	conns["ai"].SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, _, err := conns["ai"].ReadMessage(); err == nil {
		t.Fatal("an oversized frame did not close the socket")
	}
	// Unknown channel.
	if status, _, _ := ts.do(t, "GET", "/api/ws/nope", "", false); status != 404 {
		t.Fatalf("unknown channel: %d", status)
	}
}

func TestWebSocketOrigin(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{AllowedOrigins: []string{"https://ops.example.com"}})
	url := "ws" + strings.TrimPrefix(ts.URL, "http") + "/api/ws/status"
	if _, resp, err := websocket.DefaultDialer.Dial(url, http.Header{"Origin": {"https://evil.example.net"}}); err == nil || resp.StatusCode != 403 {
		t.Fatalf("foreign origin admitted: %v", err)
	}
	dial(t, ts, "status", http.Header{"Origin": {"https://ops.example.com"}})
	dial(t, ts, "status", http.Header{"Origin": {ts.URL}})
}

// A client that does not read is cut off with 1013 and never delays a
// client that does.
func TestSlowClientDoesNotDelayOthers(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{QueueLen: 8})
	slow := dial(t, ts, "metrics", nil)
	fast := dial(t, ts, "metrics", nil)
	readMsg(t, fast) // connected
	received := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		for i := 0; i < 200; i++ {
			fast.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, _, err := fast.ReadMessage(); err != nil {
				return
			}
		}
		received <- time.Since(start)
	}()
	payload := map[string]string{"pad": strings.Repeat("y", 32<<10)}
	for i := 0; i < 200; i++ {
		ts.hub.Publish("metrics", NewMessage("metrics_update", payload))
		time.Sleep(time.Millisecond)
	}
	select {
	case <-received:
	case <-time.After(5 * time.Second):
		t.Fatal("the fast client did not get its 200 messages while a slow client was connected")
	}
	// The slow client is closed with 1013 once its queue overflowed.
	var closeErr *websocket.CloseError
	slow.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		_, _, err := slow.ReadMessage()
		if err == nil {
			continue
		}
		if ce, ok := err.(*websocket.CloseError); ok {
			closeErr = ce
		}
		break
	}
	if closeErr == nil || closeErr.Code != closeTryAgainLater {
		t.Fatalf("slow client closed with %v, want 1013", closeErr)
	}
	if n := ts.hub.Clients()["metrics"]; n != 1 {
		t.Fatalf("%d metrics clients after the slow one was cut, want 1", n)
	}
	if !slices.Contains(Channels, "metrics") {
		t.Fatal("channels changed")
	}
}

func (f *fakeController) DrainProxy(context.Context) error { return nil }
