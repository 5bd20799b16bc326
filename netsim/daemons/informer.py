"""client-go's informer, for a node's daemons: each watched prefix is listed, then watched
from the next revision, into a cache (a broken stream or a compacted revision means list
again); one worker hands every daemon the whole cache of its prefixes whenever one changed, and
then reports the revision of each prefix it has applied.

Level-triggered, as the real daemons are at heart: a daemon compares the store's state with
what it has programmed, so a restart, a missed event or a re-list all end in the same kernel
state.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

from netsim.store.client import Compacted, Event, KeyValue, Store, StoreError

View = dict[str, dict[str, KeyValue]]  # prefix -> key -> value


class Informer:
    def __init__(
        self,
        store: Store,
        daemons: list,
        report: Callable[[dict[str, int]], None],
        log: Callable[[str], None] = print,
    ):
        self.store, self.daemons, self.report, self.log = store, daemons, report, log
        self.prefixes = sorted({p for d in daemons for p in d.prefixes})
        self.cache: View = {p: {} for p in self.prefixes}
        self.seen = dict.fromkeys(self.prefixes, 0)  # what the watches delivered
        self.applied: dict[str, int] = {}  # what every daemon of the prefix has synced
        self.dirty: set[str] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.worker: threading.Thread | None = None
        self.after: threading.Thread | None = None  # the worker of daemons this one replaces

    def start(self) -> None:
        for prefix in self.prefixes:
            threading.Thread(target=self._reflect, args=(prefix,), daemon=True).start()
        self.worker = threading.Thread(target=self._work, daemon=True, name="informer")
        self.worker.start()

    def stop(self) -> None:
        """Stop; a sync under way finishes (the daemons that follow wait for it: `after`)."""
        self.stopped.set()
        self.wake.set()

    # -- one prefix: list, then watch --------------------------------------------------------

    def _reflect(self, prefix: str) -> None:
        pause = 0.05
        while not self.stopped.is_set():
            try:
                revision, kvs = self.store.list(prefix)
                with self.lock:
                    self.cache[prefix] = {kv.key: kv for kv in kvs}
                    self.seen[prefix] = max(self.seen[prefix], revision)
                    self.dirty.add(prefix)
                self.wake.set()
                pause = 0.05
                self.store.watch(prefix, revision + 1, self._handler(prefix), self.stopped)
            except (StoreError, Compacted) as exc:
                self.log(f"{prefix}: {exc}; listing again in {pause:.2f} s")
                self.stopped.wait(pause)
                pause = min(pause * 2, 2.0)

    def _handler(self, prefix: str) -> Callable[[int, list[Event]], None]:
        def handle(revision: int, events: list[Event]) -> None:
            with self.lock:
                cache = self.cache[prefix]
                changed = False
                for event in events:
                    if event.type == "DELETE":
                        changed |= cache.pop(event.kv.key, None) is not None
                    else:
                        old = cache.get(event.kv.key)
                        changed |= old is None or old.value != event.kv.value
                        cache[event.kv.key] = event.kv
                self.seen[prefix] = max(self.seen[prefix], revision)
                if changed:  # else (a value written again as it was) only reported
                    self.dirty.add(prefix)
            self.wake.set()

        return handle

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        if self.after is not None:  # two kubelets must not make the same pods at once
            self.after.join()
        failed: set[int] = set()  # daemons whose last sync failed: tried again soon
        trimmed = True  # the heap trimmed since the last sync
        while not self.stopped.is_set():
            woke = self.wake.wait(1.0 if failed or not trimmed else None)
            if self.stopped.is_set():
                return
            if not woke and not failed:  # a second without news: the burst is over
                _trim()
                trimmed = True
                continue
            self.wake.clear()
            with self.lock:
                dirty, self.dirty = self.dirty, set()
                seen = dict(self.seen)
                view = {p: dict(c) for p, c in self.cache.items()}
            behind = set()
            for i, daemon in enumerate(self.daemons):
                if not (dirty & set(daemon.prefixes)) and i not in failed:
                    continue
                if any(not seen[p] for p in daemon.prefixes):  # not listed yet: a sync on
                    behind |= set(daemon.prefixes)  # half the picture would undo the rest
                    continue
                try:
                    daemon.sync(view)
                    failed.discard(i)
                except Exception:  # one daemon's failure must not stop the node's others
                    failed.add(i)
                    behind |= set(daemon.prefixes)
                    self.log(f"{daemon.name}: sync failed:\n{traceback.format_exc()}")
            before = dict(self.applied)
            self.applied.update({p: r for p, r in seen.items() if p not in behind})
            if self.applied != before:
                self.report(dict(self.applied))
            del view
            trimmed = False


def _trim() -> None:
    """Give the heap's free pages back to the kernel: a burst of syncs' peak (a hundred pods
    wired, a Service table read) would otherwise stay with each of a hundred agents."""
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)


def status(node: str, applied: dict[str, int]) -> dict:
    """What a node publishes after each sync: the revision of each prefix it has applied."""
    return {"node": node, "applied": applied, "time": time.time()}
