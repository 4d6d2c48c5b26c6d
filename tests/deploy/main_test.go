package deploy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"
)

func TestMain(m *testing.M) { agenttest.Main(m) }

// binaryEnv names a prebuilt veloflux binary for TestAlertMetricsExist
// instead of building ./cmd/veloflux from this checkout.
const binaryEnv = "VELOFLUX_DEPLOY_BINARY"

// repoPath returns the absolute path of a file or directory of this
// checkout, given relative to the module root.
func repoPath(t testing.TB, rel string) string {
	t.Helper()
	root, err := agenttest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, filepath.FromSlash(rel))
}

// readYAML decodes a file of this checkout into v, rejecting unknown keys
// when v is a struct, so that a misspelt key in a shipped file fails here
// rather than being ignored by the test.
func readYAML(t testing.TB, rel string, v any) {
	t.Helper()
	f, err := os.Open(repoPath(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("decode %s: %v", rel, err)
	}
}

// run runs a command with a timeout and returns its combined output. The
// timeout is its only deadline: cleanups use run too, and t.Context() is
// already canceled when they run.
func run(t testing.TB, dir string, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// agentSpec is what differs between the agents the tests run: one dsr VIP
// over the lab's backends, http-checked, the L7 proxy routing / to them, and
// a BGP speaker.
type agentSpec struct {
	name                string
	lab                 *lab.Lab
	vip                 netip.Addr
	api, metrics, proxy string // listen addresses
	tokenFile           string // "" keeps the default
}

// agentConfig is the agent's configuration file for s, attached to the lab's
// balancer veth.
func agentConfig(s agentSpec) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node:\n  name: %s\n", s.name)
	fmt.Fprintf(&b, "dataplane:\n  interfaces: [%s]\n  xdp_mode: native\n  conntrack_size: 65536\n", s.lab.Balancer.IfName)
	fmt.Fprintf(&b, "api:\n  listen: %q\n", s.api)
	if s.tokenFile != "" {
		fmt.Fprintf(&b, "  token_file: %s\n", s.tokenFile)
	}
	fmt.Fprintf(&b, "metrics:\n  listen: %q\n", s.metrics)
	fmt.Fprintf(&b, "proxy:\n  enabled: true\n  http_listen: %q\n", s.proxy)
	b.WriteString("pools:\n  - name: web\n    backends:\n")
	for _, be := range s.lab.Backends {
		fmt.Fprintf(&b, "      - {address: %s, port: %d}\n", be.Addr4, lab.HTTPPort)
	}
	b.WriteString("    health_check: {type: http, path: /healthz, interval: 500ms, timeout: 200ms, rise: 1, fall: 2}\n")
	fmt.Fprintf(&b, "vips:\n  - {address: %s, port: %d, protocol: tcp, mode: dsr, pool: web}\n", s.vip, lab.HTTPPort)
	b.WriteString("routes:\n  - {path_prefix: /, pool: web}\n")
	// A BGP peer nobody answers for: the veloflux_bgp_* families exist
	// (the session is down, the VIP announced to no one).
	b.WriteString("bgp:\n  asn: 65001\n  peers:\n    - {address: 127.0.0.1, asn: 65000, port: 9}\n")
	return b.String()
}
