/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Header parsing for the balancer. Each parser checks every byte it reads
 * against data_end and returns either VF_CONTINUE or the vf_reason that ends
 * the packet's journey (see the "Packet rules" table in README.md).
 */
#ifndef VF_PARSE_H
#define VF_PARSE_H

#include "vf_types.h"
#include "vf_net.h"

/* Where the L4 header may start at the latest. The verifier only learns a
 * packet range from a pointer whose variable offset it can bound, and this
 * bound also caps the IPv6 extension chain (see the packet rules). */
#define VF_MAX_L4_OFF 512

/* What the parsers learn about one packet. */
struct vf_pkt {
	struct vf_flow_key flow; /* for ICMP errors: the quoted flow, reversed */
	__u32 frame_len;         /* bytes on the wire, as counted in stats */
	__u32 l3_len;            /* IP packet length per its header (no L2 padding) */
	__u16 l3_off;            /* Ethernet header, plus 4 with a VLAN tag */
	__u16 l4_off;
	__u32 vip_id;
	__u32 real_id;
	__u32 flow_hash; /* IPv4 VIP candidates: vf_hash_flow(&flow), once (vf_pkt_flow_hash) */
	__u8 vlan;
	__u8 df; /* IPv4 don't-fragment, copied to the outer header */
	__u8 tos;
	__u8 fragment;
	__u8 ext_limit;  /* IPv6 extension chain longer than we walk */
	__u8 icmp_error; /* VF_ICMP_ERR_*: flow came from the packet quoted in an ICMP error */
	__u8 vip_matched;
	__u8 new_flow;
	__u8 tcp_syn; /* a TCP SYN without ACK: a connection being opened */
};

static __always_inline int vf_is_vlan(__be16 proto)
{
	return proto == bpf_htons(VF_ETH_P_8021Q) || proto == bpf_htons(VF_ETH_P_8021AD);
}

/* Ethernet with at most one VLAN tag. A second tag (QinQ) is left to the
 * stack: we would have to re-tag on the way out and nothing here needs it. */
static __always_inline int vf_parse_l2(void *data, void *data_end, struct vf_pkt *pkt,
				       __be16 *l3_proto)
{
	struct ethhdr *eth = data;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return VF_R_DROP_MALFORMED_L2;
	proto = eth->h_proto;
	pkt->l3_off = sizeof(*eth);
	if (vf_is_vlan(proto)) {
		struct vf_vlan_hdr *vlan = (void *)(eth + 1);

		if ((void *)(vlan + 1) > data_end)
			return VF_R_DROP_MALFORMED_L2;
		proto = vlan->encap_proto;
		pkt->l3_off += sizeof(*vlan);
		pkt->vlan = 1;
		if (vf_is_vlan(proto))
			return VF_R_PASS_VLAN_NESTED;
	}
	*l3_proto = proto;
	return VF_CONTINUE;
}

/* IPv4 with options. A header whose lengths disagree with the frame is
 * malformed; a fragment is flagged and decided after the denylist. */
static __always_inline int vf_parse_ipv4(void *data, void *data_end, struct vf_pkt *pkt)
{
	struct iphdr *iph = data + pkt->l3_off;
	__u32 hdr_len, tot_len;

	if ((void *)(iph + 1) > data_end)
		return VF_R_DROP_MALFORMED_L3;
	if (iph->version != 4 || iph->ihl < 5)
		return VF_R_DROP_MALFORMED_L3;
	hdr_len = iph->ihl * 4;
	tot_len = bpf_ntohs(iph->tot_len);
	if (tot_len < hdr_len || pkt->l3_off + tot_len > pkt->frame_len)
		return VF_R_DROP_MALFORMED_L3;

	pkt->fragment = (iph->frag_off & bpf_htons(VF_IP_MF | VF_IP_OFFSET)) != 0;
	pkt->df = (iph->frag_off & bpf_htons(VF_IP_DF)) != 0;
	pkt->tos = iph->tos;
	pkt->l3_len = tot_len;
	pkt->l4_off = pkt->l3_off + hdr_len;
	pkt->flow.family = VF_AF_INET;
	pkt->flow.proto = iph->protocol;
	pkt->flow.src[0] = iph->saddr;
	pkt->flow.dst[0] = iph->daddr;
	return VF_CONTINUE;
}

static __always_inline int vf_ipv6_is_ext(__u8 nexthdr)
{
	return nexthdr == VF_IPPROTO_HOPOPTS || nexthdr == VF_IPPROTO_ROUTING ||
	       nexthdr == VF_IPPROTO_DSTOPTS || nexthdr == VF_IPPROTO_AH ||
	       nexthdr == VF_IPPROTO_FRAGMENT;
}

/* IPv6, walking at most VF_IPV6_MAX_EXT_HDRS extension headers. A fragment
 * header anywhere in the walked chain marks the packet as a fragment. */
static __always_inline int vf_parse_ipv6(void *data, void *data_end, struct vf_pkt *pkt)
{
	struct ipv6hdr *ip6 = data + pkt->l3_off;
	__u32 payload_len, off;
	__u8 nexthdr;

	if ((void *)(ip6 + 1) > data_end)
		return VF_R_DROP_MALFORMED_L3;
	if (ip6->version != 6)
		return VF_R_DROP_MALFORMED_L3;
	payload_len = bpf_ntohs(ip6->payload_len);
	/* payload_len 0 would be a jumbogram, which Ethernet cannot carry. */
	if (payload_len == 0 || pkt->l3_off + VF_IPV6_HDR_LEN + payload_len > pkt->frame_len)
		return VF_R_DROP_MALFORMED_L3;

	pkt->l3_len = VF_IPV6_HDR_LEN + payload_len;
	pkt->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	pkt->flow.family = VF_AF_INET6;
	__builtin_memcpy(pkt->flow.src, &ip6->saddr, sizeof(pkt->flow.src));
	__builtin_memcpy(pkt->flow.dst, &ip6->daddr, sizeof(pkt->flow.dst));

	nexthdr = ip6->nexthdr;
	off = pkt->l3_off + VF_IPV6_HDR_LEN;
#pragma unroll
	for (int i = 0; i < VF_IPV6_MAX_EXT_HDRS; i++) {
		struct ipv6_opt_hdr *opt;

		if (!vf_ipv6_is_ext(nexthdr))
			break;
		if (nexthdr == VF_IPPROTO_FRAGMENT) {
			pkt->fragment = 1;
			break;
		}
		opt = data + off;
		if ((void *)(opt + 1) > data_end)
			return VF_R_DROP_MALFORMED_L3;
		/* AH counts its length in 4-byte words minus 2, the others in
		 * 8-byte words minus 1 (RFC 4302, RFC 8200). */
		if (nexthdr == VF_IPPROTO_AH)
			off += ((__u32)opt->hdrlen + 2) * 4;
		else
			off += ((__u32)opt->hdrlen + 1) * 8;
		nexthdr = opt->nexthdr;
	}
	if (!pkt->fragment && (vf_ipv6_is_ext(nexthdr) || off > VF_MAX_L4_OFF))
		pkt->ext_limit = 1;
	if (off > pkt->l3_off + pkt->l3_len)
		return VF_R_DROP_MALFORMED_L3;

	pkt->l4_off = off;
	pkt->flow.proto = nexthdr;
	return VF_CONTINUE;
}

/* TCP and UDP ports. The ports sit at the same place in both headers, but the
 * full header is required so that a truncated segment is never forwarded. */
static __always_inline int vf_parse_ports(void *l4, void *data_end, struct vf_pkt *pkt)
{
	if (pkt->flow.proto == VF_IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || th->doff < 5)
			return VF_R_DROP_MALFORMED_L4;
		pkt->flow.sport = th->source;
		pkt->flow.dport = th->dest;
		pkt->tcp_syn = th->syn && !th->ack;
		return VF_CONTINUE;
	}
	if (pkt->flow.proto == VF_IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return VF_R_DROP_MALFORMED_L4;
		pkt->flow.sport = uh->source;
		pkt->flow.dport = uh->dest;
		return VF_CONTINUE;
	}
	return VF_R_PASS_UNKNOWN_L4;
}

/* The first 4 bytes after a quoted IP header: source and destination port. */
struct vf_quoted_ports {
	__be16 sport;
	__be16 dport;
};

static __always_inline int vf_quoted_l4_ok(__u8 proto)
{
	return proto == VF_IPPROTO_TCP || proto == VF_IPPROTO_UDP;
}

/*
 * Which ICMP errors the balancer takes (pkt->icmp_error). "Fragmentation
 * needed" and "packet too big" matter to every VIP: path MTU discovery
 * breaks without them. The other errors that quote the packet they are
 * about (destination unreachable, time exceeded, parameter problem) only
 * mode nat takes, since only nat changed the addresses the sender of the
 * error saw; for other VIPs they go to the stack as ever.
 */
enum {
	VF_ICMP_ERR_NONE = 0,
	VF_ICMP_ERR_ANY_VIP,
	VF_ICMP_ERR_NAT_ONLY,
};

static __always_inline __u8 vf_icmp4_error_kind(__u8 type, __u8 code)
{
	if (type == VF_ICMP_DEST_UNREACH && code == VF_ICMP_FRAG_NEEDED)
		return VF_ICMP_ERR_ANY_VIP;
	if (type == VF_ICMP_DEST_UNREACH || type == VF_ICMP_TIME_EXCEEDED ||
	    type == VF_ICMP_PARAMETERPROB)
		return VF_ICMP_ERR_NAT_ONLY;
	return VF_ICMP_ERR_NONE;
}

static __always_inline __u8 vf_icmp6_error_kind(__u8 type)
{
	if (type == VF_ICMPV6_PKT_TOOBIG)
		return VF_ICMP_ERR_ANY_VIP;
	if (type == VF_ICMPV6_DEST_UNREACH || type == VF_ICMPV6_TIME_EXCEED ||
	    type == VF_ICMPV6_PARAMPROB)
		return VF_ICMP_ERR_NAT_ONLY;
	return VF_ICMP_ERR_NONE;
}

/* A malformed quote: dropped for the errors every VIP takes, as before nat
 * took the others, which go to the stack untouched. */
static __always_inline int vf_icmp_bad_quote(__u8 kind)
{
	return kind == VF_ICMP_ERR_NAT_ONLY ? VF_R_PASS_NOT_VIP : VF_R_DROP_MALFORMED_L4;
}

/*
 * An ICMP error quoting a packet that a real sent from the VIP (src = VIP,
 * dst = client), or that nat sent from its SNAT address. The flow it
 * belongs to is the reverse of the quoted tuple, which is what conntrack,
 * Maglev and the nat tables were keyed on. Any other ICMP message is not
 * ours.
 */
static __always_inline int vf_parse_icmp4(void *l4, void *data_end, struct vf_pkt *pkt)
{
	struct icmphdr *icmp = l4;
	struct vf_quoted_ports *ports;
	struct iphdr *inner;
	__u8 kind;

	if ((void *)(icmp + 1) > data_end)
		return VF_R_DROP_MALFORMED_L4;
	kind = vf_icmp4_error_kind(icmp->type, icmp->code);
	if (kind == VF_ICMP_ERR_NONE)
		return VF_R_PASS_NOT_VIP;

	inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > data_end)
		return vf_icmp_bad_quote(kind);
	if (inner->version != 4 || inner->ihl < 5)
		return vf_icmp_bad_quote(kind);
	ports = (void *)inner + inner->ihl * 4;
	if ((void *)(ports + 1) > data_end)
		return vf_icmp_bad_quote(kind);
	if (!vf_quoted_l4_ok(inner->protocol) || inner->saddr != pkt->flow.dst[0])
		return VF_R_PASS_NOT_VIP;

	pkt->flow.src[0] = inner->daddr;
	pkt->flow.dst[0] = inner->saddr;
	pkt->flow.sport = ports->dport;
	pkt->flow.dport = ports->sport;
	pkt->flow.proto = inner->protocol;
	pkt->icmp_error = kind;
	return VF_CONTINUE;
}

static __always_inline int vf_addr6_equal(const __u32 *a, const __u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

/* The IPv6 twin of vf_parse_icmp4. The quoted packet must carry TCP or UDP
 * directly after its fixed header. */
static __always_inline int vf_parse_icmp6(void *l4, void *data_end, struct vf_pkt *pkt)
{
	struct icmp6hdr *icmp = l4;
	struct vf_quoted_ports *ports;
	struct ipv6hdr *inner;
	__u8 kind;

	if ((void *)(icmp + 1) > data_end)
		return VF_R_DROP_MALFORMED_L4;
	kind = vf_icmp6_error_kind(icmp->icmp6_type);
	if (kind == VF_ICMP_ERR_NONE)
		return VF_R_PASS_NOT_VIP;

	inner = (void *)(icmp + 1);
	ports = (void *)(inner + 1);
	if ((void *)(ports + 1) > data_end)
		return vf_icmp_bad_quote(kind);
	if (inner->version != 6 || !vf_quoted_l4_ok(inner->nexthdr))
		return VF_R_PASS_NOT_VIP;
	if (!vf_addr6_equal(inner->saddr.in6_u.u6_addr32, pkt->flow.dst))
		return VF_R_PASS_NOT_VIP;

	__builtin_memcpy(pkt->flow.src, &inner->daddr, sizeof(pkt->flow.src));
	pkt->flow.sport = ports->dport;
	pkt->flow.dport = ports->sport;
	pkt->flow.proto = inner->nexthdr;
	pkt->icmp_error = kind;
	return VF_CONTINUE;
}

/* Ports for TCP/UDP, the quoted flow for ICMP errors, a rule for the rest. */
static __always_inline int vf_parse_l4(void *data, void *data_end, struct vf_pkt *pkt)
{
	__u32 l4_off = pkt->l4_off;
	void *l4;

	if (l4_off > VF_MAX_L4_OFF)
		return VF_R_DROP_MALFORMED_L4;
	l4 = data + l4_off;
	if (pkt->flow.proto == VF_IPPROTO_ICMP && pkt->flow.family == VF_AF_INET)
		return vf_parse_icmp4(l4, data_end, pkt);
	if (pkt->flow.proto == VF_IPPROTO_ICMPV6 && pkt->flow.family == VF_AF_INET6)
		return vf_parse_icmp6(l4, data_end, pkt);
	return vf_parse_ports(l4, data_end, pkt);
}

#endif /* VF_PARSE_H */
