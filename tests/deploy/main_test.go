package deploy

import (
	"context"
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

// requireTool returns the path of an external tool the test needs. A
// missing tool skips the test, or fails it when VELOFLUX_REQUIRE_PRIV=1:
// CI installs the tools, so there a skip would hide a missing install
// step. pkg is the Debian package that provides the tool.
func requireTool(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv(lab.RequirePrivEnv) == "1" {
		t.Fatalf("%s not found (Debian package %s) and %s=1", name, pkg, lab.RequirePrivEnv)
	}
	t.Skipf("%s not found: apt-get install %s (set %s=1 to fail instead)", name, pkg, lab.RequirePrivEnv)
	return ""
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
