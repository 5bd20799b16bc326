"""The layering the code promises, checked on its imports and literals: the CNI plugin (cni/)
uses only netsim's kernel layer, errors and the etcd client, the kernel layer uses nothing
above it, and no module outside netsim/modes names a mode (readers ask the mode instead)."""

from __future__ import annotations

import ast
from pathlib import Path

from netsim.modes import MODES

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _allowed_below(name: str, allowed: tuple[str, ...]) -> bool:
    return (
        not name.startswith("netsim")
        or name == "netsim"
        or any(name == a or name.startswith(a + ".") for a in allowed)
    )


def test_the_cni_plugin_uses_only_the_kernel_layer_of_netsim_and_the_store_client():
    wrong = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in _modules("cni")
        for name in _imports(p)
        if not _allowed_below(name, ("netsim.kernel", "netsim.errors", "netsim.store.client"))
    }
    assert not wrong, sorted(wrong)


def test_the_store_client_stands_on_the_kernel_layer_alone():
    wrong = {
        name
        for name in _imports(ROOT / "netsim" / "store" / "client.py")
        if not _allowed_below(name, ("netsim.kernel", "netsim.errors"))
    }
    assert not wrong, sorted(wrong)


def test_the_kernel_layer_imports_nothing_above_it():
    wrong = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in _modules("netsim/kernel")
        for name in _imports(p)
        if not _allowed_below(name, ("netsim.kernel", "netsim.errors"))
    }
    assert not wrong, sorted(wrong)


def test_no_module_outside_the_modes_names_a_mode():
    modes_dir = ROOT / "netsim" / "modes"
    found = []
    for path in _modules("netsim") + _modules("cni"):
        if modes_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in MODES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert not found, found
