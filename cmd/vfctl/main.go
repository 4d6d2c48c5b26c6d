// Command vfctl inspects the VeloFlux data path: its attachments, VIPs,
// reals, conntrack flows, counters and denylist. It reads the BPF maps and
// links pinned under the pin path directly and loads no program, so it works
// while the agent is stopped, restarting or wedged, and cannot disturb it.
//
//	vfctl [--pin-path /sys/fs/bpf/veloflux] [-o table|json] <command>
//
// Commands: status, vips, reals, flows [-n 50], counters, deny; decap, which
// reads what a backend's `veloflux decap` pinned; and bgp, which asks the
// agent's API since the BGP state is the agent's own.
package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/maglev"
)

const usageText = `usage: vfctl [--pin-path DIR] [-o table|json] <command>

Reads the maps the VeloFlux agent pinned under DIR (default %s);
the agent need not be running.

commands:
  status          attachments, sizes, idle timeouts, object counts, packets by verdict
  vips            every VIP with its statistics and the state of its ring's reals
  reals           every real with its state, MAC and statistics
  flows [-n 50]   a sample of conntrack flows and of nat flows, n of each
                  (-n 0: all); a nat flow shows its SNAT address and port
  counters        packets and bytes per reason, in counter order
  deny            denied prefixes
  decap [--pin-path DIR]
                  a backend's decapsulator (veloflux decap): local addresses,
                  GUE port, interfaces, packets decapsulated, passed and dropped
                  (default DIR %s)
  bgp [--api URL] [--token-file F]
                  BGP sessions and announced VIPs, asked of the agent's API
                  (default %s)
`

// statusFlowSample caps how much of conntrack status walks: a full table
// holds millions of entries and status should answer at once.
const statusFlowSample = 65536

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// source is what vfctl reads; *dataplane.Dataplane satisfies it, and tests
// substitute a fake so that rendering needs no BPF.
type source interface {
	PinnedLinks() ([]dataplane.AttachedLink, error)
	RingSize() uint32
	MaxVIPs() uint32
	MaxReals() uint32
	ConntrackSize() uint32 // flows per address family
	Settings() (dataplane.Settings, error)
	VIPs() (map[dataplane.VIP]dataplane.VIPMeta, error)
	Reals() (map[uint32]dataplane.Real, error)
	VIPStats(id uint32) (dataplane.VIPStats, error)
	RealStats(id uint32) (dataplane.RealStats, error)
	Ring(vipID uint32) ([]uint32, error)
	Counters() ([]dataplane.Counter, error)
	Flows(limit int) ([]dataplane.Flow, error)
	NATFlows(limit int) ([]dataplane.NATFlow, error)
	DenyList() ([]netip.Prefix, error)
}

// view is a command's gathered data; JSON output marshals it as it is.
type view interface{ table(w io.Writer) error }

type command struct {
	gather func(src source, limit int) (view, error)
	limit  bool // takes -n
}

var commands = map[string]command{
	"status":   {gather: func(s source, _ int) (view, error) { return gatherStatus(s) }},
	"vips":     {gather: func(s source, _ int) (view, error) { return gatherVIPs(s) }},
	"reals":    {gather: func(s source, _ int) (view, error) { return gatherReals(s) }},
	"flows":    {gather: func(s source, n int) (view, error) { return gatherFlows(s, n) }, limit: true},
	"counters": {gather: func(s source, _ int) (view, error) { return gatherCounters(s) }},
	"deny":     {gather: func(s source, _ int) (view, error) { return gatherDeny(s) }},
}

// run is main without the process: it returns the exit code, 0 on success,
// 1 when the maps cannot be read, 2 on a usage error.
func run(args []string, stdout, stderr io.Writer) int {
	usage := func() {
		fmt.Fprintf(stderr, usageText, dataplane.DefaultPinPath, dataplane.DefaultDecapPinPath, defaultAPI)
	}
	global := flag.NewFlagSet("vfctl", flag.ContinueOnError)
	global.SetOutput(stderr)
	global.Usage = usage
	pinPath := global.String("pin-path", dataplane.DefaultPinPath, "directory of the pinned maps and links")
	format := global.String("o", "table", "output format: table or json")
	if err := global.Parse(args); err != nil {
		return parseExit(err)
	}
	if global.NArg() == 0 {
		usage()
		return 2
	}
	name := global.Arg(0)
	if name == "bgp" {
		return runBGP(global.Args()[1:], *format, stdout, stderr)
	}
	if name == "decap" {
		decapPin := ""
		global.Visit(func(f *flag.Flag) {
			if f.Name == "pin-path" {
				decapPin = *pinPath
			}
		})
		return runDecap(global.Args()[1:], decapPin, *format, stdout, stderr)
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "vfctl: unknown command %q\n", name)
		usage()
		return 2
	}
	// The global flags are accepted after the command too, for convenience.
	sub := flag.NewFlagSet("vfctl "+name, flag.ContinueOnError)
	sub.SetOutput(stderr)
	sub.StringVar(pinPath, "pin-path", *pinPath, "directory of the pinned maps and links")
	sub.StringVar(format, "o", *format, "output format: table or json")
	limit := 0
	if cmd.limit {
		sub.IntVar(&limit, "n", 50, "flows to show; 0 = all")
	}
	if err := sub.Parse(global.Args()[1:]); err != nil {
		return parseExit(err)
	}
	if sub.NArg() > 0 {
		fmt.Fprintf(stderr, "vfctl %s: unexpected argument %q\n", name, sub.Arg(0))
		return 2
	}
	if *format != "table" && *format != "json" {
		fmt.Fprintf(stderr, "vfctl: -o %q: want table or json\n", *format)
		return 2
	}
	if err := execute(cmd, *pinPath, *format, limit, stdout); err != nil {
		fmt.Fprintf(stderr, "vfctl %s: %v\n", name, err)
		return 1
	}
	return 0
}

func parseExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

func execute(cmd command, pinPath, format string, limit int, w io.Writer) error {
	dp, err := dataplane.OpenPinned(pinPath)
	if err != nil {
		return err
	}
	defer dp.Close()
	v, err := cmd.gather(dp, limit)
	if err != nil {
		return err
	}
	return render(w, v, format)
}

func render(w io.Writer, v view, format string) error {
	if format == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if err := v.table(tw); err != nil {
		return err
	}
	return tw.Flush()
}

// row writes one tab-separated table line.
func row(w io.Writer, cells ...any) {
	s := make([]string, len(cells))
	for i, c := range cells {
		s[i] = fmt.Sprint(c)
	}
	fmt.Fprintln(w, strings.Join(s, "\t"))
}

type linkRow struct {
	Interface string `json:"interface"`
	Ifindex   int    `json:"ifindex"`
	ProgramID uint32 `json:"program_id"`
	LinkID    uint32 `json:"link_id"`
	Detached  bool   `json:"detached"`
}

type verdictCount struct {
	Verdict string `json:"verdict"`
	Packets uint64 `json:"packets"`
}

type statusView struct {
	Links         []linkRow `json:"links"`
	RingSize      uint32    `json:"ring_size"`
	ConntrackSize uint32    `json:"conntrack_size_per_family"` // 0: not known
	MaxVIPs       uint32    `json:"max_vips"`                  // map entries
	MaxReals      uint32    `json:"max_reals"`                 // map entries
	// What fits: id 0 is reserved in both maps.
	VIPCapacity  uint32         `json:"vip_capacity"`
	RealCapacity uint32         `json:"real_capacity"`
	TCPIdleMs    int64          `json:"tcp_idle_timeout_ms"`
	UDPIdleMs    int64          `json:"udp_idle_timeout_ms"`
	VIPs         int            `json:"vips"`
	Reals        int            `json:"reals"`
	FlowsSampled int            `json:"flows_sampled"`
	FlowSample   int            `json:"flow_sample_limit"`
	DenyPrefixes int            `json:"deny_prefixes"`
	Packets      []verdictCount `json:"packets_by_verdict"`
}

func gatherStatus(src source) (*statusView, error) {
	links, err := src.PinnedLinks()
	if err != nil {
		return nil, err
	}
	set, err := src.Settings()
	if err != nil {
		return nil, err
	}
	vips, err := src.VIPs()
	if err != nil {
		return nil, err
	}
	reals, err := src.Reals()
	if err != nil {
		return nil, err
	}
	flows, err := src.Flows(statusFlowSample)
	if err != nil {
		return nil, err
	}
	deny, err := src.DenyList()
	if err != nil {
		return nil, err
	}
	counters, err := gatherCounters(src)
	if err != nil {
		return nil, err
	}
	v := &statusView{
		Links: []linkRow{}, RingSize: src.RingSize(), MaxVIPs: src.MaxVIPs(), MaxReals: src.MaxReals(),
		VIPCapacity: max(src.MaxVIPs(), 1) - 1, RealCapacity: max(src.MaxReals(), 1) - 1,
		TCPIdleMs: time.Duration(set.TCPIdleTimeoutNs).Milliseconds(),
		UDPIdleMs: time.Duration(set.UDPIdleTimeoutNs).Milliseconds(),
		VIPs:      len(vips), Reals: len(reals), FlowsSampled: len(flows), FlowSample: statusFlowSample,
		DenyPrefixes: len(deny), Packets: []verdictCount{},
	}
	v.ConntrackSize = src.ConntrackSize()
	for _, l := range links {
		v.Links = append(v.Links, linkRow(l))
	}
	slices.SortFunc(v.Links, func(a, b linkRow) int { return cmp.Compare(a.Interface, b.Interface) })
	// Verdicts in the order their first reason appears, so pass/drop/tx
	// read the same way as the counters command.
	for _, c := range counters {
		i := slices.IndexFunc(v.Packets, func(p verdictCount) bool { return p.Verdict == c.Verdict })
		if i < 0 {
			v.Packets = append(v.Packets, verdictCount{Verdict: c.Verdict})
			i = len(v.Packets) - 1
		}
		v.Packets[i].Packets += c.Packets
	}
	return v, nil
}

func (v *statusView) table(w io.Writer) error {
	ct := "unknown"
	if v.ConntrackSize != 0 {
		ct = fmt.Sprintf("%d per family", v.ConntrackSize)
	}
	flows := strconv.Itoa(v.FlowsSampled)
	if v.FlowsSampled >= v.FlowSample {
		flows += "+ (sample limit reached)"
	}
	var pk []string
	for _, p := range v.Packets {
		pk = append(pk, fmt.Sprintf("%s %d", p.Verdict, p.Packets))
	}
	row(w, "ring size:", v.RingSize)
	row(w, "conntrack size:", ct)
	row(w, "capacity:", fmt.Sprintf("%d VIPs, %d reals (maps of %d and %d; id 0 is reserved)",
		v.VIPCapacity, v.RealCapacity, v.MaxVIPs, v.MaxReals))
	row(w, "idle timeouts:", fmt.Sprintf("tcp %v, udp %v", millis(v.TCPIdleMs), millis(v.UDPIdleMs)))
	row(w, "VIPs:", v.VIPs)
	row(w, "reals:", v.Reals)
	row(w, "flows:", flows)
	row(w, "deny prefixes:", v.DenyPrefixes)
	row(w, "packets:", strings.Join(pk, ", "))
	fmt.Fprintln(w)
	if len(v.Links) == 0 {
		fmt.Fprintln(w, "no XDP links pinned: the balancer is attached nowhere")
		return nil
	}
	row(w, "INTERFACE", "IFINDEX", "PROGRAM", "LINK", "STATE")
	for _, l := range v.Links {
		state := "attached"
		if l.Detached {
			state = "detached (interface gone)"
		}
		row(w, l.Interface, l.Ifindex, l.ProgramID, l.LinkID, state)
	}
	return nil
}

// Durations travel as whole milliseconds: exact in JSON, and finer than
// the kernel tick they are measured in.
func millis(ms int64) time.Duration { return time.Duration(ms) * time.Millisecond }

type vipRow struct {
	Address        netip.Addr `json:"address"`
	Port           uint16     `json:"port"` // 0: every port
	Proto          string     `json:"proto"`
	Mode           string     `json:"mode"`
	ID             uint32     `json:"id"`
	SourceAffinity bool       `json:"source_affinity"`
	Packets        uint64     `json:"packets"`
	Bytes          uint64     `json:"bytes"`
	NewFlows       uint64     `json:"new_flows"`
	Reals          int        `json:"reals"` // distinct reals in the ring
	RealsUp        int        `json:"reals_up"`
	RealsDraining  int        `json:"reals_draining"`
	RealsDown      int        `json:"reals_down"`
	// Fingerprint is the hash of the ring's content (maglev.Fingerprint):
	// nodes behind one router must show the same for a VIP.
	Fingerprint string `json:"fingerprint,omitempty"`
	// RingError says why the ring could not be read; the real counts are
	// then zero and mean nothing.
	RingError string `json:"ring_error,omitempty"`
}

type vipTable []vipRow

func gatherVIPs(src source) (vipTable, error) {
	vips, err := src.VIPs()
	if err != nil {
		return nil, err
	}
	reals, err := src.Reals()
	if err != nil {
		return nil, err
	}
	out := vipTable{}
	for vip, meta := range vips {
		st, err := src.VIPStats(meta.ID)
		if err != nil {
			return nil, err
		}
		r := vipRow{Address: vip.Addr, Port: vip.Port, Proto: vip.Proto.String(), Mode: meta.Mode.String(),
			ID: meta.ID, SourceAffinity: meta.SourceAffinity, Packets: st.Packets, Bytes: st.Bytes, NewFlows: st.NewFlows}
		ring, err := src.Ring(meta.ID)
		if errors.Is(err, dataplane.ErrRingUnreadable) {
			// The rest of the row is still worth showing.
			r.RingError = ringPermissionNote
			out = append(out, r)
			continue
		}
		if err != nil {
			return nil, err
		}
		r.Fingerprint = fmt.Sprintf("%013x", maglev.Fingerprint(ring, func(id uint32) netip.Addr {
			if rl, ok := reals[id]; ok && id != 0 {
				return rl.Addr
			}
			return netip.Addr{}
		}))
		seen := map[uint32]bool{0: true} // id 0 is reserved: an empty slot
		for _, id := range ring {
			if seen[id] {
				continue
			}
			seen[id] = true
			r.Reals++
			// A ring id with no real behind it is unusable, as a down one is.
			switch rl, ok := reals[id]; {
			case ok && rl.State == dataplane.RealUp:
				r.RealsUp++
			case ok && rl.State == dataplane.RealDraining:
				r.RealsDraining++
			default:
				r.RealsDown++
			}
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b vipRow) int {
		return cmp.Or(a.Address.Compare(b.Address), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
	})
	return out, nil
}

func (t vipTable) table(w io.Writer) error {
	unreadable := false
	row(w, "ADDRESS", "PORT", "PROTO", "MODE", "ID", "AFFINITY", "PACKETS", "BYTES", "NEW FLOWS", "REALS", "UP", "DRAINING", "DOWN", "FINGERPRINT")
	for _, r := range t {
		port := "*"
		if r.Port != 0 {
			port = strconv.Itoa(int(r.Port))
		}
		aff := "flow"
		if r.SourceAffinity {
			aff = "source"
		}
		if r.RingError != "" {
			row(w, r.Address, port, r.Proto, r.Mode, r.ID, aff, r.Packets, r.Bytes, r.NewFlows, "?", "?", "?", "?", "?")
			unreadable = true
			continue
		}
		row(w, r.Address, port, r.Proto, r.Mode, r.ID, aff, r.Packets, r.Bytes, r.NewFlows, r.Reals, r.RealsUp, r.RealsDraining, r.RealsDown, r.Fingerprint)
	}
	if unreadable {
		fmt.Fprintf(w, "?: %s\n", ringPermissionNote)
	}
	return nil
}

var ringPermissionNote = "the ring could not be read: " + dataplane.ErrRingUnreadable.Error() +
	"; GET /api/backends shows every backend with its state"

type realRow struct {
	ID      uint32     `json:"id"`
	Address netip.Addr `json:"address"`
	State   string     `json:"state"`
	MAC     string     `json:"mac"` // "" unless set (dsr)
	Packets uint64     `json:"packets"`
	Bytes   uint64     `json:"bytes"`
}

type realTable []realRow

func gatherReals(src source) (realTable, error) {
	reals, err := src.Reals()
	if err != nil {
		return nil, err
	}
	out := realTable{}
	for id, r := range reals {
		st, err := src.RealStats(id)
		if err != nil {
			return nil, err
		}
		out = append(out, realRow{ID: id, Address: r.Addr, State: r.State.String(), MAC: r.MAC.String(),
			Packets: st.Packets, Bytes: st.Bytes})
	}
	slices.SortFunc(out, func(a, b realRow) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

func (t realTable) table(w io.Writer) error {
	row(w, "ID", "ADDRESS", "STATE", "MAC", "PACKETS", "BYTES")
	for _, r := range t {
		row(w, r.ID, r.Address, r.State, cmp.Or(r.MAC, "-"), r.Packets, r.Bytes)
	}
	return nil
}

type flowRow struct {
	Client      netip.AddrPort `json:"client"`
	VIP         netip.AddrPort `json:"vip"`
	Proto       string         `json:"proto"`
	VIPID       uint32         `json:"vip_id"`
	RealID      uint32         `json:"real_id"`
	RealAddress string         `json:"real_address"` // "" when the id has no real any more
	IdleMs      int64          `json:"idle_ms"`
	// A nat flow's translation: it reaches the real (RealAddress and
	// RealPort) from SNAT. Absent for the other modes' flows.
	SNAT     netip.AddrPort `json:"snat,omitzero"`
	RealPort uint16         `json:"real_port,omitzero"`
	Closing  bool           `json:"closing,omitzero"` // a TCP FIN or RST went through
}

type flowTable []flowRow

func gatherFlows(src source, limit int) (flowTable, error) {
	flows, err := src.Flows(limit)
	if err != nil {
		return nil, err
	}
	reals, err := src.Reals()
	if err != nil {
		return nil, err
	}
	out := flowTable{}
	for _, f := range flows {
		r := flowRow{Client: netip.AddrPortFrom(f.Src, f.SrcPort), VIP: netip.AddrPortFrom(f.Dst, f.DstPort),
			Proto: f.Proto.String(), VIPID: f.VIPID, RealID: f.RealID, IdleMs: f.Idle.Milliseconds()}
		if rl, ok := reals[f.RealID]; ok {
			r.RealAddress = rl.Addr.String()
		}
		out = append(out, r)
	}
	nat, err := src.NATFlows(limit)
	if err != nil {
		return nil, err
	}
	for _, f := range nat {
		out = append(out, flowRow{Client: f.Client, VIP: f.VIP, Proto: f.Proto.String(), VIPID: f.VIPID,
			RealID: f.RealID, RealAddress: f.Real.Addr().String(), RealPort: f.Real.Port(), SNAT: f.SNAT,
			Closing: f.Closing, IdleMs: f.Idle.Milliseconds()})
	}
	// The sample comes in hash order; sorting makes repeated runs comparable.
	slices.SortFunc(out, func(a, b flowRow) int {
		return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Proto, b.Proto), a.Client.Compare(b.Client))
	})
	return out, nil
}

func (t flowTable) table(w io.Writer) error {
	row(w, "CLIENT", "", "VIP", "PROTO", "REAL", "REAL ADDRESS", "IDLE", "NAT")
	for _, f := range t {
		nat := "-"
		if f.SNAT.IsValid() {
			nat = fmt.Sprintf("%s -> %s", f.SNAT, netip.AddrPortFrom(netip.MustParseAddr(f.RealAddress), f.RealPort))
			if f.Closing {
				nat += " (closing)"
			}
		}
		row(w, f.Client, "->", f.VIP, f.Proto, f.RealID, cmp.Or(f.RealAddress, "(gone)"), millis(f.IdleMs), nat)
	}
	return nil
}

type counterRow struct {
	Reason  string `json:"reason"`
	Verdict string `json:"verdict"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

type counterTable []counterRow

// gatherCounters lists every reason, zeros included, so that scripts see
// the same rows whatever traffic there was.
func gatherCounters(src source) (counterTable, error) {
	counters, err := src.Counters()
	if err != nil {
		return nil, err
	}
	out := counterTable{}
	for _, r := range dataplane.Reasons() {
		c := counterRow{Reason: r.String(), Verdict: r.Verdict().String()}
		if int(r) < len(counters) {
			c.Packets, c.Bytes = counters[r].Packets, counters[r].Bytes
		}
		out = append(out, c)
	}
	return out, nil
}

func (t counterTable) table(w io.Writer) error {
	row(w, "REASON", "VERDICT", "PACKETS", "BYTES")
	for _, c := range t {
		row(w, c.Reason, c.Verdict, c.Packets, c.Bytes)
	}
	return nil
}

type denyTable []netip.Prefix

func gatherDeny(src source) (denyTable, error) {
	list, err := src.DenyList()
	if err != nil {
		return nil, err
	}
	out := denyTable(slices.Clone(list))
	if out == nil {
		out = denyTable{}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	return out, nil
}

func (t denyTable) table(w io.Writer) error {
	row(w, "PREFIX")
	for _, p := range t {
		row(w, p)
	}
	return nil
}
