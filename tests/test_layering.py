"""The layering in DESIGN.md, enforced: protocol <- client <- node, one libp2p importer."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"protocol": "loomnet.protocol", "client": "loomnet.client", "node": "loomnet.node"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package folder
                folder = path.parent.relative_to(ROOT).parts
                base = [PACKAGES[folder[0]].split(".")[0], folder[0], *folder[1:]]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                found.add(".".join(["loomnet", *base[1:]] + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


def modules(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_dependency_direction(folder):
    forbidden = {"protocol": ("loomnet.client", "loomnet.node"), "client": ("loomnet.node",), "node": ()}[folder]
    for path in modules(folder):
        bad = [m for m in imports_of(path) if m.startswith(forbidden)] if forbidden else []
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_protocol_is_sans_io():
    io = ("trio", "httpx", "libp2p", "multiaddr", "time", "random", "socket", "os", "asyncio", "sqlite3")
    for path in modules("protocol"):
        bad = [m for m in imports_of(path) if m.split(".")[0] in io]
        assert not bad, f"{path.relative_to(ROOT)} imports I/O, clocks or randomness: {bad}"


def test_exactly_one_module_imports_libp2p():
    importers = [
        str(path.relative_to(ROOT))
        for folder in PACKAGES
        for path in modules(folder)
        if any(m.split(".")[0] in ("libp2p", "multiaddr") for m in imports_of(path))
    ]
    assert importers == ["client/_p2p.py"]


@pytest.mark.parametrize("package", PACKAGES.values())
def test_public_exports_exist_and_are_sorted_names(package):
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.__all__ names missing {name}"
