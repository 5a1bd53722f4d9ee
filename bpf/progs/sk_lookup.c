// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_lookup: inbound plaintext capture, one program instance and BPF link per pod netns.
 *
 * sk_lookup programs cannot call bpf_get_netns_cookie(), so the loader sets the pod's netns
 * cookie in zt_pod_netns_cookie before loading each pod's instance; every lookup below is keyed
 * by it, which also rules out ever assigning another pod's listener.
 *
 * A new TCP connection to an enrolled pod, to a port other than the proxy's, from outside the
 * pod and not from the kubelet probe address, is handed to the pod's :15006 listener: its
 * accepted socket's local address is the original destination. "Outside" needs two checks:
 * ingress_ifindex is lo for traffic to 127.0.0.0/8 and ::1, but a connection from the pod to
 * its own address reports the device that holds that address; so a source that is one of the
 * pod's own addresses (zt_local, or the destination itself) also means "local". A packet from
 * outside that claims such a source cannot open a connection: IPv4 drops it as a martian, and
 * for either family the SYN-ACK would stay inside the pod.
 *
 * With ZT_CFG_TRANSPARENT_HBONE, a connection from a source port in the HBONE range is HBONE
 * that a peer proxy sent to the application's own port (so that port-based NetworkPolicies see
 * it): it goes to the pod's :15008 listener (zt_hbone_sk), which demands mTLS. A plaintext
 * client that picked such a port gets a TLS server, never the application.
 *
 * The proxy's own connections to the application from a client's address (ENABLE_ORIG_SRC)
 * are neither: their (source, port) is in zt_orig_src while they connect, and they pass.
 *
 * SK_DROP makes the TCP lookup find no socket, so the kernel answers with a reset: a source and
 * port that a kernel DENY rule forbids, and an enrolled pod without a listener (daemon down),
 * are refused here, so plaintext never bypasses the proxy.
 */
#include "zt_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u64 zt_pod_netns_cookie = 0;

static __always_inline int zt_denied(struct zt_deny_key *key, __u16 port)
{
	key->prefixlen = 88 + 128; /* netns cookie, port, family, full source address */
	key->port = port;
	if (bpf_map_lookup_elem(&zt_deny, key))
		return 1;
	key->port = 0;
	return bpf_map_lookup_elem(&zt_deny, key) != 0;
}

SEC("sk_lookup")
int zt_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct zt_pod_key pod_key = {};
	struct zt_deny_key deny_key = {};
	struct zt_local_key local_key = {};
	struct zt_orig_src_key spoofed = {};
	struct zt_cfg *cfg;
	struct zt_pod *pod;
	struct bpf_sock *sk;
	__u32 local_port = ctx->local_port; /* host order */
	long err;

	if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex == ZT_LOOPBACK_IFINDEX)
		return SK_PASS;
	pod_key.netns_cookie = zt_pod_netns_cookie;
	pod = bpf_map_lookup_elem(&zt_pods, &pod_key);
	if (!pod || !(pod->flags & ZT_POD_CAPTURE_INBOUND))
		return SK_PASS;
	if (zt_is_proxy_port(local_port)) {
		zt_count(ZT_CNT_IN_PASSTHROUGH);
		return SK_PASS;
	}

	cfg = zt_config();
	if (ctx->family == ZT_AF_INET6 && cfg && (cfg->flags & ZT_CFG_IPV4_ONLY)) {
		zt_count(ZT_CNT_IN_PASSTHROUGH); /* IPV6_ENABLED=false: see zt_ipv6_off() */
		return SK_PASS;
	}
	if (cfg && (cfg->flags & ZT_CFG_TRANSPARENT_HBONE)) {
		__u16 remote_port = bpf_ntohs(ctx->remote_port);

		if (remote_port >= ZT_HBONE_SPORT_MIN && remote_port <= ZT_HBONE_SPORT_MAX) {
			sk = bpf_map_lookup_elem(&zt_hbone_sk, &pod_key);
			if (!sk) {
				zt_count(ZT_CNT_IN_DROPPED_NO_LISTENER);
				return SK_DROP;
			}
			err = bpf_sk_assign(ctx, sk, 0);
			bpf_sk_release(sk);
			if (err) {
				zt_count(ZT_CNT_IN_ASSIGN_FAILED);
				return SK_DROP;
			}
			zt_count(ZT_CNT_IN_HBONE_REDIRECTED);
			return SK_PASS;
		}
	}
	local_key.netns_cookie = zt_pod_netns_cookie;
	if (ctx->family == ZT_AF_INET) {
		__u32 src4 = ctx->remote_ip4;

		if (src4 == ctx->local_ip4)
			goto local;
		zt_ip4_mapped(local_key.addr, src4);
		if (bpf_map_lookup_elem(&zt_local, &local_key))
			goto local;
		zt_ip4_mapped(spoofed.addr, src4);
		if (cfg && cfg->probe_ip4 && src4 == cfg->probe_ip4) {
			zt_count(ZT_CNT_IN_PASSTHROUGH);
			return SK_PASS;
		}
		deny_key.family = ZT_AF_INET;
		__builtin_memcpy(deny_key.addr, &src4, 4);
	} else {
		__u32 w0 = ctx->remote_ip6[0];
		__u32 w1 = ctx->remote_ip6[1];
		__u32 w2 = ctx->remote_ip6[2];
		__u32 w3 = ctx->remote_ip6[3];

		if (w0 == ctx->local_ip6[0] && w1 == ctx->local_ip6[1] && w2 == ctx->local_ip6[2] &&
		    w3 == ctx->local_ip6[3])
			goto local;
		zt_ip6_bytes(local_key.addr, w0, w1, w2, w3);
		if (bpf_map_lookup_elem(&zt_local, &local_key))
			goto local;
		zt_ip6_bytes(spoofed.addr, w0, w1, w2, w3);
		if (cfg && zt_ip6_equal(cfg->probe_ip6, w0, w1, w2, w3)) {
			zt_count(ZT_CNT_IN_PASSTHROUGH);
			return SK_PASS;
		}
		if (zt_is_v4_mapped(w0, w1, w2)) {
			/* Policies see an IPv4-mapped peer as its IPv4 address. */
			deny_key.family = ZT_AF_INET;
			__builtin_memcpy(deny_key.addr, &w3, 4);
		} else {
			deny_key.family = ZT_AF_INET6;
			zt_ip6_bytes(deny_key.addr, w0, w1, w2, w3);
		}
	}

	spoofed.netns_cookie = zt_pod_netns_cookie;
	spoofed.port = ctx->remote_port; /* already network order */
	if (bpf_map_lookup_elem(&zt_orig_src, &spoofed))
		goto local;

	deny_key.netns_cookie_lo = (__u32)zt_pod_netns_cookie;
	deny_key.netns_cookie_hi = (__u32)(zt_pod_netns_cookie >> 32);
	if (zt_denied(&deny_key, bpf_htons((__u16)local_port))) {
		zt_count(ZT_CNT_IN_DROPPED_DENY);
		return SK_DROP;
	}

	sk = bpf_map_lookup_elem(&zt_inbound_sk, &pod_key);
	if (!sk) {
		zt_count(ZT_CNT_IN_DROPPED_NO_LISTENER);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		zt_count(ZT_CNT_IN_ASSIGN_FAILED);
		return SK_DROP;
	}
	zt_count(ZT_CNT_IN_REDIRECTED);
	return SK_PASS;

local:
	zt_count(ZT_CNT_IN_LOCAL_SKIPPED);
	return SK_PASS;
}
