/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Small inline helpers shared by the programs; the layouts live in zt_maps.h. */
#ifndef ZT_COMMON_H
#define ZT_COMMON_H

#include <linux/in.h>
#include <asm/socket.h>
#include <bpf/bpf_endian.h>

#include "zt_maps.h"

static __always_inline void zt_count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&zt_counters, &index);

	if (value)
		*value += 1; /* per-CPU slot: no other writer */
}

static __always_inline struct zt_cfg *zt_config(void)
{
	__u32 zero = 0;
	struct zt_cfg *cfg = bpf_map_lookup_elem(&zt_cfg, &zero);

	if (!cfg || !(cfg->flags & ZT_CFG_VALID))
		return 0;
	return cfg;
}

/* Writes the 16-byte IPv4-mapped form of a network-order IPv4 address. */
static __always_inline void zt_ip4_mapped(__u8 addr[16], __u32 ip4)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &ip4, 4);
}

/* Copies four network-order words (ctx->user_ip6, ctx->remote_ip6) into 16 bytes. */
static __always_inline void zt_ip6_bytes(__u8 addr[16], __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	__builtin_memcpy(&addr[0], &w0, 4);
	__builtin_memcpy(&addr[4], &w1, 4);
	__builtin_memcpy(&addr[8], &w2, 4);
	__builtin_memcpy(&addr[12], &w3, 4);
}

/* Whether 16 stored bytes equal four network-order words (an all-zero address never does). */
static __always_inline int zt_ip6_equal(const __u8 addr[16], __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	__u32 a0, a1, a2, a3;

	__builtin_memcpy(&a0, &addr[0], 4);
	__builtin_memcpy(&a1, &addr[4], 4);
	__builtin_memcpy(&a2, &addr[8], 4);
	__builtin_memcpy(&a3, &addr[12], 4);
	if ((a0 | a1 | a2 | a3) == 0)
		return 0;
	return a0 == w0 && a1 == w1 && a2 == w2 && a3 == w3;
}

static __always_inline int zt_is_v4_mapped(__u32 w0, __u32 w1, __u32 w2)
{
	return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff);
}

static __always_inline int zt_is_proxy_port(__u32 port_host_order)
{
	return port_host_order == ZT_PORT_OUTBOUND || port_host_order == ZT_PORT_INBOUND_PLAINTEXT ||
	       port_host_order == ZT_PORT_HBONE || port_host_order == ZT_PORT_DNS;
}

#endif /* ZT_COMMON_H */
