// SPDX-License-Identifier: GPL-2.0
/*
 * VeloFlux decapsulation, XDP, for backends.
 *
 * Strips an IPIP (4in4, 6in4) or IP6IP6 (6in6, 4in6) outer header addressed
 * to this host and passes the inner packet to the stack, which delivers it
 * to the VIP on loopback. It stands in for the kernel's ipip/ip6_tunnel
 * modules, which some hosts (and our CI) do not have. Anything else passes
 * untouched: this program must never cost the host its own traffic.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vf_types.h"
#include "vf_net.h"
#include "vf_parse.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VF_DECAP_MAX_LOCAL);
	__type(key, struct vf_local_key);
	__type(value, __u32);
} vf_decap_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vf_decap_counters);
} vf_decap_stats SEC(".maps");

/* What the outer header told us. */
struct vf_tunnel {
	__u32 outer_len;    /* bytes to strip */
	__be16 inner_proto; /* ethertype of the inner packet */
};

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

enum vf_decap_verdict {
	VF_D_DECAP,
	VF_D_NOT_TUNNEL,
	VF_D_NOT_LOCAL,
	VF_D_MALFORMED,
};

static __always_inline int vf_outer_ipv4(void *data, void *data_end, __u32 l3_off,
					 struct vf_tunnel *tun)
{
	struct iphdr *iph = data + l3_off;
	struct vf_local_key key = {};

	if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
		return VF_D_NOT_TUNNEL;
	if (vf_inner_ethertype(iph->protocol, &tun->inner_proto))
		return VF_D_NOT_TUNNEL;
	/* A fragmented tunnel packet cannot be stripped piecewise. */
	if (iph->frag_off & bpf_htons(VF_IP_MF | VF_IP_OFFSET))
		return VF_D_NOT_TUNNEL;
	key.family = VF_AF_INET;
	key.addr[0] = iph->daddr;
	if (!vf_is_local(&key))
		return VF_D_NOT_LOCAL;
	tun->outer_len = iph->ihl * 4;
	return VF_D_DECAP;
}

static __always_inline int vf_outer_ipv6(void *data, void *data_end, __u32 l3_off,
					 struct vf_tunnel *tun)
{
	struct ipv6hdr *ip6 = data + l3_off;
	struct vf_local_key key = {};

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return VF_D_NOT_TUNNEL;
	if (vf_inner_ethertype(ip6->nexthdr, &tun->inner_proto))
		return VF_D_NOT_TUNNEL;
	key.family = VF_AF_INET6;
	__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
	if (!vf_is_local(&key))
		return VF_D_NOT_LOCAL;
	tun->outer_len = VF_IPV6_HDR_LEN;
	return VF_D_DECAP;
}

/* Move the L2 header forward over the outer IP header, then drop the bytes
 * in front of it. The inner header must be whole, or the packet is junk. */
static __always_inline int vf_strip(struct xdp_md *ctx, __u32 l3_off, const struct vf_tunnel *tun)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 outer_len = tun->outer_len;
	struct ethhdr *old_eth = data, *eth;
	__u32 inner_min;

	if (outer_len < VF_IPV4_HDR_LEN || outer_len > VF_IPV4_MAX_HDR_LEN)
		return VF_D_MALFORMED;
	inner_min = tun->inner_proto == bpf_htons(VF_ETH_P_IP) ? VF_IPV4_HDR_LEN : VF_IPV6_HDR_LEN;
	if (data + l3_off + outer_len + inner_min > data_end)
		return VF_D_MALFORMED;

	eth = data + outer_len;
	if ((void *)(old_eth + 1) > data_end || (void *)(eth + 1) > data_end)
		return VF_D_MALFORMED;
	if (l3_off > sizeof(struct ethhdr)) {
		struct vf_vlan_hdr *old_vlan = (void *)(old_eth + 1), *vlan = (void *)(eth + 1);

		if ((void *)(old_vlan + 1) > data_end || (void *)(vlan + 1) > data_end)
			return VF_D_MALFORMED;
		vlan->tci = old_vlan->tci;
		vlan->encap_proto = tun->inner_proto;
		eth->h_proto = old_eth->h_proto;
	} else {
		eth->h_proto = tun->inner_proto;
	}
	__builtin_memcpy(eth->h_source, old_eth->h_source, VF_ETH_ALEN);
	__builtin_memcpy(eth->h_dest, old_eth->h_dest, VF_ETH_ALEN);
	if (bpf_xdp_adjust_head(ctx, (int)outer_len))
		return VF_D_MALFORMED;
	return VF_D_DECAP;
}

/* The outer L2 header is parsed as the balancer parses it (vf_parse_l2):
 * Ethernet with at most one VLAN tag. Whatever it would not forward
 * (malformed, QinQ) is no tunnel of ours and goes to the stack untouched. */
static __always_inline int vf_decap_handle(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct vf_pkt pkt = {};
	struct vf_tunnel tun = {};
	__be16 proto = 0;
	__u32 l3_off;
	int ret;

	if (vf_parse_l2(data, data_end, &pkt, &proto) != VF_CONTINUE)
		return VF_D_NOT_TUNNEL;
	l3_off = pkt.l3_off;
	if (proto == bpf_htons(VF_ETH_P_IP))
		ret = vf_outer_ipv4(data, data_end, l3_off, &tun);
	else if (proto == bpf_htons(VF_ETH_P_IPV6))
		ret = vf_outer_ipv6(data, data_end, l3_off, &tun);
	else
		return VF_D_NOT_TUNNEL;
	if (ret != VF_D_DECAP)
		return ret;
	return vf_strip(ctx, l3_off, &tun);
}

SEC("xdp")
int vf_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 frame_len = data_end - data;
	struct vf_decap_counters *stats;
	__u32 zero = 0;
	int ret;

	ret = vf_decap_handle(ctx);
	stats = bpf_map_lookup_elem(&vf_decap_stats, &zero);
	if (stats) {
		switch (ret) {
		case VF_D_DECAP:
			stats->decap_packets++;
			stats->decap_bytes += frame_len;
			break;
		case VF_D_NOT_LOCAL:
			stats->pass_not_local++;
			break;
		case VF_D_MALFORMED:
			stats->drop_malformed++;
			break;
		default:
			stats->pass_not_tunnel++;
		}
	}
	return ret == VF_D_MALFORMED ? XDP_DROP : XDP_PASS;
}
