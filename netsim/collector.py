"""Python's cycle collector, paused while netsim builds or reads tens of thousands of objects
at once (kube-proxy's rule set, a 10,000-pod listing): none of them is in a cycle, and the full
collections their number triggers walk the whole heap, a third of such a step's time."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
