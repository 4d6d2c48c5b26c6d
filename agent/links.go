package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/metrics"
)

// linkChange is what the agent cares about in a netlink link update.
type linkChange struct {
	Name  string
	Index int
	Up    bool // operationally up (carrier and admin)
}

// watchLinks forwards link updates until ctx ends. If the subscription
// fails, link following stops with an error log; the periodic resync still
// re-resolves MACs, only later.
func (a *Agent) watchLinks(ctx context.Context, out chan<- linkChange) {
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			if ctx.Err() == nil { // closing the subscription at shutdown errors too
				a.log.Warn("link subscription error", "err", err)
			}
		},
	})
	if err != nil {
		a.log.Error("cannot follow link state; MACs are refreshed only periodically", "err", err)
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				a.log.Error("link subscription closed; MACs are refreshed only periodically")
				return
			}
			attrs := u.Attrs()
			lc := linkChange{
				Name:  attrs.Name,
				Index: attrs.Index,
				Up:    u.Header.Type != unix.RTM_DELLINK && attrs.OperState == netlink.OperUp,
			}
			select {
			case out <- lc:
			case <-ctx.Done():
				return
			}
		}
	}
}

// onLinkChange follows a configured interface going down and up: the kernel
// flushes its neighbours on the way down, so dsr MACs are resolved again
// when it is back, and an interface that was re-created (new index) gets the
// program attached again.
func (a *Agent) onLinkChange(ctx context.Context, seen map[string]linkChange, lc linkChange) {
	cfg := a.config()
	if !slices.Contains(cfg.Dataplane.Interfaces, lc.Name) {
		return
	}
	prev, known := seen[lc.Name]
	seen[lc.Name] = lc
	if known && prev.Up == lc.Up && prev.Index == lc.Index {
		return
	}
	a.log.Info("interface state changed", "interface", lc.Name, "up", lc.Up, "ifindex", lc.Index)
	if known && prev.Index != lc.Index && lc.Index != 0 {
		// The old link went with the old interface; Attach replaces a
		// severed link by itself.
		if err := a.syncAttachments(cfg); err != nil {
			a.log.Error("re-attach to a re-created interface", "interface", lc.Name, "err", err)
		}
	}
	if lc.Up {
		a.rec.Resync()
		a.reconcileNow(ctx, "link up")
	}
}

// xdpAttachedMulti is XDP_ATTACHED_MULTI (include/uapi/linux/if_link.h):
// programs attached in more than one mode at once. netlink's nl package
// stops at XDP_ATTACHED_HW.
const xdpAttachedMulti = 4

// xdpModeName names a kernel attach mode as the configuration does.
func xdpModeName(mode uint32) (string, bool) {
	switch mode {
	case nl.XDP_ATTACHED_DRV:
		return string(dataplane.XDPNative), true
	case nl.XDP_ATTACHED_SKB:
		return string(dataplane.XDPGeneric), true
	case nl.XDP_ATTACHED_HW:
		return "offload", true
	case xdpAttachedMulti:
		return "multi", true
	}
	return "", false
}

// xdpAttachments asks the kernel, for every configured interface, whether
// the balancer's program is attached to it now (veloflux_xdp_attached). It
// does not trust what Attach returned: the link can be detached behind the
// agent's back (bpftool link detach, the interface deleted) and nothing
// tells the agent. An interface that does not exist counts as detached; one
// whose state cannot be read is left out and named in the error.
func (a *Agent) xdpAttachments() ([]metrics.XDPAttachment, error) {
	cfg := a.config()
	progID, err := a.dp.ProgramID()
	if err != nil {
		return nil, err
	}
	var out []metrics.XDPAttachment
	var errs []error
	for _, name := range cfg.Dataplane.Interfaces {
		at := metrics.XDPAttachment{Interface: name, Mode: string(cfg.Dataplane.XDPMode)}
		l, err := netlink.LinkByName(name)
		var notFound netlink.LinkNotFoundError
		switch {
		case errors.As(err, &notFound):
			out = append(out, at)
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("read the XDP state of interface %s: %w", name, err))
			continue
		}
		x := l.Attrs().Xdp
		if x == nil || !x.Attached {
			out = append(out, at)
			continue
		}
		if x.AttachMode == xdpAttachedMulti {
			// netlink reports no program id then (only per-mode ids,
			// which the library does not parse): ask the pinned link.
			at.Attached, err = a.pinnedLinkOn(name, l.Attrs().Index, progID)
			if err != nil {
				errs = append(errs, err)
				continue
			}
		} else {
			at.Attached = x.ProgId == progID
		}
		if at.Attached {
			if mode, ok := xdpModeName(x.AttachMode); ok {
				at.Mode = mode
			}
		}
		out = append(out, at)
	}
	return out, errors.Join(errs...)
}

// pinnedLinkOn reports whether the link pinned for ifname is attached to the
// interface with that index and runs the balancer's program.
func (a *Agent) pinnedLinkOn(ifname string, ifindex int, progID uint32) (bool, error) {
	if a.opts.PinPath == "" {
		return false, fmt.Errorf("interface %s has XDP programs in several modes and, without a pin path, "+
			"no pinned link tells whether one is the balancer's", ifname)
	}
	links, err := a.dp.PinnedLinks()
	if err != nil {
		return false, err
	}
	for _, l := range links {
		if l.Interface == ifname {
			return l.Ifindex == ifindex && l.ProgramID == progID, nil
		}
	}
	return false, nil
}
