package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"

	"github.com/veloflux/veloflux/agent/dataplane"
)

// decapSource is what `vfctl decap` reads; *dataplane.Decap opened from
// the pins satisfies it, and tests substitute a fake.
type decapSource interface {
	PinPath() string
	GUEPort() (uint16, error)
	Locals() ([]netip.Addr, error)
	PinnedLinks() ([]dataplane.AttachedLink, error)
	Stats() (dataplane.DecapStats, error)
}

// decapView is the backend decapsulator as its pins show it.
type decapView struct {
	PinPath  string               `json:"pin_path"`
	GUEPort  uint16               `json:"gue_port"` // 0: GUE off
	Local    []netip.Addr         `json:"local"`
	Links    []linkRow            `json:"links"`
	Counters dataplane.DecapStats `json:"counters"`
}

func gatherDecap(src decapSource) (*decapView, error) {
	v := &decapView{PinPath: src.PinPath()}
	var err error
	if v.GUEPort, err = src.GUEPort(); err != nil {
		return nil, err
	}
	if v.Local, err = src.Locals(); err != nil {
		return nil, err
	}
	links, err := src.PinnedLinks()
	if err != nil {
		return nil, err
	}
	v.Links = []linkRow{}
	for _, l := range links {
		v.Links = append(v.Links, linkRow(l))
	}
	if v.Counters, err = src.Stats(); err != nil {
		return nil, err
	}
	return v, nil
}

func (v *decapView) table(w io.Writer) error {
	row(w, "pin path:", v.PinPath)
	gue := fmt.Sprintf("UDP port %d", v.GUEPort)
	if v.GUEPort == 0 {
		gue = "off (IPIP and IP6IP6 only)"
	}
	row(w, "gue:", gue)
	row(w, "local addresses:", joinAddrs(v.Local))
	if len(v.Links) == 0 {
		row(w, "interfaces:", "none pinned")
	}
	for _, l := range v.Links {
		state := fmt.Sprintf("program %d, link %d", l.ProgramID, l.LinkID)
		if l.Detached {
			state += ", detached: the interface went away"
		}
		row(w, "interface:", l.Interface, state)
	}
	c := v.Counters
	fmt.Fprintln(w)
	row(w, "DECAPSULATED", "PACKETS")
	row(w, "ipip4 (IPIP, 6in4)", c.IPIP4Packets)
	row(w, "ipip6 (IP6IP6, 4in6)", c.IPIP6Packets)
	row(w, "gue4", c.GUE4Packets)
	row(w, "gue6", c.GUE6Packets)
	row(w, "bytes", c.DecapBytes)
	fmt.Fprintln(w)
	row(w, "PASSED", "PACKETS")
	row(w, "not_tunnel", c.PassNotTunnel)
	row(w, "not_local", c.PassNotLocal)
	row(w, "gue_control", c.PassGUEControl)
	fmt.Fprintln(w)
	row(w, "DROPPED", "PACKETS")
	row(w, "truncated", c.DropTruncated)
	row(w, "bad_length", c.DropBadLength)
	row(w, "bad_inner", c.DropBadInner)
	row(w, "gue_variant", c.DropGUEVariant)
	row(w, "gue_unsupported", c.DropGUEUnsupported)
	return nil
}

func joinAddrs(addrs []netip.Addr) string {
	if len(addrs) == 0 {
		return "none"
	}
	s := addrs[0].String()
	for _, a := range addrs[1:] {
		s += ", " + a.String()
	}
	return s
}

// runDecap is `vfctl decap`: the backend decapsulator's settings and
// counters, from the maps `veloflux decap` pinned. Its pin path defaults
// to the decapsulator's, not the balancer's; pinPath is the global
// --pin-path when one was given.
func runDecap(args []string, pinPath, format string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vfctl decap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if pinPath == "" {
		pinPath = dataplane.DefaultDecapPinPath
	}
	fs.StringVar(&pinPath, "pin-path", pinPath, "directory of the decapsulator's pinned maps and links")
	fs.StringVar(&format, "o", format, "output format: table or json")
	if err := fs.Parse(args); err != nil {
		return parseExit(err)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "vfctl decap: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if format != "table" && format != "json" {
		fmt.Fprintf(stderr, "vfctl: -o %q: want table or json\n", format)
		return 2
	}
	d, err := dataplane.OpenPinnedDecap(pinPath)
	if err != nil {
		fmt.Fprintln(stderr, "vfctl decap:", err)
		return 1
	}
	defer d.Close()
	v, err := gatherDecap(d)
	if err == nil {
		err = render(stdout, v, format)
	}
	if err != nil {
		fmt.Fprintln(stderr, "vfctl decap:", err)
		return 1
	}
	return 0
}
