"""One apply's undo log and its summary of changes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from netsim import state
from netsim.kernel import netns as nsmod


@dataclass
class Changes:
    """What an apply did, for the summary line and for tests of idempotence."""

    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.created or self.removed or self.updated)

    def summary(self) -> str:
        if not self:
            return "unchanged"
        parts = [
            f"{len(v)} {k}"
            for k, v in (
                ("created", self.created),
                ("removed", self.removed),
                ("updated", self.updated),
            )
            if v
        ]
        return ", ".join(parts)


class Transaction:
    """Journals every namespace and process before creating it, and keeps the undo steps of
    this call so a failure leaves nothing of it behind."""

    def __init__(self, cluster: str):
        self.cluster = cluster
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def netns(self, name: str) -> None:
        state.journal(self.cluster, {"netns": name})
        prefix = state.netns_prefix(self.cluster)  # the file: the name without it
        short = name[len(prefix) :] if name.startswith(prefix) else None
        nsmod.create(name, under=state.netns_dir(self.cluster), file=short)
        self.undo.append((f"netns {name}", lambda: nsmod.remove(name)))

    def process(self, what: str, pid: int, start: int) -> None:
        """A process just started: journal it and stop it on undo."""
        from netsim.kernel import proc

        state.journal(self.cluster, {"pid": pid, "start": start})
        self.undo.append((what, lambda: proc.stop([(pid, start)])))

    def on_undo(self, what: str, step: Callable[[], None]) -> None:
        self.undo.append((what, step))

    def rollback(self) -> list[str]:
        """Undo in reverse; report steps that failed instead of hiding them."""
        problems = []
        for what, step in reversed(self.undo):
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                problems.append(f"{what}: {exc}")
        self.undo.clear()
        return problems
