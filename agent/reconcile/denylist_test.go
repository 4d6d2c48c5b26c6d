package reconcile

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// A denylist entry written IPv4-mapped reaches the data path as the IPv4
// prefix, the table IPv4 clients are matched against.
func TestDenylistMappedEntryLandsInIPv4Table(t *testing.T) {
	e := newEnv(t)
	e.cfg.Security.Denylist = []string{"::ffff:10.77.0.2", "::ffff:10.78.0.0/112"}
	_, calls := e.reconcile()
	want := []string{"AddDeny 10.77.0.2/32", "AddDeny 10.78.0.0/16"}
	var got []string
	for _, c := range writes(calls) {
		if strings.HasPrefix(c, "AddDeny") {
			got = append(got, c)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("denylist writes %q, want %q", got, want)
	}
	for p := range e.dp.deny {
		if !p.Addr().Is4() {
			t.Errorf("denied %s outside the IPv4 table", p)
		}
	}
	if !e.dp.deny[netip.MustParsePrefix("10.77.0.2/32")] {
		t.Errorf("the data path does not deny 10.77.0.2: %v", e.dp.deny)
	}

	// A mapped prefix shorter than /96 is refused before anything is written.
	e.cfg.Security.Denylist = []string{"::ffff:10.77.0.2/80"}
	if _, err := e.r.Reconcile(context.Background(), e.desired()); err == nil {
		t.Error("reconciling ::ffff:10.77.0.2/80 succeeded")
	}
	if w := writes(e.dp.takeCalls()); len(w) != 0 {
		t.Errorf("wrote %v for a refused denylist", w)
	}
}
