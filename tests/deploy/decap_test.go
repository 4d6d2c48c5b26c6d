package deploy

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/veloflux/veloflux/agent/config"
)

// unitDirectives returns the values of a directive in a systemd unit.
func unitDirectives(t *testing.T, unit []byte, key string) []string {
	t.Helper()
	var out []string
	for _, m := range regexp.MustCompile(`(?m)^`+key+`=(.*)$`).FindAllSubmatch(unit, -1) {
		out = append(out, string(m[1]))
	}
	return out
}

// deploy/veloflux-decap.service runs `veloflux decap` on the example
// settings' path with the agent's three BPF capabilities and no others,
// hardened at least as the agent's unit is; deploy/decap.yaml, the example
// the unit reads, validates; systemd, where installed, accepts the unit.
func TestDecapUnit(t *testing.T) {
	unit, err := os.ReadFile(repoPath(t, "deploy/veloflux-decap.service"))
	if err != nil {
		t.Fatal(err)
	}
	agentUnit, err := os.ReadFile(repoPath(t, "deploy/veloflux.service"))
	if err != nil {
		t.Fatal(err)
	}
	exec0 := unitDirectives(t, unit, "ExecStart")
	if len(exec0) != 1 || !strings.Contains(exec0[0], " decap --config /etc/veloflux/decap.yaml") {
		t.Errorf("ExecStart %q: want one running veloflux decap --config /etc/veloflux/decap.yaml", exec0)
	}
	want := []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}
	for _, key := range []string{"AmbientCapabilities", "CapabilityBoundingSet"} {
		got := unitDirectives(t, unit, key)
		if len(got) != 1 || !slices.Equal(strings.Fields(got[0]), want) {
			t.Errorf("%s %q, want %v", key, got, want)
		}
	}
	for _, key := range []string{"NoNewPrivileges", "ProtectHome", "PrivateTmp", "LimitMEMLOCK", "KillSignal", "ExecReload", "Restart"} {
		if a, d := unitDirectives(t, agentUnit, key), unitDirectives(t, unit, key); !slices.Equal(a, d) {
			t.Errorf("%s: the agent's unit says %q, the decapsulator's %q", key, a, d)
		}
	}

	cfg, err := config.Load(repoPath(t, "deploy/decap.yaml"))
	if err != nil {
		t.Fatalf("deploy/decap.yaml: %v", err)
	}
	if cfg.Decap == nil || len(cfg.Decap.Interfaces) == 0 || len(cfg.Decap.Local) == 0 || len(cfg.VIPs) != 0 {
		t.Errorf("deploy/decap.yaml is not a backend's decap section alone: %+v", cfg)
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (package systemd); the unit's syntax is not verified")
	}
	out, _ := exec.Command(analyze, "verify", repoPath(t, "deploy/veloflux-decap.service")).CombinedOutput()
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		// The binary is installed by install.sh, not here.
		if line != "" && !strings.Contains(line, "is not executable") {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
}
