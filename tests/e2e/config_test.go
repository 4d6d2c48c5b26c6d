package e2e

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/agenttest"
)

// typoConfig is e.webConfig with "address" misspelt in backends[typoAt].
func (e *env) typoConfig(typoAt int, idx ...int) string {
	text := e.webConfig(false, idx...)
	lines := strings.Split(text, "\n")
	n := -1
	for i, l := range lines {
		if strings.Contains(l, "{address: ") {
			if n++; n == typoAt {
				lines[i] = strings.Replace(l, "{address: ", "{adress: ", 1)
			}
		}
	}
	return strings.Join(lines, "\n")
}

// TestBadConfig:
//   - the agent started on an invalid file exits with code 2, prints each
//     error with its path, and pins nothing;
//   - `veloflux validate` exits 2 listing every error of a file, and 0 on a
//     good one;
//   - a bad reload (SIGHUP on an invalid rewrite) is rejected with its
//     errors logged, the agent keeps running, and the data plane (VIPs,
//     reals, ring) and traffic stay exactly as they were; a good reload
//     afterwards still applies.
func TestBadConfig(t *testing.T) {
	e := newEnv(t, 3, vip4)

	t.Run("StartExits2", func(t *testing.T) {
		e := e.with(t)
		e.writeConfig(e.typoConfig(0))
		p := e.runBinary("agent-bad", "--config", e.cfg, "--pin-path", e.pin, "--state-dir", e.state, "--log-format", "text")
		if code := p.Wait(10 * time.Second); code != 2 {
			t.Fatalf("agent on an invalid config exited with %d, want 2", code)
		}
		out := p.LogText()
		for _, want := range []string{"pools[0].backends[0].adress", "unknown field", "pools[0].backends[0].address"} {
			if !strings.Contains(out, want) {
				t.Errorf("agent output lacks %q:\n%s", want, out)
			}
		}
		if _, err := os.Stat(e.pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("an agent that refused its config created %s (%v)", e.pin, err)
		}
		if x, err := e.xdpOnBalancer(); err != nil || (x != nil && x.Attached) {
			t.Errorf("an agent that refused its config attached XDP: %+v %v", x, err)
		}
	})

	t.Run("Validate", func(t *testing.T) {
		e := e.with(t)
		bad := filepath.Join(e.dir, "bad.yaml")
		text := e.typoConfig(0)
		text = strings.Replace(text, "port: 80}", "port: 70000}", 2) // backends[0] (with the typo) and [1]
		text = strings.Replace(text, "pool: web}", "pool: nope}", 1)
		text = strings.Replace(text, "  conntrack_size: 65536\n", "  conntrack_size: 65536\n  ring_size: 65536\n", 1)
		agenttest.WriteFileAtomic(t, bad, text)
		code, stdout, stderr := runExit(t, e.bin, "validate", "--config", bad)
		t.Logf("validate %s: exit %d\nstdout:\n%sstderr:\n%s", bad, code, stdout, stderr)
		if code != 2 {
			t.Errorf("validate on an invalid file exited %d, want 2", code)
		}
		for _, want := range []string{
			"pools[0].backends[0].adress: unknown field",
			"pools[0].backends[0].address: required",
			"pools[0].backends[1].port: must be between 1 and 65535, got 70000",
			`vips[0].pool: unknown pool "nope"`,
			"dataplane.ring_size: must be a prime number",
		} {
			if !strings.Contains(stderr, want) {
				t.Errorf("validate output lacks %q", want)
			}
		}

		good := filepath.Join(e.dir, "good.yaml")
		agenttest.WriteFileAtomic(t, good, e.webConfig(true))
		code, stdout, stderr = runExit(t, e.bin, "validate", "--config", good)
		if code != 0 || !strings.Contains(stdout, "valid") {
			t.Errorf("validate on a good file: exit %d, stdout %q, stderr %q; want 0 and \"valid\"", code, stdout, stderr)
		}
		t.Logf("validate %s: exit %d: %s", good, code, strings.TrimSpace(stdout))
	})

	t.Run("BadReload", func(t *testing.T) {
		e := e.with(t)
		e.writeConfig(e.webConfig(false))
		a := e.startAgent()
		e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
		before := e.snapshot()
		pre := load(t.Context(), e.http, vipURL(vip4), 90, 0, 30*time.Second, nil)
		t.Logf("before the bad reload: %s", pre)

		// The rewrite would drop backend-2, if it were applied at all.
		mark := a.LogLines()
		e.writeConfig(e.typoConfig(1, 0, 1))
		a.Signal(syscall.SIGHUP)
		// The agent must log each error with its path.
		a.WaitLog("pools[0].backends[1].adress", mark, 10*time.Second)
		if logged := a.LogSince(mark); !strings.Contains(logged, "unknown field") {
			t.Errorf("the rejected reload's log lacks \"unknown field\":\n%s", logged)
		}
		// Give a wrongly applied config time to show (health, reconcile).
		time.Sleep(2 * checkInterval)
		if a.Exited() {
			t.Fatalf("agent exited after a bad reload: %v", a.Err())
		}
		after := e.snapshot()
		if !before.equal(after) {
			t.Errorf("a rejected reload changed the data plane:\nbefore %v\nafter  %v", before, after)
		}
		tl := load(t.Context(), e.http, vipURL(vip4), 150, 0, 30*time.Second, nil)
		t.Logf("after the bad reload: %s", tl)
		if tl.n != 150 || tl.fails != 0 || len(tl.counts) != 3 {
			t.Errorf("after a rejected reload, want 150 successes over all 3 backends, got %s", tl)
		}

		// The agent still takes a good reload: now backend-2 goes.
		e.writeConfig(e.webConfig(false, 0, 1))
		a.Signal(syscall.SIGHUP)
		gone := e.lab.Backends[2].Addr4
		e.waitReals("backend-2 removed by a good reload", 10*time.Second, func(r map[netip.Addr]dataplane.Real) bool {
			_, ok := r[gone]
			return !ok
		})
		tl = load(t.Context(), e.http, vipURL(vip4), 90, 0, 30*time.Second, nil)
		t.Logf("after a good reload without backend-2: %s", tl)
		if tl.fails != 0 || tl.counts["backend-2"] != 0 || len(tl.counts) != 2 {
			t.Errorf("after a good reload without backend-2, want 90 successes on backend-0/1, got %s", tl)
		}
	})
}

// runExit runs the binary outside the lab (validate needs no namespace)
// and returns its exit code and output.
func runExit(t *testing.T, bin string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr strings.Builder
	cmd := exec.CommandContext(t.Context(), bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var xerr *exec.ExitError
	if err != nil && !errors.As(err, &xerr) {
		t.Fatalf("run %s %v: %v", bin, args, err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// dpSnapshot is what a reload could change in the data plane.
type dpSnapshot struct {
	vips  map[dataplane.VIP]dataplane.VIPMeta
	reals map[uint32]dataplane.Real
	rings map[uint32][]uint32
}

func (e *env) snapshot() dpSnapshot {
	e.t.Helper()
	dp, err := dataplane.OpenPinned(e.pin)
	if err != nil {
		e.t.Fatal(err)
	}
	defer dp.Close()
	s := dpSnapshot{rings: map[uint32][]uint32{}}
	if s.vips, err = dp.VIPs(); err != nil {
		e.t.Fatal(err)
	}
	if s.reals, err = dp.Reals(); err != nil {
		e.t.Fatal(err)
	}
	for _, m := range s.vips {
		if s.rings[m.ID], err = dp.Ring(m.ID); err != nil {
			e.t.Fatal(err)
		}
	}
	return s
}

func (s dpSnapshot) equal(o dpSnapshot) bool {
	if len(s.vips) != len(o.vips) || len(s.reals) != len(o.reals) || len(s.rings) != len(o.rings) {
		return false
	}
	for k, v := range s.vips {
		if o.vips[k] != v {
			return false
		}
	}
	for k, v := range s.reals {
		w, ok := o.reals[k]
		if !ok || w.Addr != v.Addr || w.State != v.State || w.MAC.String() != v.MAC.String() {
			return false
		}
	}
	for k, v := range s.rings {
		if !slices.Equal(v, o.rings[k]) {
			return false
		}
	}
	return true
}

func (s dpSnapshot) String() string {
	var b strings.Builder
	for v, m := range s.vips {
		fmt.Fprintf(&b, "vip %s id %d %s; ", v, m.ID, m.Mode)
	}
	for id, r := range s.reals {
		fmt.Fprintf(&b, "real %d %s %s %s; ", id, r.Addr, r.MAC, r.State)
	}
	return b.String()
}
