"""The CNI executable (`netsim-cni`, installed under the config's type name, `netsim`).

A runtime runs it in the node's network namespace with CNI_* variables and the network config
on stdin. The result goes to stdout in the config's version; an error goes to stdout as
{"cniVersion", "code", "msg", "details"} with exit status 1; logs go to stderr. Imports are
kept to what one command needs, because a runtime starts the plugin once per pod.
"""

from __future__ import annotations

import json
import os
import sys

from cni import spec
from cni.spec import CniError


def run(environ: dict[str, str], stdin: bytes) -> dict | None:
    """One invocation, as data: the result to print, or None; CniError on failure."""
    env = spec.parse_env(environ)
    conf = spec.parse_conf(stdin, env.command)
    if env.command == "VERSION":
        return spec.version_info(conf.version)
    from cni import commands

    if env.command == "ADD":
        return commands.add(conf, env)
    if env.command == "DEL":
        commands.delete(conf, env)
    elif env.command == "CHECK":
        commands.check(conf, env)
    elif env.command == "STATUS":
        commands.status(conf)
    elif env.command == "GC":
        commands.gc(conf, env)
    return None


def main() -> int:
    stdin = sys.stdin.buffer.read()
    try:
        answer = run(dict(os.environ), stdin)
    except CniError as exc:
        _print(exc.to_json(_version_of(stdin)))
        print(
            f"netsim-cni: {exc.msg}" + (f" ({exc.details})" if exc.details else ""), file=sys.stderr
        )
        return 1
    except Exception as exc:  # a bug: still answer in the spec's shape, keep the traceback
        import traceback

        traceback.print_exc()
        _print(CniError(spec.IO_FAILURE, f"internal error: {exc}").to_json(_version_of(stdin)))
        return 1
    if answer is not None:
        _print(answer)
    return 0


LAUNCHER = """#!{python} -S
# netsim's CNI plugin, installed by `netsim cni install`. Python runs without site (-S): the
# editable install's import finder alone costs ~25 ms on every start, and a runtime starts
# the plugin once per pod. The paths below are where netsim and its dependencies live.
import sys
sys.path[:0] = {paths!r}
from cni.plugin import main
sys.exit(main())
"""


def install(bin_dir: str, name: str = "netsim") -> str:
    """Write the launcher into a CNI bin directory under the type name configs use."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("pyroute2").origin))
    text = LAUNCHER.format(python=sys.executable, paths=[root, site])
    path = os.path.join(bin_dir, name)
    os.makedirs(bin_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def _version_of(stdin: bytes) -> str:
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        version = None
    return version if version in spec.VERSIONS else spec.VERSIONS[-1]


def _print(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
