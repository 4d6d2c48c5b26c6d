package agent

import (
	"context"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent/metrics"
)

// linkChange is what the agent cares about in a netlink link update.
type linkChange struct {
	Name  string
	Index int
	Up    bool   // operationally up (carrier and admin)
	MAC   string // the data path forwards only frames to it
	MTU   int    // the data path answers ipip/gue packets that would exceed it
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
				MAC:   attrs.HardwareAddr.String(),
				MTU:   attrs.MTU,
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
// when it is back, an interface that was re-created (new index) gets the
// program attached again, and a new MAC is registered with the data path,
// which forwards only frames addressed to the interface's MAC, and so is
// a new MTU, against which it measures ipip and gue packets.
func (a *Agent) onLinkChange(ctx context.Context, seen map[string]linkChange, lc linkChange) {
	cfg := a.config()
	if !slices.Contains(cfg.Dataplane.Interfaces, lc.Name) {
		return
	}
	prev, known := seen[lc.Name]
	seen[lc.Name] = lc
	if known && prev.Up == lc.Up && prev.Index == lc.Index && prev.MAC == lc.MAC && prev.MTU == lc.MTU {
		return
	}
	a.log.Info("interface state changed", "interface", lc.Name, "up", lc.Up, "ifindex", lc.Index, "mac", lc.MAC, "mtu", lc.MTU)
	if known && prev.Index == lc.Index && (prev.MAC != lc.MAC || prev.MTU != lc.MTU) && lc.Index != 0 {
		if err := a.dp.RegisterInterface(lc.Name); err != nil {
			a.log.Error("register the interface's new MAC or MTU; until then its VIP traffic goes to the stack (new MAC) or is measured against the old MTU",
				"interface", lc.Name, "err", err)
		}
	}
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

// xdpAttachments is veloflux_xdp_attached: the kernel's word, for every
// configured interface. A detached interface is labelled with the mode the
// configuration asks for.
func (a *Agent) xdpAttachments() ([]metrics.XDPAttachment, error) {
	cfg := a.config()
	ats, err := a.dp.Attachments(cfg.Dataplane.Interfaces)
	out := make([]metrics.XDPAttachment, 0, len(ats))
	for _, at := range ats {
		mode := at.Mode
		if !at.Attached {
			mode = string(cfg.Dataplane.XDPMode)
		}
		out = append(out, metrics.XDPAttachment{Interface: at.Interface, Mode: mode, Attached: at.Attached})
	}
	return out, err
}
