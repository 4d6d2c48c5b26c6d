package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// defaultBPFFS is where systemd hosts mount the BPF filesystem; minimal
// hosts and containers may not have it mounted.
const defaultBPFFS = "/sys/fs/bpf"

// errNotBPFFS marks a pin path that is not on a BPF filesystem.
var errNotBPFFS = errors.New("not on a BPF filesystem")

// checkBPFFS reports whether pins under pinPath land on a BPF filesystem,
// judged from pinPath or, when it does not exist yet, its nearest existing
// ancestor, which it returns. The error wraps errNotBPFFS when that
// directory is on another filesystem.
func checkBPFFS(pinPath string) (string, error) {
	dir := filepath.Clean(pinPath)
	for {
		if _, err := os.Stat(dir); err == nil {
			break
		} else if !errors.Is(err, os.ErrNotExist) {
			return "", explainPrivilege(fmt.Errorf("check pin path %s: %w", pinPath, err))
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return dir, explainPrivilege(fmt.Errorf("statfs %s: %w", dir, err))
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return dir, fmt.Errorf("pin path %s is %w (mount one with `mount -t bpf bpf DIR`)", pinPath, errNotBPFFS)
	}
	return dir, nil
}

// ensureBPFFS makes sure pins under pinPath land on a BPF filesystem,
// mounting one at /sys/fs/bpf when that is where they go and nothing is
// mounted there yet.
func ensureBPFFS(pinPath string) error {
	dir, err := checkBPFFS(pinPath)
	if !errors.Is(err, errNotBPFFS) {
		return err
	}
	if dir != defaultBPFFS || !strings.HasPrefix(filepath.Clean(pinPath)+"/", defaultBPFFS+"/") {
		return err
	}
	if err := unix.Mount("bpf", defaultBPFFS, "bpf", 0, "mode=0700"); err != nil {
		return explainPrivilege(fmt.Errorf("mount the BPF filesystem at %s: %w", defaultBPFFS, err))
	}
	return nil
}
