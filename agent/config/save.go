package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// newFileMode is used when Save creates the file: the config names the API
// token file and describes the network, so it is not world-readable.
const newFileMode fs.FileMode = 0o600

// Save validates c and writes it to path atomically: readers see either the
// old or the new file, never a partial one, and a crash leaves one of the
// two in place.
//
// The data goes to a temporary file in the same directory (rename is only
// atomic within a file system), which is fsynced and then renamed over
// path; the directory is fsynced afterwards so the rename itself is durable.
// The previous file, if any, is kept as path+".bak". An existing file's
// permission bits are preserved; a new file gets mode 0600. If path is a
// symbolic link, the file it points to is replaced (and backed up next to
// it) so that the link keeps working.
func Save(path string, c *Config) error {
	if c == nil {
		return fmt.Errorf("config: save %s: nil config", path)
	}
	// Refuse to persist something Load would reject: the agent would then
	// fail to start after the next restart.
	if err := c.Validate(); err != nil {
		return fmt.Errorf("config: save %s: %w", path, err)
	}
	data, err := c.Marshal()
	if err != nil {
		return fmt.Errorf("config: save %s: %w", path, err)
	}

	target := path
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		target = resolved
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("config: save %s: %w", path, err)
	}

	mode := newFileMode
	existed := false
	switch fi, err := os.Stat(target); {
	case err == nil:
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("config: save %s: not a regular file", target)
		}
		mode, existed = fi.Mode().Perm(), true
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("config: save %s: %w", path, err)
	}

	dir := filepath.Dir(target)
	tmpName, err := writeTemp(dir, filepath.Base(target), data, mode)
	if err != nil {
		return fmt.Errorf("config: save %s: %w", target, err)
	}
	// Until the rename succeeds the temporary file is garbage.
	renamed := false
	defer func() {
		if !renamed {
			_ = os.Remove(tmpName)
		}
	}()

	if existed {
		if err := backup(target, tmpName+".bak", mode); err != nil {
			return fmt.Errorf("config: save %s: keep previous version as %s: %w", target, target+".bak", err)
		}
	}
	if err := os.Rename(tmpName, target); err != nil {
		return fmt.Errorf("config: save %s: %w", target, err)
	}
	renamed = true
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("config: saved %s but could not make the rename durable: %w", target, err)
	}
	return nil
}

// writeTemp writes data to a new hidden temporary file in dir, fsyncs it
// and returns its name.
func writeTemp(dir, base string, data []byte, mode fs.FileMode) (name string, err error) {
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
	// Chmod on the open file is not subject to the umask, so the mode is
	// exactly what we ask for.
	if err := f.Chmod(mode); err != nil {
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

// backup makes target+".bak" a copy of the current target. It links (or
// copies) to a unique temporary name first and renames that over the old
// backup, so concurrent saves never observe a half-written backup and the
// config file itself is never missing.
func backup(target, tmpBak string, mode fs.FileMode) error {
	// A hard link costs nothing and preserves the old file exactly; fall
	// back to copying on file systems without hard links.
	if err := os.Link(target, tmpBak); err != nil {
		if err := copyFile(target, tmpBak, mode); err != nil {
			_ = os.Remove(tmpBak)
			return err
		}
	}
	if err := os.Rename(tmpBak, target+".bak"); err != nil {
		_ = os.Remove(tmpBak)
		return err
	}
	return nil
}

func copyFile(src, dst string, mode fs.FileMode) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	if err := out.Chmod(mode); err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	return out.Sync()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
