"""A CNI runtime, as libcni drives a network config list: ADD runs the plugins in order, each
given the previous one's result as prevResult; the final result is cached per attachment; DEL
runs them in reverse with the cached result; CHECK runs them in order with it. This is what
`netsim apply --cni exec` uses, so real plugins appended to a node's chain (Debian's tuning,
portmap, bandwidth) run exactly as under containerd or CRI-O.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os

from cni import invoke
from cni.spec import INVALID_CONFIG, CniError

DEFAULT_PATH = ["/opt/cni/bin", "/usr/lib/cni"]


class Runtime:
    def __init__(self, conflist: str, paths: list[str], cache_dir: str, run_in: str | None = None):
        self.file = conflist
        with open(conflist, "rb") as fh:
            self.raw = fh.read()
        try:
            self.conf = json.loads(self.raw)
        except ValueError as exc:
            raise CniError(INVALID_CONFIG, f"{conflist}: not JSON: {exc}") from None
        if not isinstance(self.conf.get("plugins"), list) or not self.conf["plugins"]:
            raise CniError(INVALID_CONFIG, f"{conflist}: missing field plugins")
        self.paths, self.cache_dir, self.run_in = paths, cache_dir, run_in

    @property
    def name(self) -> str:
        return self.conf["name"]

    def _netconf(self, plugin: dict, prev: dict | None, capabilities: dict) -> dict:
        conf = {**plugin, "name": self.name, "cniVersion": self.conf["cniVersion"]}
        wanted = {
            k: v for k, v in capabilities.items() if (plugin.get("capabilities") or {}).get(k)
        }
        if wanted:
            conf["runtimeConfig"] = {**conf.get("runtimeConfig", {}), **wanted}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _run(
        self,
        plugin: dict,
        command: str,
        stdin: dict,
        container_id: str,
        netns: str,
        ifname: str,
        args: str,
    ) -> dict | None:
        return invoke.execute(
            plugin["type"],
            command,
            self.paths,
            stdin,
            container_id,
            netns,
            ifname,
            args,
            run_in=self.run_in,
        )

    def _cache_path(self, container_id: str, ifname: str) -> str:
        return os.path.join(self.cache_dir, "results", f"{self.name}-{container_id}-{ifname}")

    def cached(self, container_id: str, ifname: str) -> dict | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(self._cache_path(container_id, ifname)) as fh:
                return json.load(fh)
        return None

    def add(
        self,
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: str = "",
        capabilities: dict | None = None,
    ) -> dict:
        """The chain's final result; on failure the runtime's caller runs delete()."""
        prev = None
        for plugin in self.conf["plugins"]:
            prev = (
                self._run(
                    plugin,
                    "ADD",
                    self._netconf(plugin, prev, capabilities or {}),
                    container_id,
                    netns,
                    ifname,
                    args,
                )
                or prev
            )
        entry = {
            "kind": "cniCacheV1",
            "containerId": container_id,
            "ifName": ifname,
            "networkName": self.name,
            "cniArgs": args,
            "capabilityArgs": capabilities or {},
            "config": base64.b64encode(self.raw).decode(),
            "result": prev,
        }
        path = self._cache_path(container_id, ifname)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(entry, fh)
        os.replace(path + ".tmp", path)
        return prev

    def delete(self, container_id: str, netns: str, ifname: str = "eth0") -> None:
        """Every plugin's DEL in reverse order with the cached result; then drop the cache."""
        entry = self.cached(container_id, ifname) or {}
        prev, caps = entry.get("result"), entry.get("capabilityArgs") or {}
        for plugin in reversed(self.conf["plugins"]):
            self._run(
                plugin,
                "DEL",
                self._netconf(plugin, prev, caps),
                container_id,
                netns,
                ifname,
                entry.get("cniArgs", ""),
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._cache_path(container_id, ifname))

    def check(self, container_id: str, netns: str, ifname: str = "eth0") -> None:
        entry = self.cached(container_id, ifname)
        if entry is None:
            raise CniError(
                INVALID_CONFIG,
                f"no cached result for {container_id} {ifname}: CHECK needs a previous ADD",
            )
        caps = entry.get("capabilityArgs") or {}
        for plugin in self.conf["plugins"]:
            self._run(
                plugin,
                "CHECK",
                self._netconf(plugin, entry["result"], caps),
                container_id,
                netns,
                ifname,
                entry.get("cniArgs", ""),
            )
