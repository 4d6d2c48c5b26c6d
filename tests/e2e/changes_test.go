package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/vishvananda/netlink/nl"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// TestChangesAreAllOrNothing: every configuration change, by SIGHUP or by
// the API, is applied whole or not at all, and what the agent reports as
// in force is what runs.
//   - a reload naming an interface that does not exist is rejected before
//     anything moved: no new VIP in the maps, /api/config unchanged, XDP
//     still on the old interface and /health 200;
//   - an API write whose save fails answers 500 and leaves the running
//     state as it was;
//   - racing drains and undrains leave the maps, the API and the saved set
//     agreeing, right after the last answer;
//   - api.listen, metrics.listen, api.token_file, api.protect_reads,
//     api.allowed_origins and dataplane.xdp_mode change with a reload;
//   - a reload of a file without VIPs is refused unless it says
//     `vips: []`.
func TestChangesAreAllOrNothing(t *testing.T) {
	e := newEnv(t, 2, vip4)
	e.writeConfig(e.webConfig(false))
	a := e.startAgent()
	e.waitServing(vipURL(vip4), []int{0, 1}, 10*time.Second)
	api := &agentAPI{e: e, base: "http://127.0.0.1:9090", tokenFile: filepath.Join(e.state, "api.token")}

	t.Run("ReloadWithMissingInterface", func(t *testing.T) {
		e := e.with(t)
		before := e.snapshot()
		next := strings.Replace(e.webConfig(true), "interfaces: ["+e.lab.Balancer.IfName+"]",
			"interfaces: ["+e.lab.Balancer.IfName+", vfe2enosuch0]", 1)
		mark := a.LogLines()
		e.writeConfig(next)
		a.Signal(syscall.SIGHUP)
		a.WaitLog("reload rejected", mark, 10*time.Second)
		if logged := a.LogSince(mark); !strings.Contains(logged, "vfe2enosuch0") {
			t.Errorf("the rejected reload's log does not name the missing interface:\n%s", logged)
		}
		time.Sleep(2 * checkInterval) // room for a wrongly applied change to show
		if after := e.snapshot(); !before.equal(after) {
			t.Errorf("a rejected reload changed the data plane:\nbefore %v\nafter  %v", before, after)
		}
		if vips := api.vips(t); len(vips) != 1 {
			t.Errorf("GET /api/vips after the rejected reload lists %d VIPs, want the 1 in force", len(vips))
		}
		code, body := e.agentGet(healthURL)
		if code != http.StatusOK || body["dataplane_attached"] != true {
			t.Errorf("GET /health after the rejected reload: %d %v; want 200, attached", code, body)
		}
		if tl := load(t.Context(), e.http, vipURL(vip4), 40, 0, 20*time.Second, nil); tl.fails != 0 {
			t.Errorf("traffic after the rejected reload: %s", tl)
		}
		e.writeConfig(e.webConfig(false)) // the file in force again
	})

	t.Run("FailedSaveRollsBack", func(t *testing.T) {
		e := e.with(t)
		before := e.snapshot()
		// A directory where the backup must go makes the save fail after
		// the change was put in force; root cannot write through that.
		bak := e.cfg + ".bak"
		os.RemoveAll(bak)
		if err := os.MkdirAll(filepath.Join(bak, "blocker"), 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(bak) })
		fileBefore, err := os.ReadFile(e.cfg)
		if err != nil {
			t.Fatal(err)
		}
		body := fmt.Sprintf(`{"address": %q, "port": 8443, "protocol": "tcp", "mode": "dsr", "pool": "web"}`, vip4)
		code, answer := api.call(t, http.MethodPost, "/api/vips", body)
		if code != http.StatusInternalServerError {
			t.Fatalf("POST /api/vips with an unwritable backup: %d %s, want 500", code, answer)
		}
		if fileAfter, _ := os.ReadFile(e.cfg); !bytes.Equal(fileBefore, fileAfter) {
			t.Errorf("the failed write changed the configuration file")
		}
		if vips := api.vips(t); len(vips) != 1 {
			t.Errorf("GET /api/vips after a write that answered 500 lists %d VIPs, want the 1 in force", len(vips))
		}
		if after := e.snapshot(); !before.equal(after) {
			t.Errorf("a write that answered 500 changed the data plane:\nbefore %v\nafter  %v", before, after)
		}
		os.RemoveAll(bak)
		if code, answer := api.call(t, http.MethodPost, "/api/vips", body); code != http.StatusCreated {
			t.Fatalf("POST /api/vips once the backup can be written: %d %s, want 201", code, answer)
		}
		id := fmt.Sprintf("tcp:%s:8443", vip4)
		if code, answer := api.call(t, http.MethodDelete, "/api/vips/"+id, ""); code != http.StatusOK && code != http.StatusNoContent {
			t.Fatalf("DELETE /api/vips/%s: %d %s", id, code, answer)
		}
	})

	t.Run("FailedApplyIsNotSaved", func(t *testing.T) {
		e := e.with(t)
		// A second interface, attached by a reload, then deleted: the next
		// API write cannot attach to it and must not reach the file.
		ip := func(args ...string) {
			t.Helper()
			if out, err := e.lab.Balancer.Command(t.Context(), "ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %v: %v: %s", args, err, out)
			}
		}
		ip("link", "add", "vfe2ex0", "type", "veth", "peer", "name", "vfe2ex1")
		ip("link", "set", "vfe2ex0", "up")
		ip("link", "set", "vfe2ex1", "up")
		t.Cleanup(func() { e.lab.Balancer.Command(t.Context(), "ip", "link", "del", "vfe2ex0").Run() })
		two := strings.Replace(e.webConfig(false), "interfaces: ["+e.lab.Balancer.IfName+"]",
			"interfaces: ["+e.lab.Balancer.IfName+", vfe2ex0]", 1)
		mark := a.LogLines()
		e.writeConfig(two)
		a.Signal(syscall.SIGHUP)
		a.WaitLog(reloadApplied, mark, 10*time.Second)
		ip("link", "del", "vfe2ex0")

		before := e.snapshot()
		fileBefore, err := os.ReadFile(e.cfg)
		if err != nil {
			t.Fatal(err)
		}
		body := fmt.Sprintf(`{"address": %q, "port": 8443, "protocol": "tcp", "mode": "dsr", "pool": "web"}`, vip4)
		if code, answer := api.call(t, http.MethodPost, "/api/vips", body); code != http.StatusInternalServerError ||
			!strings.Contains(answer, "vfe2ex0") {
			t.Fatalf("POST /api/vips with a configured interface gone: %d %s, want 500 naming vfe2ex0", code, answer)
		}
		if fileAfter, _ := os.ReadFile(e.cfg); !bytes.Equal(fileBefore, fileAfter) {
			t.Errorf("a write that answered 500 was saved:\n%s", fileAfter)
		}
		if vips := api.vips(t); len(vips) != 1 {
			t.Errorf("GET /api/vips after a write that answered 500 lists %d VIPs, want the 1 in force", len(vips))
		}
		if after := e.snapshot(); !before.equal(after) {
			t.Errorf("a write that answered 500 changed the data plane:\nbefore %v\nafter  %v", before, after)
		}

		mark = a.LogLines()
		e.writeConfig(e.webConfig(false))
		a.Signal(syscall.SIGHUP)
		a.WaitLog(reloadApplied, mark, 10*time.Second)
	})

	t.Run("RacingDrains", func(t *testing.T) {
		e := e.with(t)
		ids := []string{
			fmt.Sprintf("web:%s:80", e.lab.Backends[0].Addr4),
			fmt.Sprintf("web:%s:80", e.lab.Backends[1].Addr4),
		}
		for round := range 4 {
			var wg sync.WaitGroup
			for i := range 30 {
				method := http.MethodPost
				if rand.IntN(2) == 0 {
					method = http.MethodDelete
				}
				id := ids[i%len(ids)]
				wg.Go(func() {
					if code, answer := api.call(t, method, "/api/backends/"+id+"/drain", ""); code >= 300 {
						t.Errorf("round %d: %s drain of %s: %d %s", round, method, id, code, answer)
					}
				})
			}
			wg.Wait()
			// Right after the last answer, before any periodic resync:
			// the API, the saved set and the maps agree.
			drained := api.drained(t)
			saved := savedDrained(t, filepath.Join(e.state, "drained.json"))
			reals := e.realsByAddr()
			for i, id := range ids {
				addr := e.lab.Backends[i].Addr4
				want := dataplane.RealUp
				if drained[id] {
					want = dataplane.RealDraining
				}
				if got := reals[addr].State; got != want {
					t.Errorf("round %d: %s is %s in the maps, but the API says drained=%v", round, id, got, drained[id])
				}
				key := "web/" + strings.TrimPrefix(id, "web:")
				if saved[key] != drained[id] {
					t.Errorf("round %d: %s is drained=%v in drained.json, but the API says %v", round, id, saved[key], drained[id])
				}
			}
		}
		for _, id := range ids {
			api.call(t, http.MethodDelete, "/api/backends/"+id+"/drain", "")
		}
	})

	t.Run("ListenersAndAccessChangeOnReload", func(t *testing.T) {
		e := e.with(t)
		newToken := filepath.Join(e.state, "rotated.token")
		text := strings.Replace(e.webConfig(false), "xdp_mode: native", "xdp_mode: generic", 1)
		text = strings.Replace(text, "api:\n", fmt.Sprintf(
			"metrics:\n  listen: \"127.0.0.1:18080\"\napi:\n  listen: \"127.0.0.1:19090\"\n  protect_reads: true\n"+
				"  allowed_origins: [\"http://dash.example\"]\n  token_file: %s\n", newToken), 1)
		text = strings.Replace(text, "  token_file: "+api.tokenFile+"\n", "", 1)
		mark := a.LogLines()
		e.writeConfig(text)
		a.Signal(syscall.SIGHUP)
		a.WaitLog(reloadApplied, mark, 10*time.Second)

		moved := &agentAPI{e: e, base: "http://127.0.0.1:19090", tokenFile: newToken}
		if code, _ := moved.callNoToken(t, http.MethodGet, "/api/vips"); code != http.StatusUnauthorized {
			t.Errorf("GET /api/vips without a token once protect_reads is on: %d, want 401", code)
		}
		if code, answer := moved.call(t, http.MethodGet, "/api/vips", ""); code != http.StatusOK {
			t.Errorf("GET /api/vips with the token of the new token file: %d %s, want 200", code, answer)
		}
		if code, _ := api.callNoToken(t, http.MethodGet, "/health"); code != 0 {
			t.Errorf("the old API address still answers (%d) after the reload moved it", code)
		}
		if code, _ := (&agentAPI{e: e, base: "http://127.0.0.1:18080"}).callNoToken(t, http.MethodGet, "/metrics"); code != http.StatusOK {
			t.Errorf("GET /metrics on the new metrics address: %d, want 200", code)
		}
		if code, _ := (&agentAPI{e: e, base: "http://127.0.0.1:8080"}).callNoToken(t, http.MethodGet, "/metrics"); code != 0 {
			t.Errorf("the old metrics address still answers (%d)", code)
		}
		if x, err := e.xdpOnBalancer(); err != nil || x == nil || x.AttachMode != nl.XDP_ATTACHED_SKB {
			t.Errorf("after the reload to xdp_mode generic, XDP on the balancer is %+v (%v), want generic", x, err)
		}
		e.waitServing(vipURL(vip4), []int{0, 1}, 10*time.Second)

		dialer := websocket.Dialer{NetDialContext: e.lab.Balancer.DialContext, HandshakeTimeout: 5 * time.Second,
			Subprotocols: []string{"veloflux", "bearer." + moved.token(t)}}
		for origin, want := range map[string]int{"http://dash.example": 101, "http://evil.example": 403} {
			conn, resp, err := dialer.Dial("ws://127.0.0.1:19090/api/ws/metrics", http.Header{"Origin": {origin}})
			got := 0
			if resp != nil {
				got = resp.StatusCode
			}
			if conn != nil {
				conn.Close()
			}
			if got != want {
				t.Errorf("WebSocket from origin %s: %d (%v), want %d", origin, got, err, want)
			}
		}
		*api = *moved // the later subtests talk to the new address
	})

	t.Run("ReloadWithoutVIPsNeedsExplicitEmptyList", func(t *testing.T) {
		e := e.with(t)
		before := e.snapshot()
		current, err := os.ReadFile(e.cfg)
		if err != nil {
			t.Fatal(err)
		}
		head, _, ok := strings.Cut(string(current), "vips:\n")
		if !ok {
			t.Fatalf("no vips section in the configuration:\n%s", current)
		}
		mark := a.LogLines()
		e.writeConfig(head) // as if cut short right before its VIPs
		a.Signal(syscall.SIGHUP)
		a.WaitLog("reload rejected", mark, 10*time.Second)
		if logged := a.LogSince(mark); !strings.Contains(logged, "vips: []") {
			t.Errorf("the refusal does not say how to withdraw every VIP on purpose:\n%s", logged)
		}
		if after := e.snapshot(); !before.equal(after) {
			t.Errorf("a file without VIPs changed the data plane:\nbefore %v\nafter  %v", before, after)
		}

		mark = a.LogLines()
		e.writeConfig(head + "vips: []\n")
		a.Signal(syscall.SIGHUP)
		a.WaitLog(reloadApplied, mark, 10*time.Second)
		if after := e.snapshot(); len(after.vips) != 0 {
			t.Errorf("`vips: []` left %d VIPs in the maps", len(after.vips))
		}
	})
}

// reloadApplied is the agent's log of a successful SIGHUP. It names the
// trigger: an API write's record of the same message may reach the log
// reader after the test marked its position.
const reloadApplied = `msg="configuration applied" trigger=reload`

// agentAPI calls the agent's REST API from the balancer namespace.
type agentAPI struct {
	e         *env
	base      string
	tokenFile string
}

func (c *agentAPI) token(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(c.tokenFile)
	if err != nil {
		t.Fatalf("read the API token: %v", err)
	}
	return strings.TrimSpace(string(data))
}

// call sends a request with the token and returns the status and body.
func (c *agentAPI) call(t *testing.T, method, path, body string) (int, string) {
	t.Helper()
	return c.do(t, method, path, body, c.token(t))
}

// callNoToken returns 0 when nothing listens.
func (c *agentAPI) callNoToken(t *testing.T, method, path string) (int, string) {
	t.Helper()
	return c.do(t, method, path, "", "")
}

func (c *agentAPI) do(t *testing.T, method, path, body, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, c.base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := newHTTPClient(c.e.lab.Balancer, 10*time.Second).Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(data)
}

func (c *agentAPI) vips(t *testing.T) []any {
	t.Helper()
	code, body := c.call(t, http.MethodGet, "/api/vips", "")
	var vips []any
	if code != http.StatusOK || json.Unmarshal([]byte(body), &vips) != nil {
		t.Fatalf("GET /api/vips: %d %s", code, body)
	}
	return vips
}

// drained is the API's view of the drain set, by backend id.
func (c *agentAPI) drained(t *testing.T) map[string]bool {
	t.Helper()
	code, body := c.call(t, http.MethodGet, "/api/backends", "")
	var backends []struct {
		ID      string `json:"id"`
		Drained bool   `json:"drained"`
	}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &backends) != nil {
		t.Fatalf("GET /api/backends: %d %s", code, body)
	}
	out := map[string]bool{}
	for _, b := range backends {
		out[b.ID] = b.Drained
	}
	return out
}

// savedDrained reads the drain set the agent saved, by backend key.
func savedDrained(t *testing.T, path string) map[string]bool {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read the saved drain set: %v", err)
	}
	var st struct {
		Drained []string `json:"drained"`
	}
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatalf("the saved drain set %s does not parse: %v\n%s", path, err, data)
	}
	out := map[string]bool{}
	for _, k := range st.Drained {
		out[k] = true
	}
	return out
}

// realsByAddr reads the pinned reals.
func (e *env) realsByAddr() map[netip.Addr]dataplane.Real {
	e.t.Helper()
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		e.t.Fatal(err)
	}
	defer dp.Close()
	reals, err := dp.Reals()
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[netip.Addr]dataplane.Real{}
	for _, r := range reals {
		out[r.Addr] = r
	}
	return out
}
