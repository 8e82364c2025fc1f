"""The import contract: layers import only downward, and no module imports itself back.

:data:`LAYERS` (also in the README's layout section) lists mergeshield's rooms from the bottom
up.  Every ``import`` of a mergeshield module, wherever it stands (module level, inside a
function, under ``TYPE_CHECKING``), must go to the importer's own layer or one below it, and
the graph of those imports must have no cycle.  The package ``__init__`` (the public API) is
the top and nothing inside may import it.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# From the bottom up; a module belongs to the layer of its longest matching name.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "progress", "registry"),
    ("folders", "arrays", "allocator", "convert", "objective"),
    ("architectures", "symmetries", "modeling", "tasks"),
    ("checkpoint", "shards", "rewrite"),
    ("defenses",),
    ("protect", "verify"),
    ("merging", "attacks"),
    ("hardening",),
    ("evaluation", "detect"),
    ("cli",),
]


def modules() -> dict[str, Path]:
    """Dotted module name (without ``mergeshield.``) -> file, packages by their ``__init__``."""
    root = SRC / "mergeshield"
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module``; the package itself ("") is above them all."""
    if module == "":
        return len(LAYERS)
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or module.startswith(name + ".")
            if inside and (best is None or len(name) > len(best[1])):
                best = (index, name)
    if best is None:
        raise AssertionError(f"mergeshield.{module} is in no layer: add it to LAYERS")
    return best[0]


def imports(file: Path, known: set[str]) -> set[str]:
    """The mergeshield modules ``file`` imports (``from mergeshield import x`` of a submodule
    counts as importing ``x``; of a name, as importing the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] or [node.module]
            names = [n if n.removeprefix("mergeshield.") in known else node.module for n in names]
        else:
            continue
        for name in names:
            if name == "mergeshield" or name.startswith("mergeshield."):
                found.add(name.removeprefix("mergeshield").removeprefix("."))
    return found


@functools.cache
def _graph(src: Path) -> dict[str, frozenset[str]]:
    mods = modules()
    known = set(mods)
    return {m: frozenset(imports(f, known) - {m}) for m, f in mods.items()}


def graph() -> dict[str, frozenset[str]]:
    """Module -> the mergeshield modules it imports (parsed once per source tree)."""
    return _graph(SRC)


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in modules() if m))
def test_imports_go_to_the_same_layer_or_below(module):
    edges = graph()
    up = sorted(
        f"mergeshield.{t or '__init__'} (layer {layer_of(t)})"
        for t in edges[module]
        if layer_of(t) > layer_of(module)
    )
    assert not up, f"mergeshield.{module} (layer {layer_of(module)}) imports upward: {up}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, set())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_contract_can_fail(tmp_path, monkeypatch):
    """The checks see an upward import inside a function and a cycle."""
    pkg = tmp_path / "mergeshield"
    (pkg / "defenses").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from mergeshield.defenses import x\n")
    (pkg / "defenses" / "__init__.py").write_text("from mergeshield.errors import f\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", tmp_path)
    with pytest.raises(AssertionError, match="imports upward"):
        test_imports_go_to_the_same_layer_or_below("errors")
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
