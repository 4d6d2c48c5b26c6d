package lab

import (
	"log/slog"
	"testing"

	"github.com/veloflux/veloflux/tests/testenv"
)

// ForTest builds a lab for t and removes it in t.Cleanup, which also runs
// when the test fails or panics. Without root it skips (or fails, see
// testenv). Unless opts.Logger is set, lab logs go to the test log.
func ForTest(t testing.TB, opts Options) *Lab {
	t.Helper()
	testenv.RequireRoot(t, "build network namespaces")
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
