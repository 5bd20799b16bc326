"""The cluster's DNS zone, answered the way CoreDNS's kubernetes plugin answers it (Kubernetes
DNS-Based Service Discovery specification, schema 1.1.0), from the Service and Endpoints
objects as they are stored under /registry/services/ (netsim/registry.py).

Pure: objects in, a `Zone` out; a query in, its response out (dnspython does every encoding).
A Zone is never changed after it is built: the server swaps in a new one on every change of
the store, so it is made of plain dicts keyed by lowercase names and address strings (10,000
endpoints in a few milliseconds); the dnspython records are made per query.

What it answers, with kubeadm's Corefile (`kubernetes cluster.local in-addr.arpa ip6.arpa {
pods insecure; ttl 30 }`) in mind:

- `<svc>.<ns>.svc.<zone>`: A per ClusterIP; for a headless Service one A per ready endpoint
  address, and NXDOMAIN while it has none; ExternalName: CNAME.
- `<hostname>.<svc>.<ns>.svc.<zone>`: A per endpoint. Like CoreDNS (beyond the spec, which
  names them for headless Services only) for every Service that has endpoints; the hostname is
  the address's `hostname`, else its IP with dashes (10-244-1-5).
- `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for named ports; priority 0, weight
  100 / number of records (CoreDNS's plugin/backend_lookup.go: floor, at least 1), target the
  Service's name (ClusterIP) or each endpoint's (headless), addresses in the additional
  section. CoreDNS also answers SRV at the Service's (or an endpoint's) own name, one per port
  named or not, and A at a port's SRV name: so does this.
- PTR for ClusterIPs (to the Service) and endpoint IPs (to `<hostname>.<svc>...`), in the
  reverse zones of the service CIDR and the pod networks only: CoreDNS's zones for a CIDR, one
  per octet (nibble) boundary, e.g. 10.96.0.0/12 -> 96.10.in-addr.arpa ... 111.10.in-addr.arpa.
- `dns-version.<zone>` TXT "1.1.0"; `a-b-c-d.<ns>.pod.<zone>` A a.b.c.d (`pods insecure`).
- A name that exists without records of the type asked: NODATA (NOERROR, SOA in authority);
  a name that does not exist: NXDOMAIN with the SOA. Both authoritative (`aa`), as CoreDNS
  answers; no `ra`: CoreDNS's kubernetes plugin does not set it, and netsim never recurses.
- Anything outside those zones: REFUSED. netsim has no upstream: no query leaves the host.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

SCHEMA_VERSION = "1.1.0"
# The kubernetes plugin's own default is 5 s (defaultTTL in plugin/kubernetes/kubernetes.go);
# kubeadm's Corefile sets `ttl 30` (kubernetes#76238, the TTL kube-dns had), and that Corefile
# is what a cluster runs, so records live 30 s here.
TTL = 30
VERSION_TTL = 28800  # CoreDNS serves dns-version with this TTL, whatever `ttl` says
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 7200, 1800, 86400  # plugin/backend_lookup.go's SOA
MAX_CNAMES = 8  # CoreDNS follows at most 8 CNAMEs inside its zone
# Namespaces every cluster has: `<ns>.svc` / `<ns>.pod` names exist for these (NODATA) even
# without a Service; CoreDNS answers NXDOMAIN for a namespace that does not exist.
NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
TOLERATE_UNREADY = "service.alpha.kubernetes.io/tolerate-unready-endpoints"
IN = dns.rdataclass.IN
_RT = dns.rdatatype


class _Name:
    """The records at one name: addresses (ordered, no duplicates), SRV entries as
    (port, target, address) and a CNAME target."""

    __slots__ = ("a", "srv", "cname")

    def __init__(self) -> None:
        self.a: dict[str, None] = {}
        self.srv: list[tuple[int, str, str]] = []
        self.cname: str | None = None


class Zone:
    """One snapshot of the cluster's names. Build with `from_view`; answer with `answer`."""

    def __init__(
        self,
        domain: str = "cluster.local",
        service_cidr: str = "10.96.0.0/12",
        pod_networks: Iterable[str] = ("10.244.0.0/16",),
        serial: int = 0,
    ):
        self.domain = dns.name.from_text(domain).canonicalize()
        self.suffix = self.domain.to_text()  # "cluster.local."
        self.serial = serial  # CoreDNS: the time of the last change it saw
        self.service_cidr = service_cidr
        self.pod_networks = tuple(pod_networks)
        self.reverse_zones = {
            z: None for cidr in (service_cidr, *self.pod_networks) for z in reverse_zones(cidr)
        }
        self.namespaces: set[str] = set(NAMESPACES)
        self.names: dict[str, _Name] = {}  # lowercase absolute name -> records
        self.ptr_service: dict[str, str] = {}  # ClusterIP -> the Service's name
        self.ptr_endpoint: dict[str, dict[str, None]] = {}  # endpoint IP -> names
        self.services = 0

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_view(
        cls,
        services: Mapping[str, dict],
        endpoints: Mapping[str, dict],
        domain: str = "cluster.local",
        service_cidr: str = "10.96.0.0/12",
        pod_networks: Iterable[str] = ("10.244.0.0/16",),
        serial: int = 0,
        namespaces: Iterable[str] = (),
    ) -> Zone:
        """The zone of these Services and Endpoints (parsed JSON, each keyed "<ns>/<name>")."""
        zone = cls(domain, service_cidr, pod_networks, serial)
        zone.namespaces.update(namespaces)
        for key in sorted(services):
            zone.add_service(services[key], endpoints.get(key), key)
        return zone

    def _entry(self, name: str) -> _Name:
        entry = self.names.get(name)
        if entry is None:
            entry = self.names[name] = _Name()
        return entry

    def add_service(self, svc: dict, ep: dict | None, key: str = "default/") -> None:
        """The names of one Service and its Endpoints object (None: none yet)."""
        meta = svc.get("metadata") or {}
        spec = svc.get("spec") or {}
        fallback_ns, _, fallback_name = key.partition("/")
        namespace = (meta.get("namespace") or fallback_ns or "default").lower()
        name = (meta.get("name") or fallback_name).lower()
        if not name:
            return
        self.services += 1
        self.namespaces.add(namespace)
        base = f"{name}.{namespace}.svc.{self.suffix}"
        if spec.get("type") == "ExternalName":
            target = (spec.get("externalName") or "").lower().rstrip(".")
            if target and not _is_ip(target):  # CoreDNS has no record for an IP here
                self._entry(base).cname = target + "."
            return
        cluster_ip = spec.get("clusterIP") or ""
        headless = cluster_ip == "None"
        if not headless:
            entry = self._entry(base)
            ips = [ip for ip in (spec.get("clusterIPs") or [cluster_ip]) if _is_ip(ip)]
            for ip in ips:
                entry.a[ip] = None
                self.ptr_service.setdefault(ip, base)
            for port in spec.get("ports") or ():
                number = port.get("port")
                srv_name = _srv_name(port, base)
                for ip in ips:
                    entry.srv.append((number, base, ip))
                    if srv_name:
                        named = self._entry(srv_name)
                        named.srv.append((number, base, ip))
                        named.a[ip] = None
        if not ep:
            return
        annotations = meta.get("annotations") or {}
        tolerate = (
            annotations.get(TOLERATE_UNREADY) == "true"
            or spec.get("publishNotReadyAddresses") is True
        )
        for subset in ep.get("subsets") or ():
            addresses = list(subset.get("addresses") or ())
            if tolerate:
                addresses += subset.get("notReadyAddresses") or ()
            if not addresses:
                continue
            ports = [
                (p.get("port"), _srv_name(p, base))
                for p in subset.get("ports") or ()
                if p.get("port") is not None
            ]
            for address in addresses:
                ip = address.get("ip") or ""
                if not _is_ip(ip):
                    continue
                host = f"{_hostname(address)}.{base}"
                own = self._entry(host)
                own.a[ip] = None
                self.ptr_endpoint.setdefault(ip, {})[host] = None
                for number, _ in ports:
                    own.srv.append((number, host, ip))
                if not headless:
                    continue
                entry = self._entry(base)
                entry.a[ip] = None
                for number, srv_name in ports:
                    entry.srv.append((number, host, ip))
                    if srv_name:
                        named = self._entry(srv_name)
                        named.srv.append((number, host, ip))
                        named.a[ip] = None

    # -- answering -----------------------------------------------------------------------------

    def answer(self, query: dns.message.Message | bytes) -> dns.message.Message | None:
        """The response to a query (a message, or its wire form). None when there is nothing
        to answer: shorter than a DNS header, or itself a response."""
        query, response = _decoded(query)
        if query is None or response.rcode() != dns.rcode.NOERROR:
            return response
        # CoreDNS with kubeadm's Corefile forwards what is not its own, so it says recursion
        # is available; resolvers (nslookup) complain when it is not
        response.flags |= dns.flags.RA
        question = query.question[0]
        origin = self.origin(question.name) if question.rdclass == IN else None
        if origin is None or question.rdtype in (_RT.AXFR, _RT.IXFR):
            response.set_rcode(dns.rcode.REFUSED)  # not ours, and nothing is forwarded
            return response
        response.flags |= dns.flags.AA
        found = self._lookup(question.name, question.rdtype, origin)
        if found is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer, response.additional = found
        if not response.answer:
            response.authority = [self.soa(origin)]
        return response

    def origin(self, name: dns.name.Name) -> dns.name.Name | None:
        """The zone of ours that holds the name: the cluster domain or one reverse zone."""
        if name.is_subdomain(self.domain):
            return self.domain
        labels = name.labels
        for i in range(len(labels) - 2):  # a reverse zone has at least 3 labels with the root
            suffix = dns.name.Name(labels[i:])
            if suffix in self.reverse_zones:
                return suffix
        return None

    def soa(self, origin: dns.name.Name) -> dns.rrset.RRset:
        """The SOA CoreDNS makes up for a zone of its own (plugin/backend_lookup.go)."""
        rdata = SOA(
            IN,
            _RT.SOA,
            dns.name.Name((b"ns", b"dns", *origin.labels)),
            dns.name.Name((b"hostmaster", *origin.labels)),
            self.serial & 0xFFFFFFFF,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            TTL,
        )
        return _rrset(origin, _RT.SOA, [rdata], min(TTL, 300))

    def _lookup(
        self, qname: dns.name.Name, qtype: int, origin: dns.name.Name
    ) -> tuple[list, list] | None:
        """(answer, additional) for a name of ours; None: the name does not exist."""
        relative = qname.relativize(origin).canonicalize()
        labels = (
            []
            if relative == dns.name.empty
            else [x.decode("ascii", "replace") for x in relative.labels]
        )
        if not labels:  # the apex
            if qtype == _RT.SOA:
                return [self.soa(origin)], []
            if qtype == _RT.NS:
                ns = NS(IN, _RT.NS, dns.name.Name((b"ns", b"dns", *origin.labels)))
                return [_rrset(qname, _RT.NS, [ns])], []
            return [], []
        if origin != self.domain:
            return self._reverse(qname, qtype)
        if labels == ["dns-version"]:
            if qtype == _RT.TXT:
                txt = TXT(IN, _RT.TXT, [SCHEMA_VERSION.encode()])
                return [_rrset(qname, _RT.TXT, [txt], VERSION_TTL)], []
            return [], []
        kind = labels[-1]
        if kind in ("svc", "pod") and len(labels) <= 2:
            if len(labels) == 1 or labels[0] in self.namespaces:
                return [], []  # the namespace's own name: NODATA, as CoreDNS answers
            return None
        if kind == "pod" and len(labels) == 3:
            return self._pod(qname, qtype, labels[0], labels[1])
        return self._records(qname, qtype, qname.to_text().lower(), 0)

    def _records(
        self, owner: dns.name.Name, qtype: int, key: str, depth: int
    ) -> tuple[list, list] | None:
        entry = self.names.get(key)
        if entry is None:
            return None
        if entry.cname is not None:
            if qtype == _RT.CNAME or qtype == _RT.ANY:
                target = CNAME(IN, _RT.CNAME, dns.name.from_text(entry.cname))
                return [_rrset(owner, _RT.CNAME, [target])], []
            cname = dns.name.from_text(entry.cname)
            answer = [_rrset(owner, _RT.CNAME, [CNAME(IN, _RT.CNAME, cname)])]
            if depth < MAX_CNAMES and cname.is_subdomain(self.domain):
                chained = self._records(cname, qtype, entry.cname, depth + 1)
                if chained:
                    answer += chained[0]
            return answer, []
        if qtype in (_RT.A, _RT.AAAA):
            return _some(_addresses(owner, qtype, entry.a)), []
        if qtype == _RT.SRV and entry.srv:
            return self._srv(owner, entry.srv)
        return [], []  # ANY too: CoreDNS answers it NODATA (no `any` plugin in its Corefile)

    def _srv(self, owner: dns.name.Name, entries: list[tuple[int, str, str]]) -> tuple[list, list]:
        """SRV records and their targets' addresses, deduplicated as CoreDNS does; the weight
        is shared out over every entry before that (plugin/backend_lookup.go)."""
        weight = max(1, 100 // len(entries))
        targets: dict[str, dns.name.Name] = {}
        records, seen, extra = [], set(), {}
        for port, target, ip in entries:
            name = targets.get(target)
            if name is None:
                name = targets[target] = dns.name.from_text(target)
            if (target, port) not in seen:
                seen.add((target, port))
                records.append(SRV(IN, _RT.SRV, 0, weight, port, name))
            extra.setdefault(target, {})[ip] = None
        additional = []
        for target, ips in extra.items():
            for qtype in (_RT.A, _RT.AAAA):
                rrset = _addresses(targets[target], qtype, ips)
                if rrset:
                    additional.append(rrset)
        return [_rrset(owner, _RT.SRV, records)], additional

    def _pod(
        self, qname: dns.name.Name, qtype: int, label: str, namespace: str
    ) -> tuple[list, list] | None:
        """`pods insecure`: a-b-c-d.<ns>.pod.<zone> is a.b.c.d, whether or not a pod has it."""
        if namespace not in self.namespaces:
            return None
        if label.count("-") == 3 and "--" not in label:
            text = label.replace("-", ".")
        else:
            text = label.replace("-", ":")
        if not _is_ip(text):
            return None
        if qtype not in (_RT.A, _RT.AAAA):
            return [], []
        return _some(_addresses(qname, qtype, {text: None})), []

    def _reverse(self, qname: dns.name.Name, qtype: int) -> tuple[list, list] | None:
        """PTR: a ClusterIP names its Service; else an endpoint IP names every endpoint
        name it has (CoreDNS's serviceRecordForIP)."""
        ip = _reverse_address(qname)
        if ip is None:
            return None
        service = self.ptr_service.get(ip)
        targets = [service] if service else list(self.ptr_endpoint.get(ip, ()))
        if not targets:
            return None
        if qtype != _RT.PTR:
            return [], []
        rdatas = [PTR(IN, _RT.PTR, dns.name.from_text(t)) for t in targets]
        return [_rrset(qname, _RT.PTR, rdatas)], []


def reverse_zones(cidr: str) -> list[dns.name.Name]:
    """The reverse zones that cover a CIDR exactly, split on octet (IPv4) or nibble (IPv6)
    boundaries as CoreDNS splits a CIDR given as a zone: 10.96.0.0/12 -> 96.10 ... 111.10."""
    network = ipaddress.ip_network(cidr, strict=False)
    step = 8 if network.version == 4 else 4
    prefix = -(-network.prefixlen // step) * step
    zones = []
    for subnet in network.subnets(new_prefix=prefix):
        text = subnet.network_address.reverse_pointer  # every octet or nibble
        labels = text.split(".")
        keep = prefix // step
        head = labels[len(labels) - 2 - keep : len(labels) - 2] if keep else []
        zones.append(dns.name.from_text(".".join([*head, *labels[-2:]]) + "."))
    return zones


def _reverse_address(qname: dns.name.Name) -> str | None:
    """The address a full reverse name stands for (no leading zeros, no partial names)."""
    try:
        ip = ipaddress.ip_address(dns.reversename.to_address(qname))
    except (dns.exception.DNSException, ValueError):
        return None
    if ip.reverse_pointer + "." != qname.to_text().lower():
        return None
    return str(ip)


def _hostname(address: dict) -> str:
    """The endpoint's DNS label: its hostname, else CoreDNS's made-up one from its IP."""
    hostname = address.get("hostname")
    if hostname:
        return hostname.lower()
    ip = address["ip"]
    return ip.replace(".", "-") if "." in ip else ip.replace(":", "-")


def _srv_name(port: dict, base: str) -> str | None:
    """`_<name>._<proto>.<base>` for a named port; None for an unnamed one."""
    name = port.get("name")
    if not name:
        return None
    return f"_{name.lower()}._{(port.get('protocol') or 'TCP').lower()}.{base}"


def _is_ip(text: str) -> bool:
    """An IPv4 or IPv6 address in its usual text (inet_pton: a tenth of ipaddress's cost)."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        socket.inet_pton(family, text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


def _rrset(name: dns.name.Name, rdtype: int, rdatas: list, ttl: int = TTL) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, IN, rdtype)
    for rdata in rdatas:
        rrset.add(rdata, ttl)
    return rrset


def _addresses(name: dns.name.Name, qtype: int, ips: Iterable[str]) -> dns.rrset.RRset | None:
    """The A (or AAAA) records of the addresses of that family; None when there are none."""
    if qtype == _RT.A:
        rdatas = [A(IN, _RT.A, ip) for ip in ips if ":" not in ip]
    else:
        rdatas = [AAAA(IN, _RT.AAAA, ip) for ip in ips if ":" in ip]
    return _rrset(name, qtype, rdatas) if rdatas else None


def _some(rrset: dns.rrset.RRset | None) -> list[dns.rrset.RRset]:
    return [rrset] if rrset is not None else []


def not_ready(query: dns.message.Message | bytes) -> dns.message.Message | None:
    """SERVFAIL, for a server that has no zone yet: an NXDOMAIN would be cached by clients."""
    query, response = _decoded(query)
    if query is not None and response.rcode() == dns.rcode.NOERROR:
        response.set_rcode(dns.rcode.SERVFAIL)
    return response


def _decoded(
    query: dns.message.Message | bytes,
) -> tuple[dns.message.Message | None, dns.message.Message | None]:
    """(the query, its response's skeleton); the skeleton's rcode is already an error when the
    query cannot be answered (FORMERR, NOTIMP, BADVERS). (None, FORMERR) for undecodable
    bytes; (None, None) when nothing may be sent back."""
    if isinstance(query, bytes | bytearray | memoryview):
        wire = bytes(query)
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None, _format_error(wire)
    if query.flags & dns.flags.QR:  # never answer a response
        return None, None
    response = dns.message.make_response(query, our_payload=1232)
    if query.edns > 0:
        response.set_rcode(dns.rcode.BADVERS)
    elif query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
    return query, response


def _format_error(wire: bytes) -> dns.message.Message | None:
    """FORMERR for a query whose header reads but whose body does not; None for less."""
    if len(wire) < 12 or wire[2] & 0x80:  # no header, or a response: never answered
        return None
    response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    response.flags = dns.flags.QR | (int.from_bytes(wire[2:4], "big") & dns.flags.RD)
    response.set_rcode(dns.rcode.FORMERR)
    return response
