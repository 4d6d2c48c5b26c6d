package statefile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// TestConcurrentWritesSamePath is the regression test for concurrent drain
// requests: many goroutines replace one file at once, some with a backup.
// Every write must succeed, the final file must be exactly one of the
// written documents (never two run together, never a partial one), and no
// temporary file may be left.
func TestConcurrentWritesSamePath(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "drained.json")
	const writers, rounds = 32, 5
	written := map[string]bool{}
	for round := range rounds {
		var wg sync.WaitGroup
		errs := make(chan error, writers)
		for w := range writers {
			doc, _ := json.Marshal(map[string]any{"version": 1, "writer": w, "round": round,
				"drained": slices.Repeat([]string{fmt.Sprintf("pool:10.0.0.%d:80", w)}, w+1)})
			written[string(doc)] = true
			wg.Go(func() {
				errs <- Write(path, doc, Options{Backup: w%2 == 0})
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("round %d: Write: %v", round, err)
			}
		}
		for _, name := range []string{path, path + ".bak"} {
			data, err := os.ReadFile(name)
			if errors.Is(err, fs.ErrNotExist) && name != path {
				continue
			}
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			var v map[string]any
			if err := json.Unmarshal(data, &v); err != nil {
				t.Fatalf("round %d: %s does not parse: %v\n%s", round, name, err, data)
			}
			if !written[string(data)] {
				t.Fatalf("round %d: %s holds %s, which no writer wrote", round, name, data)
			}
		}
	}
	assertFiles(t, dir, "drained.json", "drained.json.bak")
	assertMode(t, path, DefaultPerm)
}

func TestWriteKeepsModeAndBackup(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "veloflux.yaml")
	if err := Write(path, []byte("one\n"), Options{Perm: 0o640, Backup: true}); err != nil {
		t.Fatal(err)
	}
	assertMode(t, path, 0o640)
	assertFiles(t, dir, "veloflux.yaml") // nothing to back up yet
	if err := os.Chmod(path, 0o604); err != nil {
		t.Fatal(err)
	}
	if err := Write(path, []byte("two\n"), Options{Backup: true}); err != nil {
		t.Fatal(err)
	}
	assertMode(t, path, 0o604)
	assertContent(t, path, "two\n")
	assertContent(t, path+".bak", "one\n")
	if err := Write(path, []byte("three\n"), Options{Backup: true}); err != nil {
		t.Fatal(err)
	}
	assertContent(t, path+".bak", "two\n")
	assertFiles(t, dir, "veloflux.yaml", "veloflux.yaml.bak")
}

func TestWriteThroughSymlink(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real.yaml")
	link := filepath.Join(dir, "link.yaml")
	if err := Write(real, []byte("one\n"), Options{}); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("real.yaml", link); err != nil {
		t.Skipf("symlinks unsupported: %v", err)
	}
	if err := Write(link, []byte("two\n"), Options{Backup: true}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the symbolic link was replaced (err=%v)", err)
	}
	assertContent(t, real, "two\n")
	assertContent(t, real+".bak", "one\n")
}

func TestWriteExclusive(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "api.token")
	if err := Write(path, []byte("first\n"), Options{Exclusive: true}); err != nil {
		t.Fatal(err)
	}
	err := Write(path, []byte("second\n"), Options{Exclusive: true})
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second exclusive Write = %v, want fs.ErrExist", err)
	}
	assertContent(t, path, "first\n")
	assertFiles(t, dir, "api.token")
}

func TestEditFailureWritesNothing(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	if err := Write(path, []byte("{}"), Options{}); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	err := Edit(path, Options{Backup: true}, func(cur []byte, exists bool) ([]byte, error) {
		if !exists || string(cur) != "{}" {
			t.Errorf("edit got (%q, %v), want the current content", cur, exists)
		}
		return nil, boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Edit = %v, want the edit's error", err)
	}
	assertContent(t, path, "{}")
	assertFiles(t, dir, "state.json")
	if err := Write(filepath.Join(dir, "missing", "x"), nil, Options{}); err == nil {
		t.Error("Write into a missing directory succeeded")
	}
}

// TestReadMovesCorruptFileAside: a state file that does not parse (here two
// JSON documents run together, what racing writers used to leave) is moved
// aside, logged, and the caller starts from empty instead of failing.
func TestReadMovesCorruptFileAside(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "drained.json")
	corrupt := `{"version":1,"drained":["a"]}{"version":1,"drained":["b"]}`
	if err := os.WriteFile(path, []byte(corrupt), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	parse := func(data []byte) error {
		var v map[string]any
		if err := json.Unmarshal(data, &v); err != nil {
			return fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		return nil
	}
	found, err := Read(path, log, parse)
	if err != nil || found {
		t.Fatalf("Read = (%v, %v), want (false, nil)", found, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || !strings.HasPrefix(entries[0].Name(), "drained.json.corrupt-") {
		t.Fatalf("directory holds %v, want only drained.json.corrupt-<timestamp>", names(entries))
	}
	assertContent(t, filepath.Join(dir, entries[0].Name()), corrupt)
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), entries[0].Name()) {
		t.Errorf("log = %q, want an error naming the moved file", logs.String())
	}

	// Missing: not found, no error. Good: found.
	if found, err := Read(path, log, parse); err != nil || found {
		t.Errorf("Read of a missing file = (%v, %v)", found, err)
	}
	if err := Write(path, []byte(`{"version":1}`), Options{}); err != nil {
		t.Fatal(err)
	}
	if found, err := Read(path, log, parse); err != nil || !found {
		t.Errorf("Read of a good file = (%v, %v)", found, err)
	}

	// An error that is not corruption is returned and the file stays.
	other := errors.New("unsupported version 9")
	if _, err := Read(path, log, func([]byte) error { return other }); !errors.Is(err, other) {
		t.Errorf("Read = %v, want the parser's error", err)
	}
	assertContent(t, path, `{"version":1}`)
}

func assertContent(t *testing.T, path, want string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Errorf("%s = %q, want %q", path, got, want)
	}
}

func assertMode(t *testing.T, path string, want fs.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != want {
		t.Errorf("%s mode = %v, want %v", path, fi.Mode().Perm(), want)
	}
}

func assertFiles(t *testing.T, dir string, want ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := names(entries); !slices.Equal(got, want) {
		t.Errorf("%s holds %q, want %q", dir, got, want)
	}
}

func names(entries []os.DirEntry) []string {
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}
