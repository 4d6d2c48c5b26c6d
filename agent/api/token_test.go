package api

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadOrCreateToken(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "api.token")
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	first, err := LoadOrCreateToken(path, log)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if len(first) != 64 {
		t.Errorf("new token %q: want 64 hex characters", first)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("token file: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}
	again, err := LoadOrCreateToken(path, log)
	if err != nil || again != first {
		t.Errorf("second load = (%q, %v), want the same token", again, err)
	}

	// An empty token file (a crash while writing it, with the old
	// non-atomic write) used to stop the agent from starting. It is moved
	// aside and a new token is made.
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fresh, err := LoadOrCreateToken(path, log)
	if err != nil {
		t.Fatalf("load over an empty token file: %v", err)
	}
	if len(fresh) != 64 || fresh == first {
		t.Errorf("token after an empty file = %q, want a new one", fresh)
	}
	aside, _ := filepath.Glob(path + ".corrupt-*")
	if len(aside) != 1 {
		t.Errorf("moved-aside files = %q, want one", aside)
	}
	if !strings.Contains(logs.String(), "level=ERROR") {
		t.Errorf("nothing logged about the unusable token file: %q", logs.String())
	}
}
