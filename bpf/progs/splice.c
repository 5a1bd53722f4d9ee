// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_skb stream verdict: the kernel splice of a same-node connection the proxy has authorized.
 *
 * The proxy holds two plain TCP sockets of one connection (the source pod's accepted :15001
 * socket and its own socket to the destination application). It puts both in zt_splice_tx
 * (redirect targets, no program), writes zt_splice_conns for both, then puts both in
 * zt_splice_rx, to which this program is attached: from then on an skb received on one is
 * sent out of the other by the kernel, and counted. The order matters: a socket runs this
 * program from the moment it enters zt_splice_rx, and by then its peer is already a target.
 *
 * The kernel queues redirected skbs on the peer without limit, so the program keeps its own
 * window: bytes sent on minus what the peer's receiver acknowledged (tcp_sock.bytes_acked).
 * Past the window, or when the peer has left the maps (closed, reset), the skb is passed up
 * instead (and counted in `passed`): the socket turns readable and the proxy takes over that
 * direction (it stops this program on the socket, lets the peer drain, moves exactly what was
 * passed up, and resumes).
 *
 * The proxy does not watch spliced sockets for input (a socket whose bytes are being sent on
 * polls readable, which would wake it for every message): the first skb handed up after the
 * proxy last resumed a socket puts the socket's cookie in zt_splice_event, a ring buffer it
 * waits on.
 *
 * FIN and RST are not seen here: the proxy watches the sockets for them (EPOLLRDHUP, EPOLLERR)
 * and propagates them once the redirected bytes are on the peer.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "zt_splice.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The one kernel field read here, relocated by libbpf against the running kernel's BTF. */
struct tcp_sock {
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, ZT_SPLICE_MAX_SOCKETS);
	__type(key, struct zt_splice_key);
	__type(value, __u64);
} zt_splice_tx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, ZT_SPLICE_MAX_SOCKETS);
	__type(key, struct zt_splice_key);
	__type(value, __u64);
} zt_splice_rx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZT_SPLICE_MAX_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_splice_key);
	__type(value, struct zt_splice_conn);
} zt_splice_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, ZT_SPLICE_EVENTS_BYTES);
} zt_splice_event SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZT_SPLICE_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} zt_splice_stats SEC(".maps");

static __always_inline void zt_splice_count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&zt_splice_stats, &index);

	if (value)
		*value += 1; /* per-CPU slot: no other writer */
}

static __always_inline int zt_splice_hand_up(struct zt_splice_key *key,
					     struct zt_splice_conn *conn, __u32 len)
{
	/* Tell the proxy once per episode: the first hand-up since it resumed the socket (two
	 * CPUs may both see 0 and both tell; the proxy ignores the second). */
	int first = !conn || !conn->passed;

	zt_splice_count(ZT_SPLICE_CNT_HANDED_UP);
	/* The proxy reads exactly this many bytes back, in order, before it resumes the kernel:
	 * a handed-up skb may wait in the socket's psock queue while newer data already sits in
	 * its TCP receive queue, which a plain read would return first. */
	if (conn)
		__sync_fetch_and_add(&conn->passed, len);
	if (first && bpf_ringbuf_output(&zt_splice_event, key, sizeof(*key), 0))
		zt_splice_count(ZT_SPLICE_CNT_EVENTS_LOST);
	return SK_PASS;
}

SEC("sk_skb/stream_verdict")
int zt_splice_verdict(struct __sk_buff *skb)
{
	struct zt_splice_key key = { .cookie = bpf_get_socket_cookie(skb) };
	struct zt_splice_key peer = {};
	struct zt_splice_conn *conn;
	struct bpf_sock *peer_sk;
	struct tcp_sock *tp;
	__u32 len = skb->len;
	__s64 unacked;
	__u64 acked;

	/* A FIN arrives as an empty skb: sent on, the kernel would take the zero-byte send for a
	 * broken pipe on the peer. The FIN is already in the socket's state, where the proxy
	 * sees it. */
	if (!len)
		return SK_DROP;
	conn = bpf_map_lookup_elem(&zt_splice_conns, &key);
	if (!conn)
		return zt_splice_hand_up(&key, 0, len);
	/* Once one skb was handed up, every later one is too, until the proxy has moved them
	 * and resumes (it zeroes `passed`): sending a later one on would overtake them. */
	if (conn->passed)
		return zt_splice_hand_up(&key, conn, len);
	peer.cookie = conn->peer_cookie;
	peer_sk = bpf_map_lookup_elem(&zt_splice_tx, &peer);
	if (!peer_sk)
		return zt_splice_hand_up(&key, conn, len); /* closed or reset: the proxy sees the error */
	tp = bpf_skc_to_tcp_sock(peer_sk);
	acked = tp ? BPF_CORE_READ(tp, bytes_acked) : 0;
	bpf_sk_release(peer_sk);
	unacked = (__s64)(conn->bytes - (acked - conn->peer_base));
	if (unacked + len > (__s64)conn->window)
		return zt_splice_hand_up(&key, conn, len);
	if (bpf_sk_redirect_hash(skb, &zt_splice_tx, &peer, 0) != SK_PASS)
		return zt_splice_hand_up(&key, conn, len);
	__sync_fetch_and_add(&conn->bytes, len);
	zt_splice_count(ZT_SPLICE_CNT_REDIRECTED);
	return SK_PASS;
}
