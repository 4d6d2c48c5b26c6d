// SPDX-License-Identifier: GPL-2.0
/*
 * VeloFlux decapsulation, XDP, for backends.
 *
 * Strips the outer headers of a tunnel packet addressed to this host and
 * passes the inner packet to the stack, which delivers it to the VIP on
 * loopback. Three encapsulations, in IPv4 or IPv6 outer headers:
 *
 *   IPIP / IP6IP6 (and 6in4, 4in6): outer IP, then the inner IP header.
 *   GUE variant 1 (as Katran sends it): outer IP, UDP to the GUE port, then
 *     the inner IP header directly; its version nibble (0100 or 0110) is
 *     what makes the first two bits 01.
 *   GUE variant 0: outer IP, UDP to the GUE port, a 4-byte GUE header whose
 *     protocol field says IPv4 (4) or IPv6 (41), then the inner IP header.
 *     Only the plain header is accepted: flags and optional fields would
 *     change how the payload is read, and nothing VeloFlux talks to sends
 *     them. Control messages (C bit) go to the stack.
 *
 * It stands in for the kernel's ipip/ip6_tunnel/fou modules, which some
 * hosts (and our CI) do not have. Anything that is not a tunnel packet for
 * this host passes untouched: this program must never cost the host its own
 * traffic. A tunnel packet for this host whose headers do not add up is
 * dropped and counted by reason.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vf_types.h"
#include "vf_decap.h"
#include "vf_net.h"
#include "vf_parse.h"

char LICENSE[] SEC("license") = "GPL";

/* The maps are pinned by name under the decapsulator's own pin directory,
 * so that a restarted `veloflux decap` adopts them and vfctl reads them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VF_DECAP_MAX_LOCAL);
	__type(key, struct vf_local_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_decap_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vf_decap_config_t);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_decap_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vf_decap_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vf_decap_stats SEC(".maps");

/* Give the enum of defaults a BTF entry, so bpf2go can export it. Never read. */
const enum vf_decap_default *vf_unused_decap_default __attribute__((unused));

#define VF_UDP_HDR_LEN ((__u32)sizeof(struct udphdr))

/* The GUE variant 0 base header (draft-ietf-intarea-gue, section 3). */
struct vf_gue_base {
	__u8 ver_c_hlen; /* variant (2 bits), control (1), extension words (5) */
	__u8 proto;      /* the inner protocol (an IP protocol number) */
	__be16 flags;
};

#define VF_GUE_VARIANT_SHIFT 6
#define VF_GUE_CONTROL       0x20
#define VF_GUE_HLEN_MASK     0x1f
#define VF_GUE_BASE_LEN      ((__u32)sizeof(struct vf_gue_base))

/* The longest outer header stripped: IPv4 with options, UDP, GUE base. */
#define VF_DECAP_MAX_OUTER_LEN (VF_IPV4_MAX_HDR_LEN + VF_UDP_HDR_LEN + VF_GUE_BASE_LEN)

enum vf_decap_kind {
	VF_DK_IPIP4,
	VF_DK_IPIP6,
	VF_DK_GUE4,
	VF_DK_GUE6,
};

enum vf_decap_verdict {
	VF_D_DECAP,
	VF_D_NOT_TUNNEL,
	VF_D_NOT_LOCAL,
	VF_D_GUE_CONTROL,
	VF_D_TRUNCATED,
	VF_D_BAD_LENGTH,
	VF_D_BAD_INNER,
	VF_D_GUE_VARIANT,
	VF_D_GUE_UNSUPPORTED,
};

/* What the outer headers told us. */
struct vf_tunnel {
	__u32 outer_len;    /* bytes between the L2 header and the inner IP header */
	__u32 inner_len;    /* the inner packet's length, as the outer headers declare it */
	__be16 inner_proto; /* ethertype of the inner packet */
	__u8 kind;          /* enum vf_decap_kind */
};

/* The ethertype of an inner packet, from an IP protocol number. */
static __always_inline int vf_inner_ethertype(__u8 proto, __be16 *ethertype)
{
	if (proto == VF_IPPROTO_IPIP) {
		*ethertype = bpf_htons(VF_ETH_P_IP);
		return 0;
	}
	if (proto == VF_IPPROTO_IPV6) {
		*ethertype = bpf_htons(VF_ETH_P_IPV6);
		return 0;
	}
	return -1;
}

static __always_inline int vf_is_local(const struct vf_local_key *key)
{
	return bpf_map_lookup_elem(&vf_decap_local, key) != NULL;
}

/* The configured GUE port in network byte order, or 0 when GUE is off. */
static __always_inline __be16 vf_gue_port(void)
{
	struct vf_decap_config_t *cfg;
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&vf_decap_config, &zero);
	if (!cfg)
		return 0;
	return bpf_htons(cfg->gue_port);
}

/* UDP to the GUE port: reads the UDP header after the outer IP header of
 * ip_len bytes, whose length must be the outer IP payload (l4_len), then the
 * GUE header, if any. Fills everything in tun but the kind. A packet to
 * another port is no tunnel. */
static __always_inline int vf_outer_udp(void *data, void *data_end, __u32 l3_off, __u32 ip_len,
					__u32 l4_len, struct vf_tunnel *tun)
{
	struct udphdr *udph = data + l3_off + ip_len;
	struct vf_gue_base *gue;
	__be16 port = vf_gue_port();
	__u32 udp_len, variant;

	if ((void *)(udph + 1) > data_end)
		return VF_D_NOT_TUNNEL; /* the port cannot be read: not ours to judge */
	if (!port || udph->dest != port)
		return VF_D_NOT_TUNNEL;
	udp_len = bpf_ntohs(udph->len);
	if (udp_len < VF_UDP_HDR_LEN || udp_len != l4_len)
		return VF_D_BAD_LENGTH;
	/* Variant 1 has no GUE header; reading its first byte as one gives
	 * the variant and the inner IP version all the same. */
	gue = (void *)(udph + 1);
	if (udp_len < VF_UDP_HDR_LEN + 1 || (void *)&gue->proto > data_end)
		return VF_D_TRUNCATED;
	variant = gue->ver_c_hlen >> VF_GUE_VARIANT_SHIFT;
	if (variant == 1) {
		__u8 version = gue->ver_c_hlen >> 4;

		if (version == 4)
			tun->inner_proto = bpf_htons(VF_ETH_P_IP);
		else if (version == 6)
			tun->inner_proto = bpf_htons(VF_ETH_P_IPV6);
		else
			return VF_D_GUE_UNSUPPORTED;
		tun->outer_len = ip_len + VF_UDP_HDR_LEN;
		tun->inner_len = udp_len - VF_UDP_HDR_LEN;
		return VF_D_DECAP;
	}
	if (variant != 0)
		return VF_D_GUE_VARIANT;
	if (udp_len < VF_UDP_HDR_LEN + VF_GUE_BASE_LEN || (void *)(gue + 1) > data_end)
		return VF_D_TRUNCATED;
	if (gue->ver_c_hlen & VF_GUE_CONTROL)
		return VF_D_GUE_CONTROL;
	if ((gue->ver_c_hlen & VF_GUE_HLEN_MASK) || gue->flags)
		return VF_D_GUE_UNSUPPORTED;
	if (vf_inner_ethertype(gue->proto, &tun->inner_proto))
		return VF_D_GUE_UNSUPPORTED;
	tun->outer_len = ip_len + VF_UDP_HDR_LEN + VF_GUE_BASE_LEN;
	tun->inner_len = udp_len - VF_UDP_HDR_LEN - VF_GUE_BASE_LEN;
	return VF_D_DECAP;
}

static __always_inline int vf_outer_ipv4(void *data, void *data_end, __u32 l3_off,
					 struct vf_tunnel *tun)
{
	struct iphdr *iph = data + l3_off;
	struct vf_local_key key = {};
	__u32 hdr_len, tot_len;
	int ret;

	if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
		return VF_D_NOT_TUNNEL;
	/* A fragmented tunnel packet cannot be stripped piecewise. */
	if (iph->frag_off & bpf_htons(VF_IP_MF | VF_IP_OFFSET))
		return VF_D_NOT_TUNNEL;
	hdr_len = iph->ihl * 4;
	tot_len = bpf_ntohs(iph->tot_len);
	if (tot_len < hdr_len)
		return VF_D_NOT_TUNNEL; /* not even IP: the stack drops it */
	key.family = VF_AF_INET;
	key.addr[0] = iph->daddr;
	if (iph->protocol == VF_IPPROTO_UDP) {
		ret = vf_outer_udp(data, data_end, l3_off, hdr_len, tot_len - hdr_len, tun);
		tun->kind = VF_DK_GUE4;
	} else if (!vf_inner_ethertype(iph->protocol, &tun->inner_proto)) {
		tun->outer_len = hdr_len;
		tun->inner_len = tot_len - hdr_len;
		tun->kind = VF_DK_IPIP4;
		ret = VF_D_DECAP;
	} else {
		return VF_D_NOT_TUNNEL;
	}
	if (ret == VF_D_NOT_TUNNEL)
		return ret;
	/* Only now: a packet that is no tunnel must not cost a lookup. */
	if (!vf_is_local(&key))
		return VF_D_NOT_LOCAL;
	return ret;
}

static __always_inline int vf_outer_ipv6(void *data, void *data_end, __u32 l3_off,
					 struct vf_tunnel *tun)
{
	struct ipv6hdr *ip6 = data + l3_off;
	struct vf_local_key key = {};
	__u32 payload_len;
	int ret;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return VF_D_NOT_TUNNEL;
	payload_len = bpf_ntohs(ip6->payload_len);
	key.family = VF_AF_INET6;
	__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
	if (ip6->nexthdr == VF_IPPROTO_UDP) {
		ret = vf_outer_udp(data, data_end, l3_off, VF_IPV6_HDR_LEN, payload_len, tun);
		tun->kind = VF_DK_GUE6;
	} else if (!vf_inner_ethertype(ip6->nexthdr, &tun->inner_proto)) {
		tun->outer_len = VF_IPV6_HDR_LEN;
		tun->inner_len = payload_len;
		tun->kind = VF_DK_IPIP6;
		ret = VF_D_DECAP;
	} else {
		return VF_D_NOT_TUNNEL;
	}
	if (ret == VF_D_NOT_TUNNEL)
		return ret;
	if (!vf_is_local(&key))
		return VF_D_NOT_LOCAL;
	return ret;
}

/* The frame must hold all the outer headers announce, and the inner IP
 * header must be of the version announced and exactly as long as the outer
 * headers say: the stack would trust the inner header's length alone. */
static __always_inline int vf_check_inner(void *data, void *data_end, __u32 l3_off,
					  const struct vf_tunnel *tun)
{
	__u32 inner_off = tun->outer_len;
	__u64 frame_len = data_end - data;

	if (inner_off > VF_DECAP_MAX_OUTER_LEN)
		return VF_D_TRUNCATED;
	if ((__u64)l3_off + inner_off + tun->inner_len > frame_len)
		return VF_D_TRUNCATED;
	if (tun->inner_proto == bpf_htons(VF_ETH_P_IP)) {
		struct iphdr *iph = data + l3_off + inner_off;

		if ((void *)(iph + 1) > data_end)
			return VF_D_TRUNCATED;
		if (iph->version != 4 || iph->ihl < 5)
			return VF_D_BAD_INNER;
		if (bpf_ntohs(iph->tot_len) != tun->inner_len)
			return VF_D_BAD_LENGTH;
		return VF_D_DECAP;
	}
	{
		struct ipv6hdr *ip6 = data + l3_off + inner_off;

		if ((void *)(ip6 + 1) > data_end)
			return VF_D_TRUNCATED;
		if (ip6->version != 6)
			return VF_D_BAD_INNER;
		if (bpf_ntohs(ip6->payload_len) + VF_IPV6_HDR_LEN != tun->inner_len)
			return VF_D_BAD_LENGTH;
	}
	return VF_D_DECAP;
}

/* Move the L2 header forward over the outer headers, then drop the bytes
 * in front of it. */
static __always_inline int vf_strip(struct xdp_md *ctx, __u32 l3_off, const struct vf_tunnel *tun)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 outer_len = tun->outer_len;
	struct ethhdr *old_eth = data, *eth;

	if (outer_len < VF_IPV4_HDR_LEN || outer_len > VF_DECAP_MAX_OUTER_LEN)
		return VF_D_TRUNCATED;
	eth = data + outer_len;
	if ((void *)(old_eth + 1) > data_end || (void *)(eth + 1) > data_end)
		return VF_D_TRUNCATED;
	if (l3_off > sizeof(struct ethhdr)) {
		struct vf_vlan_hdr *old_vlan = (void *)(old_eth + 1), *vlan = (void *)(eth + 1);

		if ((void *)(old_vlan + 1) > data_end || (void *)(vlan + 1) > data_end)
			return VF_D_TRUNCATED;
		vlan->tci = old_vlan->tci;
		vlan->encap_proto = tun->inner_proto;
		eth->h_proto = old_eth->h_proto;
	} else {
		eth->h_proto = tun->inner_proto;
	}
	__builtin_memcpy(eth->h_source, old_eth->h_source, VF_ETH_ALEN);
	__builtin_memcpy(eth->h_dest, old_eth->h_dest, VF_ETH_ALEN);
	if (bpf_xdp_adjust_head(ctx, (int)outer_len))
		return VF_D_TRUNCATED;
	return VF_D_DECAP;
}

/* The outer L2 header is parsed as the balancer parses it (vf_parse_l2):
 * Ethernet with at most one VLAN tag. Whatever it would not forward
 * (malformed, QinQ) is no tunnel of ours and goes to the stack untouched. */
static __always_inline int vf_decap_handle(struct xdp_md *ctx, struct vf_tunnel *tun)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct vf_pkt pkt = {};
	__be16 proto = 0;
	__u32 l3_off;
	int ret;

	if (vf_parse_l2(data, data_end, &pkt, &proto) != VF_CONTINUE)
		return VF_D_NOT_TUNNEL;
	l3_off = pkt.l3_off;
	if (proto == bpf_htons(VF_ETH_P_IP))
		ret = vf_outer_ipv4(data, data_end, l3_off, tun);
	else if (proto == bpf_htons(VF_ETH_P_IPV6))
		ret = vf_outer_ipv6(data, data_end, l3_off, tun);
	else
		return VF_D_NOT_TUNNEL;
	if (ret != VF_D_DECAP)
		return ret;
	ret = vf_check_inner(data, data_end, l3_off, tun);
	if (ret != VF_D_DECAP)
		return ret;
	return vf_strip(ctx, l3_off, tun);
}

static __always_inline void vf_count(struct vf_decap_counters *c, int verdict,
				     const struct vf_tunnel *tun, __u64 frame_len)
{
	switch (verdict) {
	case VF_D_DECAP:
		c->decap_bytes += frame_len;
		switch (tun->kind) {
		case VF_DK_IPIP4:
			c->ipip4_packets++;
			break;
		case VF_DK_IPIP6:
			c->ipip6_packets++;
			break;
		case VF_DK_GUE4:
			c->gue4_packets++;
			break;
		default:
			c->gue6_packets++;
		}
		break;
	case VF_D_NOT_LOCAL:
		c->pass_not_local++;
		break;
	case VF_D_GUE_CONTROL:
		c->pass_gue_control++;
		break;
	case VF_D_TRUNCATED:
		c->drop_truncated++;
		break;
	case VF_D_BAD_LENGTH:
		c->drop_bad_length++;
		break;
	case VF_D_BAD_INNER:
		c->drop_bad_inner++;
		break;
	case VF_D_GUE_VARIANT:
		c->drop_gue_variant++;
		break;
	case VF_D_GUE_UNSUPPORTED:
		c->drop_gue_unsupported++;
		break;
	default:
		c->pass_not_tunnel++;
	}
}

SEC("xdp")
int vf_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 frame_len = data_end - data;
	struct vf_decap_counters *stats;
	struct vf_tunnel tun = {};
	__u32 zero = 0;
	int ret;

	ret = vf_decap_handle(ctx, &tun);
	stats = bpf_map_lookup_elem(&vf_decap_stats, &zero);
	if (stats)
		vf_count(stats, ret, &tun, frame_len);
	switch (ret) {
	case VF_D_DECAP:
	case VF_D_NOT_TUNNEL:
	case VF_D_NOT_LOCAL:
	case VF_D_GUE_CONTROL:
		return XDP_PASS;
	}
	return XDP_DROP;
}
