"""What kubeadm adds to every cluster and netsim adds too: the cluster DNS. A `coredns`
Deployment's pod in kube-system (label k8s-app=kube-dns, the coredns image, which netsim serves
with its own DNS server, netsim/dns, configured through its environment) behind the `kube-dns`
Service at the 10th address of the service CIDR, ports 53 UDP (dns) and TCP (dns-tcp), as
kubeadm makes them. The kubelets give every pod this address as its nameserver
(/etc/resolv.conf). Pure.
"""

from __future__ import annotations

import json
from dataclasses import replace

from netsim.model import Cluster, Container, Pod, Service, ServicePort
from netsim.topology import dns_ip

NAMESPACE = "kube-system"
DOMAIN = "cluster.local"  # kubeadm's DefaultServiceDNSDomain
IMAGE = "registry.k8s.io/coredns/coredns:v1.11.3"
LABELS = {"k8s-app": "kube-dns"}


def with_cluster_dns(cluster: Cluster, store_endpoints: tuple[str, ...]) -> Cluster:
    """The cluster with its DNS pod and kube-dns Service (unless the file declares them)."""
    from netsim.dns.server import CONFIG_ENV

    ports = (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"))
    container = Container(
        "coredns",
        ports=(53,),
        port_names=(("dns", 53),),
        image=IMAGE,
        args=("-conf", "/etc/coredns/Corefile"),
        env=((CONFIG_ENV, config(cluster, store_endpoints)),),
    )
    pod = Pod("coredns-0", dict(LABELS), (container,), owner="coredns", namespace=NAMESPACE)
    service = Service(
        "kube-dns",
        dict(LABELS),
        tuple(ServicePort(53, 53, proto, name) for name, _, proto in ports),
        cluster_ip=dns_ip(cluster.service_cidr),
        namespace=NAMESPACE,
    )
    pods = [p for p in cluster.pods if p.key != pod.key]
    services = [s for s in cluster.services if s.key != service.key]
    return replace(cluster, pods=[*pods, pod], services=[*services, service])


def config(cluster: Cluster, store_endpoints: tuple[str, ...]) -> str:
    """The DNS server's configuration (netsim/dns/server.py): its zone, the networks it
    answers reverse names for, and the store it follows (reached from the pod, over the
    cluster's network, as CoreDNS reaches the API server)."""
    return json.dumps(
        {
            "domain": DOMAIN,
            "service_cidr": cluster.service_cidr,
            "pod_networks": [cluster.pod_network],
            "port": 53,
            "store": {"endpoints": list(store_endpoints), "netns": ""},
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def resolv_conf(service_cidr: str, namespace: str) -> str:
    """/etc/resolv.conf as the kubelet writes it for dnsPolicy ClusterFirst."""
    search = f"{namespace}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}"
    return f"search {search}\nnameserver {dns_ip(service_cidr)}\noptions ndots:5\n"


def hosts(ip: str, hostname: str) -> str:
    """/etc/hosts as the kubelet writes it (its managed hosts file)."""
    return (
        "# Kubernetes-managed hosts file.\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "fe00::0\tip6-localnet\n"
        "fe00::0\tip6-mcastprefix\n"
        "fe00::1\tip6-allnodes\n"
        "fe00::2\tip6-allrouters\n"
        f"{ip}\t{hostname}\n"
    )
