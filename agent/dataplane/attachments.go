package dataplane

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// Attachment is what the kernel says, now, about the balancer on one
// interface.
type Attachment struct {
	Interface string
	// Attached: the balancer's program runs on the interface. An
	// interface that does not exist is not attached.
	Attached bool
	// Mode is the kernel's attach mode when attached: "native", "generic",
	// "offload" or "multi" (programs in several modes at once).
	Mode string
}

// xdpAttachedMulti is XDP_ATTACHED_MULTI (include/uapi/linux/if_link.h):
// programs attached in more than one mode at once. netlink's nl package
// stops at XDP_ATTACHED_HW.
const xdpAttachedMulti = 4

// kernelModeName names a kernel attach mode as the configuration does.
func kernelModeName(mode uint32) string {
	switch mode {
	case nl.XDP_ATTACHED_DRV:
		return string(XDPNative)
	case nl.XDP_ATTACHED_SKB:
		return string(XDPGeneric)
	case nl.XDP_ATTACHED_HW:
		return "offload"
	case xdpAttachedMulti:
		return "multi"
	}
	return fmt.Sprintf("kernel mode %d", mode)
}

// Attachments asks the kernel, for each of ifnames, whether the balancer's
// program is attached to it now. It does not trust what Attach returned: a
// link can be detached behind the agent's back (bpftool link detach, the
// interface deleted) and nothing tells the agent. The API's status and the
// veloflux_xdp_attached metric both read it, so they cannot disagree. An
// interface whose state cannot be read is left out and named in the error.
func (d *Dataplane) Attachments(ifnames []string) ([]Attachment, error) {
	progID, err := d.ProgramID()
	if err != nil {
		return nil, err
	}
	var out []Attachment
	var errs []error
	for _, name := range ifnames {
		at := Attachment{Interface: name}
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
			at.Attached, err = d.pinnedLinkOn(name, l.Attrs().Index, progID)
			if err != nil {
				errs = append(errs, err)
				continue
			}
		} else {
			at.Attached = x.ProgId == progID
		}
		if at.Attached {
			at.Mode = kernelModeName(x.AttachMode)
		}
		out = append(out, at)
	}
	return out, errors.Join(errs...)
}

// pinnedLinkOn reports whether the link pinned for ifname is attached to the
// interface with that index and runs the program progID.
func (d *Dataplane) pinnedLinkOn(ifname string, ifindex int, progID uint32) (bool, error) {
	if d.opts.PinPath == "" {
		return false, fmt.Errorf("interface %s has XDP programs in several modes and, without a pin path, "+
			"no pinned link tells whether one is the balancer's", ifname)
	}
	links, err := d.PinnedLinks()
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
