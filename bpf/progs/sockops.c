// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sock_ops: publish the original destination of a redirected socket for the proxy.
 *
 * At TCP_CONNECT_CB the source port is bound and the SYN not yet sent, so the entry
 * {netns cookie, source port, family} -> original destination exists before the proxy can
 * accept the connection. The proxy looks it up by its peer's port. The entry is removed when
 * the application's socket reaches TCP_CLOSE (the LRU map is only a safety net).
 */
#include "zt_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline void zt_publish(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct zt_orig_key key = {};
	struct zt_orig value = {};
	struct zt_sk_orig *orig;

	if (!sk)
		return;
	orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, 0);
	if (!orig || orig->kind == ZT_DST_DNS) /* the DNS proxy needs no original destination */
		return;
	key.netns_cookie = bpf_get_netns_cookie(skops);
	key.port = bpf_htons((__u16)skops->local_port); /* local_port is in host order */
	key.family = orig->family;
	__builtin_memcpy(value.addr, orig->addr, sizeof(value.addr));
	value.port = orig->port;
	value.family = orig->family;
	value.kind = orig->kind;
	if (bpf_map_update_elem(&zt_orig_dst, &key, &value, BPF_ANY)) {
		zt_count(ZT_CNT_ORIG_PUBLISH_FAILED);
		return;
	}
	orig->published_port = key.port;
	orig->flags |= ZT_ORIG_PUBLISHED;
	zt_count(ZT_CNT_ORIG_PUBLISHED);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void zt_unpublish(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct zt_orig_key key = {};
	struct zt_sk_orig *orig;

	if (!sk)
		return;
	orig = bpf_sk_storage_get(&zt_sk_orig, sk, 0, 0);
	if (!orig || !(orig->flags & ZT_ORIG_PUBLISHED))
		return;
	key.netns_cookie = bpf_get_netns_cookie(skops);
	key.port = orig->published_port;
	key.family = orig->family;
	bpf_map_delete_elem(&zt_orig_dst, &key);
	orig->flags &= ~ZT_ORIG_PUBLISHED;
}

SEC("sockops")
int zt_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		zt_publish(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			zt_unpublish(skops);
		break;
	default:
		break;
	}
	return 1;
}
