package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `veloflux detach --pin-path /etc/veloflux` (or any directory that is not
// on a BPF filesystem) refuses, exits 1 and deletes nothing.
func TestDetachRefusesDirectoryOffBPFFS(t *testing.T) {
	dir := t.TempDir()
	files := []string{"veloflux.yaml", "vf_vips", "link_xdp_eth0"}
	for _, name := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("keep\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"detach", "--pin-path", dir}, &stdout, &stderr); code != 1 {
		t.Errorf("exit code %d, want 1 (stdout %q, stderr %q)", code, stdout.String(), stderr.String())
	}
	if !strings.Contains(stderr.String(), "not on a BPF filesystem") {
		t.Errorf("stderr %q does not say why detach refused", stderr.String())
	}
	if stdout.Len() != 0 {
		t.Errorf("stdout %q: a refused detach reports nothing as removed", stdout.String())
	}
	for _, name := range files {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s after the refused detach: %v", name, err)
		}
	}
}
