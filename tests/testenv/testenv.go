// Package testenv gates VeloFlux's tests on what the machine offers: root,
// and the external tools a test drives. A test that cannot run skips with
// the reason, except when VELOFLUX_REQUIRE_PRIV=1 (as CI sets it): there a
// skip would hide a missing privilege or install step, so it fails.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// RequirePrivEnv names the variable that turns skips into failures.
const RequirePrivEnv = "VELOFLUX_REQUIRE_PRIV"

// Required reports whether skips are failures in this run.
func Required() bool { return os.Getenv(RequirePrivEnv) == "1" }

// RequireRoot skips tb unless the process runs as root, or fails it when
// Required. why says what needs root, e.g. "load BPF programs".
func RequireRoot(tb testing.TB, why string) {
	tb.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if Required() {
		tb.Fatalf("needs root to %s, and %s=1", why, RequirePrivEnv)
	}
	tb.Skipf("needs root to %s (set %s=1 to fail instead)", why, RequirePrivEnv)
}

// RequireTool returns the path of the external tool name, which Debian's
// package pkg provides. A missing tool skips tb, or fails it when Required.
func RequireTool(tb testing.TB, name, pkg string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if Required() {
		tb.Fatalf("%s not found (Debian package %s) and %s=1", name, pkg, RequirePrivEnv)
	}
	tb.Skipf("%s not found: apt-get install %s (set %s=1 to fail instead)", name, pkg, RequirePrivEnv)
	return ""
}

// SkipOrFail skips tb with reason, or fails it when Required: for a missing
// prerequisite other than root or a tool on PATH.
func SkipOrFail(tb testing.TB, reason string) {
	tb.Helper()
	if Required() {
		tb.Fatalf("%s, and %s=1", reason, RequirePrivEnv)
	}
	tb.Skipf("%s (set %s=1 to fail instead)", reason, RequirePrivEnv)
}
