"""The package's layers only import downwards, and no modules import each other in a circle.

Every import of every module under hmkd/ is read from its source (the ones inside functions too), so
a lazy import cannot hide an arrow. The layers, bottom up (README, "How the code is laid out"):

    errors, utils, allowed -> config -> models -> data -> engine -> distill -> training
        -> cli, bench, viz, export, demo, config_docs (and the package's own __init__)

A module may import its own layer and those below; within a layer, modules may import each other
as long as no circle forms.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hmkd")

LAYERS = [
    ("hmkd.errors", "hmkd.utils", "hmkd.allowed"),
    ("hmkd.config",),
    ("hmkd.models",),
    ("hmkd.data",),
    ("hmkd.engine",),
    ("hmkd.distill",),
    ("hmkd.training",),
    ("hmkd.cli", "hmkd.bench", "hmkd.viz", "hmkd.export", "hmkd.demo", "hmkd.config_docs", "hmkd.__main__", "hmkd"),
]


def _modules(root: str = ROOT) -> dict[str, str]:
    mods = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _edges(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the hmkd modules it imports (a name imported from a package resolves to its module
    when it is one, else to the package)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != m and r.startswith("hmkd"):
                    edges[m].add(r)
    return edges


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "hmkd") or module == "hmkd" and "hmkd" in prefixes:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


MODULES = _modules()
EDGES = _edges(MODULES)


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        _layer(m)


def test_imports_only_point_down() -> None:
    upward = sorted(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                    for a, targets in EDGES.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(", ".join(c) for c in cycles)


def test_the_reader_sees_lazy_and_relative_imports(tmp_path) -> None:
    """The reader itself: an import inside a function and a relative one are arrows too."""
    pkg = tmp_path / "hmkd"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from hmkd.low import X\n    return X\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nfrom ..low import X\n")
    edges = _edges(_modules(str(pkg)))
    assert edges["hmkd.sub.a"] == {"hmkd.low"}
    assert edges["hmkd.sub.b"] == {"hmkd.sub.a", "hmkd.low"}
