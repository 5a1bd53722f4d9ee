/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The kernel splice of same-node connections: layouts shared by progs/splice.c and ztunnel-py.
 *
 * Unlike zt_maps.h, nothing here is pinned: the splice maps belong to one daemon process and
 * go away with it (so do the sockets they hold). tools/gen_bpf_types.py reads the ZT_* defines
 * of this header too, and the structs from the BTF of splice.o.
 */
#ifndef ZT_SPLICE_H
#define ZT_SPLICE_H

#include <linux/types.h>

/* Plain integer literals only: the generator reads these with the C preprocessor. */
#define ZT_SPLICE_MAX_SOCKETS 65536 /* two per spliced connection */

/* zt_splice_event: a ring buffer (a power of 2, pages) of zt_splice_key records, one when a
 * socket starts handing data up, so the proxy need not watch spliced sockets for input. */
#define ZT_SPLICE_EVENTS_BYTES 65536

/* zt_splice_stats indexes. */
#define ZT_SPLICE_CNT_REDIRECTED 0  /* an skb sent on by the kernel */
#define ZT_SPLICE_CNT_HANDED_UP 1   /* an skb left to the proxy: peer slow, gone, or unpaired */
#define ZT_SPLICE_CNT_EVENTS_LOST 2 /* zt_splice_event was full: the proxy scans instead */
#define ZT_SPLICE_CNT_MAX 3

/* zt_splice_conns and both sockhashes are keyed by socket cookie (SO_COOKIE). */
struct zt_splice_key {
	__u64 cookie; /* host order */
};
_Static_assert(sizeof(struct zt_splice_key) == 8, "zt_splice_key layout");

/* One per spliced socket (the proxy writes it only while the program does not run on that
 * socket): where its bytes go, how many went, and how far ahead of the peer it may get. */
struct zt_splice_conn {
	__u64 peer_cookie; /* host order: the socket this one's received bytes are sent out of */
	__u64 bytes;       /* host order: bytes received on this socket and sent on (the counter) */
	__u64 passed;      /* host order: bytes handed up to the proxy since it last resumed this
			    * socket; while not 0, everything is handed up (order) */
	__u64 peer_base;   /* host order: the peer's tcpi_bytes_acked that are not from `bytes` */
	__u64 window;      /* host order: most bytes sent on and not yet acknowledged by the peer's
			    * receiver; past it, data stays with the proxy (backpressure) */
};
_Static_assert(sizeof(struct zt_splice_conn) == 40, "zt_splice_conn layout");

#endif /* ZT_SPLICE_H */
