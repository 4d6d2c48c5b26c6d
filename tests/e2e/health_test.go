package e2e

import (
	"testing"
	"time"
)

// TestHealthRemovesAndRestoresBackend: a backend whose server stops leaves
// the VIP within fall × interval + 1 s (from then on every new connection
// succeeds on the others), and takes new connections again once its server
// is back.
func TestHealthRemovesAndRestoresBackend(t *testing.T) {
	const victim = 1
	e := newEnv(t, 3, vip4)
	e.writeConfig(e.webConfig(false))
	e.startAgent()
	e.waitServing(vipURL(vip4), []int{0, 1, 2}, 10*time.Second)
	name := e.lab.Backends[victim].Name

	budget := checkFall*checkInterval + time.Second
	if err := e.lab.StopBackend(victim); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()

	// Until the health check takes it out, connections hashed to the victim
	// are refused. Converged = the start of a run of 40 consecutive
	// requests that all succeed on the others (a run that long happens by
	// chance with probability (2/3)^40 < 1e-7 while the victim is in).
	var (
		runStart  time.Time
		run       int
		refused   int
		converged time.Duration
		slowest   time.Duration
	)
	pre := tally{counts: map[string]int{}}
	for time.Since(stopped) < budget+5*time.Second {
		at := time.Now()
		got, err := get(t.Context(), e.http, vipURL(vip4))
		pre.add(got, err)
		slowest = max(slowest, time.Since(at))
		time.Sleep(5 * time.Millisecond) // ~150 requests/s: fine grained, no port exhaustion
		if err != nil || got == name {
			refused++
			run = 0
			continue
		}
		if run == 0 {
			runStart = at
		}
		if run++; run == 40 {
			converged = runStart.Sub(stopped)
			break
		}
	}
	pre.elapsed = time.Since(stopped)
	t.Logf("after stopping %s: %s; slowest request %s", name, pre, slowest.Round(time.Millisecond))
	if converged == 0 {
		t.Fatalf("new connections still reach %s (or fail) %s after its server stopped", name, budget+5*time.Second)
	}
	t.Logf("%s avoided %s after it stopped (%d requests failed or reached it before); budget fall×interval+1s = %s",
		name, converged.Round(time.Millisecond), refused, budget)
	if converged > budget {
		t.Errorf("new connections avoided the stopped %s only after %s, want within %s", name, converged.Round(time.Millisecond), budget)
	}
	if refused == 0 {
		t.Logf("note: no request was refused before the health check removed %s", name)
	}

	// Once out, every new connection succeeds on the others.
	out := load(t.Context(), e.http, vipURL(vip4), 150, 0, 30*time.Second, nil)
	t.Logf("with %s down: %s", name, out)
	if out.n != 150 || out.fails != 0 || out.counts[name] != 0 {
		t.Errorf("with %s down, want 150 successes on the other backends, got %s", name, out)
	}
	for i, b := range e.lab.Backends {
		if i != victim && out.counts[b.Name] == 0 {
			t.Errorf("with %s down, %s took no connection", name, b.Name)
		}
	}

	// Back: it takes connections again, and nothing fails meanwhile.
	if err := e.lab.StartBackend(t.Context(), victim); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	back := tally{counts: map[string]int{}}
	limit := checkRise*checkInterval + 5*time.Second
	for back.counts[name] == 0 && time.Since(started) < limit {
		got, err := get(t.Context(), e.http, vipURL(vip4))
		back.add(got, err)
		time.Sleep(5 * time.Millisecond)
	}
	back.elapsed = time.Since(started)
	t.Logf("after restarting %s: %s", name, back)
	if back.counts[name] == 0 {
		t.Fatalf("%s took no connection within %s of its server starting again", name, limit)
	}
	t.Logf("%s took connections again %s after its server restarted", name, time.Since(started).Round(time.Millisecond))
	if back.fails != 0 {
		t.Errorf("connections failed while %s came back: %s", name, back)
	}
	final := load(t.Context(), e.http, vipURL(vip4), 150, 0, 30*time.Second, nil)
	t.Logf("all back: %s", final)
	t.Logf("data plane counters: %v", e.counters())
	if final.fails != 0 || len(final.counts) != 3 {
		t.Errorf("after %s came back, want 150 successes over all 3 backends, got %s", name, final)
	}
}
