/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The map contract between the backend decapsulator (decap.bpf.c) and the
 * Go side that loads it, pins it and reads its counters. Exported to Go by
 * `bpf2go -type`, so every layout has explicit padding.
 */
#ifndef VF_DECAP_H
#define VF_DECAP_H

/* Defaults the Go side applies; an enum so that bpf2go exports them. */
enum vf_decap_default {
	/* The UDP port Katran and VeloFlux send GUE to. */
	VF_DECAP_DEFAULT_GUE_PORT = 6080,
};

/* Outer-header addresses that decap.bpf.c accepts as "addressed to the host". */
struct vf_local_key {
	__u32 addr[4];
	__u32 family;
};

/* The one entry of vf_decap_config. */
struct vf_decap_config_t {
	__u16 gue_port; /* host byte order; 0: GUE is not decapsulated */
	__u16 pad;
	__u32 pad2;
};

/*
 * What the decapsulator did with each packet, one field per outcome so that
 * `bpftool map dump` names them. The four *_packets fields count what was
 * decapsulated, by outer family and kind; every other packet lands in
 * exactly one pass_* or drop_* field.
 */
struct vf_decap_counters {
	__u64 ipip4_packets;        /* IPIP and 6in4: outer IPv4, protocol 4 or 41 */
	__u64 ipip6_packets;        /* IP6IP6 and 4in6: outer IPv6, next header 41 or 4 */
	__u64 gue4_packets;         /* GUE in UDP over IPv4 */
	__u64 gue6_packets;         /* GUE in UDP over IPv6 */
	__u64 decap_bytes;          /* frame bytes of the decapsulated packets, as received */
	__u64 pass_not_tunnel;      /* not IPIP, IP6IP6 nor UDP to the GUE port */
	__u64 pass_not_local;       /* a tunnel packet for an address not in vf_decap_local */
	__u64 pass_gue_control;     /* a GUE control message: for the host's stack */
	__u64 drop_truncated;       /* the packet ends inside a header it announces */
	__u64 drop_bad_length;      /* UDP, outer and inner lengths disagree */
	__u64 drop_bad_inner;       /* the inner header is not the IP version announced */
	__u64 drop_gue_variant;     /* GUE variant 2 or 3, which no version defines */
	__u64 drop_gue_unsupported; /* GUE variant 0 with flags or options, or not carrying IP */
};

#endif /* VF_DECAP_H */
