// Package decap runs the backend side of ipip and gue VIPs: it puts the XDP
// decapsulator on a backend's interfaces with the addresses and GUE port it
// is told, keeps it there when an interface is made again, and leaves it
// pinned when it stops, so that restarting it changes nothing on the wire.
package decap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
)

// watchInterval is how often Run looks for interfaces that went away and
// came back (a link on a deleted interface is severed for good).
const watchInterval = 2 * time.Second

// Settings are what the decapsulator is to do.
type Settings struct {
	Interfaces []string
	Local      []netip.Addr
	GUEPort    uint16 // 0: no GUE
	XDPMode    dataplane.XDPMode
}

// FromConfig turns a decap section into Settings, refusing one with any
// problem (every problem is listed, each with its path under prefix).
func FromConfig(c config.DecapConfig, prefix string) (Settings, error) {
	if problems := c.Problems(prefix); len(problems) > 0 {
		return Settings{}, &config.ValidationError{Errors: problems}
	}
	s := Settings{Interfaces: slices.Clone(c.Interfaces), GUEPort: uint16(c.GUEPort), XDPMode: dataplane.XDPMode(c.XDPMode)}
	for _, a := range c.Local {
		addr, err := netip.ParseAddr(a)
		if err != nil { // Problems checked it; this is a bug if it happens
			return Settings{}, fmt.Errorf("decap: local address %q: %w", a, err)
		}
		s.Local = append(s.Local, addr)
	}
	return s, nil
}

// Service holds the loaded decapsulator and what it was last told.
type Service struct {
	log *slog.Logger
	d   *dataplane.Decap
	cur Settings
}

// Start loads the decapsulator (adopting what an earlier run pinned under
// pinPath; "" pins nothing) and applies s.
func Start(log *slog.Logger, pinPath string, s Settings) (*Service, error) {
	d, err := dataplane.LoadDecap(dataplane.DecapOptions{PinPath: pinPath})
	if err != nil {
		return nil, err
	}
	svc := &Service{log: log, d: d}
	if err := svc.Apply(s); err != nil {
		d.Close()
		return nil, err
	}
	return svc, nil
}

// Apply makes the decapsulator do what s says: these local addresses and
// GUE port, on exactly these interfaces. Every interface must exist before
// anything changes; if attaching to one fails, the interfaces attached
// here are detached again and the previous addresses and port restored.
// Interfaces an earlier run or an earlier Apply attached to, and s no
// longer names, are detached once the rest succeeded.
func (s *Service) Apply(next Settings) error {
	for _, name := range next.Interfaces {
		if _, err := net.InterfaceByName(name); err != nil {
			return fmt.Errorf("decap: interface %s: %w", name, err)
		}
	}
	prevLocals, err := s.d.Locals()
	if err != nil {
		return err
	}
	prevPort, err := s.d.GUEPort()
	if err != nil {
		return err
	}
	restore := func(cause error) error {
		errs := []error{cause}
		if err := s.d.SetLocals(prevLocals); err != nil {
			errs = append(errs, fmt.Errorf("restoring the previous local addresses: %w", err))
		}
		if err := s.d.SetGUEPort(prevPort); err != nil {
			errs = append(errs, fmt.Errorf("restoring the previous GUE port: %w", err))
		}
		return errors.Join(errs...)
	}
	if err := s.d.SetGUEPort(next.GUEPort); err != nil {
		return restore(err)
	}
	if err := s.d.SetLocals(next.Local); err != nil {
		return restore(err)
	}
	held, before := s.d.Attached(), s.attachedNow()
	var attachedHere []string // new links, in place of none or of one in another mode
	for _, name := range next.Interfaces {
		adopted, err := s.d.Attach(name, next.XDPMode)
		if err != nil {
			return restore(errors.Join(err, s.undoAttach(attachedHere, before)))
		}
		switch {
		case !adopted:
			attachedHere = append(attachedHere, name)
			s.log.Info("decap: attached", "interface", name, "xdp_mode", string(next.XDPMode))
		case !slices.Contains(held, name):
			s.log.Info("decap: adopted the pinned link", "interface", name)
		}
	}
	var errs []error
	for _, name := range s.attachedElsewhere(next.Interfaces) {
		if err := s.d.Detach(name); err != nil {
			errs = append(errs, err)
			continue
		}
		s.log.Info("decap: detached from an interface no longer configured", "interface", name)
	}
	s.cur = next
	return errors.Join(errs...)
}

// undoAttach takes back the links a failed Apply made: an interface that
// had the decapsulator before gets it back in the mode in force, one that
// had not is left.
func (s *Service) undoAttach(made, before []string) error {
	var errs []error
	for _, name := range made {
		var err error
		if slices.Contains(before, name) {
			_, err = s.d.Attach(name, s.cur.XDPMode)
		} else {
			err = s.d.Detach(name)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("undoing the attachment to %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// attachedNow names the interfaces the decapsulator is on, held or pinned.
func (s *Service) attachedNow() []string {
	names := s.d.Attached()
	if pinned, err := s.d.PinnedLinks(); err == nil {
		for _, l := range pinned {
			names = append(names, l.Interface)
		}
	} else {
		s.log.Warn("decap: cannot list the pinned links", "err", err)
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// attachedElsewhere names the interfaces the decapsulator is on that are
// not in keep.
func (s *Service) attachedElsewhere(keep []string) []string {
	return slices.DeleteFunc(s.attachedNow(), func(n string) bool { return slices.Contains(keep, n) })
}

// Settings is what the decapsulator was last told.
func (s *Service) Settings() Settings { return s.cur }

// ErrDetached is what Run returns when the pins of every link it held were
// removed (`veloflux decap detach` while it ran): it let the links go, and
// the decapsulator is off every interface.
var ErrDetached = errors.New("decap: its pins were removed, and with them the decapsulator")

// Run keeps the decapsulator on its interfaces until ctx ends (it returns
// nil) or its pins are removed (ErrDetached): an interface deleted and
// made again gets it back, and a link whose pin was removed is let go. On
// each value from reload it calls load and applies the result; a failure
// is logged and the settings in force stay.
func (s *Service) Run(ctx context.Context, reload <-chan struct{}, load func() (Settings, error)) error {
	tick := time.NewTicker(watchInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-reload:
			s.reload(load)
		case <-tick.C:
			if s.releaseUnpinned() {
				return ErrDetached
			}
			s.reattachSevered()
		}
	}
}

// reload applies what load returns; when either fails, it logs why and the
// settings in force stay.
func (s *Service) reload(load func() (Settings, error)) {
	next, err := load()
	if err == nil {
		err = s.Apply(next)
	}
	if err != nil {
		s.log.Error("decap: reload rejected; the settings in force stay", "err", err)
		return
	}
	s.log.Info("decap: reloaded", "interfaces", next.Interfaces, "local", next.Local, "gue_port", next.GUEPort)
}

// releaseUnpinned lets go of the links whose pins were removed, and
// reports whether that left the decapsulator on no interface.
func (s *Service) releaseUnpinned() bool {
	gone := s.d.Unpinned()
	for _, name := range gone {
		if err := s.d.Detach(name); err != nil {
			s.log.Error("decap: cannot let go of the link whose pin was removed", "interface", name, "err", err)
			continue
		}
		s.log.Info("decap: its pin was removed: detached", "interface", name)
	}
	return len(gone) > 0 && len(s.d.Attached()) == 0
}

// reattachSevered puts the decapsulator back on interfaces whose link lost
// its interface, once an interface of that name exists again.
func (s *Service) reattachSevered() {
	severed, err := s.d.Severed()
	if err != nil {
		s.log.Warn("decap: cannot check the XDP links", "err", err)
		return
	}
	for _, name := range severed {
		if _, err := net.InterfaceByName(name); err != nil {
			continue // still gone
		}
		if _, err := s.d.Attach(name, s.cur.XDPMode); err != nil {
			s.log.Error("decap: cannot attach to the interface made again", "interface", name, "err", err)
			continue
		}
		s.log.Info("decap: attached to the interface made again", "interface", name)
	}
}

// Close releases this process's handles; what is pinned stays attached.
func (s *Service) Close() error { return s.d.Close() }
