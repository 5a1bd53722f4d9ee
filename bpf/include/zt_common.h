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

/*
 * With IPV6_ENABLED=false the proxy has no IPv6 listeners, as ztunnel's; IPv6 (not IPv4-mapped)
 * traffic is then left alone, as istio-cni leaves it without ip6tables rules. Older programs
 * ignore the flag and keep capturing, which fails closed.
 */
static __always_inline int zt_ipv6_off(void)
{
	struct zt_cfg *cfg = zt_config();

	return cfg && (cfg->flags & ZT_CFG_IPV4_ONLY);
}

static __always_inline int zt_is_proxy_port(__u32 port_host_order)
{
	return port_host_order == ZT_PORT_OUTBOUND || port_host_order == ZT_PORT_INBOUND_PLAINTEXT ||
	       port_host_order == ZT_PORT_HBONE || port_host_order == ZT_PORT_DNS;
}

/* Shows a socket's stored original destination as its peer (getpeername, recvmsg). */
static __always_inline void zt_show_orig4(struct bpf_sock_addr *ctx, const struct zt_sk_orig *orig)
{
	__u32 ip4;

	__builtin_memcpy(&ip4, &orig->addr[12], sizeof(ip4));
	ctx->user_ip4 = ip4;
	ctx->user_port = orig->port;
}

/* The same for an IPv6 socket: the original is stored IPv4-mapped already, as it shows it. */
static __always_inline void zt_show_orig6(struct bpf_sock_addr *ctx, const struct zt_sk_orig *orig)
{
	__u32 word;

	__builtin_memcpy(&word, &orig->addr[0], 4);
	ctx->user_ip6[0] = word;
	__builtin_memcpy(&word, &orig->addr[4], 4);
	ctx->user_ip6[1] = word;
	__builtin_memcpy(&word, &orig->addr[8], 4);
	ctx->user_ip6[2] = word;
	__builtin_memcpy(&word, &orig->addr[12], 4);
	ctx->user_ip6[3] = word;
	ctx->user_port = orig->port;
}

/* Whether the socket is one of the proxy's own (it carries the daemon's SO_MARK). */
static __always_inline int zt_is_proxy_socket(struct bpf_sock_addr *ctx, const struct zt_cfg *cfg)
{
	int mark = 0;

	if (!cfg->mark_mask)
		return 0;
	if (bpf_getsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)))
		return 0;
	return ((__u32)mark & cfg->mark_mask) == (cfg->mark & cfg->mark_mask);
}

/*
 * istio-cni's DNS capture, in the kernel: UDP or TCP to port 53 from an enrolled pod, not to a
 * loopback address and not from the proxy's own sockets, goes to the pod's DNS proxy on :15053.
 * What the application dialled is kept in the socket's storage (kind ZT_DST_DNS), so that
 * getpeername and recvmsg show it the resolver it asked. Returns 1 when the caller must rewrite
 * the destination; with the daemon down nothing listens there and queries fail, never leak.
 */
static __always_inline int zt_dns_capture(struct bpf_sock_addr *ctx, const __u8 addr[16],
					  __u8 family, int to_loopback)
{
	struct bpf_sock *sk = ctx->sk;
	struct zt_pod_key pod_key = {};
	struct zt_sk_orig *orig;
	struct zt_cfg *cfg;

	if (!sk || to_loopback || ctx->user_port != bpf_htons(ZT_PORT_DNS_SERVER))
		return 0;
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 0;
	cfg = zt_config();
	if (!cfg || !(cfg->flags & ZT_CFG_DNS_CAPTURE))
		return 0;
	pod_key.netns_cookie = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&zt_pods, &pod_key))
		return 0;
	if (zt_is_proxy_socket(ctx, cfg))
		return 0;
	orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (orig) {
		__builtin_memcpy(orig->addr, addr, sizeof(orig->addr));
		orig->port = (__u16)ctx->user_port;
		orig->family = family;
		orig->kind = ZT_DST_DNS;
		orig->published_port = 0;
		orig->flags = 0;
	}
	return 1;
}

/* 127.0.0.0/8, from a network-order IPv4 address. */
static __always_inline int zt_ip4_is_loopback(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

/* The pod's DNS proxy for a (possibly IPv4-mapped) IPv6 destination: ::ffff:127.0.0.1 or ::1. */
static __always_inline void zt_dns_proxy6(struct bpf_sock_addr *ctx, int mapped)
{
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_port = bpf_htons(ZT_PORT_DNS);
}

static __always_inline int zt_ip6_is_loopback(__u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	if (zt_is_v4_mapped(w0, w1, w2))
		return zt_ip4_is_loopback(w3);
	return w0 == 0 && w1 == 0 && w2 == 0 && w3 == bpf_htonl(1);
}

#endif /* ZT_COMMON_H */
