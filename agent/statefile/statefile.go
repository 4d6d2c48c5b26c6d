// Package statefile writes and reads the files the agent keeps across
// restarts (the drained backends, the API token, the sticky-cookie key, the
// billing ledger and the configuration the API rewrites).
//
// A write never leaves a partial file behind and never loses to a
// concurrent one: writers of the same directory are serialised by an
// exclusive flock(2) on the directory (which also covers a second agent
// process), the data goes to a uniquely named temporary file in the same
// directory, which is fsynced and renamed over the target, and the directory
// is fsynced so that the rename survives a power loss.
//
// A state file that cannot be parsed must not keep the agent from starting:
// Read moves it aside as name.corrupt-<timestamp>, logs why, and lets the
// caller start from empty.
package statefile

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultPerm is the mode of a new file when Options.Perm is zero: state
// files hold tokens, keys and customer usage.
const DefaultPerm fs.FileMode = 0o600

// ErrCorrupt is what a Read parser wraps to say that the file's content is
// unusable, so that Read moves it aside instead of failing.
var ErrCorrupt = errors.New("corrupt state file")

// Options adjust a write.
type Options struct {
	// Perm is the mode of a file that does not exist yet (DefaultPerm when
	// zero). An existing file keeps its permission bits.
	Perm fs.FileMode
	// Backup keeps the file being replaced as name.bak.
	Backup bool
	// Exclusive refuses to replace an existing file: the write fails with
	// an error wrapping fs.ErrExist.
	Exclusive bool
}

// Write replaces path with data; see the package comment. If path is a
// symbolic link, the file it points to is replaced, so that the link keeps
// working.
func Write(path string, data []byte, opts Options) error {
	return Edit(path, opts, func([]byte, bool) ([]byte, error) { return data, nil })
}

// Edit replaces path with what edit makes of its current content, all under
// the directory's lock, so that a read-modify-write cannot interleave with
// another writer. edit gets exists=false and nil when the file is missing.
// An error from edit is returned as it is and nothing is written.
func Edit(path string, opts Options, edit func(current []byte, exists bool) ([]byte, error)) error {
	target, err := resolve(path)
	if err != nil {
		return err
	}
	dir := filepath.Dir(target)
	unlock, err := lockDir(dir)
	if err != nil {
		return err
	}
	defer unlock()

	perm := opts.Perm
	if perm == 0 {
		perm = DefaultPerm
	}
	current, err := os.ReadFile(target)
	exists := err == nil
	switch {
	case exists && opts.Exclusive:
		return fmt.Errorf("write %s: %w", target, fs.ErrExist)
	case exists:
		fi, err := os.Stat(target)
		if err != nil {
			return fmt.Errorf("write %s: %w", target, err)
		}
		perm = fi.Mode().Perm()
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("write %s: %w", target, err)
	}

	data, err := edit(current, exists)
	if err != nil {
		return err
	}
	tmp, err := writeTemp(dir, filepath.Base(target), data, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", target, err)
	}
	renamed := false
	defer func() {
		if !renamed {
			_ = os.Remove(tmp)
		}
	}()
	if exists && opts.Backup {
		if err := backup(target, current, perm); err != nil {
			return fmt.Errorf("write %s: keep the previous version as %s.bak: %w", target, target, err)
		}
	}
	if err := os.Rename(tmp, target); err != nil {
		return fmt.Errorf("write %s: %w", target, err)
	}
	renamed = true
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("wrote %s but could not make the rename durable: %w", target, err)
	}
	return nil
}

// Read reads path and hands its content to parse. A missing file is
// (false, nil). When parse returns an error wrapping ErrCorrupt, the file is
// moved aside as path.corrupt-<UTC timestamp>, the problem is logged, and
// Read returns (false, nil) so that the caller starts from empty; any other
// error from parse, or from reading, is returned and the file is left as it
// is.
func Read(path string, log *slog.Logger, parse func([]byte) error) (found bool, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	perr := parse(data)
	if perr == nil {
		return true, nil
	}
	if !errors.Is(perr, ErrCorrupt) {
		return false, fmt.Errorf("read %s: %w", path, perr)
	}
	aside, err := moveAside(path, data)
	if err != nil {
		return false, fmt.Errorf("read %s: %w; moving it aside failed: %w", path, perr, err)
	}
	if log != nil {
		log.Error("state file is unreadable: moved it aside and starting without it",
			"file", path, "moved_to", aside, "err", perr)
	}
	return false, nil
}

// moveAside renames path to a fresh path.corrupt-<timestamp> name, under
// the directory's lock and only if path still holds data: a writer that
// replaced it meanwhile wrote something good, which must stay.
func moveAside(path string, data []byte) (string, error) {
	dir := filepath.Dir(path)
	unlock, err := lockDir(dir)
	if err != nil {
		return "", err
	}
	defer unlock()
	now, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	if string(now) != string(data) {
		return "", fmt.Errorf("%s changed while being read", path)
	}
	stamp := time.Now().UTC().Format("20060102T150405.000000000Z")
	aside := path + ".corrupt-" + stamp
	// Link rather than rename straight away: link fails instead of
	// replacing an existing file of the same name.
	if err := os.Link(path, aside); err != nil {
		return "", err
	}
	if err := os.Remove(path); err != nil {
		return "", err
	}
	if err := syncDir(dir); err != nil {
		return "", err
	}
	return aside, nil
}

// resolve returns the file a write must replace: path itself, or the file
// a symbolic link at path points to.
func resolve(path string) (string, error) {
	resolved, err := filepath.EvalSymlinks(path)
	switch {
	case err == nil:
		fi, err := os.Stat(resolved)
		if err != nil {
			return "", fmt.Errorf("write %s: %w", path, err)
		}
		if !fi.Mode().IsRegular() {
			return "", fmt.Errorf("write %s: not a regular file", resolved)
		}
		return resolved, nil
	case errors.Is(err, fs.ErrNotExist):
		return path, nil
	default:
		return "", fmt.Errorf("write %s: %w", path, err)
	}
}

// lockDir takes an exclusive flock on dir. Each call opens dir anew, and
// flock locks of separate open files exclude each other even within one
// process, so goroutines and other processes are serialised alike.
func lockDir(dir string) (unlock func(), err error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("lock directory %s: %w", dir, err)
	}
	for {
		err = unix.Flock(int(d.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("lock directory %s: %w", dir, err)
	}
	// Closing the descriptor releases the lock.
	return func() { _ = d.Close() }, nil
}

// writeTemp writes data to a new hidden temporary file in dir, fsyncs it
// and returns its name.
func writeTemp(dir, base string, data []byte, perm fs.FileMode) (name string, err error) {
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("create temporary file: %w", err)
	}
	name = f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(name)
		}
	}()
	// Chmod on the open file is not subject to the umask.
	if err := f.Chmod(perm); err != nil {
		return "", fmt.Errorf("chmod %s: %w", name, err)
	}
	if _, err := f.Write(data); err != nil {
		return "", fmt.Errorf("write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("fsync %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("close %s: %w", name, err)
	}
	return name, nil
}

// backup makes target.bak hold current (the content about to be
// replaced), itself written atomically, so the backup is never half
// written and the target is never missing.
func backup(target string, current []byte, perm fs.FileMode) error {
	dir := filepath.Dir(target)
	tmp, err := writeTemp(dir, filepath.Base(target)+".bak", current, perm)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, target+".bak"); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s to fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
