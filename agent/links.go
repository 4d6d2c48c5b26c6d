package agent

import (
	"context"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
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
		if err := a.dp.Detach(lc.Name); err != nil {
			a.log.Warn("drop the stale attachment of a re-created interface", "interface", lc.Name, "err", err)
		}
		if err := a.syncAttachments(cfg); err != nil {
			a.log.Error("re-attach to a re-created interface", "interface", lc.Name, "err", err)
		}
	}
	if lc.Up {
		a.rec.Resync()
		a.reconcileNow(ctx, "link up")
	}
}
