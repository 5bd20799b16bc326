"""Cluster DNS: the zone's answers record kind by record kind (pure: queries in, responses out),
then the server itself in a throwaway namespace, asked by Debian's dig and nslookup, and the
`python -m netsim.dns` process following a real etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import ROOT, needs_root, wait_for

from netsim.dns.server import ClusterDns, DnsServer, load_config, wire
from netsim.dns.zone import Zone, not_ready, reverse_zones
from netsim.errors import TopologyError
from netsim.kernel import netns as nsmod
from netsim.store.client import KeyValue

SOA = (
    "cluster.local. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 30"
)


def service(name: str, cluster_ip: str, ports=(), namespace="default", **spec) -> dict:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, **spec.pop("meta", {})},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "ports": list(ports), **spec},
    }


def port(number: int, name: str = "", protocol: str = "TCP") -> dict:
    return {"port": number, "protocol": protocol, **({"name": name} if name else {})}


def address(ip: str, hostname: str = "") -> dict:
    entry = {"ip": ip, "nodeName": "worker-1", "targetRef": {"kind": "Pod", "name": f"p{ip}"}}
    return {**entry, **({"hostname": hostname} if hostname else {})}


def endpoints(*subsets: dict) -> dict:
    return {"kind": "Endpoints", "subsets": list(subsets)}


def subset(addresses, ports, not_ready=()) -> dict:
    found = {"addresses": list(addresses), "ports": list(ports)}
    return {**found, **({"notReadyAddresses": list(not_ready)} if not_ready else {})}


TOLERATE = {"annotations": {"service.alpha.kubernetes.io/tolerate-unready-endpoints": "true"}}
SERVICES = {
    "default/web": service("web", "10.96.0.20", [port(80, "http"), port(81)]),
    "default/db": service("db", "None", [port(5432, "pg")]),
    "default/db-all": service("db-all", "None", [port(5432, "pg")], meta=TOLERATE),
    "default/db-pub": service("db-pub", "None", [port(5432, "pg")], publishNotReadyAddresses=True),
    "default/empty": service("empty", "None", [port(80, "http")]),
    "default/ext": service("ext", "", type="ExternalName", externalName="example.com"),
    "default/alias": service(
        "alias", "", type="ExternalName", externalName="web.default.svc.cluster.local"
    ),
    "kube-system/kube-dns": service(
        "kube-dns", "10.96.0.10", [port(53, "dns", "UDP"), port(53, "dns-tcp")], "kube-system"
    ),
}
DB = subset(
    [address("10.244.1.6", "db-0"), address("10.244.2.7")],
    [port(5432, "pg")],
    not_ready=[address("10.244.3.8")],
)
ENDPOINTS = {
    "default/web": endpoints(
        subset([address("10.244.1.5")], [port(9376, "http")]),
        subset([address("10.244.1.5")], [port(9377)]),
    ),
    "default/db": endpoints(DB),
    "default/db-all": endpoints(DB),
    "default/db-pub": endpoints(DB),
    "default/empty": endpoints(subset([], [port(80, "http")], not_ready=[address("10.244.9.9")])),
}


@pytest.fixture(scope="module")
def zone() -> Zone:
    return Zone.from_view(SERVICES, ENDPOINTS, serial=7)


def ask(zone: Zone, name: str, rdtype: str = "A", **kw) -> dns.message.Message:
    response = zone.answer(dns.message.make_query(name, rdtype, **kw))
    assert response is not None
    return response


def rdatas(response: dns.message.Message, section: str = "answer") -> list[str]:
    """Every record of a section as `<owner> <type> <rdata>` (TTL aside), sorted."""
    return sorted(
        f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rdata}"
        for rrset in getattr(response, section)
        for rdata in rrset
    )


def rcode(response: dns.message.Message) -> str:
    return dns.rcode.to_text(response.rcode())


# -- services ------------------------------------------------------------------------------------


def test_cluster_ip_service_is_its_cluster_ip(zone):
    response = ask(zone, "web.default.svc.cluster.local")
    assert rcode(response) == "NOERROR"
    assert response.flags & dns.flags.AA
    assert response.flags & dns.flags.RA  # CoreDNS forwards the rest: recursion available
    assert rdatas(response) == ["web.default.svc.cluster.local. A 10.96.0.20"]
    assert response.answer[0].ttl == 30
    assert ask(zone, "kube-dns.kube-system.svc.cluster.local").answer[0][0].address == "10.96.0.10"


def test_headless_service_is_its_ready_addresses(zone):
    assert rdatas(ask(zone, "db.default.svc.cluster.local")) == [
        "db.default.svc.cluster.local. A 10.244.1.6",
        "db.default.svc.cluster.local. A 10.244.2.7",
    ]


@pytest.mark.parametrize("name", ["db-all", "db-pub"])
def test_headless_service_that_tolerates_unready_has_them_too(zone, name):
    """The annotation, or spec.publishNotReadyAddresses: notReadyAddresses are served."""
    answer = ask(zone, f"{name}.default.svc.cluster.local").answer[0]
    assert sorted(r.address for r in answer) == ["10.244.1.6", "10.244.2.7", "10.244.3.8"]
    assert ask(zone, f"10-244-3-8.{name}.default.svc.cluster.local").answer


def test_headless_service_without_ready_endpoints_does_not_exist(zone):
    """The spec: NXDOMAIN when a headless Service has no ready endpoint (a not-ready one
    does not count), its SRV names too."""
    for name, rdtype in (
        ("empty.default.svc.cluster.local", "A"),
        ("empty.default.svc.cluster.local", "AAAA"),
        ("_http._tcp.empty.default.svc.cluster.local", "SRV"),
        ("10-244-9-9.empty.default.svc.cluster.local", "A"),
    ):
        assert rcode(ask(zone, name, rdtype)) == "NXDOMAIN", name


def test_endpoint_hostnames_given_or_made_from_the_ip(zone):
    assert rdatas(ask(zone, "db-0.db.default.svc.cluster.local")) == [
        "db-0.db.default.svc.cluster.local. A 10.244.1.6"
    ]
    assert rdatas(ask(zone, "10-244-2-7.db.default.svc.cluster.local")) == [
        "10-244-2-7.db.default.svc.cluster.local. A 10.244.2.7"
    ]
    # not ready, and the Service does not tolerate it: no name
    assert rcode(ask(zone, "10-244-3-8.db.default.svc.cluster.local")) == "NXDOMAIN"
    # CoreDNS names the endpoints of ClusterIP Services as well
    assert rdatas(ask(zone, "10-244-1-5.web.default.svc.cluster.local")) == [
        "10-244-1-5.web.default.svc.cluster.local. A 10.244.1.5"
    ]


def test_external_name_is_a_cname(zone):
    for rdtype in ("A", "CNAME", "AAAA"):
        response = ask(zone, "ext.default.svc.cluster.local", rdtype)
        assert rcode(response) == "NOERROR"
        assert rdatas(response) == ["ext.default.svc.cluster.local. CNAME example.com."]
    # a target inside the zone is followed, as CoreDNS follows it
    assert rdatas(ask(zone, "alias.default.svc.cluster.local")) == [
        "alias.default.svc.cluster.local. CNAME web.default.svc.cluster.local.",
        "web.default.svc.cluster.local. A 10.96.0.20",
    ]


# -- SRV -----------------------------------------------------------------------------------------


def test_srv_of_a_named_port_of_a_cluster_ip_service(zone):
    response = ask(zone, "_http._tcp.web.default.svc.cluster.local", "SRV")
    assert rdatas(response) == [
        "_http._tcp.web.default.svc.cluster.local. SRV 0 100 80 web.default.svc.cluster.local."
    ]
    assert rdatas(response, "additional") == ["web.default.svc.cluster.local. A 10.96.0.20"]
    udp = ask(zone, "_dns._udp.kube-dns.kube-system.svc.cluster.local", "SRV")
    assert [str(r) for r in udp.answer[0]] == ["0 100 53 kube-dns.kube-system.svc.cluster.local."]


def test_srv_of_a_headless_service_names_each_endpoint(zone):
    response = ask(zone, "_pg._tcp.db.default.svc.cluster.local", "SRV")
    srv = "_pg._tcp.db.default.svc.cluster.local. SRV 0 50 5432"
    assert rdatas(response) == [
        f"{srv} 10-244-2-7.db.default.svc.cluster.local.",
        f"{srv} db-0.db.default.svc.cluster.local.",
    ]
    assert rdatas(response, "additional") == [
        "10-244-2-7.db.default.svc.cluster.local. A 10.244.2.7",
        "db-0.db.default.svc.cluster.local. A 10.244.1.6",
    ]


def test_srv_only_for_named_ports_and_their_protocol(zone):
    """Port 81 has no name: no _<anything>._tcp name has it; a named port is not under another
    protocol's label."""
    for name in (
        "_81._tcp.web.default.svc.cluster.local",
        "_._tcp.web.default.svc.cluster.local",
        "_http._udp.web.default.svc.cluster.local",
        "_dns._tcp.kube-dns.kube-system.svc.cluster.local",
    ):
        assert rcode(ask(zone, name, "SRV")) == "NXDOMAIN", name
    ports = {r.port for r in ask(zone, "web.default.svc.cluster.local", "SRV").answer[0]}
    assert ports == {80, 81}  # CoreDNS: SRV at the Service's own name lists every port


# -- PTR -----------------------------------------------------------------------------------------


def test_ptr_of_a_cluster_ip_and_of_endpoints(zone):
    assert rdatas(ask(zone, "20.0.96.10.in-addr.arpa", "PTR")) == [
        "20.0.96.10.in-addr.arpa. PTR web.default.svc.cluster.local."
    ]
    # a pod behind two headless Services and nothing else has a name in each
    assert rdatas(ask(zone, "6.1.244.10.in-addr.arpa", "PTR")) == [
        "6.1.244.10.in-addr.arpa. PTR db-0.db-all.default.svc.cluster.local.",
        "6.1.244.10.in-addr.arpa. PTR db-0.db-pub.default.svc.cluster.local.",
        "6.1.244.10.in-addr.arpa. PTR db-0.db.default.svc.cluster.local.",
    ]
    assert rdatas(ask(zone, "5.1.244.10.in-addr.arpa", "PTR")) == [
        "5.1.244.10.in-addr.arpa. PTR 10-244-1-5.web.default.svc.cluster.local."
    ]


def test_reverse_names_in_our_cidrs_without_a_record_do_not_exist(zone):
    response = ask(zone, "9.9.244.10.in-addr.arpa", "PTR")
    assert rcode(response) == "NXDOMAIN" and response.flags & dns.flags.AA
    assert rdatas(response, "authority") == [
        "244.10.in-addr.arpa. SOA ns.dns.244.10.in-addr.arpa. hostmaster.244.10.in-addr.arpa. "
        "7 7200 1800 86400 30"
    ]
    assert rcode(ask(zone, "1.0.100.10.in-addr.arpa", "PTR")) == "NXDOMAIN"  # in 10.96/12
    assert rcode(ask(zone, "1.244.10.in-addr.arpa", "PTR")) == "NXDOMAIN"  # not a full address


def test_reverse_zones_split_on_octets():
    zones = [z.to_text() for z in reverse_zones("10.96.0.0/12")]
    assert zones == [f"{n}.10.in-addr.arpa." for n in range(96, 112)]
    assert [z.to_text() for z in reverse_zones("10.244.0.0/16")] == ["244.10.in-addr.arpa."]
    assert [z.to_text() for z in reverse_zones("192.168.1.0/24")] == ["1.168.192.in-addr.arpa."]


# -- the rest of the zone --------------------------------------------------------------------------


def test_dns_version(zone):
    response = ask(zone, "dns-version.cluster.local", "TXT")
    assert rdatas(response) == ['dns-version.cluster.local. TXT "1.1.0"']


def test_pod_records_pods_insecure(zone):
    assert rdatas(ask(zone, "10-244-1-9.default.pod.cluster.local")) == [
        "10-244-1-9.default.pod.cluster.local. A 10.244.1.9"
    ]
    assert rcode(ask(zone, "10-244-1-9.default.pod.cluster.local", "AAAA")) == "NOERROR"
    for name in ("10-244-1.default.pod.cluster.local", "10-244-1-999.default.pod.cluster.local"):
        assert rcode(ask(zone, name)) == "NXDOMAIN", name
    assert rcode(ask(zone, "10-244-1-9.no-such-ns.pod.cluster.local")) == "NXDOMAIN"


def test_a_name_without_that_type_is_nodata_with_the_soa(zone):
    for name, rdtype in (
        ("web.default.svc.cluster.local", "AAAA"),  # IPv4-only cluster
        ("web.default.svc.cluster.local", "TXT"),
        ("db.default.svc.cluster.local", "MX"),
        ("default.svc.cluster.local", "A"),  # a namespace
        ("cluster.local", "A"),  # the apex
    ):
        response = ask(zone, name, rdtype)
        assert rcode(response) == "NOERROR" and not response.answer, (name, rdtype)
        assert response.flags & dns.flags.AA
        assert [rrset.to_text() for rrset in response.authority] == [SOA]


def test_a_name_that_does_not_exist_is_nxdomain_with_the_soa(zone):
    for name in (
        "nope.default.svc.cluster.local",
        "web.other.svc.cluster.local",
        "no-such-ns.svc.cluster.local",
        "x.y.web.default.svc.cluster.local",
        "something.cluster.local",
    ):
        response = ask(zone, name)
        assert rcode(response) == "NXDOMAIN", name
        assert [rrset.to_text() for rrset in response.authority] == [SOA]


def test_names_outside_our_zones_are_refused(zone):
    """No upstream: nothing is forwarded, nothing is answered for the rest of the world."""
    for name, rdtype in (
        ("example.com", "A"),
        ("local", "SOA"),
        ("1.1.1.1.in-addr.arpa", "PTR"),
        ("1.0.128.10.in-addr.arpa", "PTR"),  # 10.128.0.1: outside 10.96/12 and 10.244/16
    ):
        response = ask(zone, name, rdtype)
        assert rcode(response) == "REFUSED", name
        assert not response.flags & dns.flags.AA and not response.answer


def test_names_are_case_insensitive_and_the_question_keeps_its_case(zone):
    response = ask(zone, "WeB.DeFault.SVC.Cluster.LOCAL")
    assert response.question[0].name.to_text() == "WeB.DeFault.SVC.Cluster.LOCAL."
    assert [r.address for r in response.answer[0]] == ["10.96.0.20"]
    wire_form = response.to_wire()
    assert b"\x03WeB\x07DeFault" in wire_form  # the question as asked, on the wire too
    srv = ask(zone, "_HTTP._TCP.web.default.svc.cluster.local", "SRV")
    assert srv.answer[0][0].port == 80


def test_soa_at_the_apex(zone):
    assert [r.to_text() for r in ask(zone, "cluster.local", "SOA").answer] == [SOA]


def test_wire_in_wire_out(zone):
    query = dns.message.make_query("web.default.svc.cluster.local", "A")
    response = zone.answer(query.to_wire())
    assert response.id == query.id and response.answer
    garbled = zone.answer(query.to_wire()[:12] + b"\x07broken")
    assert rcode(garbled) == "FORMERR" and garbled.id == query.id
    assert zone.answer(b"\x00\x01") is None  # not even a header
    assert zone.answer(response.to_wire()) is None  # a response is never answered
    assert rcode(not_ready(query.to_wire())) == "SERVFAIL"


def test_udp_answers_over_512_bytes_without_edns_are_truncated():
    big = {"default/big": service("big", "None", [port(80, "http")])}
    eps = {
        "default/big": endpoints(
            subset([address(f"10.244.0.{i}") for i in range(1, 101)], [port(80, "http")])
        )
    }
    zone = Zone.from_view(big, eps)
    plain = dns.message.from_wire(wire(ask(zone, "big.default.svc.cluster.local"), tcp=False))
    assert plain.flags & dns.flags.TC and len(plain.to_wire()) <= 512
    edns = ask(zone, "big.default.svc.cluster.local", use_edns=0, payload=4096)
    full = dns.message.from_wire(wire(edns, tcp=False))
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 100
    over_tcp = wire(ask(zone, "big.default.svc.cluster.local"), tcp=True)
    assert len(dns.message.from_wire(over_tcp[2:]).answer[0]) == 100


def test_ten_thousand_endpoints():
    big = {"default/big": service("big", "None", [port(80, "http")])}
    addresses = [address(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(10_000)]
    zone = Zone.from_view(big, {"default/big": endpoints(subset(addresses, [port(80, "http")]))})
    assert len(zone.names["big.default.svc.cluster.local."].a) == 10_000
    assert rdatas(ask(zone, "10-244-39-250.big.default.svc.cluster.local")) == [
        "10-244-39-250.big.default.svc.cluster.local. A 10.244.39.250"
    ]


# -- the daemon and its configuration ------------------------------------------------------------


def test_the_daemon_builds_the_zone_from_the_store_view():
    def kv(key: str, obj: dict) -> KeyValue:
        return KeyValue(key, json.dumps(obj).encode(), 1, 1)

    view = {
        "/registry/services/": {
            k: kv(k, o)
            for k, o in (
                ("/registry/services/specs/default/web", SERVICES["default/web"]),
                ("/registry/services/endpoints/default/web", ENDPOINTS["default/web"]),
            )
        }
    }
    server = DnsServer(None)
    lines: list[str] = []
    daemon = ClusterDns(server, log=lines.append)
    daemon.sync(view)
    assert rdatas(ask(server.zone, "10-244-1-5.web.default.svc.cluster.local"))
    assert len(lines) == 1 and lines[0].startswith("dns: zone rebuilt: 1 services, 1 endpoints")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"service_cidr": "10.96.0.1/12"}, "service_cidr"),
        ({"pod_networks": ["banana"]}, "pod_networks[0]"),
        ({"port": 70000}, "port"),
        ({"domain": "cluster..local"}, "domain"),
        ({"listen_netns": "netsim-test-no-such-ns"}, "listen_netns"),
        ({"store": {"endpoints": []}}, "store.endpoints"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_config_error_names_its_field(tmp_path, change, field):
    config = {
        "domain": "cluster.local",
        "service_cidr": "10.96.0.0/12",
        "pod_networks": ["10.244.0.0/16"],
        "port": 53,
        "store": {"endpoints": ["http://127.0.0.1:2379"], "netns": ""},
        **change,
    }
    path = tmp_path / "dns.json"
    path.write_text(json.dumps(config))
    with pytest.raises(TopologyError) as caught:
        load_config(str(path))
    assert caught.value.field == field and caught.value.exit_code == 2


def test_a_config_error_is_one_line_and_exit_status_2(tmp_path):
    path = tmp_path / "dns.json"
    path.write_text(json.dumps({"port": "fifty-three", "store": {"endpoints": ["http://x"]}}))
    result = subprocess.run(
        [sys.executable, "-m", "netsim.dns", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "port" in result.stderr


# -- the real server -----------------------------------------------------------------------------


@pytest.fixture
def pod_netns():
    """A throwaway namespace with lo up, as a pod's: removed whatever happens."""
    name = f"netsim-test-dns-{uuid.uuid4().hex[:6]}"
    nsmod.create(name)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        nsmod.remove(name)


def run_in(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=20
    )


def dig(netns: str, *args: str) -> str:
    result = run_in(netns, "dig", "@127.0.0.1", "+time=2", "+tries=1", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_root
def test_the_server_answers_dig_and_nslookup_in_a_namespace(pod_netns):
    big = {"default/big": service("big", "None", [port(80, "http")])}
    eps = {
        "default/big": endpoints(
            subset([address(f"10.244.5.{i}") for i in range(1, 101)], [port(80, "http")])
        )
    }
    zone = Zone.from_view({**SERVICES, **big}, {**ENDPOINTS, **eps})
    server = DnsServer(zone, 53, pod_netns, log=lambda line: None)
    server.start()
    try:
        assert dig(pod_netns, "+short", "web.default.svc.cluster.local").split() == ["10.96.0.20"]
        assert dig(pod_netns, "+tcp", "+short", "web.default.svc.cluster.local").split() == [
            "10.96.0.20"
        ]
        assert dig(pod_netns, "+short", "SRV", "_http._tcp.web.default.svc.cluster.local").split(
            "\n"
        )[0] == ("0 100 80 web.default.svc.cluster.local.")
        missing = dig(pod_netns, "nope.default.svc.cluster.local")
        assert "status: NXDOMAIN" in missing and "flags: qr aa rd" in missing
        assert "status: REFUSED" in dig(pod_netns, "example.com")
        assert dig(pod_netns, "+short", "-x", "10.96.0.20").split() == [
            "web.default.svc.cluster.local."
        ]
        # 100 addresses do not fit 512 bytes: dig sees TC over UDP and asks again over TCP
        assert (
            len(dig(pod_netns, "+noedns", "+short", "big.default.svc.cluster.local").split()) == 100
        )
        truncated = dig(pod_netns, "+noedns", "+ignore", "big.default.svc.cluster.local")
        assert "flags: qr aa tc rd" in truncated
        looked_up = run_in(
            pod_netns,
            "nslookup",
            "-timeout=2",
            "-retry=1",
            "web.default.svc.cluster.local",
            "127.0.0.1",
        )
        assert looked_up.returncode == 0, looked_up.stdout + looked_up.stderr
        assert "Address: 10.96.0.20" in looked_up.stdout
        # a new zone is served from the next query on
        server.zone = Zone.from_view({}, {})
        assert "status: NXDOMAIN" in dig(pod_netns, "web.default.svc.cluster.local")
    finally:
        server.stop()
    assert "status:" not in dig_unchecked(pod_netns, "web.default.svc.cluster.local")


def dig_unchecked(netns: str, *args: str) -> str:
    result = run_in(netns, "dig", "@127.0.0.1", "+time=1", "+tries=1", *args)
    return result.stdout + result.stderr


@needs_root
def test_the_process_follows_the_store(etcd, pod_netns, tmp_path):
    """`python -m netsim.dns` in a pod's namespace, reading a real etcd reached from another:
    a Service written is answered, one deleted is gone; SIGTERM ends it with status 0."""
    web = "/registry/services/specs/default/web"
    etcd.store.put_all(
        {
            web: json.dumps(SERVICES["default/web"]),
            "/registry/services/endpoints/default/web": json.dumps(ENDPOINTS["default/web"]),
        }
    )
    config = tmp_path / "dns.json"
    config.write_text(
        json.dumps(
            {
                "domain": "cluster.local",
                "service_cidr": "10.96.0.0/12",
                "pod_networks": ["10.244.0.0/16"],
                "listen_netns": pod_netns,
                "port": 53,
                "store": {"endpoints": [etcd.url], "netns": etcd.netns},
            }
        )
    )
    log = tmp_path / "dns.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "netsim.dns", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:

        def answer(name: str) -> str:
            return dig_unchecked(pod_netns, "+short", name).strip()

        wait_for(lambda: answer("web.default.svc.cluster.local") == "10.96.0.20", 20, "web")
        api = service("api", "10.96.0.30", [port(443, "https")])
        etcd.store.put("/registry/services/specs/default/api", json.dumps(api))
        wait_for(lambda: answer("api.default.svc.cluster.local") == "10.96.0.30", 10, "api")
        etcd.store.delete(web)
        wait_for(
            lambda: "NXDOMAIN" in dig_unchecked(pod_netns, "web.default.svc.cluster.local"),
            10,
            "web gone",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text()
    assert "zone rebuilt: 2 services" in text and "Traceback" not in text, text
