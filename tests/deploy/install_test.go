package deploy

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/agenttest"

	"github.com/veloflux/veloflux/tests/testenv"
)

// installTree lays out what deploy/install.sh reads from a checkout after
// `make build`: bin/veloflux and bin/vfctl built here, the script, the
// unit, the example configuration and the README. It returns the tree's
// root and the unit's ExecStart command line.
func installTree(t *testing.T) (string, string) {
	t.Helper()
	tree := t.TempDir()
	for _, dir := range []string{"bin", "deploy"} {
		if err := os.Mkdir(filepath.Join(tree, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, rel := range []string{"deploy/install.sh", "deploy/veloflux.service", "deploy/veloflux.yaml", "README.md",
		"deploy/veloflux-decap.service", "deploy/decap.yaml"} {
		copyFile(t, repoPath(t, rel), filepath.Join(tree, rel))
	}
	copyFile(t, agenttest.BuildAgent(t, binaryEnv), filepath.Join(tree, "bin/veloflux"))
	root, err := agenttest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if err := agenttest.GoBuild(root, "./cmd/vfctl", filepath.Join(tree, "bin/vfctl")); err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(repoPath(t, "deploy/veloflux.service"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ExecStart=(.+)$`).FindSubmatch(unit)
	if m == nil {
		t.Fatal("deploy/veloflux.service has no ExecStart line")
	}
	return tree, string(m[1])
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, info.Mode().Perm()); err != nil {
		t.Fatal(err)
	}
}

// installRun is one run of install.sh.
type installRun struct {
	destdir string
	out     string // stdout and stderr
	code    int
	calls   string // the systemctl command lines, one a line
}

// runInstall runs the tree's install.sh with DESTDIR set, in a private
// mount namespace whose /run is an empty tmpfs, with /run/systemd/system
// in it when systemd is true: what decides, for the script, whether the
// host runs systemd. systemctl is a stand-in that records its arguments
// and, when systemctlFails, fails as it does without a reachable systemd.
func runInstall(t *testing.T, unshare, tree string, systemd, systemctlFails bool) installRun {
	t.Helper()
	r := installRun{destdir: t.TempDir()}
	fake := t.TempDir()
	calls := filepath.Join(fake, "calls")
	systemctl := "#!/bin/sh\necho \"$*\" >>" + calls + "\n"
	if systemctlFails {
		systemctl += "echo 'Failed to connect to bus: No such file or directory' >&2\nexit 1\n"
	}
	if err := os.WriteFile(filepath.Join(fake, "systemctl"), []byte(systemctl), 0o755); err != nil {
		t.Fatal(err)
	}
	setup := "mount -t tmpfs -o mode=0755 tmpfs /run"
	if systemd {
		setup += " && mkdir -p /run/systemd/system"
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, unshare, "--mount", "--propagation", "private",
		"sh", "-c", setup+` && exec "$0"`, filepath.Join(tree, "deploy/install.sh"))
	cmd.Env = append(os.Environ(), "DESTDIR="+r.destdir, "PATH="+fake+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	r.out = string(out)
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("run install.sh: %v\n%s", err, out)
	}
	if data, err := os.ReadFile(calls); err == nil {
		r.calls = string(data)
	}
	return r
}

// deploy/install.sh on a host with and without systemd: without it the
// files are installed and the script says how to run the agent instead of
// pointing at systemctl; with it, a failing systemctl is shown and fails
// the script rather than being hidden behind "start with: systemctl".
func TestInstallScript(t *testing.T) {
	testenv.RequireRoot(t, "build network namespaces")
	unshare := testenv.RequireTool(t, "unshare", "util-linux")
	tree, execStart := installTree(t)

	t.Run("without systemd", func(t *testing.T) {
		r := runInstall(t, unshare, tree, false, false)
		if r.code != 0 {
			t.Fatalf("exit %d, want 0:\n%s", r.code, r.out)
		}
		for _, rel := range []string{"usr/local/bin/veloflux", "usr/local/bin/vfctl", "etc/systemd/system/veloflux.service",
			"etc/veloflux/veloflux.yaml", "usr/local/share/doc/veloflux/README.md", "var/lib/veloflux",
			"etc/systemd/system/veloflux-decap.service", "usr/local/share/doc/veloflux/decap.yaml"} {
			if _, err := os.Stat(filepath.Join(r.destdir, rel)); err != nil {
				t.Errorf("not installed: %v", err)
			}
		}
		if !strings.Contains(r.out, "does not run systemd") || !strings.Contains(r.out, "  "+execStart+"\n") {
			t.Errorf("output does not say the host lacks systemd and what to run (%q):\n%s", execStart, r.out)
		}
		if strings.Contains(r.out, "systemctl enable") || r.calls != "" {
			t.Errorf("points at systemctl on a host without systemd (calls %q):\n%s", r.calls, r.out)
		}
	})

	t.Run("systemctl fails", func(t *testing.T) {
		r := runInstall(t, unshare, tree, true, true)
		if r.code == 0 {
			t.Errorf("exit 0 although systemctl daemon-reload failed:\n%s", r.out)
		}
		if !strings.Contains(r.out, "Failed to connect to bus") || !strings.Contains(r.out, "daemon-reload failed") {
			t.Errorf("the systemctl failure is not reported:\n%s", r.out)
		}
		if strings.Contains(r.out, "start with") {
			t.Errorf("says to start the service although systemd does not know it:\n%s", r.out)
		}
	})

	t.Run("with systemd", func(t *testing.T) {
		r := runInstall(t, unshare, tree, true, false)
		if r.code != 0 || r.calls != "daemon-reload\n" {
			t.Fatalf("exit %d, systemctl calls %q; want 0 and one daemon-reload:\n%s", r.code, r.calls, r.out)
		}
		if !strings.Contains(r.out, "start with: systemctl enable --now veloflux") {
			t.Errorf("does not say how to start the service:\n%s", r.out)
		}
	})
}
