"""Import pyroute2's netlink message classes without the rest of pyroute2.

`pyroute2/__init__.py` imports the whole library (NDB, IPDB, conntrack, ...): about 250 ms,
while the message classes netsim encodes with take about 50 ms. The CNI executable starts once
per pod and must answer in well under 150 ms, so the package is registered here without running
its `__init__`; `full()` runs it later, in place, for code that wants IPRoute (any other
attribute asked of the package runs it too). Imported by netsim.kernel's __init__, so it is in
place before any kernel module imports pyroute2.
Works with pyroute2 0.9.x (pinned in pyproject.toml).
"""

from __future__ import annotations

import importlib.util
import sys
import types

_light = False

if "pyroute2" not in sys.modules:
    _spec = importlib.util.find_spec("pyroute2")
    _module = types.ModuleType("pyroute2")
    _module.__path__ = list(_spec.submodule_search_locations)
    _module.__spec__ = _spec
    _module.__file__ = _spec.origin
    _module.__getattr__ = lambda name: _attribute(name)
    sys.modules["pyroute2"] = _module
    _light = True


def _attribute(name: str):
    """`from pyroute2 import X`: a submodule is imported as such; anything else (IPRoute)
    needs the whole package."""
    if importlib.util.find_spec(f"pyroute2.{name}") is not None:
        return importlib.import_module(f"pyroute2.{name}")
    return getattr(full(), name)


def full() -> types.ModuleType:
    """The complete pyroute2 package (its __init__ run now if it was skipped)."""
    global _light
    module = sys.modules["pyroute2"]
    if _light:
        _light = False
        del module.__getattr__
        module.__spec__.loader.exec_module(module)
    return module
