package dataplane

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"unsafe"

	"github.com/cilium/ebpf"
)

// legacyConntrack4 is the IPv4 conntrack an agent from before the table of
// sets pinned: an LRU hash from the flow key to its entry. An upgrade moves
// its flows into the table of sets instead of refusing to start, so that
// established connections keep their reals across it.
type legacyConntrack4 struct {
	path  string
	m     *ebpf.Map // open until the new table holds the flows, to pin back on failure
	flows map[balancerVfFlow4Key]balancerVfCtEntry
}

// takeLegacyConntrack4 reads the flows of a pinned legacy vf_ct4 and
// removes its pin, so that loading creates the table of sets in its place.
// The attached program keeps using the old map until the new one is
// swapped onto its link; flows it creates meanwhile are not moved (their
// next packet is balanced again, to the same real unless the ring changed).
// It returns nil when there is no legacy table under pinDir.
func takeLegacyConntrack4(pinDir string) (*legacyConntrack4, error) {
	path := filepath.Join(pinDir, "vf_ct4")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned map %s: %w", path, err)
	}
	var key balancerVfFlow4Key
	var entry balancerVfCtEntry
	if m.Type() != ebpf.LRUHash || m.KeySize() != uint32(unsafe.Sizeof(key)) || m.ValueSize() != uint32(unsafe.Sizeof(entry)) {
		m.Close()
		return nil, nil // the current layout, or one Load refuses by name
	}
	old := &legacyConntrack4{path: path, m: m, flows: map[balancerVfFlow4Key]balancerVfCtEntry{}}
	it := m.Iterate()
	for it.Next(&key, &entry) {
		old.flows[key] = entry
	}
	if err := it.Err(); err != nil {
		m.Close()
		return nil, fmt.Errorf("read the flows of %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		m.Close()
		return nil, fmt.Errorf("replace %s, an IPv4 conntrack of the older layout: %w", path, err)
	}
	return old, nil
}

// restore pins the legacy table back, when the new one could not be made.
func (old *legacyConntrack4) restore() {
	if old == nil {
		return
	}
	old.m.Pin(old.path) // best effort: the load error is what gets reported
	old.m.Close()
}

// moveInto writes the legacy flows into the table of sets: each set keeps
// its ct4Ways most recently seen flows. It returns how many flows moved and
// how many did not fit.
func (old *legacyConntrack4) moveInto(ct4 *ebpf.Map) (moved, dropped int, err error) {
	defer old.m.Close()
	sets := ct4.MaxEntries()
	bySet := map[uint32][]balancerVfCt4Slot{}
	for k, e := range old.flows {
		k.Pad = [3]uint8{}
		idx := ct4SetIndex(k, sets)
		slot := balancerVfCt4Slot{Key: k, Entry: e}
		slot.Key.Pad = ct4Check(flowHash4(k), e)
		bySet[idx] = append(bySet[idx], slot)
	}
	keys := make([]uint32, 0, len(bySet))
	vals := make([]balancerVfCt4Set, 0, len(bySet))
	for idx, slots := range bySet {
		slices.SortFunc(slots, func(a, b balancerVfCt4Slot) int { return cmp.Compare(b.Entry.LastSeen, a.Entry.LastSeen) })
		var set balancerVfCt4Set
		n := copy(set.Way[:], slots)
		moved, dropped = moved+n, dropped+len(slots)-n
		keys, vals = append(keys, idx), append(vals, set)
	}
	if len(keys) == 0 {
		return 0, 0, nil
	}
	if _, err := ct4.BatchUpdate(keys, vals, nil); err != nil {
		return 0, 0, fmt.Errorf("write %d moved IPv4 flows into vf_ct4: %w", moved, err)
	}
	return moved, dropped, nil
}
