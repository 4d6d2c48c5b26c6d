package lab

import (
	"log/slog"
	"os"
	"testing"
)

// RequirePrivEnv, when set to "1", turns ForTest's "not root" skip into a
// failure, so CI that is meant to run privileged tests cannot pass by
// silently skipping them.
const RequirePrivEnv = "VELOFLUX_REQUIRE_PRIV"

// ForTest builds a lab for t and removes it in t.Cleanup, which also runs
// when the test fails or panics. Without root it skips (or fails, see
// RequirePrivEnv). Unless opts.Logger is set, lab logs go to the test log.
func ForTest(t testing.TB, opts Options) *Lab {
	t.Helper()
	RequireRoot(t)
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	l, err := New(t.Context(), opts)
	if err != nil {
		t.Fatalf("build lab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("close lab %s: %v", l.Prefix, err)
		}
	})
	return l
}

// RequireRoot skips t unless the process runs as root, or fails it when
// RequirePrivEnv is "1".
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(RequirePrivEnv) == "1" {
		t.Fatalf("needs root (network namespaces, veth, XDP) and %s=1", RequirePrivEnv)
	}
	t.Skipf("needs root (network namespaces, veth, XDP); set %s=1 to fail instead", RequirePrivEnv)
}
