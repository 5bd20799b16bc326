"""The environment the kubelet gives a container for the Services that exist when it starts
(kubernetes pkg/kubelet/envvars): for each Service with a ClusterIP, <SVC>_SERVICE_HOST and
_SERVICE_PORT (its first port), _SERVICE_PORT_<NAME> per named port, and the Docker-link
variables <SVC>_PORT, <SVC>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]. <SVC> is the name
upper-cased with '-' as '_' (only dashes are replaced, as the kubelet does). Pure.
"""

from __future__ import annotations


def _upper(name: str) -> str:
    return name.upper().replace("-", "_")


def service_env(services: list[dict]) -> dict[str, str]:
    """Service objects (as the API holds them) -> variables; headless Services get none."""
    env: dict[str, str] = {}
    for svc in sorted(services, key=lambda s: s["metadata"]["name"]):
        spec = svc.get("spec", {})
        ip, ports = spec.get("clusterIP", ""), spec.get("ports", [])
        if not ip or ip == "None" or not ports:
            continue
        prefix = _upper(svc["metadata"]["name"])
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{_upper(port['name'])}"] = str(port["port"])
        first = ports[0]
        env[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
        for port in ports:
            proto = port.get("protocol", "TCP")
            base = f"{prefix}_PORT_{port['port']}_{proto.upper()}"
            env[base] = f"{proto.lower()}://{ip}:{port['port']}"
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(port["port"])
            env[f"{base}_ADDR"] = ip
    return env
