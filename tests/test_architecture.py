"""The house's rules, read from the code's own imports (ARCHITECTURE.md draws them).

Every ``import`` and ``from ... import`` in the package counts, at module level or inside a
function (a late import is still a dependency). Each module belongs to the layer of its top
folder; a module may import its own layer's modules and the layers below, never one above,
and no chain of imports may lead back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "dreamroute"

#: lowest first; a name is a top-level module or folder of the package
LAYERS = [
    ["errors"],
    ["config"],
    ["signals", "grading", "store"],
    ["backends", "cache"],
    ["router"],
    ["api"],
    ["eval", "dream", "bench"],
    ["server", "cli"],
    ["__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (a ``from X import m`` of a submodule counts as m)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            # "from pkg import submodule, ..." depends on the submodules alone
            targets = subs if all(t in known for t in subs) else [mod] + subs
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_top_level_part_has_a_layer():
    assert {layer_of(m) for m in modules()} <= set(LAYER), "add the new part to LAYERS and ARCHITECTURE.md"


def test_layers_import_only_their_own_and_those_below():
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
              if LAYER[layer_of(b)] > LAYER[layer_of(a)]]
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(upward))


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(g[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_parts_do_not_import_each_other_in_a_circle():
    edges = {(layer_of(a), layer_of(b)) for a, deps in graph().items() for b in deps if layer_of(a) != layer_of(b)}
    both = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not both, "parts that import each other:\n" + "\n".join(both)


@pytest.mark.parametrize("name", sorted(modules()))
def test_files_read_in_one_sitting(name):
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it along a responsibility (under {MAX_LINES})"
