// SPDX-License-Identifier: GPL-2.0
/*
 * netsim's IPIP carrier: RFC 2003 IP-in-IP at tc, for kernels without the ipip module.
 *
 * Attached (cls_bpf, direct action) to a node's underlay interface, it stands in for Calico's
 * tunl0. The node keeps Calico's routes, only with the underlay device in place of tunl0:
 *     <peer block> via <peer node IP> dev eth0 onlink
 * so the kernel routes, resolves the peer node's MAC and builds the Ethernet header itself.
 *
 *   egress:  IPv4 whose destination lies in a peer's block (LPM trie ipip_routes) gets an outer
 *            IPv4 header (protocol 4, TTL 64, DF copied, checksum set) between the Ethernet and
 *            the inner IP header. BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 marks GSO packets as IPXIP4, so
 *            TSO/GSO traffic is segmented correctly after encapsulation.
 *   ingress: IPv4 protocol 4 from a known peer node (hash ipip_peers) to this node (ipip_config)
 *            loses its outer header; the kernel then routes the inner packet to the pod.
 * Everything else passes untouched. The pod MTU must leave room for 20 bytes, as with tunl0.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* Added in Linux 6.3 (clears SKB_GSO_IPXIP4 on decap); the 6.1 uapi headers lack it. */
#define NETSIM_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define IP_DF_BIT 0x4000
#define IP_MF_OFFSET 0x3fff
#define OUTER_LEN ((int)sizeof(struct iphdr))

struct route_key {
	__u32 prefixlen;
	__be32 addr;
};

struct route {
	__be32 remote; /* outer destination: the peer node's IP */
	__be32 local;  /* outer source: this node's IP */
};

struct config {
	__be32 local;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct route_key);
	__type(value, struct route);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipip_routes SEC(".maps");

/* peer node IP -> number of blocks routed to it; ingress only accepts these sources */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32);
	__uint(max_entries, 16384);
} ipip_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct config);
	__uint(max_entries, 1);
} ipip_config SEC(".maps");

static __always_inline __u16 ip_checksum(const struct iphdr *ip)
{
	const __u16 *word = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < OUTER_LEN / 2; i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

SEC("tc")
int ipip_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *inner = data + sizeof(*eth);

	if ((void *)(inner + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;

	struct route_key key = { .prefixlen = 32, .addr = inner->daddr };
	struct route *route = bpf_map_lookup_elem(&ipip_routes, &key);

	if (!route)
		return TC_ACT_OK;

	struct iphdr outer = {
		.version = 4,
		.ihl = 5,
		.tos = inner->tos,
		.tot_len = bpf_htons(skb->len - sizeof(*eth) + OUTER_LEN),
		.id = bpf_htons(bpf_get_prandom_u32() & 0xffff),
		.frag_off = inner->frag_off & bpf_htons(IP_DF_BIT),
		.ttl = 64,
		.protocol = IPPROTO_IPIP,
		.saddr = route->local,
		.daddr = route->remote,
	};
	outer.check = ip_checksum(&outer);

	/* a pod packet that cannot be tunnelled must not leak onto the underlay unencapsulated */
	if (bpf_skb_adjust_room(skb, OUTER_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(*eth), &outer, OUTER_LEN, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int ipip_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = data + sizeof(*eth);
	__u32 zero = 0;

	if ((void *)(outer + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	/* options or fragments: leave to the kernel (as a host without the module would) */
	if (outer->protocol != IPPROTO_IPIP || outer->ihl != 5 ||
	    (outer->frag_off & bpf_htons(IP_MF_OFFSET)))
		return TC_ACT_OK;

	struct config *cfg = bpf_map_lookup_elem(&ipip_config, &zero);

	if (!cfg || outer->daddr != cfg->local)
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&ipip_peers, &outer->saddr))
		return TC_ACT_OK;

	/* before 6.3 the DECAP flag is unknown (EINVAL): decap without it */
	if (bpf_skb_adjust_room(skb, -OUTER_LEN, BPF_ADJ_ROOM_MAC, NETSIM_ADJ_ROOM_DECAP_L3_IPV4) &&
	    bpf_skb_adjust_room(skb, -OUTER_LEN, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
