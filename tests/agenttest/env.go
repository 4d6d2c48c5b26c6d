package agenttest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/veloflux/veloflux/tests/lab"
)

// Env is what every suite that runs a real agent starts from: a namespace
// lab with its backend servers running, the agent binary, a private BPF
// filesystem for its pins, and the paths of its state directory and
// configuration file. Nothing runs yet; everything is removed in the
// test's cleanup, pins (and so the XDP attachment) before the lab.
type Env struct {
	Lab   *lab.Lab
	Bin   string // the veloflux binary
	Dir   string // tb.TempDir()
	Pin   string // --pin-path, on the private bpffs
	State string // --state-dir
	Cfg   string // --config
}

// NewEnv builds the lab of opts, starts its backend servers, builds (or
// takes from binaryEnv) the agent binary and mounts the bpffs.
func NewEnv(tb testing.TB, opts lab.Options, binaryEnv string) *Env {
	tb.Helper()
	l := lab.ForTest(tb, opts)
	e := &Env{Lab: l, Bin: BuildAgent(tb, binaryEnv), Dir: tb.TempDir()}
	if err := l.StartBackendServers(tb.Context()); err != nil {
		tb.Fatalf("start backend servers: %v", err)
	}
	// The bpffs is mounted after tb.TempDir() was created, so its cleanup
	// (registered later) runs first: pins removed, then unmounted, then
	// the directory removed.
	e.Pin = MountBPFFS(tb, e.Dir)
	e.State = filepath.Join(e.Dir, "state")
	e.Cfg = filepath.Join(e.Dir, "veloflux.yaml")
	return e
}

// WriteFileAtomic replaces path with text in one rename, as an operator's
// tool should: the agent may read the file at any SIGHUP.
func WriteFileAtomic(tb testing.TB, path, text string) {
	tb.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}
