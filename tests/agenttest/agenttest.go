// Package agenttest is the harness that VeloFlux's privileged test packages
// (tests/e2e, tests/live, tests/bench and tests/browser) share to run the
// real agent: BuildAgent builds the `veloflux` binary from this checkout
// once per test binary (or takes a prebuilt one named by an environment
// variable), and MountBPFFS mounts a private BPF filesystem for the agent's
// --pin-path, so no pin reaches the host's, which the test's cleanup empties
// and unmounts.
//
// A package that calls BuildAgent runs its tests through Main, which removes
// the binaries built for it once they have all run:
//
//	func TestMain(m *testing.M) { agenttest.Main(m) }
package agenttest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// build is one BuildAgent result, made at most once.
type build struct {
	once sync.Once
	dir  string // temporary directory holding a built binary; "" for a prebuilt one
	bin  string
	err  error
}

// builds caches BuildAgent's results for one test binary, one per
// environment variable name: every caller that passes the same envOverride
// shares one build (or one prebuilt path), and callers with different
// overrides never share one.
type builds struct {
	mu    sync.Mutex
	byEnv map[string]*build
}

var cache builds

// get returns the build for envOverride, making an empty one the first time.
func (c *builds) get(envOverride string) *build {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byEnv == nil {
		c.byEnv = map[string]*build{}
	}
	b := c.byEnv[envOverride]
	if b == nil {
		b = &build{}
		c.byEnv[envOverride] = b
	}
	return b
}

// removeAll removes every directory a binary was built in.
func (c *builds) removeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range c.byEnv {
		if b.dir != "" {
			os.RemoveAll(b.dir)
		}
	}
}

// Main runs m's tests, then removes the binaries BuildAgent built and exits
// with m's code. Call it from the TestMain of every package that calls
// BuildAgent; without it the built binaries stay in the temp directory.
func Main(m *testing.M) {
	code := m.Run()
	cache.removeAll()
	os.Exit(code)
}

// BuildAgent builds ./cmd/veloflux once per test binary into a temp dir (or
// returns the binary named by the env var envOverride when set) and returns
// its path. The first test that needs it pays for the build and logs its
// duration; a failed build, or an override naming no file, fails every test
// that asks. An empty envOverride means no override.
func BuildAgent(tb testing.TB, envOverride string) string {
	tb.Helper()
	b := cache.get(envOverride)
	b.once.Do(func() { b.bin, b.err = b.make(tb, envOverride) })
	if b.err != nil {
		tb.Fatal(b.err)
	}
	return b.bin
}

func (b *build) make(tb testing.TB, envOverride string) (string, error) {
	if envOverride != "" {
		if p := os.Getenv(envOverride); p != "" {
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("%s: %w", envOverride, err)
			}
			return filepath.Abs(p)
		}
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	if b.dir, err = os.MkdirTemp("", "veloflux-agenttest-"); err != nil {
		return "", err
	}
	bin := filepath.Join(b.dir, "veloflux")
	start := time.Now()
	if err := GoBuild(root, "./cmd/veloflux", bin); err != nil {
		return "", err
	}
	tb.Logf("built %s in %s", bin, time.Since(start).Round(time.Millisecond))
	return bin, nil
}

// GoBuild builds the package pkg (a path relative to the module root, like
// "./cmd/veloflux") of the module at root into the binary out.
func GoBuild(root, pkg, out string) error {
	cmd := exec.Command(goTool(), "build", "-o", out, pkg)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s in %s: %v\n%s", pkg, root, err, msg)
	}
	return nil
}

// goTool is the go command: the one on $PATH (`go test` puts its own
// first), else the one in $GOROOT.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "go" // the build then fails saying that go is not found
}

// ModuleRoot returns the module root directory (absolute), found from this
// source file's location.
func ModuleRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate the agenttest source")
	}
	root := filepath.Join(filepath.Dir(file), "..", "..")
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("no go.mod at %s: %w", root, err)
	}
	return filepath.Abs(root)
}

// MountBPFFS mounts a private BPF filesystem on dir/bpffs and returns a pin
// path inside it (dir/bpffs/veloflux) for the agent's --pin-path. dir should
// be a tb.TempDir() made before the call: the cleanup registered here then
// runs before the directory is removed. The cleanup removes the pins left
// under the pin path (removing a link's last pin detaches its XDP program)
// and unmounts the filesystem (MNT_DETACH); a failure of either is a test
// error.
func MountBPFFS(tb testing.TB, dir string) string {
	tb.Helper()
	mnt := filepath.Join(dir, "bpffs")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		tb.Fatal(err)
	}
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		tb.Fatalf("mount bpffs on %s: %v", mnt, err)
	}
	pin := filepath.Join(mnt, "veloflux")
	tb.Cleanup(func() {
		if err := dataplane.RemovePins(pin); err != nil {
			tb.Errorf("remove pins under %s: %v", pin, err)
		}
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount bpffs %s: %v", mnt, err)
		}
	})
	return pin
}
