"""Executing a CNI plugin as a runtime (or a delegating plugin) does: found by its type in
CNI_PATH, the CNI_* variables in its environment, the config on stdin, the result or the error
as JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess

from cni.spec import DELEGATE_FAILURE, CniError
from netsim.kernel import netns as nsmod


def find(plugin: str, paths: list[str]) -> str:
    for directory in paths:
        candidate = os.path.join(directory, plugin)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(
        DELEGATE_FAILURE,
        f"failed to find plugin {plugin!r} in path {paths}",
        "install it (Debian: apt-get install containernetworking-plugins puts the "
        "reference plugins in /usr/lib/cni) or add its directory to CNI_PATH",
    )


def execute(
    plugin: str,
    command: str,
    paths: list[str],
    stdin: dict,
    container_id: str = "",
    netns: str = "",
    ifname: str = "",
    args: str = "",
    run_in: str | None = None,
    timeout: float = 60,
) -> dict | None:
    """Run one plugin; return its decoded result (None when it prints nothing). `run_in` is the
    namespace the plugin runs in (the node's); None runs it where this process is."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": args,
        "CNI_PATH": ":".join(paths),
    }
    done = subprocess.run(
        [find(plugin, paths)],
        input=json.dumps(stdin).encode(),
        env=env,
        capture_output=True,
        timeout=timeout,
        preexec_fn=(lambda: nsmod.enter_for_exec(run_in)) if run_in else None,
    )
    out = done.stdout.decode(errors="replace").strip()
    try:
        answer = json.loads(out) if out else None
    except ValueError:
        answer = None
    if done.returncode != 0:
        if isinstance(answer, dict) and "code" in answer:
            raise CniError(
                int(answer["code"]),
                f"plugin {plugin} ({command}): {answer.get('msg')}",
                answer.get("details", ""),
            )
        stderr = done.stderr.decode(errors="replace").strip()
        raise CniError(
            DELEGATE_FAILURE,
            f"plugin {plugin} ({command}) exited with status {done.returncode}",
            (out + "\n" + stderr).strip(),
        )
    if out and answer is None:
        raise CniError(
            DELEGATE_FAILURE,
            f"plugin {plugin} ({command}) printed something that is not JSON",
            out[:500],
        )
    return answer
