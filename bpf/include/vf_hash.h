/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Flow hashing for Maglev. It must be identical on every balancer so that a
 * flow lands on the same real whichever node receives it, hence a fixed seed
 * and nothing derived from the CPU or the time. The mixing steps are those of
 * MurmurHash3 (public domain): cheap multiplies and rotates that the JIT turns
 * into a handful of instructions, with good avalanche on 32-bit words.
 */
#ifndef VF_HASH_H
#define VF_HASH_H

#include "vf_types.h"
#include "vf_net.h"

#define VF_HASH_SEED 0x5646u /* "VF" */

static __always_inline __u32 vf_rotl32(__u32 x, __u32 r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 vf_hash_word(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51u;
	k = vf_rotl32(k, 15);
	k *= 0x1b873593u;
	h ^= k;
	h = vf_rotl32(h, 13);
	return h * 5 + 0xe6546b64u;
}

static __always_inline __u32 vf_hash_final(__u32 h, __u32 nwords)
{
	h ^= nwords * 4;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 vf_hash_addr(__u32 h, const __u32 *addr, __u8 family)
{
	h = vf_hash_word(h, addr[0]);
	if (family == VF_AF_INET6) {
		h = vf_hash_word(h, addr[1]);
		h = vf_hash_word(h, addr[2]);
		h = vf_hash_word(h, addr[3]);
	}
	return h;
}

/* Hash of the whole 5-tuple: spreads the flows of one client over the reals. */
static __always_inline __u32 vf_hash_flow(const struct vf_flow_key *flow)
{
	__u32 h = VF_HASH_SEED;

	h = vf_hash_addr(h, flow->src, flow->family);
	h = vf_hash_addr(h, flow->dst, flow->family);
	h = vf_hash_word(h, ((__u32)flow->sport << 16) | flow->dport);
	h = vf_hash_word(h, flow->proto);
	return vf_hash_final(h, flow->family == VF_AF_INET6 ? 10 : 4);
}

/* Hash of the source address alone: every flow of a client to a VIP with
 * source affinity goes to the same real. */
static __always_inline __u32 vf_hash_source(const struct vf_flow_key *flow)
{
	__u32 h = vf_hash_addr(VF_HASH_SEED, flow->src, flow->family);

	return vf_hash_final(h, flow->family == VF_AF_INET6 ? 4 : 1);
}

#endif /* VF_HASH_H */
