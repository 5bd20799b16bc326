"""What a container's image runs here. netsim has no image store: a container runs the host's
binaries in the pod's namespaces. The images the Kubernetes guides and e2e tests use are
modelled by their ENTRYPOINT and CMD, so `command` and `args` mean what they mean in
Kubernetes: `command` replaces the ENTRYPOINT, `args` the CMD. agnhost, the e2e tests' image,
is served by netsim's own agnhost (netsim/agnhost.py). A container that comes to nothing to run
(no image, or an image netsim does not model, with neither command nor args) gets netsim's
built-in hostname server, served by the node's agent; for an image that is not netsim's own,
with a one-line notice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# image name (no registry, no tag) -> (ENTRYPOINT, CMD), as their Dockerfiles declare them
IMAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "agnhost": (("/agnhost",), ("pause",)),
    "pause": (("/pause",), ()),
    "coredns": (("/coredns",), ()),
    "busybox": ((), ("sh",)),
    "alpine": ((), ("/bin/sh",)),
    "debian": ((), ("bash",)),
    "ubuntu": ((), ("/bin/bash",)),
}
# web servers' images that netsim's hostname server stands in for, on the port they listen on
# (the Kubernetes guides create `--image=nginx` and expose its port 80)
IMAGE_PORTS = {"nginx": 80, "httpd": 80}
# programs of modelled images that netsim serves itself: argv[0] -> its module's argv
SERVED = {
    "/agnhost": ("-m", "netsim.agnhost"),
    "agnhost": ("-m", "netsim.agnhost"),
    "/pause": ("-m", "netsim.agnhost", "pause"),
    "/coredns": ("-m", "netsim.dns"),  # the cluster DNS: netsim/dns
}


@dataclass(frozen=True)
class Workload:
    argv: tuple[str, ...] | None  # None: the agent's built-in hostname server
    notice: str = ""


def image_name(image: str) -> str:
    """registry.k8s.io/e2e-test-images/agnhost:2.53 -> agnhost (no registry, tag or digest)."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0]


def workload(container) -> Workload:
    """The process a container runs, by Kubernetes' rules for command and args."""
    entrypoint, cmd = IMAGES.get(image_name(container.image), ((), ()))
    if container.command:
        argv = (*container.command, *container.args)
    else:
        argv = (*entrypoint, *(container.args or cmd))
    if not argv:
        notice = ""
        if container.image and image_name(container.image) not in IMAGE_PORTS:
            ports = ", ".join(map(str, container.served_ports))
            notice = (
                f"image {container.image} of container {container.name} is not modelled and "
                f"has no command: netsim's hostname server answers on port {ports}"
            )
        return Workload(None, notice)
    served = SERVED.get(argv[0])
    if served is not None:
        return Workload((sys.executable, *served, *argv[1:]))
    return Workload(argv)
