package e2e

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// TestDetach: after SIGTERM the XDP program stays attached through its
// pinned link; `veloflux detach --pin-path P` then removes every pin and
// with them the attachment (netlink in the balancer namespace shows no XDP
// program), and the VIP is no longer served.
func TestDetach(t *testing.T) {
	e := newEnv(t, 3, vip4)
	e.writeConfig(e.webConfig(false))
	a := e.startAgent()
	e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
	if code := a.Stop(); code != 0 {
		t.Fatalf("agent exited with %d on SIGTERM, want 0", code)
	}
	x, err := e.xdpOnBalancer()
	if err != nil {
		t.Fatal(err)
	}
	if x == nil || !x.Attached {
		t.Fatalf("after SIGTERM no XDP program on %s: %+v", e.lab.Balancer.IfName, x)
	}
	entries, err := os.ReadDir(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	var pins []string
	for _, en := range entries {
		pins = append(pins, en.Name())
	}
	t.Logf("after SIGTERM: XDP program %d on %s; pins: %s", x.ProgId, e.lab.Balancer.IfName, strings.Join(pins, " "))

	d := e.runBinary("detach", "detach", "--pin-path", e.pin)
	if code := d.Wait(10 * time.Second); code != 0 {
		t.Fatalf("veloflux detach exited with %d, want 0", code)
	}
	if _, err := os.Stat(e.pin); !errors.Is(err, os.ErrNotExist) {
		left, _ := os.ReadDir(e.pin)
		t.Errorf("pin path %s still exists after detach (%v), holding %d entries", e.pin, err, len(left))
	}
	// The link goes when its last reference (the pin) does; the kernel may
	// release it a moment later.
	start := time.Now()
	for {
		x, err = e.xdpOnBalancer()
		if err != nil {
			t.Fatal(err)
		}
		if x == nil || !x.Attached {
			break
		}
		if time.Since(start) > 3*time.Second {
			t.Fatalf("XDP program %d still attached to %s 3s after detach", x.ProgId, e.lab.Balancer.IfName)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("XDP attachment gone %s after detach", time.Since(start).Round(time.Millisecond))

	// Nobody balances the VIP any more (the balancer does not forward).
	c := newHTTPClient(e.lab.Client, 500*time.Millisecond)
	if name, err := get(context.Background(), c, vipURL(vip4)); err == nil {
		t.Errorf("VIP still served (by %s) after detach", name)
	}
}
