package config

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A SIGHUP that lands while the file is being written must not apply the
// part written so far: LoadSettled waits until the file stops changing.
func TestLoadSettledWaitsForTheWriterToFinish(t *testing.T) {
	path := filepath.Join(t.TempDir(), "veloflux.yaml")
	full := minimal + "  - address: 10.200.0.101\n    port: 80\n    protocol: tcp\n    pool: web\n"
	prefix := minimal // valid on its own: one VIP where the whole file has two
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(prefix); err != nil {
		t.Fatal(err)
	}
	// The writer finishes a little later, well inside the settle time.
	go func() {
		time.Sleep(30 * time.Millisecond)
		f.WriteString(strings.TrimPrefix(full, prefix))
	}()
	c, err := LoadSettled(context.Background(), path, 150*time.Millisecond, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.VIPs) != 2 {
		t.Fatalf("LoadSettled applied %d VIPs, want the 2 of the finished file", len(c.VIPs))
	}
}

func TestLoadSettledGivesUpOnAFileThatKeepsChanging(t *testing.T) {
	path := filepath.Join(t.TempDir(), "veloflux.yaml")
	if err := os.WriteFile(path, []byte(minimal), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for i := 0; ctx.Err() == nil && i < 200; i++ {
			os.WriteFile(path, []byte(minimal+strings.Repeat("#", i+1)+"\n"), 0o600)
			time.Sleep(10 * time.Millisecond)
		}
	}()
	_, err := LoadSettled(ctx, path, 50*time.Millisecond, 300*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "kept changing") {
		t.Fatalf("LoadSettled on a file rewritten every 10ms: %v, want a \"kept changing\" error", err)
	}
}

// A file whose vips key is missing or empty would withdraw every VIP; only
// an explicit `vips: []` may.
func TestCheckReplacementGuardsAgainstWithdrawingEveryVIP(t *testing.T) {
	cur, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	head, _, _ := strings.Cut(minimal, "vips:")
	for _, tc := range []struct {
		name, text string
		refused    bool
	}{
		{"key missing", head, true},
		{"key without value", head + "vips:\n", true},
		{"explicit empty list", head + "vips: []\n", false},
		{"unchanged", minimal, false},
	} {
		next, err := Parse([]byte(tc.text))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		err = CheckReplacement(cur, next)
		if refused := err != nil; refused != tc.refused {
			t.Errorf("%s: CheckReplacement = %v, want refused %v", tc.name, err, tc.refused)
		}
		if err != nil && !strings.Contains(err.Error(), "vips: []") {
			t.Errorf("%s: the refusal %q does not say how to withdraw every VIP on purpose", tc.name, err)
		}
	}
	// Nothing to withdraw: a file without VIPs is fine.
	empty, _ := Parse([]byte(head))
	if err := CheckReplacement(empty, empty); err != nil {
		t.Errorf("no VIPs before or after: %v", err)
	}
}

func TestNewFlowTableSizeNeedsRestart(t *testing.T) {
	cur, next := Default(), Default()
	next.Dataplane.NewFlowLimit.TableSize *= 2
	if err := RestartOnlyChanges(cur, next); err == nil || !strings.Contains(err.Error(), "dataplane.new_flow_limit.table_size") {
		t.Fatalf("a new new_flow_limit.table_size: %v, want it refused as needing a restart", err)
	}
	next = Default()
	next.Dataplane.NewFlowLimit.RatePerSecond, next.Dataplane.NewFlowLimit.Burst = 100, 100
	if err := RestartOnlyChanges(cur, next); err != nil {
		t.Fatalf("changing the new-flow rate asks for a restart: %v", err)
	}
}
