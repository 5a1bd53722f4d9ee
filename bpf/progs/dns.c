// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4/6, cgroup/recvmsg4/6: DNS capture for unconnected UDP sockets.
 *
 * A datagram an enrolled pod sends to port 53 goes to the pod's DNS proxy on :15053 instead
 * (zt_dns_capture, the same rule connect.c applies to TCP and connected UDP), and the answers
 * the proxy sends back are shown to the application as coming from the resolver it asked, as
 * iptables' REDIRECT does with conntrack. Together these make istio-cni's in-pod DNS rules
 * unnecessary; with them present, nothing changes (a datagram the kernel already sent to
 * :15053 is not to port 53 any more).
 */
#include "zt_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/sendmsg4")
int zt_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u8 addr[16];

	zt_ip4_mapped(addr, ctx->user_ip4);
	if (zt_dns_capture(ctx, addr, ZT_AF_INET, zt_ip4_is_loopback(ctx->user_ip4))) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(ZT_PORT_DNS);
	}
	return 1;
}

SEC("cgroup/sendmsg6")
int zt_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 w0 = ctx->user_ip6[0];
	__u32 w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2];
	__u32 w3 = ctx->user_ip6[3];
	int mapped = zt_is_v4_mapped(w0, w1, w2);
	__u8 addr[16];

	if (!mapped && zt_ipv6_off())
		return 1;
	zt_ip6_bytes(addr, w0, w1, w2, w3);
	if (zt_dns_capture(ctx, addr, mapped ? ZT_AF_INET : ZT_AF_INET6,
			   zt_ip6_is_loopback(w0, w1, w2, w3)))
		zt_dns_proxy6(ctx, mapped);
	return 1;
}

/* The resolver a captured socket asked, when an answer comes from the pod's DNS proxy. */
static __always_inline struct zt_sk_orig *zt_dns_answer(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct zt_sk_orig *orig;

	if (!sk || ctx->user_port != bpf_htons(ZT_PORT_DNS))
		return 0;
	orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, 0);
	return orig && orig->kind == ZT_DST_DNS ? orig : 0;
}

SEC("cgroup/recvmsg4")
int zt_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct zt_sk_orig *orig;

	if (ctx->user_ip4 != bpf_htonl(0x7f000001))
		return 1;
	orig = zt_dns_answer(ctx);
	if (!orig || orig->family != ZT_AF_INET)
		return 1;
	zt_show_orig4(ctx, orig);
	return 1;
}

SEC("cgroup/recvmsg6")
int zt_recvmsg6(struct bpf_sock_addr *ctx)
{
	__u32 w0 = ctx->user_ip6[0];
	__u32 w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2];
	__u32 w3 = ctx->user_ip6[3];
	struct zt_sk_orig *orig;
	int from_v4_loopback = zt_is_v4_mapped(w0, w1, w2) && w3 == bpf_htonl(0x7f000001);
	int from_v6_loopback = w0 == 0 && w1 == 0 && w2 == 0 && w3 == bpf_htonl(1);

	if (!from_v4_loopback && !from_v6_loopback)
		return 1;
	orig = zt_dns_answer(ctx);
	if (!orig)
		return 1;
	zt_show_orig6(ctx, orig);
	return 1;
}
