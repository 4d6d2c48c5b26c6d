package config

import (
	"fmt"
	"strings"
)

// DefaultGUEPort is the UDP port GUE packets are sent to, as Katran does.
const DefaultGUEPort = 6080

// maxDecapLocals is the size of the decapsulator's map of local addresses
// (VF_DECAP_MAX_LOCAL in bpf/include/vf_types.h).
const maxDecapLocals = 64

// DecapConfig configures `veloflux decap`, the XDP decapsulator a backend
// of ipip and gue VIPs runs. The agent ignores the section: a backend's
// file may hold nothing else, and a node that is both balancer and backend
// may keep both in one file.
type DecapConfig struct {
	// Interfaces the tunnel packets arrive on.
	Interfaces []string `yaml:"interfaces"`
	// Local are the outer destination addresses to accept: this backend's
	// own addresses, which the balancer knows it by.
	Local []string `yaml:"local"`
	// GUEPort is the UDP port of GUE packets; 0 decapsulates no GUE.
	GUEPort int     `yaml:"gue_port"`
	XDPMode XDPMode `yaml:"xdp_mode"`
}

func (d *DecapConfig) setDefaults() {
	d.GUEPort = DefaultGUEPort
	d.XDPMode = XDPModeAuto
}

// DefaultDecap returns a decap section with its defaults and nothing to
// attach to, for settings that come from elsewhere (the command line).
func DefaultDecap() DecapConfig {
	var d DecapConfig
	d.setDefaults()
	return d
}

// Problems lists everything wrong with the section, each located by its
// path under prefix ("decap." in a file). Addresses are checked as given;
// Normalize puts valid ones in canonical form.
func (d *DecapConfig) Problems(prefix string) []FieldError {
	v := &collector{}
	if len(d.Interfaces) == 0 {
		v.add(prefix+"interfaces", "at least one interface is required: the one the tunnel packets arrive on")
	}
	seen := map[string]int{}
	for i, name := range d.Interfaces {
		ip := fmt.Sprintf("%sinterfaces[%d]", prefix, i)
		if msg := checkIfName(name); msg != "" {
			v.add(ip, "%s", msg)
		} else if j, dup := seen[name]; dup {
			v.add(ip, "duplicate interface %q (also interfaces[%d])", name, j)
		} else {
			seen[name] = i
		}
	}
	switch {
	case len(d.Local) == 0:
		v.add(prefix+"local", "at least one address is required: this backend's address that the balancer sends tunnel packets to")
	case len(d.Local) > maxDecapLocals:
		v.add(prefix+"local", "at most %d addresses, got %d", maxDecapLocals, len(d.Local))
	}
	seen = map[string]int{}
	for i, s := range d.Local {
		lp := fmt.Sprintf("%slocal[%d]", prefix, i)
		a, msg := checkUnicastIP(s)
		switch {
		case msg != "":
			v.add(lp, "%s", msg)
		case a.IsLoopback():
			v.add(lp, "%s is a loopback address, which no tunnel packet arrives for", s)
		default:
			if j, dup := seen[a.String()]; dup {
				v.add(lp, "duplicate address %s (also local[%d])", s, j)
			} else {
				seen[a.String()] = i
			}
		}
	}
	if d.GUEPort < 0 || d.GUEPort > 65535 {
		v.add(prefix+"gue_port", "must be a UDP port between 1 and 65535, or 0 to decapsulate no GUE, got %d", d.GUEPort)
	}
	checkEnum(v, prefix+"xdp_mode", d.XDPMode, XDPModeNative, XDPModeGeneric, XDPModeAuto)
	return v.errs
}

// Normalize writes valid local addresses in canonical form.
func (d *DecapConfig) Normalize() {
	for i := range d.Local {
		if a, msg := checkUnicastIP(d.Local[i]); msg == "" {
			d.Local[i] = a.String()
		}
	}
}

// SplitList splits a comma-separated command-line value into its trimmed,
// non-empty items.
func SplitList(s string) []string {
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func (c *Config) validateDecap(v *collector) {
	if c.Decap == nil {
		return
	}
	v.errs = append(v.errs, c.Decap.Problems("decap.")...)
}
