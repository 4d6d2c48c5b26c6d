/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Protocol constants that vmlinux.h cannot give us (they are #defines in the
 * UAPI headers, not BTF types), and small helpers shared by every program.
 */
#ifndef VF_NET_H
#define VF_NET_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define VF_ETH_ALEN     6
#define VF_ETH_P_IP     0x0800
#define VF_ETH_P_IPV6   0x86DD
#define VF_ETH_P_8021Q  0x8100
#define VF_ETH_P_8021AD 0x88A8

#define VF_IPPROTO_HOPOPTS  0
#define VF_IPPROTO_ICMP     1
#define VF_IPPROTO_IPIP     4
#define VF_IPPROTO_TCP      6
#define VF_IPPROTO_UDP      17
#define VF_IPPROTO_IPV6     41
#define VF_IPPROTO_ROUTING  43
#define VF_IPPROTO_FRAGMENT 44
#define VF_IPPROTO_AH       51
#define VF_IPPROTO_ICMPV6   58
#define VF_IPPROTO_DSTOPTS  60

#define VF_IP_MF     0x2000
#define VF_IP_DF     0x4000
#define VF_IP_OFFSET 0x1FFF

#define VF_ICMP_DEST_UNREACH   3
#define VF_ICMP_FRAG_NEEDED    4
#define VF_ICMP_TIME_EXCEEDED  11
#define VF_ICMP_PARAMETERPROB  12
#define VF_ICMPV6_DEST_UNREACH 1
#define VF_ICMPV6_PKT_TOOBIG   2
#define VF_ICMPV6_TIME_EXCEED  3
#define VF_ICMPV6_PARAMPROB    4

/* Martian sources (RFC 1122 3.2.1.3, RFC 4291 2.7): first octet of
 * 0.0.0.0/8 and 127.0.0.0/8, the limited broadcast, the first nibble of
 * 224.0.0.0/4, the first byte of ff00::/8. */
#define VF_IPV4_NET_THIS         0
#define VF_IPV4_NET_LOOPBACK     127
#define VF_IPV4_BROADCAST        0xffffffffU
#define VF_IPV4_MULTICAST_NIBBLE 0xe
#define VF_IPV6_MULTICAST_BYTE   0xff

#define VF_IPV4_HDR_LEN     ((__u32)sizeof(struct iphdr))
#define VF_IPV4_MAX_HDR_LEN (15 * 4) /* ihl is 4 bits of 4-byte words */
#define VF_IPV6_HDR_LEN     ((__u32)sizeof(struct ipv6hdr))
#define VF_DEFAULT_TTL      64

/* Ethernet header followed by one optional 802.1Q tag. */
struct vf_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

static __always_inline int vf_mac_is_zero(const __u8 *mac)
{
	return (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]) == 0;
}

/* Two MACs compared as one 4-byte and one 2-byte load per side instead of
 * six byte loads: a MAC in an Ethernet header or a map value is 2-byte
 * aligned, which the architectures that run XDP load words from (the
 * verifier only insists on alignment where the CPU needs it). Through
 * memcpy the compiler, bound to the 1-byte alignment of a u8 array, would
 * emit the six byte loads. */
static __always_inline int vf_mac_equal(const __u8 *a, const __u8 *b)
{
	const __u32 *a_hi = (const void *)a, *b_hi = (const void *)b;
	const __u16 *a_lo = (const void *)(a + 4), *b_lo = (const void *)(b + 4);

	return ((*a_hi ^ *b_hi) | (__u32)(*a_lo ^ *b_lo)) == 0;
}

static __always_inline __u16 vf_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Checksum of a 20-byte IPv4 header whose check field is zero. */
static __always_inline __u16 vf_ipv4_hdr_csum(const struct iphdr *iph)
{
	const __u16 *word = (const __u16 *)iph;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(struct iphdr) / sizeof(__u16)); i++)
		sum += word[i];
	return vf_csum_fold(sum);
}

#endif /* VF_NET_H */
