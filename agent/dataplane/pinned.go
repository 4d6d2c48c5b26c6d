package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// OpenPinned opens the maps a running (or stopped) agent pinned, without
// loading a program, so that tools can inspect the data path while no agent
// runs. Only the read methods are meant to be used on the result.
func OpenPinned(pinPath string) (*Dataplane, error) {
	d := &Dataplane{opts: Options{PinPath: pinPath}, links: map[string]link.Link{}}
	// In a fixed order, so that a missing pin is always reported the same way.
	targets := []struct {
		name string
		dst  **ebpf.Map
	}{
		{"vf_vips", &d.objs.VfVips}, {"vf_rings", &d.objs.VfRings}, {"vf_reals", &d.objs.VfReals},
		{"vf_ct4", &d.objs.VfCt4}, {"vf_ct6", &d.objs.VfCt6}, {"vf_stats_vip", &d.objs.VfStatsVip},
		{"vf_stats_real", &d.objs.VfStatsReal}, {"vf_counters", &d.objs.VfCounters}, {"vf_settings", &d.objs.VfSettings},
		{"vf_deny4", &d.objs.VfDeny4}, {"vf_deny6", &d.objs.VfDeny6}, {"vf_events", &d.objs.VfEvents},
	}
	for _, target := range targets {
		name, dst := target.name, target.dst
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, name), &ebpf.LoadPinOptions{ReadOnly: true})
		for old, successor := range retiredPins {
			// Pins an agent older than this vfctl made.
			if successor == name && errors.Is(err, os.ErrNotExist) {
				m, err = ebpf.LoadPinnedMap(filepath.Join(pinPath, old), &ebpf.LoadPinOptions{ReadOnly: true})
			}
		}
		if err != nil {
			d.objs.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("no pinned map %s under %s: is the agent installed with this pin path?", name, pinPath)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = m
	}
	// The nat tables, optional: an agent older than mode nat pinned none.
	for name, dst := range map[string]**ebpf.Map{"vf_nat_fwd": &d.objs.VfNatFwd, "vf_nat_vips": &d.objs.VfNatVips} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			d.objs.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = m
	}
	d.opts.MaxVIPs = d.objs.VfVips.MaxEntries()
	d.opts.MaxReals = d.objs.VfReals.MaxEntries()
	d.opts.ConntrackSize = d.objs.VfCt4.MaxEntries() * ct4Ways
	s, err := d.readSettings()
	if err != nil {
		d.objs.Close()
		return nil, err
	}
	d.opts.RingSize = s.RingSize
	if d.clock, err = newKernelClock(s.Hz); err != nil {
		d.objs.Close()
		return nil, err
	}
	return d, nil
}

// AttachedLink is an XDP attachment found under the pin path.
type AttachedLink struct {
	Interface string
	Ifindex   int
	ProgramID uint32
	LinkID    uint32
	Detached  bool // the interface went away; the pin outlived it
}

// PinnedLinks describes every XDP link pinned under the pin path.
func (d *Dataplane) PinnedLinks() ([]AttachedLink, error) {
	if d.opts.PinPath == "" {
		return nil, nil
	}
	return pinnedLinks(d.opts.PinPath)
}

// pinnedLinks describes every XDP link pinned under pinPath.
func pinnedLinks(pinPath string) ([]AttachedLink, error) {
	entries, err := os.ReadDir(pinPath)
	if err != nil {
		return nil, fmt.Errorf("list pins in %s: %w", pinPath, err)
	}
	var out []AttachedLink
	for _, e := range entries {
		ifname, ok := strings.CutPrefix(e.Name(), linkPinPrefix)
		if !ok {
			continue
		}
		l, err := link.LoadPinnedLink(filepath.Join(pinPath, e.Name()), nil)
		if err != nil {
			return nil, fmt.Errorf("open pinned link of %s: %w", ifname, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, fmt.Errorf("read pinned link of %s: %w", ifname, err)
		}
		al := AttachedLink{Interface: ifname, ProgramID: uint32(info.Program), LinkID: uint32(info.ID)}
		if x := info.XDP(); x != nil {
			al.Ifindex = int(x.Ifindex)
		}
		// The kernel clears the link's ifindex when the device goes away.
		al.Detached = al.Ifindex == 0
		out = append(out, al)
	}
	return out, nil
}

// mapPinPrefix starts the name of every map the balancer pins (its
// LIBBPF_PIN_BY_NAME maps are all called vf_*).
const mapPinPrefix = "vf_"

// isOwnPin reports whether a directory entry under the pin path is one
// VeloFlux pins: a vf_* map or a link_xdp_<ifname> link. Pins are regular
// files on a BPF filesystem; a subdirectory is never ours.
func isOwnPin(e os.DirEntry) bool {
	if !e.Type().IsRegular() {
		return false
	}
	return strings.HasPrefix(e.Name(), mapPinPrefix) || strings.HasPrefix(e.Name(), linkPinPrefix)
}

// ForeignPinsError reports entries RemovePins found under the pin path and
// left alone because VeloFlux did not pin them. Every VeloFlux pin was
// removed; the directory stays because it is not empty.
type ForeignPinsError struct {
	Dir   string
	Names []string
}

func (e *ForeignPinsError) Error() string {
	return fmt.Sprintf("left %d entries under %s that VeloFlux did not pin, and the directory with them: %s",
		len(e.Names), e.Dir, strings.Join(e.Names, ", "))
}
