// Package dataplane loads, attaches, pins and upgrades the XDP balancer and
// the backend decapsulator, and gives the rest of the agent typed access to
// their maps. It is the only package that touches cilium/ebpf types; every
// other package speaks in netip addresses and the types defined here.
package dataplane

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf/btf"
)

// Address families as the data path stores them (enum vf_family).
const (
	afInet  = uint8(balancerVfFamilyVF_AF_INET)
	afInet6 = uint8(balancerVfFamilyVF_AF_INET6)
)

// Protocol is an IP protocol number that a VIP can carry.
type Protocol uint8

const (
	ProtoTCP Protocol = 6
	ProtoUDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// Mode is how a VIP's packets reach its reals.
type Mode uint32

const (
	// ModeDSR rewrites the MACs and transmits; the reals hold the VIP on
	// loopback and answer clients directly.
	ModeDSR Mode = Mode(balancerVfModeVF_MODE_DSR)
	// ModeIPIP wraps the packet in an outer IPv4/IPv6 header toward the real.
	ModeIPIP Mode = Mode(balancerVfModeVF_MODE_IPIP)
	// ModeNAT rewrites the destination to the real's address and port and
	// the source to an SNAT address of this node, and translates the
	// real's replies back (bpf/include/vf_nat.h). The reals need no change.
	ModeNAT Mode = Mode(balancerVfModeVF_MODE_NAT)
	// ModeGUE wraps the packet in an outer IPv4/IPv6 and UDP header toward
	// the real (GUE variant 1: the inner IP header right after UDP).
	ModeGUE Mode = Mode(balancerVfModeVF_MODE_GUE)
)

func (m Mode) String() string {
	switch m {
	case ModeDSR:
		return "dsr"
	case ModeIPIP:
		return "ipip"
	case ModeNAT:
		return "nat"
	case ModeGUE:
		return "gue"
	}
	return fmt.Sprintf("mode-%d", uint32(m))
}

// RealState decides whether a real takes new flows and keeps old ones.
type RealState uint32

const (
	RealUp       RealState = RealState(balancerVfRealStateVF_REAL_UP)
	RealDraining RealState = RealState(balancerVfRealStateVF_REAL_DRAINING)
	RealDown     RealState = RealState(balancerVfRealStateVF_REAL_DOWN)
)

func (s RealState) String() string {
	switch s {
	case RealUp:
		return "up"
	case RealDraining:
		return "draining"
	case RealDown:
		return "down"
	}
	return fmt.Sprintf("state-%d", uint32(s))
}

// Reason is why the balancer returned its verdict for a packet. Every packet
// is counted under exactly one reason.
type Reason uint32

const (
	ReasonPassNotIP        Reason = Reason(balancerVfReasonVF_R_PASS_NOT_IP)
	ReasonPassNotVIP       Reason = Reason(balancerVfReasonVF_R_PASS_NOT_VIP)
	ReasonPassFragment     Reason = Reason(balancerVfReasonVF_R_PASS_FRAGMENT)
	ReasonPassUnknownL4    Reason = Reason(balancerVfReasonVF_R_PASS_UNKNOWN_L4)
	ReasonPassIPv6ExtLimit Reason = Reason(balancerVfReasonVF_R_PASS_IPV6EXT_LIMIT)
	ReasonPassVLANNested   Reason = Reason(balancerVfReasonVF_R_PASS_VLAN_NESTED)
	// ReasonPassNotOurMAC: a VIP packet in a frame addressed to another
	// MAC (flooded unknown unicast, broadcast, multicast).
	ReasonPassNotOurMAC Reason = Reason(balancerVfReasonVF_R_PASS_NOT_OUR_MAC)
	// ReasonPassIfaceUnknown: a VIP packet on an interface whose MAC the
	// agent did not register (see Attach).
	ReasonPassIfaceUnknown Reason = Reason(balancerVfReasonVF_R_PASS_IFACE_UNKNOWN)
	ReasonDropMalformedL2  Reason = Reason(balancerVfReasonVF_R_DROP_MALFORMED_L2)
	ReasonDropMalformedL3  Reason = Reason(balancerVfReasonVF_R_DROP_MALFORMED_L3)
	ReasonDropMalformedL4  Reason = Reason(balancerVfReasonVF_R_DROP_MALFORMED_L4)
	ReasonDropDenylist     Reason = Reason(balancerVfReasonVF_R_DROP_DENYLIST)
	ReasonDropNoReal       Reason = Reason(balancerVfReasonVF_R_DROP_NO_REAL)
	ReasonDropNoRoute      Reason = Reason(balancerVfReasonVF_R_DROP_NO_ROUTE)
	ReasonDropEncap        Reason = Reason(balancerVfReasonVF_R_DROP_ENCAP)
	// The martian sources of a VIP packet: the VIP itself, 0.0.0.0/8 or ::,
	// 255.255.255.255, 224.0.0.0/4 or ff00::/8, 127.0.0.0/8 or ::1.
	ReasonDropMartianVIP       Reason = Reason(balancerVfReasonVF_R_DROP_MARTIAN_VIP)
	ReasonDropMartianUnspec    Reason = Reason(balancerVfReasonVF_R_DROP_MARTIAN_UNSPECIFIED)
	ReasonDropMartianBroadcast Reason = Reason(balancerVfReasonVF_R_DROP_MARTIAN_BROADCAST)
	ReasonDropMartianMulticast Reason = Reason(balancerVfReasonVF_R_DROP_MARTIAN_MULTICAST)
	ReasonDropMartianLoopback  Reason = Reason(balancerVfReasonVF_R_DROP_MARTIAN_LOOPBACK)
	// ReasonDropNewFlowRateLimited: the packet would have opened a flow
	// beyond its source's new-flow budget (Settings.NewFlowLimit).
	ReasonDropNewFlowRateLimited Reason = Reason(balancerVfReasonVF_R_DROP_NEW_FLOW_RATE_LIMITED)
	// ReasonDropNATNoPort: a new nat flow found no free SNAT port in the
	// ports it tried (the range is exhausted toward that real).
	ReasonDropNATNoPort Reason = Reason(balancerVfReasonVF_R_DROP_NAT_NO_PORT)
	// ReasonDropNATUnconfigured: a nat VIP without its SNAT address, real
	// port or port range, or a real of the other family.
	ReasonDropNATUnconfigured Reason = Reason(balancerVfReasonVF_R_DROP_NAT_UNCONFIGURED)
	ReasonTxDSR               Reason = Reason(balancerVfReasonVF_R_TX_DSR)
	ReasonTxIPIP              Reason = Reason(balancerVfReasonVF_R_TX_IPIP)
	// ReasonTxNAT: a client's packet translated toward its real.
	ReasonTxNAT Reason = Reason(balancerVfReasonVF_R_TX_NAT)
	// ReasonTxNATReply: a real's reply translated back toward its client.
	ReasonTxNATReply Reason = Reason(balancerVfReasonVF_R_TX_NAT_REPLY)
	// ReasonTxGUE: forwarded inside an outer IP and UDP header (GUE variant 1).
	ReasonTxGUE Reason = Reason(balancerVfReasonVF_R_TX_GUE)
	// ReasonTxICMPTooBig: an ipip or gue packet too big for the MTU, answered with ICMP.
	ReasonTxICMPTooBig Reason = Reason(balancerVfReasonVF_R_TX_ICMP_TOO_BIG)
	numReasons                = int(balancerVfReasonVF_R_MAX)
)

// reasonNames are the counters' names, read once from the program's BTF:
// the enumerators of enum vf_reason, lower-cased without their VF_R_ prefix
// (VF_R_TX_IPIP is "tx_ipip"), so C holds the only list. The group markers
// (VF_R_*_FIRST, VF_R_*_LAST) and VF_R_MAX name no reason of their own.
var reasonNames = sync.OnceValue(func() [numReasons]string {
	var names [numReasons]string
	spec, err := loadBalancer()
	if err != nil {
		return names // unreachable: the object is embedded; String falls back
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("vf_reason", &enum); err != nil {
		return names
	}
	for _, v := range enum.Values {
		name, ok := strings.CutPrefix(v.Name, "VF_R_")
		if !ok || v.Value >= uint64(numReasons) || strings.HasSuffix(name, "_FIRST") || strings.HasSuffix(name, "_LAST") {
			continue
		}
		names[v.Value] = strings.ToLower(name)
	}
	return names
})

// Reasons lists every reason in counter order.
func Reasons() []Reason {
	out := make([]Reason, numReasons)
	for i := range out {
		out[i] = Reason(i)
	}
	return out
}

func (r Reason) String() string {
	if int(r) < numReasons && reasonNames()[r] != "" {
		return reasonNames()[r]
	}
	return reasonFallbackName(r)
}

func reasonFallbackName(r Reason) string { return fmt.Sprintf("reason-%d", uint32(r)) }

// Verdict is the XDP action a reason leads to, as the program returns it.
type Verdict uint32

const (
	VerdictAborted Verdict = 0
	VerdictDrop    Verdict = 1
	VerdictPass    Verdict = 2
	VerdictTx      Verdict = 3
)

func (v Verdict) String() string {
	switch v {
	case VerdictAborted:
		return "aborted"
	case VerdictDrop:
		return "drop"
	case VerdictPass:
		return "pass"
	case VerdictTx:
		return "tx"
	}
	return fmt.Sprintf("verdict-%d", uint32(v))
}

// Verdict is vf_reason_verdict of balancer.bpf.c: the verdict of the group
// (VF_R_*_FIRST to VF_R_*_LAST) the reason falls in.
func (r Reason) Verdict() Verdict {
	switch {
	case r >= Reason(balancerVfReasonVF_R_TX_FIRST) && r <= Reason(balancerVfReasonVF_R_TX_LAST):
		return VerdictTx
	case r >= Reason(balancerVfReasonVF_R_DROP_FIRST) && r <= Reason(balancerVfReasonVF_R_DROP_LAST):
		return VerdictDrop
	}
	return VerdictPass
}

// VIP identifies a virtual service. Port 0 matches every port of the
// address and protocol that has no entry of its own.
type VIP struct {
	Addr  netip.Addr
	Port  uint16
	Proto Protocol
}

func (v VIP) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(v.Addr, v.Port), v.Proto)
}

// VIPMeta is what the data path needs to serve a VIP.
type VIPMeta struct {
	ID             uint32 // index of its ring and statistics; chosen by the agent
	Mode           Mode
	SourceAffinity bool // hash the client address only, not the 5-tuple
	// NAT is the source translation of a ModeNAT VIP; zero otherwise.
	NAT NATTarget
}

// NATTarget is what a nat VIP rewrites to besides the real's address: the
// source address (one this node owns, so that replies return here) and the
// port every real of the VIP listens on.
type NATTarget struct {
	SNAT     netip.Addr
	RealPort uint16
}

// Real is a backend as the data path knows it.
type Real struct {
	Addr  netip.Addr
	MAC   net.HardwareAddr // dsr only: the real's MAC on the attached segment
	State RealState
}

// Settings are the data path's global knobs. The source MAC of what the
// balancer sends is each interface's own, registered by Attach.
type Settings struct {
	GatewayMAC   net.HardwareAddr // ipip and gue next hop when FIB lookup is off or fails
	EncapSource4 netip.Addr       // outer source of IPv4-in-IPv4 and GUE over IPv4
	EncapSource6 netip.Addr       // outer source of IPv6-in-IPv6 and GUE over IPv6
	UseFIB       bool             // ipip and gue: ask the kernel FIB for the next hop first
	GUEPort      uint16           // gue: outer UDP destination port; 0 drops gue VIPs' packets
	// ICMPTooBig answers an ipip or gue packet that would exceed the
	// interface's MTU once encapsulated with ICMP "fragmentation needed"
	// (IPv4 with DF) or ICMPv6 "packet too big" (ReasonTxICMPTooBig).
	ICMPTooBig       bool
	TCPIdleTimeoutNs uint64
	UDPIdleTimeoutNs uint64
	EventSampleEvery uint32 // one event per N drops of a reason per CPU; 0 or 1 = all
	NewFlowLimit     NewFlowLimit
	NAT              NATSettings
}

// NATSettings are the knobs of mode nat shared by every nat VIP.
type NATSettings struct {
	// PortMin and PortMax bound the SNAT source ports; both 0 when no
	// VIP is nat. Keep them out of the kernel's ip_local_port_range, or
	// the node's own connections from an SNAT address may collide.
	PortMin, PortMax uint16
	// ClosingTimeoutNs is how long a nat flow lives after a TCP FIN or
	// RST; the idle timeouts above apply otherwise.
	ClosingTimeoutNs uint64
}

func (n NATSettings) validate() error {
	switch {
	case n.PortMin == 0 && n.PortMax == 0:
		return nil
	case n.PortMin == 0 || n.PortMax < n.PortMin:
		return fmt.Errorf("nat port range %d-%d: want 1 <= min <= max", n.PortMin, n.PortMax)
	}
	return nil
}

// NewFlowLimit bounds how fast one source (an IPv4 address, an IPv6 /64) may
// open flows through the balancer, so that a flood from one address cannot
// fill conntrack and evict everyone's idle flows. It is a token bucket per
// source and per receiving CPU, charged by every packet that would create a
// conntrack entry; a source over its budget has those packets dropped
// (ReasonDropNewFlowRateLimited) while its established flows go on.
type NewFlowLimit struct {
	RatePerSecond uint32 // new flows per second; 0 = no limit
	Burst         uint32 // bucket depth in flows; at least 1 with a rate
}

// Bounds of NewFlowLimit: the data path counts credit in nanoseconds, so a
// rate above one per microsecond would round its cost noticeably.
const (
	MaxNewFlowRate  = 1_000_000
	MaxNewFlowBurst = 1_000_000
)

func (l NewFlowLimit) validate() error {
	switch {
	case l.RatePerSecond == 0 && l.Burst == 0:
		return nil
	case l.RatePerSecond == 0:
		return fmt.Errorf("new-flow limit: burst %d without a rate", l.Burst)
	case l.RatePerSecond > MaxNewFlowRate:
		return fmt.Errorf("new-flow limit: rate %d/s above the maximum %d/s", l.RatePerSecond, MaxNewFlowRate)
	case l.Burst < 1 || l.Burst > MaxNewFlowBurst:
		return fmt.Errorf("new-flow limit: burst %d not in [1,%d]", l.Burst, MaxNewFlowBurst)
	}
	return nil
}

// VIPStats are a VIP's counters summed over CPUs.
type VIPStats struct {
	Packets, Bytes, NewFlows uint64
	Drops                    uint64 // of Packets, those dropped (no live real, no route, encapsulation)
}

// RealStats are a real's counters summed over CPUs.
type RealStats struct {
	Packets, Bytes uint64
}

// Counter is one reason's counter summed over CPUs.
type Counter struct {
	Packets, Bytes uint64
}

// Flow is one conntrack entry.
type Flow struct {
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
	Proto            Protocol
	RealID, VIPID    uint32
	Idle             time.Duration // since the entry was last refreshed (to within VF_CT_TOUCH_JIFFIES)
}

// NATFlow is one nat flow: the client's tuple toward the VIP and the
// tuple it was translated to (SNAT address and port toward the real).
type NATFlow struct {
	Client, VIP   netip.AddrPort
	SNAT, Real    netip.AddrPort
	Proto         Protocol
	RealID, VIPID uint32
	Closing       bool          // a TCP FIN or RST went through
	Idle          time.Duration // since the client side was last seen
}

// NATStats describe the nat tables.
type NATStats struct {
	Flows    int // live (not idle-expired) flows in the forward table
	Capacity int // flows each table can hold
}

// Event is a sampled drop from the ring buffer.
type Event struct {
	MonotonicNs      uint64
	Reason           Reason
	PacketLen        uint32
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
	Proto            uint8
}

// addrWords stores an address the way the data path reads it from the wire:
// network-order bytes reinterpreted as host-endian words.
func addrWords(a netip.Addr) (words [4]uint32, family uint8) {
	if a.Is4() {
		b := a.As4()
		words[0] = binary.NativeEndian.Uint32(b[:])
		return words, afInet
	}
	b := a.As16()
	for i := range words {
		words[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return words, afInet6
}

func wordsAddr(words [4]uint32, family uint8) netip.Addr {
	switch family {
	case afInet:
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], words[0])
		return netip.AddrFrom4(b)
	case afInet6:
		var b [16]byte
		for i, w := range words {
			binary.NativeEndian.PutUint32(b[i*4:], w)
		}
		return netip.AddrFrom16(b)
	}
	return netip.Addr{}
}

// htons gives the host-endian value whose memory holds v in network order,
// which is how the data path stores ports. It is its own inverse.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

func ntohs(v uint16) uint16 { return htons(v) }

func macBytes(mac net.HardwareAddr) (out [6]uint8, err error) {
	switch len(mac) {
	case 0:
		return out, nil
	case 6:
		copy(out[:], mac)
		return out, nil
	}
	return out, fmt.Errorf("MAC %q is not a 6-byte Ethernet address", mac.String())
}
