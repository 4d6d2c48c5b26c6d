// SPDX-License-Identifier: GPL-2.0
/*
 * VeloFlux L4 balancer, XDP.
 *
 *   parse -> denylist -> VIP -> our MAC? -> martian source? -> conntrack
 *         -> (new flow: per-source limit) -> Maglev -> forward (dsr | ipip | gue)
 *   nat VIPs keep their own state instead of conntrack (vf_nat.h), and a
 *   packet to no VIP may be a nat reply to one of our SNAT addresses.
 *
 * Every packet ends under exactly one enum vf_reason, which fixes its verdict
 * and is counted once in vf_counters. The agent owns every map; this program
 * only reads them, except conntrack, the new-flow buckets and the per-CPU
 * statistics.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vf_types.h"
#include "vf_net.h"
#include "vf_hash.h"
#include "vf_parse.h"

/* gue: the outer UDP header, and the range its source port is taken from. */
#define VF_GUE_UDP_HDR_LEN ((__u32)sizeof(struct udphdr))
#define VF_GUE_SPORT_BASE  0xc000
#define VF_GUE_SPORT_MASK  0x3fff

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VF_DEFAULT_MAX_VIPS);
	__type(key, struct vf_vip_key);
	__type(value, struct vf_vip_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_vips SEC(".maps");

/* vf_vips again, indexed by VIP id, for established flows (vf_vip_of_flow).
 * Derived from vf_vips: the agent writes a slot with every VIP and
 * rebuilds the map from vf_vips on every load, hence not pinned. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_DEFAULT_MAX_VIPS);
	__type(key, __u32);
	__type(value, struct vf_vip_slot);
} vf_vips_by_id SEC(".maps");

/* One Maglev ring per VIP. The agent builds a new inner map and swaps it in
 * with a single outer update, so a lookup never sees a half-written ring.
 * Rings are mmapable so that the agent fills 65537 slots with one copy
 * instead of a batch update that costs milliseconds per ring. */
struct vf_ring {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_DEFAULT_RING_SIZE);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, VF_DEFAULT_MAX_VIPS);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct vf_ring);
} vf_rings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_DEFAULT_MAX_REALS);
	__type(key, __u32);
	__type(value, struct vf_real);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_reals SEC(".maps");

/* Conntrack, one LRU per family so that IPv4 flows use a 16-byte key. Per-CPU
 * LRU lists: each CPU evicts from its own list, so new flows on one CPU do
 * not contend for a global LRU lock. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_DEFAULT_CT_SIZE / VF_CT_WAYS);
	__type(key, __u32);
	__type(value, struct vf_ct4_set);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_ct4 SEC(".maps");

/* The number of sets in vf_ct4, set by the agent at load time from the
 * map it uses (a pinned one keeps its size). */
volatile const __u32 vf_ct4_sets = VF_DEFAULT_CT_SIZE / VF_CT_WAYS;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, VF_DEFAULT_CT_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct vf_flow_key);
	__type(value, struct vf_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VF_DEFAULT_MAX_VIPS);
	__type(key, __u32);
	__type(value, struct vf_vip_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_stats_vip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VF_DEFAULT_MAX_REALS);
	__type(key, __u32);
	__type(value, struct vf_real_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_stats_real SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VF_R_MAX);
	__type(key, __u32);
	__type(value, struct vf_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, vf_settings_t);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, VF_DENY_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vf_lpm4_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_deny4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, VF_DENY_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vf_lpm6_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_deny6 SEC(".maps");

/* ifindex -> the interface's own MAC, written by the agent before it puts
 * the program on the interface. Not pinned: every agent writes the entries
 * of the interfaces it attaches, so none outlives what an agent knows.
 *
 * Direct-mapped, because every VIP packet reads it: slot ifindex modulo
 * VF_MAX_IFACES of an array is an inlined load, where a hash costs a helper
 * call and a hash of the key. An ifindex is not bounded by anything we
 * could size the array with, so an interface whose slot another one holds
 * goes to the overflow hash vf_ifaces, which is only read when the slot
 * belongs to another interface (or to none). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct vf_iface);
} vf_iface_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VF_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct vf_iface);
} vf_ifaces SEC(".maps");

/* A one-hash-function Bloom filter of the VIP addresses: slot
 * vf_vip_filter_slot(dst) holds how many VIPs (of any port and protocol)
 * have an address that hashes there. A packet whose slot is 0 is addressed
 * to no VIP, and is passed without the hash lookup in vf_vips: non-VIP
 * traffic, most of what a host receives, pays one inlined array load. The
 * agent keeps the counts with vf_vips and rebuilds the map from it on every
 * load, hence not pinned. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_VIP_FILTER_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} vf_vip_filter SEC(".maps");

/*
 * The per-source new-flow buckets. Per CPU, by putting the CPU in the key of
 * an LRU hash with per-CPU LRU lists, rather than a BPF_MAP_TYPE_LRU_PERCPU_HASH:
 *  - a source flooding from random ports lands on every CPU; a shared bucket
 *    would make every CPU write one cache line (and take a lock) for it;
 *  - an LRU_PERCPU_HASH allocates the value on every possible CPU for every
 *    key and zeroes all of them when a program inserts one, which is the
 *    common operation under a spoofed-source flood; here an insert touches
 *    one element of the inserting CPU's own LRU list, like conntrack.
 * The cost is that the limit holds per receiving CPU: a source whose flows
 * RSS spreads over N queues can open up to N times the rate (README).
 * Not pinned: losing the buckets on a restart only refills them, and the
 * agent can then size the table anew.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, VF_DEFAULT_FLOW_LIMIT_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct vf_flow_limit_key);
	__type(value, struct vf_flow_limit_bucket);
} vf_flow_limit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, VF_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_events SEC(".maps");

/* Give struct vf_event and the enums that no map or struct uses a BTF
 * entry, so bpf2go can export them. Never read. */
const struct vf_event *vf_unused_event __attribute__((unused));
const enum vf_size *vf_unused_size __attribute__((unused));
const enum vf_family *vf_unused_family __attribute__((unused));

static __always_inline int vf_reason_verdict(__u32 reason)
{
	if (reason >= VF_R_TX_FIRST && reason <= VF_R_TX_LAST)
		return XDP_TX;
	if (reason >= VF_R_DROP_FIRST && reason <= VF_R_DROP_LAST)
		return XDP_DROP;
	return XDP_PASS;
}

static __always_inline int vf_reason_has_event(__u32 reason)
{
	switch (reason) {
	case VF_R_DROP_DENYLIST:
	case VF_R_DROP_MALFORMED_L2:
	case VF_R_DROP_MALFORMED_L3:
	case VF_R_DROP_MALFORMED_L4:
	case VF_R_DROP_MARTIAN_VIP:
	case VF_R_DROP_MARTIAN_UNSPECIFIED:
	case VF_R_DROP_MARTIAN_BROADCAST:
	case VF_R_DROP_MARTIAN_MULTICAST:
	case VF_R_DROP_MARTIAN_LOOPBACK:
	case VF_R_DROP_NEW_FLOW_RATE_LIMITED:
		return 1;
	default:
		return 0;
	}
}

static __always_inline int vf_check_denylist(const struct vf_settings *cfg,
					     const struct vf_pkt *pkt)
{
	if (pkt->flow.family == VF_AF_INET) {
		struct vf_lpm4_key key = { .prefixlen = 32, .addr = pkt->flow.src[0] };

		if (cfg->deny4_active && bpf_map_lookup_elem(&vf_deny4, &key))
			return VF_R_DROP_DENYLIST;
		return VF_CONTINUE;
	}
	if (cfg->deny6_active) {
		struct vf_lpm6_key key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, pkt->flow.src, sizeof(key.addr));
		if (bpf_map_lookup_elem(&vf_deny6, &key))
			return VF_R_DROP_DENYLIST;
	}
	return VF_CONTINUE;
}

/*
 * The frame must be addressed to the interface it came in on. A switch
 * floods a frame for an unknown unicast MAC to every port, and broadcast or
 * multicast reaches every balancer of the segment: forwarding those would
 * duplicate the flow, and stamping another host's MAC as our source would
 * teach the switch a wrong port for it. The stack drops them or answers
 * them as it does without XDP. An interface the agent registered no MAC for
 * passes too: forwarding without knowing our own address is the bug above.
 * One array load; the MAC compares as a 4-byte and a 2-byte word.
 */
static __always_inline const struct vf_iface *vf_lookup_iface(__u32 ifindex)
{
	__u32 slot = ifindex % VF_MAX_IFACES;
	const struct vf_iface *iface = bpf_map_lookup_elem(&vf_iface_slots, &slot);

	if (iface && iface->ifindex == ifindex)
		return iface;
	return bpf_map_lookup_elem(&vf_ifaces, &ifindex);
}

static __always_inline int vf_check_our_mac(struct xdp_md *ctx, const struct vf_iface **out)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)(long)ctx->data;
	const struct vf_iface *iface;

	if ((void *)(eth + 1) > data_end)
		return VF_R_DROP_MALFORMED_L2;
	iface = vf_lookup_iface(ctx->ingress_ifindex);
	if (!iface)
		return VF_R_PASS_IFACE_UNKNOWN;
	if (!vf_mac_equal(eth->h_dest, iface->mac))
		return VF_R_PASS_NOT_OUR_MAC;
	*out = iface;
	return VF_CONTINUE;
}

/*
 * Sources no client can have (the kernel's "martians", RFC 1122 3.2.1.3 and
 * RFC 4291 2.5.2-2.7): a reply to them would go to ourselves, to nobody or
 * to a whole group. Decided on the outer header, before an ICMP error swaps
 * in its quoted flow; acted on for VIP packets only, so the host still gets
 * its own DHCP (0.0.0.0) and multicast traffic.
 */
static __always_inline int vf_martian4(__be32 src, __be32 dst)
{
	__u32 host = bpf_ntohl(src);

	if (src == dst)
		return VF_R_DROP_MARTIAN_VIP;
	if ((host >> 24) == VF_IPV4_NET_THIS)
		return VF_R_DROP_MARTIAN_UNSPECIFIED;
	if ((host >> 24) == VF_IPV4_NET_LOOPBACK)
		return VF_R_DROP_MARTIAN_LOOPBACK;
	if (host == VF_IPV4_BROADCAST)
		return VF_R_DROP_MARTIAN_BROADCAST;
	if ((host >> 28) == VF_IPV4_MULTICAST_NIBBLE)
		return VF_R_DROP_MARTIAN_MULTICAST;
	return VF_CONTINUE;
}

static __always_inline int vf_martian6(const __u32 *src, const __u32 *dst)
{
	if (vf_addr6_equal(src, dst))
		return VF_R_DROP_MARTIAN_VIP;
	if ((bpf_ntohl(src[0]) >> 24) == VF_IPV6_MULTICAST_BYTE)
		return VF_R_DROP_MARTIAN_MULTICAST;
	if ((src[0] | src[1] | src[2]) != 0)
		return VF_CONTINUE;
	if (src[3] == 0)
		return VF_R_DROP_MARTIAN_UNSPECIFIED;
	if (src[3] == bpf_htonl(1))
		return VF_R_DROP_MARTIAN_LOOPBACK;
	return VF_CONTINUE;
}

static __always_inline int vf_martian(const struct vf_pkt *pkt)
{
	if (pkt->flow.family == VF_AF_INET)
		return vf_martian4(pkt->flow.src[0], pkt->flow.dst[0]);
	return vf_martian6(pkt->flow.src, pkt->flow.dst);
}

static __always_inline __u32 vf_vip_filter_slot(const __u32 *addr, __u8 family)
{
	__u32 word = addr[0];

	if (family == VF_AF_INET6)
		word ^= addr[1] ^ addr[2] ^ addr[3];
	return (word * VF_VIP_FILTER_MULT) >> (32 - VF_VIP_FILTER_BITS);
}

/* Whether some VIP's address hashes to the packet's slot of vf_vip_filter:
 * if not, the packet is no VIP's. */
static __always_inline int vf_maybe_vip(const struct vf_pkt *pkt)
{
	__u32 slot = vf_vip_filter_slot(pkt->flow.dst, pkt->flow.family);
	__u32 *vips_here = bpf_map_lookup_elem(&vf_vip_filter, &slot);

	return vips_here && *vips_here;
}

/* The exact {addr, port, proto} first, then the all-ports entry, which is
 * only looked for while some VIP has one. */
static __always_inline struct vf_vip_meta *vf_lookup_vip(const struct vf_settings *cfg,
							 const struct vf_pkt *pkt)
{
	struct vf_vip_key key = {};
	struct vf_vip_meta *vip;

	__builtin_memcpy(key.addr, pkt->flow.dst, sizeof(key.addr));
	key.port = pkt->flow.dport;
	key.proto = pkt->flow.proto;
	key.family = pkt->flow.family;
	vip = bpf_map_lookup_elem(&vf_vips, &key);
	if (vip || !cfg->wildcard_active)
		return vip;
	key.port = 0;
	return bpf_map_lookup_elem(&vf_vips, &key);
}

/* The VIP of an established flow, from the id its conntrack entry holds:
 * the VIP of that id if the packet is addressed to exactly it. An all-ports
 * VIP is left to vf_lookup_vip, because an exact VIP added for the port
 * since takes precedence; so is anything the slot does not confirm (a VIP
 * removed, or its id given to another). What vf_lookup_vip would find for
 * the packet is then the same VIP. */
static __always_inline struct vf_vip_meta *vf_vip_of_flow(const struct vf_ct_entry *ct,
							  const struct vf_pkt *pkt)
{
	__u32 vip_id = ct->vip_id;
	struct vf_vip_slot *slot = bpf_map_lookup_elem(&vf_vips_by_id, &vip_id);

	if (!slot || slot->key.family != pkt->flow.family || slot->key.port != pkt->flow.dport ||
	    slot->key.proto != pkt->flow.proto || slot->meta.vip_id != vip_id)
		return NULL;
	if (pkt->flow.family == VF_AF_INET) {
		if (slot->key.addr[0] != pkt->flow.dst[0])
			return NULL;
	} else if (!vf_addr6_equal(slot->key.addr, pkt->flow.dst)) {
		return NULL;
	}
	return &slot->meta;
}

static __always_inline int vf_real_selectable(const struct vf_real *real)
{
	return real && real->family != 0 && real->state != VF_REAL_DOWN;
}

static __always_inline __u64 vf_idle_timeout(const struct vf_settings *cfg,
					     const struct vf_pkt *pkt)
{
	return pkt->flow.proto == VF_IPPROTO_UDP ? cfg->udp_timeout : cfg->tcp_timeout;
}

/* The flow hash. vf_handle computes it once for an IPv4 VIP candidate,
 * whose conntrack set, Maglev slot and GUE source port all derive from it;
 * an IPv6 packet hashes where it needs to (an established one, found in
 * its LRU conntrack, does not). */
static __always_inline __u32 vf_pkt_flow_hash(const struct vf_pkt *pkt)
{
	if (pkt->flow.family == VF_AF_INET)
		return pkt->flow_hash;
	return vf_hash_flow(&pkt->flow);
}

/* Maglev: the ring slot is picked by a multiply-shift instead of a modulo,
 * which maps the 32-bit hash uniformly onto [0, ring_size) without a divide. */
static __always_inline __u32 vf_maglev_pick(const struct vf_settings *cfg,
					    const struct vf_vip_meta *vip, const struct vf_pkt *pkt)
{
	__u32 vip_id = vip->vip_id;
	__u32 hash, slot;
	__u32 *real_id;
	void *ring;

	ring = bpf_map_lookup_elem(&vf_rings, &vip_id);
	if (!ring)
		return 0;
	if (vip->flags & VF_VIP_F_SRC_AFFINITY)
		hash = vf_hash_source(&pkt->flow);
	else
		hash = vf_pkt_flow_hash(pkt);
	slot = ((__u64)hash * cfg->ring_size) >> 32;
	real_id = bpf_map_lookup_elem(ring, &slot);
	return real_id ? *real_id : 0;
}

static __always_inline void vf_build_flow4_key(const struct vf_pkt *pkt, struct vf_flow4_key *key)
{
	key->src = pkt->flow.src[0];
	key->dst = pkt->flow.dst[0];
	key->sport = pkt->flow.sport;
	key->dport = pkt->flow.dport;
	key->proto = pkt->flow.proto;
}

/* A conntrack hit: the entry as read (for an IPv4 slot, as its check
 * confirmed it), and where to refresh its last_seen: the IPv6 LRU entry's,
 * or NULL for an IPv4 slot, which vf_ct4_touch finds again. Keeping no
 * pointer into the set lets the verifier merge the paths of the 8 ways
 * (6.1's runs out of its instruction budget otherwise). */
struct vf_ct_hit {
	struct vf_ct_entry entry;
	__u64 *last_seen;
};

/* The second word of an IPv4 key holds the ports and the protocol in its
 * low 40 bits (little endian); in a slot, the 24 bits above them, the key's
 * padding, hold the slot's check. */
#define VF_CT4_FLOW_MASK   0xffffffffffULL
#define VF_CT4_CHECK_SHIFT 40

/* The check binds a slot's entry to its flow. The table takes no lock, so a
 * CPU may read a slot while another one rewrites it for another flow; a
 * read that mixes the two fails its check and counts as a miss (the flow
 * is balanced again, to the same real unless the ring changed), instead of
 * sending the packet to the other flow's real. */
static __always_inline __u64 vf_ct4_check(__u32 hash, __u32 real_id, __u32 vip_id)
{
	__u32 c = hash ^ (real_id * 0x85ebca6bu) ^ (vip_id * 0xc2b2ae35u);

	return (__u64)(c & 0xffffff) << VF_CT4_CHECK_SHIFT;
}

/* The set of an IPv4 flow: the flow hash, multiplied by an odd constant so
 * that the set does not follow the Maglev slot (both take the high bits),
 * mapped onto [0, vf_ct4_sets) by a multiply-shift. */
static __always_inline struct vf_ct4_set *vf_ct4_set_of(const struct vf_pkt *pkt)
{
	__u32 idx = ((__u64)(pkt->flow_hash * 0x9e3779b1u) * vf_ct4_sets) >> 32;

	return bpf_map_lookup_elem(&vf_ct4, &idx);
}

/* Whether a slot holds the flow of key (the check aside). */
static __always_inline int vf_ct4_slot_holds(const struct vf_ct4_slot *slot, const __u64 *key)
{
	const __u64 *words = (const __u64 *)&slot->key;

	return words[0] == key[0] && (words[1] & VF_CT4_FLOW_MASK) == key[1];
}

static __always_inline int vf_ct4_lookup(const struct vf_pkt *pkt, const struct vf_flow4_key *key4,
					 struct vf_ct_hit *hit)
{
	const __u64 *key = (const __u64 *)key4;
	struct vf_ct4_set *set = vf_ct4_set_of(pkt);
	int i;

	if (!set)
		return 0;
#pragma unroll
	for (i = 0; i < VF_CT_WAYS; i++) {
		struct vf_ct4_slot *slot = &set->way[i];
		__u32 real_id, vip_id;
		__u64 check;

		if (!vf_ct4_slot_holds(slot, key))
			continue;
		check = ((const __u64 *)&slot->key)[1] & ~VF_CT4_FLOW_MASK;
		real_id = slot->entry.real_id;
		vip_id = slot->entry.vip_id;
		if (check != vf_ct4_check(pkt->flow_hash, real_id, vip_id))
			return 0;
		hit->entry.real_id = real_id;
		hit->entry.vip_id = vip_id;
		hit->entry.last_seen = slot->entry.last_seen;
		hit->last_seen = NULL;
		return 1;
	}
	return 0;
}

/* Refreshes an IPv4 flow's last_seen, if its slot still holds it. Once per
 * VF_CT_TOUCH_JIFFIES per flow, so finding the slot again costs little. */
static __always_inline void vf_ct4_touch(const struct vf_pkt *pkt, const struct vf_flow4_key *key4,
					 __u64 now)
{
	const __u64 *key = (const __u64 *)key4;
	struct vf_ct4_set *set = vf_ct4_set_of(pkt);
	int i;

	if (!set)
		return;
#pragma unroll
	for (i = 0; i < VF_CT_WAYS; i++) {
		struct vf_ct4_slot *slot = &set->way[i];

		if (vf_ct4_slot_holds(slot, key)) {
			slot->entry.last_seen = now;
			return;
		}
	}
}

/* A new IPv4 flow takes its own slot if the set still has it, else the
 * slot seen least recently (an empty one has last_seen 0). */
static __always_inline void vf_ct4_store(const struct vf_pkt *pkt, const struct vf_flow4_key *key4,
					 const struct vf_ct_entry *entry)
{
	const __u64 *key = (const __u64 *)key4;
	struct vf_ct4_set *set = vf_ct4_set_of(pkt);
	struct vf_ct4_slot *victim;
	__u64 oldest, *words;
	int i;

	if (!set)
		return;
	victim = &set->way[0];
	oldest = victim->entry.last_seen;
#pragma unroll
	for (i = 0; i < VF_CT_WAYS; i++) {
		struct vf_ct4_slot *slot = &set->way[i];

		if (vf_ct4_slot_holds(slot, key)) {
			victim = slot;
			break;
		}
		if (slot->entry.last_seen < oldest) {
			victim = slot;
			oldest = slot->entry.last_seen;
		}
	}
	words = (__u64 *)&victim->key;
	words[0] = key[0];
	words[1] = key[1] | vf_ct4_check(pkt->flow_hash, entry->real_id, entry->vip_id);
	victim->entry = *entry;
}

static __always_inline int vf_ct_lookup(const struct vf_pkt *pkt, const struct vf_flow4_key *key4,
					struct vf_ct_hit *hit)
{
	struct vf_ct_entry *ct;

	if (pkt->flow.family == VF_AF_INET)
		return vf_ct4_lookup(pkt, key4, hit);
	ct = bpf_map_lookup_elem(&vf_ct6, &pkt->flow);
	if (!ct)
		return 0;
	hit->entry = *ct;
	hit->last_seen = &ct->last_seen;
	return 1;
}

static __always_inline void vf_ct_store(const struct vf_pkt *pkt, const struct vf_flow4_key *key4,
					const struct vf_ct_entry *entry)
{
	if (pkt->flow.family == VF_AF_INET) {
		vf_ct4_store(pkt, key4, entry);
		return;
	}
	bpf_map_update_elem(&vf_ct6, &pkt->flow, entry, BPF_ANY);
}

/*
 * The per-source new-flow limit: a token bucket per source and CPU, charged
 * for every conntrack entry the packet is about to create. Credit is kept in
 * nanoseconds and grows with the clock up to the bucket's depth; a new flow
 * costs new_flow_interval_ns of it. So the data path adds and compares, and
 * the agent did the one division. A source seen for the first time (or
 * evicted since) starts with a full bucket.
 */
static __always_inline int vf_charge_new_flow(const struct vf_settings *cfg,
					      const struct vf_pkt *pkt)
{
	__u64 interval = cfg->new_flow_interval_ns, depth = cfg->new_flow_burst_ns;
	struct vf_flow_limit_key key = {};
	struct vf_flow_limit_bucket *bucket;
	__u64 now, elapsed, credit;

	if (!interval)
		return VF_CONTINUE;
	key.prefix[0] = pkt->flow.src[0];
	if (pkt->flow.family == VF_AF_INET6)
		key.prefix[1] = pkt->flow.src[1];
	key.family = pkt->flow.family;
	key.cpu = bpf_get_smp_processor_id();
	now = bpf_ktime_get_ns();

	bucket = bpf_map_lookup_elem(&vf_flow_limit, &key);
	if (!bucket) {
		struct vf_flow_limit_bucket fresh = {
			.credit_ns = depth > interval ? depth - interval : 0,
			.last_ns = now,
		};

		bpf_map_update_elem(&vf_flow_limit, &key, &fresh, BPF_ANY);
		return VF_CONTINUE;
	}
	elapsed = now - bucket->last_ns;
	credit = bucket->credit_ns;
	/* Compared before adding, so a long-idle source cannot overflow. */
	credit = elapsed >= depth - credit ? depth : credit + elapsed;
	bucket->last_ns = now;
	if (credit < interval) {
		bucket->credit_ns = credit;
		return VF_R_DROP_NEW_FLOW_RATE_LIMITED;
	}
	bucket->credit_ns = credit - interval;
	return VF_CONTINUE;
}

/* An ICMP error that only nat takes (vf_icmp4_error_kind), about a flow of
 * another mode: the stack's, as the parser left it before nat took such
 * errors, so it is not counted for the VIP either. Decided here, inside
 * the branches that conntrack and Maglev take on ICMP errors anyway, so
 * that no other packet pays for the test. */
static __always_inline int vf_icmp_not_for_vip(struct vf_pkt *pkt)
{
	pkt->vip_matched = 0;
	return VF_R_PASS_NOT_VIP;
}

/*
 * ct is the packet's conntrack entry, looked up by vf_handle (NULL for a
 * miss, and for a SYN, which is not looked up).
 *
 * Conntrack first: a live entry keeps its real, even a draining one. A miss,
 * an idle entry or a real that went down falls through to Maglev, and the
 * choice is remembered. ICMP errors only read conntrack: they must not create
 * flows that no client opened.
 *
 * A TCP SYN opens a connection, so it skips the lookup (as Katran does): the
 * lookup would miss on a full table anyway, and on a hit (a retransmitted SYN,
 * or a client reusing its port) balancing again is right, since no real holds
 * an established connection for the tuple yet. This saves a hash lookup, a
 * cache miss on a large table, on every new connection.
 *
 * Whatever will create an entry is charged to its source first (not ICMP
 * errors, which create none), so one source cannot fill the table and evict
 * the idle flows of everyone else.
 */
static __always_inline int vf_select_real(const struct vf_settings *cfg,
					  const struct vf_vip_meta *vip, struct vf_pkt *pkt,
					  const struct vf_ct_hit *ct,
					  const struct vf_flow4_key *key4,
					  const struct vf_real **out)
{
	struct vf_ct_entry entry = {};
	const struct vf_real *real;
	__u64 now = bpf_jiffies64();
	__u32 real_id;

	if (ct) {
		real_id = ct->entry.real_id;
		real = bpf_map_lookup_elem(&vf_reals, &real_id);
		if (vf_real_selectable(real) &&
		    now - ct->entry.last_seen <= vf_idle_timeout(cfg, pkt)) {
			if (pkt->icmp_error) {
				if (pkt->icmp_error == VF_ICMP_ERR_NAT_ONLY)
					return vf_icmp_not_for_vip(pkt);
			} else if (now - ct->entry.last_seen > VF_CT_TOUCH_JIFFIES) {
				if (ct->last_seen)
					*ct->last_seen = now;
				else
					vf_ct4_touch(pkt, key4, now);
			}
			pkt->real_id = real_id;
			*out = real;
			return VF_CONTINUE;
		}
	}

	if (!pkt->icmp_error) {
		int ret = vf_charge_new_flow(cfg, pkt);

		if (ret != VF_CONTINUE)
			return ret;
	} else if (pkt->icmp_error == VF_ICMP_ERR_NAT_ONLY) {
		return vf_icmp_not_for_vip(pkt);
	}
	real_id = vf_maglev_pick(cfg, vip, pkt);
	if (!real_id)
		return VF_R_DROP_NO_REAL;
	real = bpf_map_lookup_elem(&vf_reals, &real_id);
	if (!vf_real_selectable(real))
		return VF_R_DROP_NO_REAL;

	if (!pkt->icmp_error) {
		entry.last_seen = now;
		entry.real_id = real_id;
		entry.vip_id = vip->vip_id;
		vf_ct_store(pkt, key4, &entry);
		pkt->new_flow = 1;
	}
	pkt->real_id = real_id;
	*out = real;
	return VF_CONTINUE;
}

/* dsr: the real holds the VIP on loopback, so only the MACs change. We send
 * from our own MAC, never from the frame's destination. */
static __always_inline int vf_forward_dsr(struct xdp_md *ctx, const struct vf_iface *iface,
					  const struct vf_real *real)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)(long)ctx->data;

	if ((void *)(eth + 1) > data_end)
		return VF_R_DROP_MALFORMED_L2;
	if (vf_mac_is_zero(real->mac))
		return VF_R_DROP_NO_ROUTE;
	__builtin_memcpy(eth->h_source, iface->mac, VF_ETH_ALEN);
	__builtin_memcpy(eth->h_dest, real->mac, VF_ETH_ALEN);
	return VF_R_TX_DSR;
}

/* GUE's UDP source port: the flow's hash folded into the dynamic range
 * (49152-65535), so the backends' NIC RSS and any ECMP on the way spread
 * the flows, every packet of a flow (and the ICMP errors about it, whose
 * flow is the quoted one) keeps one port, and no well-known port is used. */
static __always_inline __be16 vf_gue_sport(const struct vf_pkt *pkt)
{
	return bpf_htons(VF_GUE_SPORT_BASE | (vf_pkt_flow_hash(pkt) & VF_GUE_SPORT_MASK));
}

/* The MACs for the encapsulated frame: the kernel's FIB and neighbour table
 * when enabled and the next hop is out of the interface we transmit on,
 * otherwise the configured gateway. gue is a compile-time constant: the
 * lookup describes the outer packet as ipip or gue builds it. */
static __always_inline int vf_ipip_nexthop(struct xdp_md *ctx, const struct vf_settings *cfg,
					   const struct vf_iface *iface, const struct vf_pkt *pkt,
					   const struct vf_real *real, const int gue,
					   __be16 gue_sport, __u8 *smac, __u8 *dmac)
{
	if (cfg->use_fib) {
		struct bpf_fib_lookup fib = {};
		__u32 ifindex = ctx->ingress_ifindex;
		__u32 udp_len = gue ? VF_GUE_UDP_HDR_LEN : 0;

		fib.family = pkt->flow.family;
		fib.ifindex = ifindex;
		if (pkt->flow.family == VF_AF_INET) {
			fib.l4_protocol = gue ? VF_IPPROTO_UDP : VF_IPPROTO_IPIP;
			fib.tot_len = pkt->l3_len + VF_IPV4_HDR_LEN + udp_len;
			fib.ipv4_src = cfg->encap_src4;
			fib.ipv4_dst = real->addr[0];
		} else {
			fib.l4_protocol = gue ? VF_IPPROTO_UDP : VF_IPPROTO_IPV6;
			fib.tot_len = pkt->l3_len + VF_IPV6_HDR_LEN + udp_len;
			__builtin_memcpy(fib.ipv6_src, cfg->encap_src6, sizeof(fib.ipv6_src));
			__builtin_memcpy(fib.ipv6_dst, real->addr, sizeof(fib.ipv6_dst));
		}
		if (gue) {
			fib.sport = gue_sport;
			fib.dport = cfg->gue_port;
		}
		if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_SUCCESS &&
		    fib.ifindex == ifindex) {
			__builtin_memcpy(smac, fib.smac, VF_ETH_ALEN);
			__builtin_memcpy(dmac, fib.dmac, VF_ETH_ALEN);
			return 0;
		}
	}
	if (vf_mac_is_zero(cfg->gw_mac))
		return -1;
	__builtin_memcpy(smac, iface->mac, VF_ETH_ALEN);
	__builtin_memcpy(dmac, cfg->gw_mac, VF_ETH_ALEN);
	return 0;
}

/*
 * Grow the frame at the front by outer_len bytes and rebuild the L2 header
 * (with its VLAN tag, if any) in front of the new outer IP header. Returns
 * the outer IP header, or NULL when the kernel refused the headroom.
 */
static __always_inline void *vf_push_outer(struct xdp_md *ctx, const struct vf_pkt *pkt,
					   __u32 outer_len, __be16 eth_proto, const __u8 *smac,
					   const __u8 *dmac)
{
	struct vf_vlan_hdr *vlan;
	struct ethhdr *eth;
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, -(int)outer_len))
		return NULL;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return NULL;
	if (pkt->vlan) {
		/* The old tag now sits outer_len bytes further on; it does not
		 * overlap the new one because outer_len >= 20. */
		struct vf_vlan_hdr *old = data + outer_len + sizeof(struct ethhdr);

		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end || (void *)(old + 1) > data_end)
			return NULL;
		vlan->tci = old->tci;
		vlan->encap_proto = eth_proto;
		eth->h_proto = bpf_htons(VF_ETH_P_8021Q);
		__builtin_memcpy(eth->h_dest, dmac, VF_ETH_ALEN);
		__builtin_memcpy(eth->h_source, smac, VF_ETH_ALEN);
		return vlan + 1;
	}
	eth->h_proto = eth_proto;
	__builtin_memcpy(eth->h_dest, dmac, VF_ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, VF_ETH_ALEN);
	return eth + 1;
}

/* gue: the outer UDP header after an outer IP header that ends at next.
 * The checksum is zero in both families: RFC 768 allows it over IPv4, and
 * RFC 6935/6936 allow it over IPv6 for tunnel protocols whose inner packet
 * carries its own transport checksum, as every packet we forward does. A
 * real checksum would cost a sum over the whole inner packet per packet,
 * and the decapsulator, an XDP program, does not check it. */
static __always_inline int vf_gue_fill_udp(struct xdp_md *ctx, const struct vf_settings *cfg,
					   const struct vf_pkt *pkt, __be16 sport, void *next)
{
	struct udphdr *udph = next;

	if ((void *)(udph + 1) > (void *)(long)ctx->data_end)
		return -1;
	udph->source = sport;
	udph->dest = cfg->gue_port;
	udph->len = bpf_htons(pkt->l3_len + VF_GUE_UDP_HDR_LEN);
	udph->check = 0;
	return 0;
}

/* IPv4-in-IPv4 (ipip) or IPv4 in UDP in IPv4 (gue, a compile-time constant). */
static __always_inline int vf_encap_ipv4(struct xdp_md *ctx, const struct vf_settings *cfg,
					 const struct vf_pkt *pkt, const struct vf_real *real,
					 const int gue, __be16 gue_sport, const __u8 *smac,
					 const __u8 *dmac)
{
	__u32 hdr_len = VF_IPV4_HDR_LEN + (gue ? VF_GUE_UDP_HDR_LEN : 0);
	__u32 outer_len = pkt->l3_len + hdr_len;
	struct iphdr *iph;

	if (!cfg->encap_src4 || outer_len > 0xffff)
		return VF_R_DROP_ENCAP;
	iph = vf_push_outer(ctx, pkt, hdr_len, bpf_htons(VF_ETH_P_IP), smac, dmac);
	if (!iph || (void *)(iph + 1) > (void *)(long)ctx->data_end)
		return VF_R_DROP_ENCAP;

	iph->version = 4;
	iph->ihl = sizeof(*iph) / 4;
	iph->tos = pkt->tos;
	iph->tot_len = bpf_htons(outer_len);
	iph->id = 0;
	/* RFC 2003: the outer header inherits DF, so PMTU discovery still works. */
	iph->frag_off = pkt->df ? bpf_htons(VF_IP_DF) : 0;
	iph->ttl = VF_DEFAULT_TTL;
	iph->protocol = gue ? VF_IPPROTO_UDP : VF_IPPROTO_IPIP;
	iph->check = 0;
	iph->saddr = cfg->encap_src4;
	iph->daddr = real->addr[0];
	iph->check = vf_ipv4_hdr_csum(iph);
	if (!gue)
		return VF_R_TX_IPIP;
	if (vf_gue_fill_udp(ctx, cfg, pkt, gue_sport, iph + 1))
		return VF_R_DROP_ENCAP;
	return VF_R_TX_GUE;
}

/* IPv6-in-IPv6 (ipip) or IPv6 in UDP in IPv6 (gue, a compile-time constant). */
static __always_inline int vf_encap_ipv6(struct xdp_md *ctx, const struct vf_settings *cfg,
					 const struct vf_pkt *pkt, const struct vf_real *real,
					 const int gue, __be16 gue_sport, const __u8 *smac,
					 const __u8 *dmac)
{
	__u32 udp_len = gue ? VF_GUE_UDP_HDR_LEN : 0;
	__u32 payload_len = pkt->l3_len + udp_len;
	struct ipv6hdr *ip6;

	if ((cfg->encap_src6[0] | cfg->encap_src6[1] | cfg->encap_src6[2] | cfg->encap_src6[3]) ==
		    0 ||
	    payload_len > 0xffff)
		return VF_R_DROP_ENCAP;
	ip6 = vf_push_outer(ctx, pkt, VF_IPV6_HDR_LEN + udp_len, bpf_htons(VF_ETH_P_IPV6), smac,
			    dmac);
	if (!ip6 || (void *)(ip6 + 1) > (void *)(long)ctx->data_end)
		return VF_R_DROP_ENCAP;

	ip6->version = 6;
	ip6->priority = pkt->tos >> 4;
	ip6->flow_lbl[0] = (pkt->tos & 0x0f) << 4;
	ip6->flow_lbl[1] = 0;
	ip6->flow_lbl[2] = 0;
	ip6->payload_len = bpf_htons(payload_len);
	ip6->nexthdr = gue ? VF_IPPROTO_UDP : VF_IPPROTO_IPV6;
	ip6->hop_limit = VF_DEFAULT_TTL;
	__builtin_memcpy(&ip6->saddr, cfg->encap_src6, sizeof(ip6->saddr));
	__builtin_memcpy(&ip6->daddr, real->addr, sizeof(ip6->daddr));
	if (!gue)
		return VF_R_TX_IPIP;
	if (vf_gue_fill_udp(ctx, cfg, pkt, gue_sport, ip6 + 1))
		return VF_R_DROP_ENCAP;
	return VF_R_TX_GUE;
}

/*
 * Packet too big. A packet that would leave longer than the interface's MTU
 * once encapsulated is answered, from the VIP, with ICMP "fragmentation
 * needed" (IPv4 with DF) or ICMPv6 "packet too big" carrying the MTU minus
 * the encapsulation overhead, sent back out of the interface it came in by.
 * The answer quotes the first VF_PTB_QUOTE_LEN bytes of the packet: more
 * than RFC 792's header plus 8 bytes, within RFC 1812's 576 and RFC 4443's
 * 1280, enough for the client to find its socket (IP header, options or
 * extension headers, and the TCP header), and constant so that the checksum
 * is one bpf_csum_diff of a fixed size.
 */
#define VF_PTB_QUOTE_LEN 128
#define VF_ICMP_HDR_LEN  8
#define VF_ICMP_ERR_TTL  64

/* The frame is cut to L2 + the quote, then grown at the front by the new
 * IP and ICMP headers, with the L2 header (and VLAN tag) rebuilt in front
 * of them, addressed back to the client. Returns the new IP header. */
static __always_inline void *vf_ptb_reframe(struct xdp_md *ctx, const struct vf_pkt *pkt,
					    const struct vf_iface *iface, __u32 l3_off,
					    __u32 new_hdr_len, __be16 eth_proto)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 client_mac[VF_ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return NULL;
	__builtin_memcpy(client_mac, eth->h_source, VF_ETH_ALEN);
	/* The frame is as it came (pkt->frame_len): nothing moved its ends yet. */
	if (bpf_xdp_adjust_tail(ctx, (int)(l3_off + VF_PTB_QUOTE_LEN) - (int)pkt->frame_len))
		return NULL;
	return vf_push_outer(ctx, pkt, new_hdr_len, eth_proto, iface->mac, client_mac);
}

static __always_inline int vf_ptb_ipv4(struct xdp_md *ctx, const struct vf_pkt *pkt,
				       const struct vf_iface *iface, __u32 l3_off, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	struct iphdr *iph = data + l3_off;
	struct icmphdr *icmp;
	__be32 client, vip;
	__u32 csum;

	if ((void *)(iph + 1) > (void *)(long)ctx->data_end)
		return VF_R_DROP_MALFORMED_L3;
	client = iph->saddr;
	vip = iph->daddr;
	iph = vf_ptb_reframe(ctx, pkt, iface, l3_off, VF_IPV4_HDR_LEN + VF_ICMP_HDR_LEN,
			     bpf_htons(VF_ETH_P_IP));
	if (!iph)
		return VF_R_DROP_ENCAP;
	icmp = (void *)(iph + 1);
	if ((void *)(icmp + 1) + VF_PTB_QUOTE_LEN > (void *)(long)ctx->data_end)
		return VF_R_DROP_ENCAP;

	iph->version = 4;
	iph->ihl = sizeof(*iph) / 4;
	iph->tos = 0;
	iph->tot_len = bpf_htons(VF_IPV4_HDR_LEN + VF_ICMP_HDR_LEN + VF_PTB_QUOTE_LEN);
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = VF_ICMP_ERR_TTL;
	iph->protocol = VF_IPPROTO_ICMP;
	iph->check = 0;
	iph->saddr = vip;
	iph->daddr = client;
	iph->check = vf_ipv4_hdr_csum(iph);

	icmp->type = VF_ICMP_DEST_UNREACH;
	icmp->code = VF_ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->un.frag.__unused = 0;
	icmp->un.frag.mtu = bpf_htons(mtu);
	csum = bpf_csum_diff(NULL, 0, (void *)icmp, VF_ICMP_HDR_LEN + VF_PTB_QUOTE_LEN, 0);
	icmp->checksum = vf_csum_fold(csum);
	return VF_R_TX_ICMP_TOO_BIG;
}

static __always_inline int vf_ptb_ipv6(struct xdp_md *ctx, const struct vf_pkt *pkt,
				       const struct vf_iface *iface, __u32 l3_off, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	struct ipv6hdr *ip6 = data + l3_off;
	struct icmp6hdr *icmp;
	struct in6_addr client, vip;
	__be32 pseudo[2];
	__u32 csum;

	if ((void *)(ip6 + 1) > (void *)(long)ctx->data_end)
		return VF_R_DROP_MALFORMED_L3;
	__builtin_memcpy(&client, &ip6->saddr, sizeof(client));
	__builtin_memcpy(&vip, &ip6->daddr, sizeof(vip));
	ip6 = vf_ptb_reframe(ctx, pkt, iface, l3_off, VF_IPV6_HDR_LEN + VF_ICMP_HDR_LEN,
			     bpf_htons(VF_ETH_P_IPV6));
	if (!ip6)
		return VF_R_DROP_ENCAP;
	icmp = (void *)(ip6 + 1);
	if ((void *)(icmp + 1) + VF_PTB_QUOTE_LEN > (void *)(long)ctx->data_end)
		return VF_R_DROP_ENCAP;

	ip6->version = 6;
	ip6->priority = 0;
	ip6->flow_lbl[0] = 0;
	ip6->flow_lbl[1] = 0;
	ip6->flow_lbl[2] = 0;
	ip6->payload_len = bpf_htons(VF_ICMP_HDR_LEN + VF_PTB_QUOTE_LEN);
	ip6->nexthdr = VF_IPPROTO_ICMPV6;
	ip6->hop_limit = VF_ICMP_ERR_TTL;
	__builtin_memcpy(&ip6->saddr, &vip, sizeof(vip));
	__builtin_memcpy(&ip6->daddr, &client, sizeof(client));

	icmp->icmp6_type = VF_ICMPV6_PKT_TOOBIG;
	icmp->icmp6_code = 0;
	icmp->icmp6_cksum = 0;
	icmp->icmp6_dataun.un_data32[0] = bpf_htonl(mtu);
	/* RFC 4443 2.3: the checksum covers the pseudo-header too. */
	pseudo[0] = bpf_htonl(VF_ICMP_HDR_LEN + VF_PTB_QUOTE_LEN);
	pseudo[1] = bpf_htonl(VF_IPPROTO_ICMPV6);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&ip6->saddr, 2 * sizeof(struct in6_addr), 0);
	csum = bpf_csum_diff(NULL, 0, pseudo, sizeof(pseudo), csum);
	csum = bpf_csum_diff(NULL, 0, (void *)icmp, VF_ICMP_HDR_LEN + VF_PTB_QUOTE_LEN, csum);
	icmp->icmp6_cksum = vf_csum_fold(csum);
	return VF_R_TX_ICMP_TOO_BIG;
}

/* Called only for a packet that does not fit the interface's MTU once
 * encapsulated with hdr_len bytes (the hot path's one compare). Returns
 * VF_CONTINUE to forward it anyway: the answer is off, the MTU unknown,
 * the packet is itself an ICMP error (never answered, RFC 1122 3.2.2), or
 * IPv4 without DF, which the client allows us to fragment: XDP cannot, and
 * the stack would not encapsulate it, so it is forwarded as before, with
 * the outer header's DF clear, for a path to the real that carries it. */
static __always_inline int vf_too_big(struct xdp_md *ctx, const struct vf_settings *cfg,
				      const struct vf_iface *iface, const struct vf_pkt *pkt,
				      __u32 hdr_len)
{
	__u32 l3_off = pkt->l3_off;
	__u32 mtu = iface->mtu;

	if (!cfg->icmp_too_big || pkt->icmp_error || mtu <= hdr_len ||
	    pkt->l3_len < VF_PTB_QUOTE_LEN)
		return VF_CONTINUE;
	if (l3_off > sizeof(struct ethhdr) + sizeof(struct vf_vlan_hdr))
		return VF_R_DROP_MALFORMED_L2;
	/* Bytes after the IP packet (padding, which a frame this long never
	 * needs, or the fragments of a multi-buffer frame, which only
	 * BPF_PROG_TEST_RUN hands this program) would make the cut below,
	 * measured on the linear part, wrong: such a frame goes on as before. */
	if (pkt->frame_len != l3_off + pkt->l3_len)
		return VF_CONTINUE;
	if (pkt->flow.family == VF_AF_INET) {
		if (!pkt->df)
			return VF_CONTINUE;
		return vf_ptb_ipv4(ctx, pkt, iface, l3_off, mtu - hdr_len);
	}
	return vf_ptb_ipv6(ctx, pkt, iface, l3_off, mtu - hdr_len);
}

/* ipip: IPv4-in-IPv4 or IPv6-in-IPv6 toward the real; gue (a compile-time
 * constant): the same with a UDP header between the two IP headers. */
static __always_inline int vf_forward_ipip(struct xdp_md *ctx, const struct vf_settings *cfg,
					   const struct vf_iface *iface, const struct vf_pkt *pkt,
					   const struct vf_real *real, const int gue)
{
	__u8 smac[VF_ETH_ALEN], dmac[VF_ETH_ALEN];
	__u32 hdr_len = pkt->flow.family == VF_AF_INET ? VF_IPV4_HDR_LEN : VF_IPV6_HDR_LEN;
	__be16 sport = 0;

	if (real->family != pkt->flow.family)
		return VF_R_DROP_ENCAP;
	if (gue)
		hdr_len += VF_GUE_UDP_HDR_LEN;
	/* The one compare the packet-too-big answer costs a packet that fits. */
	if (pkt->l3_len + hdr_len > iface->mtu) {
		int ret = vf_too_big(ctx, cfg, iface, pkt, hdr_len);

		if (ret != VF_CONTINUE)
			return ret;
	}
	if (gue) {
		if (!cfg->gue_port)
			return VF_R_DROP_ENCAP;
		sport = vf_gue_sport(pkt);
	}
	if (vf_ipip_nexthop(ctx, cfg, iface, pkt, real, gue, sport, smac, dmac))
		return VF_R_DROP_NO_ROUTE;
	if (pkt->flow.family == VF_AF_INET)
		return vf_encap_ipv4(ctx, cfg, pkt, real, gue, sport, smac, dmac);
	return vf_encap_ipv6(ctx, cfg, pkt, real, gue, sport, smac, dmac);
}

/* --- mode nat: the NAT tables and both directions, using the helpers above --- */
#include "vf_nat.h"

static __always_inline int vf_handle(struct xdp_md *ctx, const struct vf_settings *cfg,
				     struct vf_pkt *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	const struct vf_iface *iface = NULL;
	const struct vf_real *real = NULL;
	struct vf_flow4_key key4 = {};
	struct vf_vip_meta *vip = NULL;
	struct vf_ct_hit ct_hit, *ct = NULL;
	__be16 l3_proto = 0;
	int ret, martian;

	pkt->frame_len = data_end - data;
	ret = vf_parse_l2(data, data_end, pkt, &l3_proto);
	if (ret != VF_CONTINUE)
		return ret;
	if (l3_proto == bpf_htons(VF_ETH_P_IP))
		ret = vf_parse_ipv4(data, data_end, pkt);
	else if (l3_proto == bpf_htons(VF_ETH_P_IPV6))
		ret = vf_parse_ipv6(data, data_end, pkt);
	else
		return VF_R_PASS_NOT_IP;
	if (ret != VF_CONTINUE)
		return ret;
	martian = vf_martian(pkt); /* before an ICMP error's quoted flow replaces the source */

	ret = vf_check_denylist(cfg, pkt);
	if (ret != VF_CONTINUE)
		return ret;
	if (pkt->fragment)
		return VF_R_PASS_FRAGMENT;
	if (pkt->ext_limit)
		return VF_R_PASS_IPV6_EXT_LIMIT;

	ret = vf_parse_l4(data, data_end, pkt);
	if (ret != VF_CONTINUE)
		return ret;

	if (!vf_maybe_vip(pkt))
		goto not_vip;
	/* Conntrack before the VIP: the entry of an established flow names
	 * its VIP, which an array slot then confirms, so such a packet makes
	 * one hashed lookup instead of two. */
	if (pkt->flow.family == VF_AF_INET) {
		vf_build_flow4_key(pkt, &key4);
		pkt->flow_hash = vf_hash_flow(&pkt->flow);
	}
	if (!pkt->tcp_syn) {
		if (vf_ct_lookup(pkt, &key4, &ct_hit)) {
			ct = &ct_hit;
			vip = vf_vip_of_flow(&ct->entry, pkt);
		}
	}
	if (!vip)
		vip = vf_lookup_vip(cfg, pkt);
	if (!vip)
		goto not_vip;
	/* Not counted for the VIP: the packet is another host's. */
	ret = vf_check_our_mac(ctx, &iface);
	if (ret != VF_CONTINUE)
		return ret;
	pkt->vip_id = vip->vip_id;
	pkt->vip_matched = 1;
	if (martian != VF_CONTINUE)
		return martian;

	if (vip->mode == VF_MODE_NAT) /* nat hook: its own flow table */
		return vf_nat_forward(ctx, cfg, iface, vip, pkt);

	ret = vf_select_real(cfg, vip, pkt, ct, &key4, &real);
	if (ret != VF_CONTINUE)
		return ret;
	if (!real)
		return VF_R_DROP_NO_REAL;

	if (vip->mode == VF_MODE_DSR)
		return vf_forward_dsr(ctx, iface, real);
	if (vip->mode == VF_MODE_IPIP)
		return vf_forward_ipip(ctx, cfg, iface, pkt, real, 0);
	if (vip->mode == VF_MODE_GUE)
		return vf_forward_ipip(ctx, cfg, iface, pkt, real, 1);
	return VF_R_DROP_ENCAP;

not_vip:
	/* nat hook: a packet to no VIP may be a nat reply to an SNAT address
	 * (a bitmap test unless nat is on). One call site, so that its code
	 * is in the program once. */
	return vf_nat_reverse(ctx, cfg, pkt);
}

static __always_inline void vf_emit_event(const struct vf_pkt *pkt, __u32 reason)
{
	struct vf_event *ev = bpf_ringbuf_reserve(&vf_events, sizeof(*ev), 0);

	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->reason = reason;
	ev->pkt_len = pkt->frame_len;
	__builtin_memcpy(ev->src, pkt->flow.src, sizeof(ev->src));
	__builtin_memcpy(ev->dst, pkt->flow.dst, sizeof(ev->dst));
	ev->sport = pkt->flow.sport;
	ev->dport = pkt->flow.dport;
	ev->proto = pkt->flow.proto;
	ev->family = pkt->flow.family;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void vf_account(const struct vf_settings *cfg, const struct vf_pkt *pkt,
				       __u32 reason)
{
	struct vf_counter *counter = bpf_map_lookup_elem(&vf_counters, &reason);
	__u32 vip_id = pkt->vip_id, real_id = pkt->real_id;

	if (counter) {
		counter->packets++;
		counter->bytes += pkt->frame_len;
		if (vf_reason_has_event(reason) &&
		    (cfg->event_sample_every <= 1 ||
		     counter->packets % cfg->event_sample_every == 0))
			vf_emit_event(pkt, reason);
	}
	if (pkt->vip_matched) {
		struct vf_vip_stats *vs = bpf_map_lookup_elem(&vf_stats_vip, &vip_id);

		if (vs) {
			vs->packets++;
			vs->bytes += pkt->frame_len;
			vs->new_flows += pkt->new_flow;
			vs->drops += vf_reason_verdict(reason) == XDP_DROP;
		}
	}
	if (reason == VF_R_TX_DSR || reason == VF_R_TX_IPIP || reason == VF_R_TX_NAT ||
	    reason == VF_R_TX_GUE) {
		struct vf_real_stats *rs = bpf_map_lookup_elem(&vf_stats_real, &real_id);

		if (rs) {
			rs->packets++;
			rs->bytes += pkt->frame_len;
		}
	}
}

SEC("xdp")
int vf_balancer(struct xdp_md *ctx)
{
	struct vf_pkt pkt = {};
	const struct vf_settings *cfg;
	__u32 zero = 0;
	int reason;

	cfg = bpf_map_lookup_elem(&vf_settings, &zero);
	if (!cfg)
		return XDP_PASS; /* unreachable: an array always has slot 0 */
	reason = vf_handle(ctx, cfg, &pkt);
	vf_account(cfg, &pkt, reason);
	return vf_reason_verdict(reason);
}
