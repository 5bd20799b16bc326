"""Client-side checks run from inside a pod or node: ping (the real iputils ping in the
namespace) and HTTP GETs over fresh TCP connections (opened in-process in the namespace)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod


@dataclass
class PingResult:
    sent: int
    received: int
    rtt: tuple[float, float, float] | None  # min, avg, max in ms
    output: str

    @property
    def loss(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 100.0


def ping(
    netns: str, ip: str, count: int = 3, interval: float = 0.2, timeout: float = 1.0
) -> PingResult:
    binary = shutil.which("ping")
    if binary is None:
        raise NetsimError("ping not found: apt-get install iputils-ping (or run ./bootstrap)")
    result = subprocess.run(
        [binary, "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout), ip],
        capture_output=True,
        text=True,
        timeout=count * (interval + timeout) + 5,
        preexec_fn=lambda: nsmod.enter_for_exec(netns),
    )
    out = result.stdout + result.stderr
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out)
    return PingResult(
        int(stats.group(1)) if stats else count,
        int(stats.group(2)) if stats else 0,
        tuple(float(x) for x in rtt.groups()) if rtt else None,
        out,
    )


@dataclass
class HttpReply:
    body: str | None
    error: str | None
    ms: float


def http_get(netns: str, ip: str, port: int, path: str = "/", timeout: float = 2.0) -> HttpReply:
    """One GET over a fresh TCP connection whose socket lives in the namespace."""
    start = time.monotonic()
    with nsmod.entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/"):
            return HttpReply(None, "not an HTTP reply", (time.monotonic() - start) * 1000)
        return HttpReply(body.decode(errors="replace"), None, (time.monotonic() - start) * 1000)
    except OSError as exc:
        return HttpReply(None, exc.strerror or str(exc), (time.monotonic() - start) * 1000)
    finally:
        sock.close()


def parse_url(url: str) -> tuple[str, int, str]:
    """host, port, path (with its query) of http://HOST[:PORT][/PATH][?QUERY]; the scheme
    may be left out."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        raise NetsimError(f"cannot use URL {url!r}: write http://HOST[:PORT]/PATH")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path
