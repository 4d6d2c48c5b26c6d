/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The map contract between the XDP programs and the Go agent.
 *
 * Every type here is exported to Go by `bpf2go -type`, so the layouts are
 * written with explicit padding: Go must see exactly what the kernel sees.
 * Addresses are kept in network byte order, as they sit in the packet, so
 * the data path never converts them. IPv4 uses addr[0] only; the other
 * words are zero.
 */
#ifndef VF_TYPES_H
#define VF_TYPES_H

/*
 * Map sizes. The agent overrides the VIP, real, ring, conntrack and
 * new-flow sizes at load time; the others are fixed. An enum rather than
 * #defines so that bpf2go exports the values to Go (-type vf_size), and Go
 * has no second copy of them.
 */
enum vf_size {
	VF_DEFAULT_MAX_VIPS = 4096,
	VF_DEFAULT_MAX_REALS = 16384,
	VF_DEFAULT_RING_SIZE = 65537,
	VF_DEFAULT_CT_SIZE = 1048576,
	VF_DEFAULT_FLOW_LIMIT_SIZE = 65536,
	VF_DENY_MAX_PREFIXES = 65536, /* per family */
	VF_EVENTS_BYTES = 256 * 1024,
	VF_DECAP_MAX_LOCAL = 64,
	VF_MAX_IFACES = 256, /* slots of vf_iface_slots, and entries of its overflow vf_ifaces */
	VF_VIP_FILTER_SLOTS = 65536,
	VF_NAT_MAX_ADDRS = 64,         /* SNAT addresses, both families */
	VF_DEFAULT_NAT_SIZE = 262144,  /* NAT flows, per table */
	VF_NAT_MAX_REAL_PORTS = 65536, /* (nat VIP, real) pairs with their own port */
};

/* vf_vip_filter is indexed by the top VF_VIP_FILTER_BITS bits of a
 * multiplicative (Fibonacci) hash of the destination address. */
#define VF_VIP_FILTER_BITS 16
#define VF_VIP_FILTER_MULT 0x9e3779b1u

/* Address families as the maps store them (Linux AF_* values). */
enum vf_family {
	VF_AF_INET = 2,
	VF_AF_INET6 = 10,
};

/* How many IPv6 extension headers are walked before giving up (see README). */
#define VF_IPV6_MAX_EXT_HDRS 4

/* A conntrack hit refreshes last_seen at most every this many jiffies
 * (32-320 ms for HZ 1000-100), so an established flow does not write its
 * entry on every packet. Idle timeouts are seconds, so this is invisible. */
#define VF_CT_TOUCH_JIFFIES 32

/* Forwarding mode of a VIP. Zero is invalid so a zeroed entry never forwards. */
enum vf_mode {
	VF_MODE_INVALID = 0,
	VF_MODE_DSR = 1,
	VF_MODE_IPIP = 2,
	VF_MODE_NAT = 3, /* full NAT: destination to the real, source to our SNAT address */
	VF_MODE_GUE = 4, /* GUE variant 1: outer IP, UDP, then the inner IP header */
};

/* Per-VIP behaviour bits in vf_vip_meta.flags. */
enum vf_vip_flag {
	VF_VIP_F_SRC_AFFINITY = 1,
};

/* State of a real. Down reals are never selected; a draining real keeps the
 * flows conntrack already gave it but is absent from new rings. A zeroed
 * slot (family 0) is an unused id. */
enum vf_real_state {
	VF_REAL_UP = 0,
	VF_REAL_DRAINING = 1,
	VF_REAL_DOWN = 2,
};

/*
 * Why the balancer returned what it returned. Every packet is counted under
 * exactly one reason, so the counters add up to the packets seen. The
 * reasons are grouped by verdict, and each group's first and last member are
 * named (VF_R_*_FIRST/LAST): the verdict of a reason is the group it falls
 * in, the one rule that vf_reason_verdict and Go's Reason.Verdict both read.
 * A new reason goes at the end of its group. The names are the counters'
 * names in Go and in the metrics, lower-cased without VF_R_.
 */
enum vf_reason {
	VF_R_PASS_NOT_IP = 0, /* not IPv4/IPv6 (ARP, LLDP, ...) */
	VF_R_PASS_FIRST = VF_R_PASS_NOT_IP,
	VF_R_PASS_NOT_VIP,        /* IP, but not addressed to a VIP */
	VF_R_PASS_FRAGMENT,       /* IPv4 or IPv6 fragment */
	VF_R_PASS_UNKNOWN_L4,     /* L4 protocol other than TCP/UDP/ICMP */
	VF_R_PASS_IPV6_EXT_LIMIT, /* more IPv6 extension headers than we walk */
	VF_R_PASS_VLAN_NESTED,    /* a second VLAN tag (QinQ) */
	VF_R_PASS_NOT_OUR_MAC, /* VIP packet in a frame to another MAC (flooded, broadcast, multicast) */
	VF_R_PASS_IFACE_UNKNOWN, /* VIP packet on an interface the agent registered no MAC for */
	VF_R_PASS_LAST = VF_R_PASS_IFACE_UNKNOWN,
	VF_R_DROP_MALFORMED_L2, /* truncated Ethernet or VLAN header */
	VF_R_DROP_FIRST = VF_R_DROP_MALFORMED_L2,
	VF_R_DROP_MALFORMED_L3,          /* truncated or inconsistent IP header */
	VF_R_DROP_MALFORMED_L4,          /* truncated TCP/UDP/ICMP header */
	VF_R_DROP_DENYLIST,              /* source address in the denylist */
	VF_R_DROP_NO_REAL,               /* VIP has no live real */
	VF_R_DROP_NO_ROUTE,              /* no MAC for the real or the next hop */
	VF_R_DROP_ENCAP,                 /* encapsulation impossible for this packet */
	VF_R_DROP_MARTIAN_VIP,           /* VIP packet whose source is the VIP itself */
	VF_R_DROP_MARTIAN_UNSPECIFIED,   /* VIP packet from 0.0.0.0/8 or :: */
	VF_R_DROP_MARTIAN_BROADCAST,     /* VIP packet from 255.255.255.255 */
	VF_R_DROP_MARTIAN_MULTICAST,     /* VIP packet from 224.0.0.0/4 or ff00::/8 */
	VF_R_DROP_MARTIAN_LOOPBACK,      /* VIP packet from 127.0.0.0/8 or ::1 */
	VF_R_DROP_NEW_FLOW_RATE_LIMITED, /* the source spent its new-flow budget */
	VF_R_DROP_NAT_NO_PORT,           /* nat: every SNAT port tried was taken */
	VF_R_DROP_NAT_UNCONFIGURED,      /* nat VIP without an SNAT address or port range */
	VF_R_DROP_LAST = VF_R_DROP_NAT_UNCONFIGURED,
	VF_R_TX_DSR, /* forwarded by MAC rewrite */
	VF_R_TX_FIRST = VF_R_TX_DSR,
	VF_R_TX_IPIP,         /* forwarded inside an IPIP/IP6IP6 header */
	VF_R_TX_NAT,          /* nat: client to real, addresses and ports rewritten */
	VF_R_TX_NAT_REPLY,    /* nat: real's reply to the SNAT address, sent back to the client */
	VF_R_TX_GUE,          /* forwarded inside an outer IP and UDP header (GUE variant 1) */
	VF_R_TX_ICMP_TOO_BIG, /* too big to encapsulate: ICMP frag-needed / packet-too-big sent back */
	VF_R_TX_LAST = VF_R_TX_ICMP_TOO_BIG,
	VF_R_MAX,
};

/* What a step of the balancer returns to say "not decided yet, go on": not
 * a reason, so outside the enum's range, and never counted. */
#define VF_CONTINUE (-1)

struct vf_vip_key {
	__u32 addr[4];
	__u16 port;  /* network order; 0 = every port of addr/proto */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family; /* AF_INET or AF_INET6 */
};

struct vf_vip_meta {
	__u32 vip_id; /* index into vf_rings and vf_stats_vip */
	enum vf_mode mode;
	__u32 flags; /* enum vf_vip_flag bits */
};

/* A VIP by its id (vf_vips_by_id): what an established flow, which knows
 * its VIP's id from conntrack, needs to confirm that the packet is still
 * that VIP's, without the hash lookup in vf_vips. A zeroed slot (family 0)
 * matches no packet. */
struct vf_vip_slot {
	struct vf_vip_key key;
	struct vf_vip_meta meta;
};

struct vf_real {
	__u32 addr[4];
	__u8 mac[6]; /* dsr: the real's MAC; ipip: unused */
	__u8 family;
	__u8 pad;
	enum vf_real_state state;
};

struct vf_flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* The IPv4 conntrack key: 16 bytes instead of 40, so the hash and the key
 * compare touch less memory on every packet of the common family. */
struct __attribute__((aligned(8))) vf_flow4_key {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct vf_ct_entry {
	__u64 last_seen; /* jiffies: bpf_jiffies64() is inlined by the verifier, a clock read is a call */
	__u32 real_id;
	__u32 vip_id;
};

/* The IPv4 conntrack is set-associative: a flow's hash picks one set of
 * VF_CT_WAYS slots in an array, and a new flow takes the set's least
 * recently seen slot. Inserting is then a scan of four cache lines and a
 * store, where the kernel's LRU hash takes its LRU and bucket locks (with
 * interrupts off) and evicts through the hash table on every insert into
 * a full table. */
#define VF_CT_WAYS 8

struct vf_ct4_slot {
	struct vf_flow4_key key;
	struct vf_ct_entry entry;
};

struct vf_ct4_set {
	struct vf_ct4_slot way[VF_CT_WAYS];
};

struct vf_vip_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
	__u64 drops; /* packets for the VIP that were dropped (no real, no route, encap, martian, rate limit) */
};

struct vf_real_stats {
	__u64 packets;
	__u64 bytes;
};

struct vf_counter {
	__u64 packets;
	__u64 bytes;
};

struct vf_settings {
	__u8 gw_mac[6];  /* next hop for ipip and gue when bpf_fib_lookup gives nothing */
	__be16 gue_port; /* gue: the outer UDP destination port, network order */
	__u32 encap_src4;
	__u32 encap_src6[4];
	__u32 ring_size;          /* entries in every inner ring map */
	__u32 event_sample_every; /* emit one event per N drops of a reason, per CPU; 0 or 1 = all */
	__u8 use_fib;             /* ipip and gue: ask bpf_fib_lookup for the next hop first */
	__u8 deny4_active;        /* skip the LPM lookup while the v4 denylist is empty */
	__u8 deny6_active;
	__u8 wildcard_active; /* some VIP has port 0: a miss needs a second lookup */
	__u32 hz;             /* the kernel tick rate the agent measured, for the timeouts below */
	/* The per-source new-flow limit (vf_charge_new_flow), as a token
	 * bucket counted in nanoseconds of credit: a new flow costs
	 * new_flow_interval_ns (1e9 / rate), the bucket holds
	 * new_flow_burst_ns (burst * interval). Interval 0 = no limit. */
	__u32 new_flow_interval_ns;
	__u64 tcp_timeout; /* idle timeouts in jiffies */
	__u64 udp_timeout;
	__u64 new_flow_burst_ns;
	__u32 new_flow_rate;  /* rate and burst as configured, read back by the agent; */
	__u32 new_flow_burst; /* the program only reads the two derived fields */
	/* nat (vf_nat.h): SNAT source ports come from [nat_port_min,
	 * nat_port_max], host order. */
	__u16 nat_port_min;
	__u16 nat_port_max;
	__u32 nat_pad;
	__u64 nat_closing_timeout; /* jiffies: a NAT entry after a TCP FIN or RST */
	/* One bit per vf_nat_addr_bit of every SNAT address: a packet to no VIP
	 * looks in vf_nat_addrs only when its destination's bit is set, so
	 * with nat off, or to most other addresses, it pays a multiply. */
	__u64 nat_addr_bits;
	__u8 icmp_too_big; /* ipip and gue: answer a packet too big to encapsulate with ICMP */
	__u8 pad2[7];
};

/* The settings map is named vf_settings like its value's struct; bpf2go's
 * -type lookup cannot tell a struct from a variable of the same name, so
 * Go's type is generated from this typedef.
 */
typedef struct vf_settings vf_settings_t;

/* An interface the program is attached to (vf_iface_slots, vf_ifaces): its
 * own MAC, the only destination it forwards from and the source it sends
 * with. ifindex says which interface a slot of vf_iface_slots belongs to;
 * 0, which no interface has, marks a free slot. */
struct vf_iface {
	__u8 mac[6];
	__u16 mtu; /* the interface's MTU (XDP_TX leaves by it), for ipip and gue's too-big check; 0 = unknown */
	__u32 ifindex;
};

/* A source's new-flow bucket on one CPU (vf_flow_limit). IPv4 sources are
 * limited per address, IPv6 ones per /64, what one host usually holds. */
struct vf_flow_limit_key {
	__u32 prefix[2]; /* IPv4: the address in prefix[0]; IPv6: the first 64 bits */
	__u32 cpu;
	__u8 family;
	__u8 pad[3];
};

struct vf_flow_limit_bucket {
	__u64 credit_ns; /* unspent credit, at most new_flow_burst_ns */
	__u64 last_ns;   /* bpf_ktime_get_ns() when credit was last brought up to date */
};

struct vf_lpm4_key {
	__u32 prefixlen;
	__u32 addr;
};

struct vf_lpm6_key {
	__u32 prefixlen;
	__u32 addr[4];
};

/* A sampled event on vf_events: denylist, malformed-packet, martian-source
 * and new-flow rate limit drops. */
struct vf_event {
	__u64 ts_ns;
	enum vf_reason reason;
	__u32 pkt_len;
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* A nat VIP's source translation (vf_nat_vips, by vip id): the SNAT
 * address this node owns and the reals' port when vf_nat_real_ports has
 * none for the chosen real. */
struct vf_nat_vip {
	__u32 snat_addr[4];
	__u16 real_port; /* network order */
	__u8 family;     /* 0: the VIP has no NAT configuration */
	__u8 pad;
};

/* A real of a nat VIP (vf_nat_real_ports): the real's own port, so that
 * one pool may list its backends on different ports. Keyed by VIP as well
 * as real because one address may sit in two pools on different ports. */
struct vf_nat_real_key {
	__u32 vip_id;
	__u32 real_id;
};

/* An SNAT address of this node (vf_nat_addrs): a packet to no VIP is
 * reverse-translated only when addressed to one of these. */
#define VF_NAT_ADDR_HASH_MUL 0x9E3779B1u /* 2^32 / golden ratio */
struct vf_nat_addr_key {
	__u32 addr[4];
	__u32 family;
};

/*
 * One direction of a NAT flow. The forward table (vf_nat_fwd) is keyed by
 * the client's tuple as it reaches the VIP, the reverse table (vf_nat_rev)
 * by the real's reply as it reaches the SNAT address; each entry carries the
 * other's key in peer, which is also what the packet is rewritten to:
 *   forward: key client:cport -> VIP:vport, peer real:rport -> snat:sport;
 *            sent as snat:sport -> real:rport (peer reversed).
 *   reverse: key real:rport -> snat:sport,  peer client:cport -> VIP:vport;
 *            sent as VIP:vport -> client:cport (peer reversed).
 * So both directions are one lookup.
 */
struct vf_nat_entry {
	struct vf_flow_key peer;
	__u64 last_seen; /* jiffies */
	__u32 real_id;
	__u32 vip_id;
	__u8 closing; /* a TCP FIN or RST went through: nat_closing_timeout applies */
	__u8 pad[7];
};

#endif /* VF_TYPES_H */
