package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veloflux/veloflux/agent/config"
)

// TestPrepareRunDir: the demo agent runs on a copy of deploy/demo.yaml
// outside the repository, so API writes during the demo (which save the
// configuration and keep a .bak) leave the tracked file alone. Before, the
// agent was started with --config deploy/demo.yaml itself.
func TestPrepareRunDir(t *testing.T) {
	repo, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	shipped := filepath.Join(repo, "deploy", "demo.yaml")
	original, err := os.ReadFile(shipped)
	if err != nil {
		t.Fatal(err)
	}

	rd, err := prepareRunDir(shipped)
	if err != nil {
		t.Fatalf("prepareRunDir: %v", err)
	}
	t.Cleanup(func() { _ = rd.remove() })
	for _, p := range []string{rd.config, rd.state} {
		if rel, err := filepath.Rel(repo, p); err == nil && !strings.HasPrefix(rel, "..") {
			t.Errorf("%s is inside the repository %s", p, repo)
		}
	}
	if copied, err := os.ReadFile(rd.config); err != nil || string(copied) != string(original) {
		t.Errorf("the agent's configuration is not a copy of %s (err=%v)", shipped, err)
	}
	if fi, err := os.Stat(rd.state); err != nil || !fi.IsDir() {
		t.Errorf("state directory %s: %v", rd.state, err)
	}

	// An API write, as the agent makes it, changes the copy only.
	c, err := config.Load(rd.config)
	if err != nil {
		t.Fatal(err)
	}
	next, err := c.Modify(func(c *config.Config) error {
		c.Security.Denylist = append(c.Security.Denylist, "192.0.2.0/24")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := config.Save(rd.config, next); err != nil {
		t.Fatalf("Save: %v", err)
	}
	if now, err := os.ReadFile(shipped); err != nil || string(now) != string(original) {
		t.Errorf("%s changed (err=%v)", shipped, err)
	}
	if _, err := os.Stat(shipped + ".bak"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s.bak exists (err=%v)", shipped, err)
	}

	if err := rd.remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(rd.root); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("run directory %s left behind (err=%v)", rd.root, err)
	}
}
