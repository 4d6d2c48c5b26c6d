//go:build linux

package reconcile

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestNeighborResolverMissingInterface(t *testing.T) {
	n := &NeighborResolver{Interface: "vf-no-such0"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	mac, err := n.Resolve(ctx, netip.MustParseAddr("192.0.2.10"))
	if err == nil {
		t.Fatalf("resolved %s on a missing interface", mac)
	}
	t.Log(err)
	for _, part := range []string{"192.0.2.10", `"vf-no-such0"`} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("error %q does not name %s", err, part)
		}
	}
}

func TestNeighborResolverNoInterface(t *testing.T) {
	_, err := (&NeighborResolver{}).Resolve(context.Background(), netip.MustParseAddr("192.0.2.10"))
	if err == nil || !strings.Contains(err.Error(), "no interface") {
		t.Errorf("err = %v", err)
	}
}
