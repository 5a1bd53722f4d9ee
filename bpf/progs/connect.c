// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect4, cgroup/connect6: outbound capture.
 *
 * For a TCP socket of an enrolled pod (netns cookie in zt_pods) dialling a mesh destination
 * (zt_dst, or a service CIDR VIP in zt_dst_cidr), connect() is rewritten to the pod's own loopback :15001, where the proxy listens, and
 * the dialled address is kept in the socket's storage for sock_ops and getpeername. Everything
 * else is left alone: non-enrolled sockets, other destinations, the pod's own addresses, and the
 * proxy's own sockets (SO_MARK). The rewrite does not depend on a listener being there: with the
 * daemon down nothing listens on :15001 and the application gets ECONNREFUSED, never plaintext.
 *
 * Before that, DNS capture (zt_dns_capture): a TCP or connected UDP socket to port 53 goes to
 * the pod's DNS proxy on :15053 (dns.c does the same for unconnected UDP sends).
 */
#include "zt_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The mesh entry of a destination: VIP:port first, then the address on every port, then a
 * service CIDR VIP containing it (on that port, then on every port). */
static __always_inline struct zt_dst *zt_mesh_lookup(struct zt_dst_key *key)
{
	struct zt_dst_cidr_key cidr = {};
	struct zt_dst *dst = bpf_map_lookup_elem(&zt_dst, key);

	if (dst)
		return dst;
	cidr.port = key->port;
	key->port = 0;
	dst = bpf_map_lookup_elem(&zt_dst, key);
	if (dst)
		return dst;
	cidr.prefixlen = 16 + 128;
	__builtin_memcpy(cidr.addr, key->addr, sizeof(cidr.addr));
	dst = bpf_map_lookup_elem(&zt_dst_cidr, &cidr);
	if (dst)
		return dst;
	cidr.port = 0;
	return bpf_map_lookup_elem(&zt_dst_cidr, &cidr);
}

/* Returns 1 when the caller must rewrite the destination to the pod's :15001. */
static __always_inline int zt_outbound(struct bpf_sock_addr *ctx, struct zt_dst_key *key,
				       __u8 family)
{
	struct bpf_sock *sk = ctx->sk;
	struct zt_pod_key pod_key = {};
	struct zt_local_key local_key = {};
	struct zt_sk_orig *orig;
	struct zt_cfg *cfg;
	struct zt_pod *pod;
	struct zt_dst *dst;
	__u16 port = key->port;
	__u32 kind;

	if (!sk || ctx->protocol != IPPROTO_TCP)
		return 0;
	pod_key.netns_cookie = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&zt_pods, &pod_key);
	if (!pod || !(pod->flags & ZT_POD_CAPTURE_OUTBOUND))
		return 0;
	cfg = zt_config();
	if (!cfg)
		return 0;

	local_key.netns_cookie = pod_key.netns_cookie;
	__builtin_memcpy(local_key.addr, key->addr, sizeof(local_key.addr));

	dst = zt_mesh_lookup(key);
	if (!dst) {
		/* A socket may connect() again after a failed attempt: forget the old original. */
		bpf_sk_storage_delete(&zt_sk_orig, sk);
		zt_count(ZT_CNT_OUT_PASSTHROUGH);
		return 0;
	}
	kind = dst->kind;
	if (bpf_map_lookup_elem(&zt_local, &local_key)) {
		bpf_sk_storage_delete(&zt_sk_orig, sk);
		zt_count(ZT_CNT_OUT_LOCAL_SKIPPED);
		return 0;
	}
	if (zt_is_proxy_socket(ctx, cfg)) {
		bpf_sk_storage_delete(&zt_sk_orig, sk);
		zt_count(ZT_CNT_OUT_PROXY_SKIPPED);
		return 0;
	}

	orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (orig) {
		__builtin_memcpy(orig->addr, local_key.addr, sizeof(orig->addr));
		orig->port = port;
		orig->family = family;
		orig->kind = (__u8)kind;
		orig->published_port = 0;
		orig->flags = 0;
	} else {
		/* Still redirect: the proxy finds no original and closes, which fails closed. */
		zt_count(ZT_CNT_OUT_ORIG_STORE_FAILED);
	}
	zt_count(ZT_CNT_OUT_REDIRECTED);
	return 1;
}

SEC("cgroup/connect4")
int zt_connect4(struct bpf_sock_addr *ctx)
{
	struct zt_dst_key key = {};

	zt_ip4_mapped(key.addr, ctx->user_ip4);
	key.port = (__u16)ctx->user_port; /* network order in the low 16 bits */
	if (zt_dns_capture(ctx, key.addr, ZT_AF_INET, zt_ip4_is_loopback(ctx->user_ip4))) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(ZT_PORT_DNS);
		return 1;
	}
	if (zt_outbound(ctx, &key, ZT_AF_INET)) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(ZT_PORT_OUTBOUND);
	}
	return 1;
}

SEC("cgroup/connect6")
int zt_connect6(struct bpf_sock_addr *ctx)
{
	struct zt_dst_key key = {};
	__u32 w0 = ctx->user_ip6[0];
	__u32 w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2];
	__u32 w3 = ctx->user_ip6[3];
	int mapped = zt_is_v4_mapped(w0, w1, w2);

	zt_ip6_bytes(key.addr, w0, w1, w2, w3);
	key.port = (__u16)ctx->user_port;
	if (!mapped && zt_ipv6_off())
		return 1;
	if (zt_dns_capture(ctx, key.addr, mapped ? ZT_AF_INET : ZT_AF_INET6,
			   zt_ip6_is_loopback(w0, w1, w2, w3))) {
		zt_dns_proxy6(ctx, mapped);
		return 1;
	}
	if (zt_outbound(ctx, &key, mapped ? ZT_AF_INET : ZT_AF_INET6)) {
		/* An IPv6 socket dialling an IPv4-mapped address stays on IPv4: ::ffff:127.0.0.1. */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(ZT_PORT_OUTBOUND);
	}
	return 1;
}
