// Package vmimage gives the VM tests (tests/vm/install, tests/vm/vagrant)
// their Debian 12 image, built and cached by tests/vm/image.sh, and the
// files an operator would copy onto a host: static builds of veloflux and
// vfctl in bin/, deploy/ and README.md.
package vmimage

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veloflux/veloflux/tests/testenv"
)

// Image is one built image and what comes with it, all in Dir.
type Image struct {
	Dir     string
	Disk    string // disk.qcow2: boot an overlay of it, never the file itself
	Key     string // id_ed25519: root and "vagrant" accept it over ssh
	Box     string // veloflux.box: the vagrant-libvirt box of the same image
	Release string // the kernel release the image boots
}

// RepoRoot returns the checkout's top directory: the first parent of the
// working directory with a go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod in %s or any parent", dir)
		}
	}
}

// Build runs tests/vm/image.sh, which builds the image unless it is cached,
// and returns it. The script's progress goes to progress.
func Build(ctx context.Context, repo string, progress io.Writer) (Image, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, filepath.Join(repo, "tests/vm/image.sh"))
	cmd.Stdout = &out
	cmd.Stderr = progress
	if err := cmd.Run(); err != nil {
		return Image{}, fmt.Errorf("tests/vm/image.sh: %w", err)
	}
	dir := strings.TrimSpace(out.String())
	img := Image{
		Dir:  dir,
		Disk: filepath.Join(dir, "disk.qcow2"),
		Key:  filepath.Join(dir, "id_ed25519"),
		Box:  filepath.Join(dir, "veloflux.box"),
	}
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err != nil {
		return Image{}, fmt.Errorf("tests/vm/image.sh printed %q, which holds no image: %w", dir, err)
	}
	img.Release = strings.TrimSpace(string(rel))
	for _, f := range []string{img.Disk, img.Key, img.Box} {
		if _, err := os.Stat(f); err != nil {
			return Image{}, fmt.Errorf("image %s is incomplete: %w", dir, err)
		}
	}
	return img, nil
}

// ForTest returns the image for t, building it if needed (about four
// minutes the first time). Without root or the tools it skips, or fails
// when testenv.Required.
func ForTest(t testing.TB) Image {
	t.Helper()
	testenv.RequireRoot(t, "debootstrap the VM image and boot it")
	for tool, pkg := range map[string]string{
		"debootstrap": "debootstrap", "qemu-img": "qemu-utils", "qemu-system-x86_64": "qemu-system-x86",
		"syslinux": "syslinux", "mcopy": "mtools", "mkfs.vfat": "dosfstools", "sfdisk": "fdisk",
		"ssh": "openssh-client",
	} {
		testenv.RequireTool(t, tool, pkg)
	}
	repo, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	img, err := Build(t.Context(), repo, t.Output())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("image %s (kernel %s)", img.Dir, img.Release)
	return img
}

// WritePayload fills dir with what an operator copies onto a host before
// running deploy/install.sh: bin/veloflux and bin/vfctl, built static so
// that they run on any Linux, deploy/ and README.md.
func WritePayload(ctx context.Context, repo, dir string) error {
	bin := filepath.Join(dir, "bin")
	// Without symbol tables (-s -w): a third smaller, so quicker to copy
	// into an emulated VM, and the same code.
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin+"/",
		"./cmd/veloflux", "./cmd/vfctl")
	build.Dir = repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("static build of veloflux and vfctl: %w\n%s", err, out)
	}
	if err := os.CopyFS(filepath.Join(dir, "deploy"), os.DirFS(filepath.Join(repo, "deploy"))); err != nil {
		return fmt.Errorf("copy deploy/: %w", err)
	}
	// os.CopyFS writes files 0644 or 0755 by the source's executable bit,
	// so install.sh stays runnable.
	readme, err := os.ReadFile(filepath.Join(repo, "README.md"))
	if err != nil {
		return fmt.Errorf("read README.md: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "README.md"), readme, 0o644); err != nil {
		return fmt.Errorf("copy README.md: %w", err)
	}
	return nil
}

// PayloadForTest writes the payload into a new temporary directory of t.
func PayloadForTest(t testing.TB) string {
	t.Helper()
	repo, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := WritePayload(t.Context(), repo, dir); err != nil {
		t.Fatal(err)
	}
	return dir
}
