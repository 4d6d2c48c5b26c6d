package e2e

import (
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/tests/lab"
)

// TestReloadAddsBackend: a fourth backend is added by rewriting the config
// and sending SIGHUP while a TCP echo stream runs through the VIP and new
// connections keep coming.
//   - none of 400 new connections made across the reload fails;
//   - once the new backend is healthy it takes about a quarter of new
//     connections (12%..38% of 400);
//   - the echo stream never errors and stays on its backend (its server
//     socket stays on the same backend namespace, and its conntrack entry
//     keeps the same real).
func TestReloadAddsBackend(t *testing.T) {
	e := newEnv(t, 4, vip4)
	e.writeConfig(e.webConfig(true, 0, 1, 2))
	a := e.startAgent()
	e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)

	echoVIP := netip.AddrPortFrom(vip4, lab.TCPEchoPort)
	stream := startEchoStream(t, e.lab.Client, echoVIP, 100*time.Millisecond, 60*time.Second)
	// Let a few lines through so the flow is established everywhere.
	waitEchoes(t, stream, 3, 5*time.Second)
	owner, err := e.socketOwner(stream.local, echoVIP)
	if err != nil || owner < 0 {
		t.Fatalf("echo stream %s: no backend holds its connection (%v)", stream.local, err)
	}
	realID, ctOwner, err := e.flowReal(stream.local, echoVIP, dataplane.ProtoTCP)
	if err != nil {
		t.Fatal(err)
	}
	if ctOwner != owner {
		t.Fatalf("echo stream: conntrack names backend %d (real %d) but backend %d holds the socket", ctOwner, realID, owner)
	}
	t.Logf("echo stream %s -> %s is on %s (real %d)", stream.local, echoVIP, e.lab.Backends[owner].Name, realID)

	// New connections across the reload: 400 GETs paced 5 ms apart, so the
	// load spans the reload, the new backend's first health check and the
	// ring swap.
	var done atomic.Int64
	loadc := make(chan tally, 1)
	go func() {
		loadc <- load(t.Context(), e.http, vipURL(vip4), 400, 5*time.Millisecond, 40*time.Second, &done)
	}()
	for deadline := time.Now().Add(20 * time.Second); done.Load() < 100; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d requests done in 20s before the reload", done.Load())
		}
	}
	e.writeConfig(e.webConfig(true, 0, 1, 2, 3))
	a.Signal(syscall.SIGHUP)
	newAddr := e.lab.Backends[3].Addr4
	up := e.waitReals("backend-3 installed and up after SIGHUP", 10*time.Second, func(r map[netip.Addr]dataplane.Real) bool {
		return r[newAddr].State == dataplane.RealUp && len(r[newAddr].MAC) == 6
	})
	t.Logf("reload applied and backend-3 up in the data plane %s after SIGHUP", up.Round(time.Millisecond))

	during := <-loadc
	t.Logf("load across the reload: %s", during)
	if during.n != 400 || during.fails != 0 {
		t.Errorf("want 400 successful connections across the reload, got %s", during)
	}

	// The new backend takes traffic once it is in the ring.
	e.waitServing(vipURL(vip4), []int{3}, 10*time.Second)
	after := load(t.Context(), e.http, vipURL(vip4), 400, 0, 60*time.Second, nil)
	t.Logf("load after the reload: %s", after)
	if after.n != 400 || after.fails != 0 {
		t.Errorf("want 400 successful connections after the reload, got %s", after)
	}
	if s := after.share("backend-3"); s < 0.12 || s > 0.38 {
		t.Errorf("new backend-3 took %.1f%% of new connections, want about 25%% (12..38)", 100*s)
	}
	for i := range 3 {
		if after.counts[e.lab.Backends[i].Name] == 0 {
			t.Errorf("%s took no connection after the reload", e.lab.Backends[i].Name)
		}
	}

	// The stream is still alive, on the same backend, with the same real.
	if err := stream.failed(); err != nil {
		t.Fatalf("echo stream failed: %v", err)
	}
	owner2, err := e.socketOwner(stream.local, echoVIP)
	if err != nil {
		t.Fatal(err)
	}
	realID2, ctOwner2, err := e.flowReal(stream.local, echoVIP, dataplane.ProtoTCP)
	if err != nil {
		t.Fatal(err)
	}
	n := stream.echoes.Load()
	if err := stream.stop(); err != nil {
		t.Fatalf("echo stream failed: %v", err)
	}
	t.Logf("echo stream: %d lines echoed; now on backend %d (real %d)", n, owner2, realID2)
	if owner2 != owner || ctOwner2 != owner || realID2 != realID {
		t.Errorf("echo stream moved: socket on backend %d -> %d, conntrack real %d (backend %d) -> %d (backend %d)",
			owner, owner2, realID, ctOwner, realID2, ctOwner2)
	}
}

// waitEchoes waits until the stream has echoed n lines.
func waitEchoes(t *testing.T, s *echoStream, n int64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for s.echoes.Load() < n {
		if err := s.failed(); err != nil {
			t.Fatalf("echo stream failed: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("echo stream: %d of %d lines echoed within %s", s.echoes.Load(), n, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
