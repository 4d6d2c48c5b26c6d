package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// rebuiltPins are the pinned maps whose content a starting agent rewrites
// whole (the settings) or that only count (the reason counters, the event
// ring). When an upgrade changes one's layout (a new reason makes
// vf_counters longer, a new setting makes vf_config's value larger), the
// new agent replaces the pin instead of refusing to start: the program
// still attached keeps its references to the old map until the new one is
// swapped onto the link, so forwarding never stops, and only the reason
// counters start again from zero.
//
// Maps that hold flows or the ids flows refer to (conntrack, VIPs, reals,
// rings) and the per-VIP and per-real statistics are never replaced: a
// change of their layout still needs `veloflux detach`.
var rebuiltPins = []string{"vf_config", "vf_counters", "vf_events"}

// IncompatiblePinError says which pinned map a new layout cannot reuse.
type IncompatiblePinError struct {
	Map    string
	PinDir string
	Err    error // wraps ebpf.ErrMapIncompatible
}

func (e *IncompatiblePinError) Error() string {
	return fmt.Sprintf("the map %s pinned under %s has another layout or size than this agent uses (%v): "+
		"keep the sizes it was created with, or run `veloflux detach` (which stops forwarding) and start again",
		e.Map, e.PinDir, e.Err)
}

func (e *IncompatiblePinError) Unwrap() error { return e.Err }

// replaceStalePins removes the pins of rebuiltPins whose layout the spec
// no longer matches, and returns their names.
func replaceStalePins(spec *ebpf.CollectionSpec, pinDir string) ([]string, error) {
	var replaced []string
	for _, name := range rebuiltPins {
		ms, ok := spec.Maps[name]
		if !ok {
			continue
		}
		path := filepath.Join(pinDir, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return replaced, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		err = ms.Compatible(m)
		m.Close()
		if err == nil {
			continue
		}
		if !errors.Is(err, ebpf.ErrMapIncompatible) {
			return replaced, fmt.Errorf("compare pinned map %s with this agent's: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return replaced, fmt.Errorf("replace pinned map %s of an older layout: %w", path, err)
		}
		replaced = append(replaced, name)
	}
	return replaced, nil
}

// incompatiblePin names the first pinned map the spec cannot reuse.
func incompatiblePin(spec *ebpf.CollectionSpec, pinDir string) string {
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
		if err != nil {
			continue
		}
		err = ms.Compatible(m)
		m.Close()
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return name
		}
	}
	return ""
}
