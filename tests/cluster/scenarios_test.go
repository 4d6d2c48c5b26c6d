package cluster

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/veloflux/veloflux/tests/agenttest"
)

// warmUp lets every stream exchange a few times before the event, so a
// stream that breaks at once is told apart from one that never worked.
const warmUp = 400 * time.Millisecond

// TestCluster runs the scenarios one after the other on one cluster (it
// takes some 20 s to build); each leaves the cluster as it found it.
func TestCluster(t *testing.T) {
	c := newCluster(t)
	for _, sc := range []struct {
		name string
		run  func(*testing.T, *cluster)
	}{
		{"NodeKilled", nodeKilled},
		{"NodeSilent", nodeSilent},
		{"AgentRestarted", agentRestarted},
		{"NodeDrained", nodeDrained},
		{"BackendsDownInOneNodesView", backendsDownInOneView},
		{"DifferentBackendSetBreaksFlows", differentBackendSet},
	} {
		if !t.Run(sc.name, func(t *testing.T) { sc.run(t, c) }) {
			// The next scenario would start from a broken cluster.
			t.Fatalf("%s failed; later scenarios not run", sc.name)
		}
	}
}

// nodeKilled: the agent is SIGKILLed and its XDP detached, as when a node
// is taken out: the router's route loses the node within a second, and
// every stream it carried continues on another node with its backend.
func nodeKilled(t *testing.T, c *cluster) {
	victim := c.nodes[2]
	s := c.openStreams(t)
	tunnelled := c.openStreamsTo(t, ipipVIP)
	time.Sleep(warmUp)
	if n := victim.flows(t); n == 0 {
		t.Fatalf("ECMP sent none of the %d streams to %s: the scenario would prove nothing", streamCount, victim.name)
	} else {
		t.Logf("%s carries %d of the %d streams", victim.name, n, streamCount)
	}
	victim.agent.Signal(syscall.SIGKILL)
	victim.agent.Wait(5 * time.Second)
	start := time.Now()
	out, err := victim.host.Command(context.Background(), c.bin, "detach", "--pin-path", victim.pin,
		"--config", victim.cfgPath).CombinedOutput()
	if err != nil {
		t.Fatalf("veloflux detach: %v\n%s", err, out)
	}
	t.Logf("veloflux detach: %s", strings.TrimSpace(string(out)))
	at := c.waitNextHops(t, 2, 5*time.Second)
	t.Logf("MEASURE kill+detach -> router route change: %s", at.Sub(start).Round(time.Millisecond))
	if d := at.Sub(start); d > time.Second {
		t.Errorf("the route lost the killed node %s after detach began, want at most 1s", d)
	}
	if !s.answeredAfter(at, 8*time.Second) || !tunnelled.answeredAfter(at, 8*time.Second) {
		t.Errorf("streams did not all answer after the route changed")
	}
	c.requireIntact(t, s)
	t.Log("ipip VIP:")
	c.requireIntact(t, tunnelled)

	c.startAgent(t, 2)
	c.waitNextHops(t, 3, 15*time.Second)
}

// nodeSilent: the node's link goes down without a BGP close: the router's
// hold timer (3 s) removes the route, and the streams it carried move.
func nodeSilent(t *testing.T, c *cluster) {
	victim := c.nodes[1]
	s := c.openStreams(t)
	time.Sleep(warmUp)
	setLink := func(state string) {
		t.Helper()
		if out, err := c.lab.Switch.Command(context.Background(), "ip", "link", "set", victim.host.PeerName, state).CombinedOutput(); err != nil {
			t.Fatalf("ip link set %s %s: %v: %s", victim.host.PeerName, state, err, out)
		}
	}
	start := time.Now()
	setLink("down")
	t.Cleanup(func() { setLink("up") })
	at := c.waitNextHops(t, 2, holdTime+2*time.Second)
	t.Logf("MEASURE silent (link down) -> router route change: %s", at.Sub(start).Round(time.Millisecond))
	// The router's hold timer runs from the last keepalive it got; a
	// second on top is for BIRD and the kernel on a busy machine.
	if d := at.Sub(start); d > holdTime+time.Second {
		t.Errorf("the silent node's route went after %s, want within the hold time (%s)", d, holdTime)
	}
	// Blackholed segments are retransmitted with backoff; give them the
	// retransmission that follows the route change.
	if !s.answeredAfter(at, 10*time.Second) {
		t.Errorf("streams did not all answer after the route changed")
	}
	c.requireIntact(t, s)

	setLink("up")
	c.waitNextHops(t, 3, 20*time.Second)
}

// agentRestarted: SIGTERM and a new agent, with graceful restart: the
// router keeps all three next hops throughout, and no stream moves.
func agentRestarted(t *testing.T, c *cluster) {
	victim := c.nodes[0]
	s := c.openStreams(t)
	time.Sleep(warmUp)
	start := time.Now()
	if code := victim.agent.Stop(); code != 0 {
		t.Fatalf("%s's agent exited with %d after SIGTERM", victim.name, code)
	}
	c.startAgent(t, 0)
	// Wait for the new agent's session and its announcement.
	deadline := time.Now().Add(20 * time.Second)
	for {
		var b struct {
			Peers []struct {
				Up         bool     `json:"up"`
				RoutesSent []string `json:"routes_sent"`
			} `json:"peers"`
		}
		victim.call(t, http.MethodGet, "/api/bgp", &b)
		if len(b.Peers) == 1 && b.Peers[0].Up && len(b.Peers[0].RoutesSent) == 2 { // both VIPs
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted agent did not re-announce: %+v\n%s", b, c.birdc("show", "protocols", "all", victim.name))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("MEASURE restart: SIGTERM -> route re-announced by the new agent: %s", time.Since(start).Round(time.Millisecond))
	time.Sleep(time.Second) // let the router process the End-of-RIB
	if changes := c.routes.since(start); len(changes) > 0 {
		t.Errorf("the router's route changed during the restart: %+v", changes)
	}
	r := c.requireIntact(t, s)
	if r.moved > 0 {
		t.Errorf("%d streams moved", r.moved)
	}
}

// nodeDrained: POST /api/node/drain withdraws the VIP within a second while
// the data path keeps forwarding; DELETE announces it again.
func nodeDrained(t *testing.T, c *cluster) {
	victim := c.nodes[0]
	s := c.openStreams(t)
	time.Sleep(warmUp)
	start := time.Now()
	victim.call(t, http.MethodPost, "/api/node/drain", nil)
	t.Cleanup(func() { victim.call(t, http.MethodDelete, "/api/node/drain", nil) })
	at := c.waitNextHops(t, 2, 3*time.Second)
	t.Logf("MEASURE drain -> router route change: %s", at.Sub(start).Round(time.Millisecond))
	if d := at.Sub(start); d > time.Second {
		t.Errorf("the drained node's route went after %s, want at most 1s", d)
	}
	if !s.answeredAfter(at, 5*time.Second) {
		t.Errorf("streams did not all answer after the route changed")
	}
	c.requireIntact(t, s)

	// The drain is kept across a restart.
	if b, err := os.ReadFile(filepath.Join(victim.dir, "state", "node-drained.json")); err != nil || !strings.Contains(string(b), `"drained":true`) {
		t.Errorf("node drain not persisted: %s, %v", b, err)
	}
	victim.call(t, http.MethodDelete, "/api/node/drain", nil)
	c.waitNextHops(t, 3, 5*time.Second)
}

// backendsDownInOneView: one node cannot reach any backend's health check
// port (the others can): it withdraws the VIP.
func backendsDownInOneView(t *testing.T, c *cluster) {
	victim := c.nodes[1]
	// Only what the node's own stack sends (its health checks) goes
	// through OUTPUT; what XDP transmits does not.
	rule := []string{"OUTPUT", "-p", "tcp", "--dport", strconv.Itoa(streamPort), "-j", "REJECT", "--reject-with", "tcp-reset"}
	iptables := func(op string) error {
		out, err := victim.host.Command(context.Background(), "iptables", append([]string{op}, rule...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("iptables %s %v: %v: %s", op, rule, err, out)
		}
		return nil
	}
	s := c.openStreams(t)
	time.Sleep(warmUp)
	start := time.Now()
	if err := iptables("-A"); err != nil {
		t.Fatal(err)
	}
	removed := false
	t.Cleanup(func() {
		if !removed {
			_ = iptables("-D")
		}
	})
	at := c.waitNextHops(t, 2, 5*time.Second)
	t.Logf("MEASURE all backends down in one node's view -> router route change: %s (health checks: interval 200ms, fall 2)",
		at.Sub(start).Round(time.Millisecond))
	// The node's checks fail one backend after the other, and between
	// the first and the last its data path moves the flows of the
	// backends it already sees down, as a single node would: a stream it
	// carried may break then. The router's route is what this asserts;
	// the streams are reported.
	s.answeredAfter(at, 3*time.Second)
	r := s.report()
	t.Logf("streams: %d/%d survived, %d changed backend (flows through %s to a backend it saw down first may move)",
		streamCount-r.broken, streamCount, r.moved, victim.name)

	if err := iptables("-D"); err != nil {
		t.Fatal(err)
	}
	removed = true
	c.waitNextHops(t, 3, 10*time.Second)
	// The route is back with the first backend up again; the scenarios
	// after this one want every backend up in every node's view.
	c.waitFingerprintsAgree(t, 10*time.Second)
}

// waitFingerprintsAgree waits until every node has the same ring for the
// VIP.
func (c *cluster) waitFingerprintsAgree(t *testing.T, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		fps := map[string]bool{}
		for _, n := range c.nodes {
			fps[n.fingerprint(t)] = true
		}
		if len(fps) == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the nodes' fingerprints still differ after %s: %v", within, fps)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// differentBackendSet is the negative control: one node is configured with
// another backend set. Its ring fingerprint differs (and the alert rule
// fires on the values it exports), and when the router moves streams onto
// it, some break or change backend: the scenarios above could fail.
func differentBackendSet(t *testing.T, c *cluster) {
	odd := c.nodes[2]
	c.waitFingerprintsAgree(t, 10*time.Second)
	odd.writeConfig(t, c, c.lab.Backends[:2])
	odd.agent.Signal(syscall.SIGHUP)
	t.Cleanup(func() {
		odd.writeConfig(t, c, c.lab.Backends)
		odd.agent.Signal(syscall.SIGHUP)
	})
	deadline := time.Now().Add(10 * time.Second)
	for odd.fingerprint(t) == c.nodes[0].fingerprint(t) {
		if time.Now().After(deadline) {
			t.Fatal("the fingerprints still agree after the odd node's reload")
		}
		time.Sleep(100 * time.Millisecond)
	}
	fps := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		fps[i] = n.fingerprint(t)
	}
	t.Logf("fingerprints: %v", fps)
	if fps[0] != fps[1] || fps[2] == fps[0] {
		t.Errorf("fingerprints %v: want nodes 0 and 1 equal and node 2 different", fps)
	}
	checkFingerprintAlert(t, c)

	s := c.openStreams(t)
	time.Sleep(warmUp)
	if c.nodes[2].flows(t) == streamCount {
		t.Fatal("every stream went to the odd node already; nothing would move")
	}
	// Move every stream onto the odd node.
	for _, n := range c.nodes[:2] {
		n.call(t, http.MethodPost, "/api/node/drain", nil)
		t.Cleanup(func() { n.call(t, http.MethodDelete, "/api/node/drain", nil) })
	}
	at := c.waitNextHops(t, 1, 3*time.Second)
	s.answeredAfter(at, 3*time.Second)
	r := s.report()
	t.Logf("negative control: %d/%d streams broke, %d changed backend", r.broken, streamCount, r.moved)
	if r.broken+r.moved == 0 {
		t.Error("no stream broke although one node has another backend set: the test cannot fail")
	}
	for _, n := range c.nodes[:2] {
		n.call(t, http.MethodDelete, "/api/node/drain", nil)
	}
	c.waitNextHops(t, 3, 5*time.Second)
}

// checkFingerprintAlert evaluates the expression of the
// VelofluxRingFingerprintMismatch rule of deploy/prometheus/alerts.yml with
// promtool over the values the three nodes export now, and requires it to
// find the VIP with two different fingerprints.
func checkFingerprintAlert(t *testing.T, c *cluster) {
	t.Helper()
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Logf("promtool not installed; the alert rule is checked by tests/deploy only: %v", err)
		return
	}
	root, err := agenttest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	expr := ruleExpr(t, filepath.Join(root, "deploy", "prometheus", "alerts.yml"), "VelofluxRingFingerprintMismatch")
	var series strings.Builder
	var vipLabel string
	for _, n := range c.nodes {
		line := n.scrapeFingerprint(t) // veloflux_vip_ring_fingerprint{vip="..."} value
		labels, value, _ := strings.Cut(line, "} ")
		vipLabel = strings.TrimSuffix(strings.TrimPrefix(labels, `veloflux_vip_ring_fingerprint{vip="`), `"`)
		fmt.Fprintf(&series, "      - series: 'veloflux_vip_ring_fingerprint{job=\"veloflux\", instance=%q, vip=%q}'\n        values: '%sx2'\n",
			n.name, vipLabel, value)
	}
	test := fmt.Sprintf(`evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
%s    promql_expr_test:
      - expr: %q
        eval_time: 1m
        exp_samples:
          - labels: '{vip=%q}'
            value: 2
`, series.String(), expr, vipLabel)
	path := filepath.Join(t.TempDir(), "fingerprint_test.yml")
	if err := os.WriteFile(path, []byte(test), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "test", "rules", path).CombinedOutput(); err != nil {
		t.Errorf("the fingerprint alert's expression does not find the mismatch: %v\n%s\n%s", err, test, out)
	}
}

// ruleExpr returns the expression of alert name in a rules file.
func ruleExpr(t *testing.T, path, name string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(data, &f); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			if r.Alert == name {
				return r.Expr
			}
		}
	}
	t.Fatalf("%s has no alert %s", path, name)
	return ""
}
