package dataplane

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
)

// rebuiltPins are the pinned maps whose content a starting agent rewrites
// whole (the settings) or that only count (the reason counters, the event
// ring). When an upgrade changes one's layout (a new reason makes
// vf_counters longer, a new setting makes vf_settings' value larger), the
// new agent replaces the pin instead of refusing to start: the program
// still attached keeps its references to the old map until the new one is
// swapped onto the link, so forwarding never stops, and only the reason
// counters start again from zero.
//
// Maps that hold flows or the ids flows refer to (conntrack, VIPs, reals,
// rings) and the per-VIP and per-real statistics are never replaced: a
// change of their layout still needs `veloflux detach`. The exception is
// the IPv4 conntrack of the layout before the table of sets, whose flows
// Load moves (takeLegacyConntrack4).
var rebuiltPins = []string{"vf_settings", "vf_counters", "vf_events"}

// retiredPins are pins an earlier version made under names this one no
// longer uses, and what replaces each. A starting agent removes them (the
// attached program keeps its references until the new one is swapped on),
// so they do not linger beside their successors.
var retiredPins = map[string]string{
	"vf_config": "vf_settings", // renamed to match its value's struct
}

// removeRetiredPins removes retiredPins from pinDir and returns their names.
func removeRetiredPins(pinDir string) ([]string, error) {
	var removed []string
	for _, old := range slices.Sorted(maps.Keys(retiredPins)) {
		err := os.Remove(filepath.Join(pinDir, old))
		switch {
		case err == nil:
			removed = append(removed, old)
		case !errors.Is(err, os.ErrNotExist):
			return removed, fmt.Errorf("remove the pin %s of an older version: %w", old, err)
		}
	}
	return removed, nil
}

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
	return replaceIncompatiblePins(spec, pinDir, rebuiltPins)
}

// replaceIncompatiblePins removes the pins of names whose layout the spec
// no longer matches, and returns their names.
func replaceIncompatiblePins(spec *ebpf.CollectionSpec, pinDir string, names []string) ([]string, error) {
	var replaced []string
	for _, name := range names {
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
