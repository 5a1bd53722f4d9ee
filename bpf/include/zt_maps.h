/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The contract between the BPF programs and ztunnel-py: constants, map layouts, map definitions.
 *
 * tools/gen_bpf_types.py turns the BTF of the compiled objects (and the ZT_* defines below) into
 * ztunnel_py/bpf/_types.py, so Python never carries a hand-written copy of these layouts.
 * Rules: fixed-width types only, padding is explicit and named, every field states its byte
 * order, every struct size is asserted. IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d)
 * wherever a field holds "an address", so one key type serves both families.
 * Changing any layout or meaning here means bumping ZT_ABI_VERSION: pinned maps from an older
 * daemon are then refused instead of silently misread.
 */
#ifndef ZT_MAPS_H
#define ZT_MAPS_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Plain integer literals only: the generator reads these with the C preprocessor. */
#define ZT_ABI_VERSION 2

/* In-pod listener ports (ztunnel's, host byte order). */
#define ZT_PORT_OUTBOUND 15001
#define ZT_PORT_INBOUND_PLAINTEXT 15006
#define ZT_PORT_HBONE 15008
#define ZT_PORT_DNS 15053
#define ZT_PORT_DNS_SERVER 53

#define ZT_AF_INET 2
#define ZT_AF_INET6 10
/* The loopback device is the first device of every network namespace. */
#define ZT_LOOPBACK_IFINDEX 1

/* zt_pods.flags */
#define ZT_POD_CAPTURE_OUTBOUND 0x1
#define ZT_POD_CAPTURE_INBOUND 0x2

/* zt_dst.kind and zt_orig_dst.kind: why a destination is captured. */
#define ZT_DST_WORKLOAD 1
#define ZT_DST_SERVICE 2
#define ZT_DST_DNS 3 /* zt_sk_orig only: a DNS socket sent to the pod's :15053 */
#define ZT_DST_ON_DEMAND 4 /* zt_sk_orig only: unknown to the maps, captured for an xDS lookup */

/* zt_sk_orig.flags */
#define ZT_ORIG_PUBLISHED 0x1 /* an entry for this socket is in zt_orig_dst */

/* zt_cfg.flags */
#define ZT_CFG_VALID 0x1 /* written by the loader; a zeroed entry means "not configured" */
#define ZT_CFG_DNS_CAPTURE 0x2 /* enrolled pods' port-53 traffic goes to their DNS proxy */
#define ZT_CFG_IPV4_ONLY 0x4 /* IPV6_ENABLED=false: IPv6 traffic is never captured */
/* XDS_ON_DEMAND: a destination the maps do not know goes to the proxy too, which asks istiod
 * for it and then tunnels or passes it through (what istio-cni's iptables rules do). */
#define ZT_CFG_CAPTURE_UNKNOWN 0x8
/* TRANSPARENT_NETWORK_POLICIES: TCP from a source port in [ZT_HBONE_SPORT_MIN,
 * ZT_HBONE_SPORT_MAX] is HBONE sent to an application's own port; it goes to :15008. */
#define ZT_CFG_TRANSPARENT_HBONE 0x10
#define ZT_HBONE_SPORT_MIN 15100
#define ZT_HBONE_SPORT_MAX 15199

/* zt_deny.action */
#define ZT_DENY_DROP 1

/* zt_counters indexes. */
#define ZT_CNT_OUT_REDIRECTED 0       /* connect() rewritten to the pod's :15001 */
#define ZT_CNT_OUT_PASSTHROUGH 1      /* enrolled pod, destination outside the mesh */
#define ZT_CNT_OUT_PROXY_SKIPPED 2    /* socket carries the proxy mark */
#define ZT_CNT_OUT_LOCAL_SKIPPED 3    /* destination is one of the pod's own addresses */
#define ZT_CNT_OUT_ORIG_STORE_FAILED 4 /* redirected, but no socket storage for the original */
#define ZT_CNT_ORIG_PUBLISHED 5       /* original destination published for the proxy */
#define ZT_CNT_ORIG_PUBLISH_FAILED 6  /* zt_orig_dst update failed */
#define ZT_CNT_IN_REDIRECTED 7        /* inbound connection assigned to the pod's :15006 */
#define ZT_CNT_IN_PASSTHROUGH 8       /* inbound to a proxy port or from the probe address */
#define ZT_CNT_IN_DROPPED_DENY 9      /* inbound refused by a kernel DENY rule */
#define ZT_CNT_IN_DROPPED_NO_LISTENER 10 /* enrolled pod without a :15006 listener (fail closed) */
#define ZT_CNT_IN_ASSIGN_FAILED 11    /* bpf_sk_assign refused the listener (dropped) */
#define ZT_CNT_IN_LOCAL_SKIPPED 12    /* from the pod to itself (e.g. the proxy to the app) */
#define ZT_CNT_IN_HBONE_REDIRECTED 13 /* HBONE on an app port assigned to the pod's :15008 */
#define ZT_CNT_MAX 14

#define ZT_MAX_PODS 8192
#define ZT_MAX_DESTINATIONS 131072
#define ZT_MAX_CIDR_DESTINATIONS 16384
#define ZT_MAX_LOCAL_ADDRS 32768
#define ZT_MAX_DENY_RULES 65536
#define ZT_MAX_ORIG_DST 131072
#define ZT_MAX_ORIG_SRC 65536

/* zt_cfg[0]: daemon-wide settings, written once at start. */
struct zt_cfg {
	__u32 flags;      /* host order, ZT_CFG_* */
	__u32 mark;       /* host order: SO_MARK of the proxy's own sockets (0x539) */
	__u32 mark_mask;  /* host order: bits of the mark that identify them (0xfff) */
	__u32 probe_ip4;  /* network order: kubelet probe source, never captured inbound */
	__u8 probe_ip6[16]; /* network order: the same for IPv6 */
};
_Static_assert(sizeof(struct zt_cfg) == 32, "zt_cfg layout");

/* zt_version[0]: the ABI of whoever created the pinned maps. */
struct zt_version {
	__u32 abi_version; /* host order, ZT_ABI_VERSION */
	__u8 pad[4];
};
_Static_assert(sizeof(struct zt_version) == 8, "zt_version layout");

/* zt_pods: enrolled pods, keyed by the netns cookie. Written last on enroll, removed first. */
struct zt_pod_key {
	__u64 netns_cookie; /* host order, bpf_get_netns_cookie() / SO_NETNS_COOKIE */
};
_Static_assert(sizeof(struct zt_pod_key) == 8, "zt_pod_key layout");

struct zt_pod {
	__u32 flags; /* host order, ZT_POD_* */
	__u8 pad[4];
};
_Static_assert(sizeof(struct zt_pod) == 8, "zt_pod layout");

/* zt_dst: mesh destinations. A workload IP has port 0 (every port); a service VIP one entry per
 * service port. */
struct zt_dst_key {
	__u8 addr[16]; /* network order, IPv4 as ::ffff:a.b.c.d */
	__u16 port;    /* network order; 0 = every port */
	__u8 pad[2];
};
_Static_assert(sizeof(struct zt_dst_key) == 20, "zt_dst_key layout");

struct zt_dst {
	__u32 kind; /* host order, ZT_DST_* */
};
_Static_assert(sizeof(struct zt_dst) == 4, "zt_dst layout");

/* zt_dst_cidr: service CIDR VIPs (an xDS address with a prefix length), as an LPM trie, looked
 * up when zt_dst has no entry. The prefix covers the port (16 bits), then the address: 16 + 96 + n
 * for an IPv4 /n (stored IPv4-mapped), 16 + n for an IPv6 /n. Port 0 = every port. Any match
 * captures; which service serves the address (longest prefix, client's namespace) is the proxy's
 * decision. */
struct zt_dst_cidr_key {
	__u32 prefixlen; /* host order, bits of the fields below that must match */
	__u16 port;      /* network order; 0 = every port */
	__u8 addr[16];   /* network order, IPv4 as ::ffff:a.b.c.d */
	__u8 pad[2];
};
_Static_assert(sizeof(struct zt_dst_cidr_key) == 24, "zt_dst_cidr_key layout");

/* zt_local: each enrolled pod's own addresses. Outbound, traffic to them stays local, as with
 * istio-cni's "! -d 127.0.0.1/32 -o lo -j ACCEPT". Inbound, a connection from one of them is the
 * pod talking to itself (the proxy to the application included) and is never steered. */
struct zt_local_key {
	__u64 netns_cookie; /* host order */
	__u8 addr[16];      /* network order, IPv4 as ::ffff:a.b.c.d */
};
_Static_assert(sizeof(struct zt_local_key) == 24, "zt_local_key layout");

struct zt_local {
	__u32 reserved; /* always 0 */
};
_Static_assert(sizeof(struct zt_local) == 4, "zt_local layout");

/* zt_orig_src: the proxy's own connections to a pod's application from a client's address
 * (ENABLE_ORIG_SRC), while they connect. Their SYN looks like a client's, so sk_lookup would
 * steer it back to the proxy's :15006; the proxy lists its bound (address, port) here between
 * bind and connect, and sk_lookup lets those through. */
struct zt_orig_src_key {
	__u64 netns_cookie; /* host order */
	__u8 addr[16];      /* network order, IPv4 as ::ffff:a.b.c.d: the spoofed source */
	__u16 port;         /* network order: its bound port */
	__u8 pad[6];        /* always 0 */
};
_Static_assert(sizeof(struct zt_orig_src_key) == 32, "zt_orig_src_key layout");

struct zt_orig_src {
	__u32 reserved; /* always 0 */
};
_Static_assert(sizeof(struct zt_orig_src) == 4, "zt_orig_src layout");

/* zt_deny: kernel-enforceable DENY rules of a pod's workload, as an LPM trie. The prefix always
 * covers the netns cookie (64 bits) and the port (16 bits); a rule with a source network adds
 * the family (8 bits) and the network's bits: prefixlen 80 without a source, 88 + n for an
 * IPv4 or IPv6 /n. The family keeps IPv4 and IPv6 rules apart (an IPv6 ::/0 must not match IPv4
 * sources). Port 0 = every destination port. Any match drops: which entry is "longest" never
 * matters. */
struct zt_deny_key {
	__u32 prefixlen;       /* host order, bits of the fields below that must match */
	__u32 netns_cookie_lo; /* host order, low 32 bits of the netns cookie */
	__u32 netns_cookie_hi; /* host order, high 32 bits */
	__u16 port;            /* network order; 0 = every port */
	__u8 family;           /* ZT_AF_INET or ZT_AF_INET6 (0 when prefixlen is 80) */
	__u8 addr[16];         /* network order; IPv4 in the first 4 bytes, the rest zero */
	__u8 pad[1];
};
_Static_assert(sizeof(struct zt_deny_key) == 32, "zt_deny_key layout");

struct zt_deny {
	__u32 action; /* host order, ZT_DENY_DROP */
};
_Static_assert(sizeof(struct zt_deny) == 4, "zt_deny layout");

/* zt_sk_orig: per-socket storage, the destination the application dialled. */
struct zt_sk_orig {
	__u8 addr[16];       /* network order, IPv4 as ::ffff:a.b.c.d */
	__u16 port;          /* network order */
	__u8 family;         /* ZT_AF_INET or ZT_AF_INET6: the family on the wire */
	__u8 kind;           /* ZT_DST_* */
	__u16 published_port; /* network order, local port of the zt_orig_dst entry */
	__u8 flags;          /* ZT_ORIG_* */
	__u8 pad[1];
};
_Static_assert(sizeof(struct zt_sk_orig) == 24, "zt_sk_orig layout");

/* zt_orig_dst: what the proxy reads for an accepted :15001 connection. */
struct zt_orig_key {
	__u64 netns_cookie; /* host order */
	__u16 port;         /* network order: the application's source port = the proxy's peer port */
	__u8 family;        /* ZT_AF_INET or ZT_AF_INET6, the family on the wire */
	__u8 pad[5];
};
_Static_assert(sizeof(struct zt_orig_key) == 16, "zt_orig_key layout");

struct zt_orig {
	__u8 addr[16]; /* network order, IPv4 as ::ffff:a.b.c.d */
	__u16 port;    /* network order */
	__u8 family;   /* ZT_AF_INET or ZT_AF_INET6 */
	__u8 kind;     /* ZT_DST_* */
};
_Static_assert(sizeof(struct zt_orig) == 20, "zt_orig layout");

/* Every map is pinned by name under <pin path>/maps, so all objects (and a restarted daemon)
 * share one instance of each. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct zt_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct zt_version);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_version SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZT_MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_pod_key);
	__type(value, struct zt_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZT_MAX_DESTINATIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_dst_key);
	__type(value, struct zt_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, ZT_MAX_CIDR_DESTINATIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_dst_cidr_key);
	__type(value, struct zt_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_dst_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZT_MAX_LOCAL_ADDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_local_key);
	__type(value, struct zt_local);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZT_MAX_ORIG_SRC);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_orig_src_key);
	__type(value, struct zt_orig_src);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_orig_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, ZT_MAX_DENY_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct zt_deny_key);
	__type(value, struct zt_deny);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_deny SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct zt_sk_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_sk_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ZT_MAX_ORIG_DST);
	__type(key, struct zt_orig_key);
	__type(value, struct zt_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_orig_dst SEC(".maps");

/* The pod's :15006 listener (dual-stack [::]:15006, or 0.0.0.0 on IPv4-only pods), keyed by the
 * pod's netns cookie. Userspace writes the socket fd; a closed listener drops out by itself. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, ZT_MAX_PODS);
	__type(key, struct zt_pod_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_inbound_sk SEC(".maps");

/* The pod's :15008 listener, by netns cookie: HBONE arriving on an application's port
 * (ZT_CFG_TRANSPARENT_HBONE) is assigned to it. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, ZT_MAX_PODS);
	__type(key, struct zt_pod_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_hbone_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_counters SEC(".maps");

#endif /* ZT_MAPS_H */
