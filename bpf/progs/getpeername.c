// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername4, cgroup/getpeername6: the application sees the address it dialled.
 *
 * Only a socket that connect.c redirected (its storage holds the original) and whose peer is
 * still the pod's loopback :15001 (or :15053 for a captured DNS socket, TCP or connected UDP)
 * is rewritten, so a stale record never lies about a peer.
 */
#include "zt_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline struct zt_sk_orig *zt_redirected(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct zt_sk_orig *orig;

	if (!sk)
		return 0;
	if (ctx->user_port == bpf_htons(ZT_PORT_DNS)) {
		orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, 0);
		return orig && orig->kind == ZT_DST_DNS ? orig : 0;
	}
	if (ctx->protocol != IPPROTO_TCP || ctx->user_port != bpf_htons(ZT_PORT_OUTBOUND))
		return 0;
	orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, 0);
	return orig && orig->kind != ZT_DST_DNS ? orig : 0;
}

SEC("cgroup/getpeername4")
int zt_getpeername4(struct bpf_sock_addr *ctx)
{
	struct zt_sk_orig *orig;

	if (ctx->user_ip4 != bpf_htonl(0x7f000001))
		return 1;
	orig = zt_redirected(ctx);
	if (!orig || orig->family != ZT_AF_INET)
		return 1;
	zt_show_orig4(ctx, orig);
	return 1;
}

SEC("cgroup/getpeername6")
int zt_getpeername6(struct bpf_sock_addr *ctx)
{
	__u32 w0 = ctx->user_ip6[0];
	__u32 w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2];
	__u32 w3 = ctx->user_ip6[3];
	struct zt_sk_orig *orig;
	int to_v4_loopback = zt_is_v4_mapped(w0, w1, w2) && w3 == bpf_htonl(0x7f000001);
	int to_v6_loopback = w0 == 0 && w1 == 0 && w2 == 0 && w3 == bpf_htonl(1);

	if (!to_v4_loopback && !to_v6_loopback)
		return 1;
	orig = zt_redirected(ctx);
	if (!orig)
		return 1;
	zt_show_orig6(ctx, orig);
	return 1;
}
