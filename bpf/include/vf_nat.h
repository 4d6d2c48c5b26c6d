/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mode nat: full NAT in both directions, for reals that cannot be changed.
 *
 *   client:cport -> VIP:vport      becomes  snat:sport -> real:rport
 *   real:rport   -> snat:sport     becomes  VIP:vport  -> client:cport
 *
 * The SNAT address is one this node owns, so the real's replies come back
 * here; sport is allocated per flow from [nat_port_min, nat_port_max]. Two
 * LRU tables hold each flow, one per direction (struct vf_nat_entry), so
 * each packet costs one lookup. An ICMP error about a NATed packet
 * (destination unreachable, fragmentation needed, time exceeded, parameter
 * problem and their ICMPv6 twins) is translated too, outer and quoted
 * headers.
 *
 * Checksums are fixed incrementally (RFC 1624): the IPv4 header checksum
 * for the addresses, the TCP/UDP checksum for the pseudo-header addresses
 * and the ports, in an ICMP error the quoted ones as well when the quote
 * reaches them, and the ICMP checksum for all that changed under it.
 *
 * Included by balancer.bpf.c after its maps and the helpers used here
 * (vf_reals, vf_real_selectable, vf_maglev_pick, vf_charge_new_flow,
 * vf_check_our_mac, vf_idle_timeout).
 */
#ifndef VF_NAT_H
#define VF_NAT_H

#include "vf_types.h"
#include "vf_net.h"
#include "vf_parse.h"

/* Where the IP header starts at the latest (one VLAN tag): a bound the
 * verifier needs for the offset kept in struct vf_pkt. */
#define VF_NAT_MAX_L3_OFF (sizeof(struct ethhdr) + sizeof(struct vf_vlan_hdr))

/* How many SNAT ports a new flow tries before it is dropped as "no port". */
#define VF_NAT_PORT_TRIES 8

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VF_DEFAULT_MAX_VIPS);
	__type(key, __u32);
	__type(value, struct vf_nat_vip);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_nat_vips SEC(".maps");

/* Each real's port (network order) by {VIP id, real id}; only a new flow
 * reads it, an established one carries the port in its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VF_NAT_MAX_REAL_PORTS);
	__type(key, struct vf_nat_real_key);
	__type(value, __u16);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_nat_real_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VF_NAT_MAX_ADDRS);
	__type(key, struct vf_nat_addr_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_nat_addrs SEC(".maps");

/* Both directions of every NAT flow; an entry and its peer are created
 * together on one CPU, so per-CPU LRU lists evict them at about the same
 * time. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, VF_DEFAULT_NAT_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct vf_flow_key);
	__type(value, struct vf_nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_nat_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, VF_DEFAULT_NAT_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct vf_flow_key);
	__type(value, struct vf_nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_nat_rev SEC(".maps");

/* --- incremental checksums (RFC 1624: HC' = ~(~HC + ~m + m')) --- */

/* Adds the change of a 32-bit word to an accumulator. The halves are 16-bit
 * words in the byte order of memory, as the checksum field is. */
static __always_inline __u32 vf_csum_add32(__u32 acc, __u32 from, __u32 to)
{
	return acc + (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u32 vf_csum_add16(__u32 acc, __u16 from, __u16 to)
{
	return acc + (__u16)~from + to;
}

static __always_inline __u32 vf_csum_add_addr(__u32 acc, const __u32 *from, const __u32 *to,
					      __u8 family)
{
	acc = vf_csum_add32(acc, from[0], to[0]);
	if (family == VF_AF_INET6) {
		acc = vf_csum_add32(acc, from[1], to[1]);
		acc = vf_csum_add32(acc, from[2], to[2]);
		acc = vf_csum_add32(acc, from[3], to[3]);
	}
	return acc;
}

static __always_inline __u16 vf_csum_apply(__u16 check, __u32 acc)
{
	return vf_csum_fold((__u16)~check + acc);
}

/* --- the tables --- */

static __always_inline __u64 vf_nat_timeout(const struct vf_settings *cfg,
					    const struct vf_nat_entry *e, __u8 proto)
{
	if (e->closing)
		return cfg->nat_closing_timeout;
	return proto == VF_IPPROTO_UDP ? cfg->udp_timeout : cfg->tcp_timeout;
}

static __always_inline int vf_nat_fresh(const struct vf_settings *cfg, const struct vf_nat_entry *e,
					__u8 proto, __u64 now)
{
	return now - e->last_seen <= vf_nat_timeout(cfg, e, proto);
}

static __always_inline int vf_flow_key_equal(const struct vf_flow_key *a,
					     const struct vf_flow_key *b)
{
	return vf_addr6_equal(a->src, b->src) && vf_addr6_equal(a->dst, b->dst) &&
	       a->sport == b->sport && a->dport == b->dport && a->proto == b->proto &&
	       a->family == b->family;
}

/* The peer of e, when it still points back at e's key. */
static __always_inline struct vf_nat_entry *
vf_nat_partner(void *peer_map, const struct vf_nat_entry *e, const struct vf_flow_key *key)
{
	struct vf_nat_entry *p = bpf_map_lookup_elem(peer_map, &e->peer);

	if (p && vf_flow_key_equal(&p->peer, key))
		return p;
	return NULL;
}

/*
 * A flow lives while either direction has been seen within its timeout: a
 * client that only sends (or a real that only streams) keeps both entries.
 * The common case, a fresh entry, costs no second lookup.
 */
static __always_inline int vf_nat_alive(const struct vf_settings *cfg, void *peer_map,
					struct vf_nat_entry *e, const struct vf_flow_key *key,
					__u64 now)
{
	struct vf_nat_entry *p;

	if (vf_nat_fresh(cfg, e, key->proto, now))
		return 1;
	p = vf_nat_partner(peer_map, e, key);
	return p && vf_nat_fresh(cfg, p, key->proto, now);
}

/* Whether the packet is a TCP FIN or RST (not one quoted in an ICMP error).
 * Read here rather than by the parser, so that no other packet pays for it. */
static __always_inline __u8 vf_nat_tcp_close(struct xdp_md *ctx, const struct vf_pkt *pkt)
{
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l4_off = pkt->l4_off;
	struct tcphdr *th;

	if (pkt->flow.proto != VF_IPPROTO_TCP || pkt->icmp_error || l4_off > VF_MAX_L4_OFF)
		return 0;
	th = (void *)(long)ctx->data + l4_off;
	if ((void *)(th + 1) > data_end)
		return 0;
	return th->fin | th->rst;
}

/* Refresh an entry used by a packet. A FIN or RST marks both directions as
 * closing, so the pair expires soon; a SYN that reuses a closing flow's
 * tuple (a client reusing its port) opens a connection, which gets the
 * idle timeout back. One more lookup, once per change. */
static __always_inline void vf_nat_touch(const struct vf_pkt *pkt, __u8 tcp_close, void *peer_map,
					 struct vf_nat_entry *e, const struct vf_flow_key *key,
					 __u64 now)
{
	__u8 closing = e->closing;

	if (now - e->last_seen > VF_CT_TOUCH_JIFFIES)
		e->last_seen = now;
	if (tcp_close)
		closing = 1;
	else if (pkt->tcp_syn)
		closing = 0;
	if (closing != e->closing) {
		struct vf_nat_entry *p = vf_nat_partner(peer_map, e, key);

		e->closing = closing;
		if (p)
			p->closing = closing;
	}
}

/* Remove what is left of a flow whose forward entry is being replaced: its
 * reverse entry, if that still belongs to it, frees the port. */
static __always_inline void vf_nat_forget_reverse(const struct vf_nat_entry *fwd,
						  const struct vf_flow_key *key)
{
	struct vf_nat_entry *rev = bpf_map_lookup_elem(&vf_nat_rev, &fwd->peer);

	if (rev && vf_flow_key_equal(&rev->peer, key))
		bpf_map_delete_elem(&vf_nat_rev, &fwd->peer);
}

/*
 * Claim an SNAT port for a new flow: rkey is the reply tuple with dport to
 * be chosen. Allocation is per CPU without shared state: each try starts
 * from a draw of the kernel's per-CPU generator and probes the next
 * VF_NAT_PORT_TRIES ports, so CPUs do not walk into each other's recent
 * ports as shared or per-CPU cursors would, a range smaller than the tries
 * is searched whole, and a full range costs a bounded number of lookups.
 * A port is free when no reverse entry has it, or when the flow holding it
 * is dead in both directions (its forward entry then goes too). BPF_NOEXIST
 * makes two CPUs racing for one port see each other.
 */
static __always_inline int vf_nat_claim_port(const struct vf_settings *cfg,
					     struct vf_flow_key *rkey,
					     const struct vf_nat_entry *rval, __u64 now)
{
	__u32 span = (__u32)cfg->nat_port_max - cfg->nat_port_min + 1;
	__u32 start = bpf_get_prandom_u32();

	for (__u32 i = 0; i < VF_NAT_PORT_TRIES; i++) {
		__u32 off = (start + i) % span;
		struct vf_nat_entry *held;

		rkey->dport = bpf_htons((__u16)(cfg->nat_port_min + off));
		held = bpf_map_lookup_elem(&vf_nat_rev, rkey);
		if (held) {
			if (vf_nat_alive(cfg, &vf_nat_fwd, held, rkey, now))
				continue;
			if (vf_nat_partner(&vf_nat_fwd, held, rkey))
				bpf_map_delete_elem(&vf_nat_fwd, &held->peer);
			if (bpf_map_update_elem(&vf_nat_rev, rkey, rval, BPF_EXIST))
				continue;
		} else if (bpf_map_update_elem(&vf_nat_rev, rkey, rval, BPF_NOEXIST)) {
			continue;
		}
		return 0;
	}
	return -1;
}

/* --- rewriting --- */

/* TCP/UDP: addresses and ports become those of the reversed peer. */
static __always_inline int vf_nat_rewrite_l4(void *data, void *data_end, const struct vf_pkt *pkt,
					     __u32 acc, const struct vf_flow_key *peer)
{
	__u32 l4_off = pkt->l4_off;
	void *l4;

	if (l4_off > VF_MAX_L4_OFF)
		return -1;
	l4 = data + l4_off;
	if (pkt->flow.proto == VF_IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return -1;
		acc = vf_csum_add16(acc, th->source, peer->dport);
		acc = vf_csum_add16(acc, th->dest, peer->sport);
		th->source = peer->dport;
		th->dest = peer->sport;
		th->check = vf_csum_apply(th->check, acc);
		return 0;
	}
	if (pkt->flow.proto == VF_IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return -1;
		acc = vf_csum_add16(acc, uh->source, peer->dport);
		acc = vf_csum_add16(acc, uh->dest, peer->sport);
		uh->source = peer->dport;
		uh->dest = peer->sport;
		/* IPv4 UDP may go without a checksum (0), which stays so; a
		 * computed 0 is sent as 0xffff (RFC 768). */
		if (uh->check || pkt->flow.family == VF_AF_INET6) {
			uh->check = vf_csum_apply(uh->check, acc);
			if (!uh->check)
				uh->check = 0xffff;
		}
		return 0;
	}
	return -1;
}

/*
 * The transport checksum of a quoted packet, after its addresses and ports
 * changed by l4_acc (they are all in its sum, the addresses through the
 * pseudo header). A quote may stop before the field (RFC 792 asks for 8
 * bytes only): then there is nothing to fix. An IPv4 UDP checksum of 0
 * means none and stays so. Returns the change to the ICMP checksum, which
 * covers the field.
 */
static __always_inline __u32 vf_nat_fix_quoted_check(void *data, void *data_end,
						     const struct vf_pkt *pkt, void *ports,
						     __u32 l4_acc)
{
	__u32 quote_end = (__u32)pkt->l3_off + pkt->l3_len;
	__u16 *check, old;

	if (pkt->flow.proto == VF_IPPROTO_TCP)
		check = ports + __builtin_offsetof(struct tcphdr, check);
	else
		check = ports + __builtin_offsetof(struct udphdr, check);
	/* Both ends: the frame may carry Ethernet padding after the quote. */
	if ((void *)(check + 1) > data_end || (void *)(check + 1) - data > quote_end)
		return 0;
	old = *check;
	if (pkt->flow.proto == VF_IPPROTO_UDP && !old && pkt->flow.family == VF_AF_INET)
		return 0;
	*check = vf_csum_apply(old, l4_acc);
	if (pkt->flow.proto == VF_IPPROTO_UDP && !*check)
		*check = 0xffff;
	return vf_csum_add16(0, old, *check);
}

/* The packet quoted in an ICMP error becomes peer as it is (it was sent in
 * the other direction): its IP header, its ports and its transport
 * checksum. Returns the change to the ICMP checksum. */
static __always_inline int vf_nat_rewrite_quoted(void *data, void *data_end,
						 const struct vf_pkt *pkt,
						 const struct vf_flow_key *peer, __u32 *icmp_acc)
{
	__u32 l4_off = pkt->l4_off, acc = 0, addr_acc = 0, port_acc = 0;
	struct vf_quoted_ports *ports;

	if (l4_off > VF_MAX_L4_OFF)
		return -1;
	if (pkt->flow.family == VF_AF_INET) {
		struct iphdr *inner = data + l4_off + sizeof(struct icmphdr);
		__u16 old_check;

		if ((void *)(inner + 1) > data_end || inner->ihl < 5)
			return -1;
		ports = (void *)inner + inner->ihl * 4;
		if ((void *)(ports + 1) > data_end)
			return -1;
		addr_acc = vf_csum_add32(addr_acc, inner->saddr, peer->src[0]);
		addr_acc = vf_csum_add32(addr_acc, inner->daddr, peer->dst[0]);
		inner->saddr = peer->src[0];
		inner->daddr = peer->dst[0];
		old_check = inner->check;
		inner->check = vf_csum_apply(old_check, addr_acc);
		acc = vf_csum_add16(addr_acc, old_check, inner->check);
	} else {
		struct ipv6hdr *inner = data + l4_off + sizeof(struct icmp6hdr);

		ports = (void *)(inner + 1);
		if ((void *)(ports + 1) > data_end)
			return -1;
		addr_acc = vf_csum_add_addr(addr_acc, inner->saddr.in6_u.u6_addr32, peer->src,
					    VF_AF_INET6);
		addr_acc = vf_csum_add_addr(addr_acc, inner->daddr.in6_u.u6_addr32, peer->dst,
					    VF_AF_INET6);
		__builtin_memcpy(&inner->saddr, peer->src, sizeof(inner->saddr));
		__builtin_memcpy(&inner->daddr, peer->dst, sizeof(inner->daddr));
		acc = addr_acc;
	}
	port_acc = vf_csum_add16(port_acc, ports->sport, peer->sport);
	port_acc = vf_csum_add16(port_acc, ports->dport, peer->dport);
	ports->sport = peer->sport;
	ports->dport = peer->dport;
	acc += port_acc;
	acc += vf_nat_fix_quoted_check(data, data_end, pkt, ports, addr_acc + port_acc);
	*icmp_acc = acc;
	return 0;
}

static __always_inline int vf_nat_rewrite_icmp(void *data, void *data_end, const struct vf_pkt *pkt,
					       __u32 outer_acc, const struct vf_flow_key *peer)
{
	__u32 l4_off = pkt->l4_off, acc = 0;

	if (vf_nat_rewrite_quoted(data, data_end, pkt, peer, &acc))
		return -1;
	if (l4_off > VF_MAX_L4_OFF)
		return -1;
	if (pkt->flow.family == VF_AF_INET) {
		struct icmphdr *icmp = data + l4_off;

		if ((void *)(icmp + 1) > data_end)
			return -1;
		icmp->checksum = vf_csum_apply(icmp->checksum, acc);
	} else {
		struct icmp6hdr *icmp = data + l4_off;

		if ((void *)(icmp + 1) > data_end)
			return -1;
		/* ICMPv6 sums the pseudo header: the outer addresses too. */
		icmp->icmp6_cksum = vf_csum_apply(icmp->icmp6_cksum, acc + outer_acc);
	}
	return 0;
}

/*
 * Rewrite the packet toward peer reversed: source peer->dst:dport,
 * destination peer->src:sport (for an ICMP error, the outer addresses so,
 * and the quoted packet to peer itself). MACs are the caller's.
 */
static __always_inline int vf_nat_rewrite(struct xdp_md *ctx, const struct vf_pkt *pkt,
					  const struct vf_flow_key *peer)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l3_off = pkt->l3_off, acc = 0;

	if (l3_off > VF_NAT_MAX_L3_OFF)
		return -1;
	if (pkt->flow.family == VF_AF_INET) {
		struct iphdr *iph = data + l3_off;

		if ((void *)(iph + 1) > data_end)
			return -1;
		acc = vf_csum_add32(acc, iph->saddr, peer->dst[0]);
		acc = vf_csum_add32(acc, iph->daddr, peer->src[0]);
		iph->saddr = peer->dst[0];
		iph->daddr = peer->src[0];
		iph->check = vf_csum_apply(iph->check, acc);
	} else {
		struct ipv6hdr *ip6 = data + l3_off;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		acc = vf_csum_add_addr(acc, ip6->saddr.in6_u.u6_addr32, peer->dst, VF_AF_INET6);
		acc = vf_csum_add_addr(acc, ip6->daddr.in6_u.u6_addr32, peer->src, VF_AF_INET6);
		__builtin_memcpy(&ip6->saddr, peer->dst, sizeof(ip6->saddr));
		__builtin_memcpy(&ip6->daddr, peer->src, sizeof(ip6->daddr));
	}
	if (pkt->icmp_error)
		return vf_nat_rewrite_icmp(data, data_end, pkt, acc, peer);
	return vf_nat_rewrite_l4(data, data_end, pkt, acc, peer);
}

/* The MACs toward the rewritten destination, as vf_ipip_nexthop finds them:
 * the FIB when enabled and the next hop is out of the receiving interface,
 * else the configured gateway. */
static __always_inline int vf_nat_nexthop(struct xdp_md *ctx, const struct vf_settings *cfg,
					  const struct vf_iface *iface, const struct vf_pkt *pkt,
					  const struct vf_flow_key *peer)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth;
	int found = 0;

	if (cfg->use_fib) {
		__u32 ifindex = ctx->ingress_ifindex;

		fib.family = pkt->flow.family;
		fib.ifindex = ifindex;
		if (pkt->icmp_error) {
			fib.l4_protocol = pkt->flow.family == VF_AF_INET ? VF_IPPROTO_ICMP
									 : VF_IPPROTO_ICMPV6;
		} else {
			fib.l4_protocol = pkt->flow.proto;
			fib.sport = peer->dport;
			fib.dport = peer->sport;
		}
		fib.tot_len = pkt->l3_len;
		if (pkt->flow.family == VF_AF_INET) {
			fib.ipv4_src = peer->dst[0];
			fib.ipv4_dst = peer->src[0];
		} else {
			__builtin_memcpy(fib.ipv6_src, peer->dst, sizeof(fib.ipv6_src));
			__builtin_memcpy(fib.ipv6_dst, peer->src, sizeof(fib.ipv6_dst));
		}
		found = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_SUCCESS &&
			fib.ifindex == ifindex;
	}
	if (!found && vf_mac_is_zero(cfg->gw_mac))
		return -1;
	eth = (void *)(long)ctx->data;
	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return -1;
	if (found) {
		__builtin_memcpy(eth->h_source, fib.smac, VF_ETH_ALEN);
		__builtin_memcpy(eth->h_dest, fib.dmac, VF_ETH_ALEN);
	} else {
		__builtin_memcpy(eth->h_source, iface->mac, VF_ETH_ALEN);
		__builtin_memcpy(eth->h_dest, cfg->gw_mac, VF_ETH_ALEN);
	}
	return 0;
}

/* Translate and send: the shared tail of both directions. */
static __always_inline int vf_nat_send(struct xdp_md *ctx, const struct vf_settings *cfg,
				       const struct vf_iface *iface, const struct vf_pkt *pkt,
				       const struct vf_flow_key *peer, int reason)
{
	if (vf_nat_nexthop(ctx, cfg, iface, pkt, peer))
		return VF_R_DROP_NO_ROUTE;
	if (vf_nat_rewrite(ctx, pkt, peer))
		return VF_R_DROP_MALFORMED_L4;
	return reason;
}

/* The port a new flow of the VIP reaches the real on: the real's own, or
 * the VIP's when the agent wrote none for it. */
static __always_inline __u16 vf_nat_real_port(const struct vf_nat_vip *nv, __u32 vip_id,
					      __u32 real_id)
{
	struct vf_nat_real_key key = { .vip_id = vip_id, .real_id = real_id };
	const __u16 *port = bpf_map_lookup_elem(&vf_nat_real_ports, &key);

	return port && *port ? *port : nv->real_port;
}

/*
 * A new nat flow: charged to its source, balanced with Maglev, given a port,
 * and both entries written. fwd is the tuple's previous entry (idle, or on a
 * real gone down), whose reverse entry goes. Fills rkey (the reply tuple)
 * and the real's id.
 */
static __always_inline int vf_nat_new_flow(const struct vf_settings *cfg,
					   const struct vf_vip_meta *vip, struct vf_pkt *pkt,
					   const struct vf_nat_entry *fwd, struct vf_flow_key *rkey,
					   __u8 tcp_close, __u64 now)
{
	struct vf_nat_entry val = {};
	const struct vf_nat_vip *nv;
	const struct vf_real *real;
	__u32 vip_id = vip->vip_id;
	__u32 real_id;
	int ret;

	ret = vf_charge_new_flow(cfg, pkt);
	if (ret != VF_CONTINUE)
		return ret;
	real_id = vf_maglev_pick(cfg, vip, pkt);
	if (!real_id)
		return VF_R_DROP_NO_REAL;
	real = bpf_map_lookup_elem(&vf_reals, &real_id);
	if (!vf_real_selectable(real))
		return VF_R_DROP_NO_REAL;
	nv = bpf_map_lookup_elem(&vf_nat_vips, &vip_id);
	if (!nv || nv->family != pkt->flow.family || real->family != pkt->flow.family ||
	    !nv->real_port || !cfg->nat_port_min || cfg->nat_port_max < cfg->nat_port_min)
		return VF_R_DROP_NAT_UNCONFIGURED;
	if (fwd)
		vf_nat_forget_reverse(fwd, &pkt->flow);

	__builtin_memcpy(rkey->src, real->addr, sizeof(rkey->src));
	__builtin_memcpy(rkey->dst, nv->snat_addr, sizeof(rkey->dst));
	rkey->sport = vf_nat_real_port(nv, vip_id, real_id);
	rkey->proto = pkt->flow.proto;
	rkey->family = pkt->flow.family;
	/* One value on the stack serves both entries: they differ in peer. */
	__builtin_memcpy(&val.peer, &pkt->flow, sizeof(val.peer));
	val.last_seen = now;
	val.real_id = real_id;
	val.vip_id = vip_id;
	val.closing = tcp_close;
	if (vf_nat_claim_port(cfg, rkey, &val, now))
		return VF_R_DROP_NAT_NO_PORT;
	__builtin_memcpy(&val.peer, rkey, sizeof(val.peer));
	if (bpf_map_update_elem(&vf_nat_fwd, &pkt->flow, &val, BPF_ANY)) {
		bpf_map_delete_elem(&vf_nat_rev, rkey);
		return VF_R_DROP_NAT_NO_PORT;
	}
	pkt->new_flow = 1;
	pkt->real_id = real_id;
	return VF_CONTINUE;
}

/*
 * Client to real. A live forward entry whose real is not down is used as
 * it is (a draining real keeps its flows, as with conntrack); otherwise the
 * flow is new. An ICMP error only ever uses an entry. Both end in the one
 * translation below, so its code is in the program once.
 */
static __always_inline int vf_nat_forward(struct xdp_md *ctx, const struct vf_settings *cfg,
					  const struct vf_iface *iface,
					  const struct vf_vip_meta *vip, struct vf_pkt *pkt)
{
	struct vf_flow_key rkey = {};
	const struct vf_real *real;
	struct vf_nat_entry *fwd;
	__u8 tcp_close = vf_nat_tcp_close(ctx, pkt);
	__u64 now = bpf_jiffies64();
	__u32 real_id;
	int ret;

	fwd = bpf_map_lookup_elem(&vf_nat_fwd, &pkt->flow);
	if (fwd) {
		real_id = fwd->real_id;
		real = bpf_map_lookup_elem(&vf_reals, &real_id);
		if (!vf_real_selectable(real) ||
		    !vf_nat_alive(cfg, &vf_nat_rev, fwd, &pkt->flow, now))
			goto new_flow;
		if (!pkt->icmp_error)
			vf_nat_touch(pkt, tcp_close, &vf_nat_rev, fwd, &pkt->flow, now);
		pkt->real_id = real_id;
		__builtin_memcpy(&rkey, &fwd->peer, sizeof(rkey));
		goto send;
	}
new_flow:
	if (pkt->icmp_error)
		return VF_R_DROP_NO_REAL; /* no flow to translate it for */
	ret = vf_nat_new_flow(cfg, vip, pkt, fwd, &rkey, tcp_close, now);
	if (ret != VF_CONTINUE)
		return ret;
send:
	return vf_nat_send(ctx, cfg, iface, pkt, &rkey, VF_R_TX_NAT);
}

/* Which bit of settings.nat_addr_bits an address sets: the top 6 bits of
 * a multiplicative hash of its words as they sit in the packet (the agent
 * computes the same, agent/dataplane natAddrBit). */
static __always_inline __u32 vf_nat_addr_bit(const __u32 *addr, __u8 family)
{
	__u32 h = addr[0];

	if (family == VF_AF_INET6)
		h ^= addr[1] ^ addr[2] ^ addr[3];
	return (h * VF_NAT_ADDR_HASH_MUL) >> 26;
}

/*
 * Real to client: a packet to no VIP is looked for in the reverse table when
 * its destination is one of our SNAT addresses. The settings' bitmap rules
 * out nearly every other packet for the price of a multiply (all of them
 * while no VIP is nat); the SNAT address map settles the rest. What is not
 * found (the node's own connections from that address) goes to the stack.
 */
static __always_inline int vf_nat_reverse(struct xdp_md *ctx, const struct vf_settings *cfg,
					  struct vf_pkt *pkt)
{
	struct vf_nat_addr_key akey = {};
	const struct vf_iface *iface = NULL;
	struct vf_flow_key peer;
	struct vf_nat_entry *rev;
	__u64 now;
	int ret;

	__u64 bits = cfg->nat_addr_bits;

	if (!bits || !(bits >> vf_nat_addr_bit(pkt->flow.dst, pkt->flow.family) & 1))
		return VF_R_PASS_NOT_VIP;
	__builtin_memcpy(akey.addr, pkt->flow.dst, sizeof(akey.addr));
	akey.family = pkt->flow.family;
	if (!bpf_map_lookup_elem(&vf_nat_addrs, &akey))
		return VF_R_PASS_NOT_VIP;
	rev = bpf_map_lookup_elem(&vf_nat_rev, &pkt->flow);
	if (!rev)
		return VF_R_PASS_NOT_VIP;
	now = bpf_jiffies64();
	if (!vf_nat_alive(cfg, &vf_nat_fwd, rev, &pkt->flow, now))
		return VF_R_PASS_NOT_VIP;
	ret = vf_check_our_mac(ctx, &iface);
	if (ret != VF_CONTINUE)
		return ret;
	if (!pkt->icmp_error)
		vf_nat_touch(pkt, vf_nat_tcp_close(ctx, pkt), &vf_nat_fwd, rev, &pkt->flow, now);
	__builtin_memcpy(&peer, &rev->peer, sizeof(peer));
	return vf_nat_send(ctx, cfg, iface, pkt, &peer, VF_R_TX_NAT_REPLY);
}

#endif /* VF_NAT_H */
