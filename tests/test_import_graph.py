"""The import graph of src/zhiling: no cycles, and dependencies flow one way.

config -> data -> models -> train | infer -> serve / eval / export, with the applications (the quickstart, the CLI)
on top. The graph is read from the source with the AST, so every import statement counts: those inside functions,
under ``if TYPE_CHECKING:`` and relative ones too. An edge goes to the module named; ``from package import name`` goes
to ``package.name`` where that is a module, else to the package's ``__init__``. Importing ``a.b.c`` also runs
``a/__init__.py`` and ``a/b/__init__.py``; those implicit edges are not drawn (a package face that re-exports its own
modules would otherwise be a cycle with each of them).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "zhiling"

LIBRARIES = {"config", "data", "models", "train", "infer", "serve", "eval", "export"}
APPLICATIONS = {"quickstart", "cli", "__main__"}  # zhiling.quickstart, zhiling.cli.*, zhiling.__main__
FORBIDDEN = {  # layer -> layers it must not import (besides the applications, which no library may import)
    "train": {"infer", "serve", "eval", "export"},
    "infer": {"export"},
    "eval": {"train"},
}

# What remains to fix: the graph's violations must equal this set exactly, so a new one fails and a fixed one must be
# struck off here (a ratchet). Cycles read "cycle: a, b" (modules sorted), arrows "a -> b".
KNOWN_VIOLATIONS: set[str] = set()  # none left: a new cycle or forbidden arrow fails the test


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SRC / ROOT).rglob("*.py"))}


def imported_modules(module: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the import statements of ``path`` name, relative imports made absolute."""

    def known(name: str) -> str:  # the longest prefix of a dotted name that is one of ours ("" if none)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                stem = f"{base}.{stem}" if stem else base
            for alias in node.names:
                found.add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else known(stem))
    return found - {"", module}


def import_graph() -> dict[str, set[str]]:
    modules = read_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    arrows = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer(source), layer(target)
            if here in LIBRARIES and (there in APPLICATIONS or there in FORBIDDEN.get(here, set())):
                arrows.append(f"{source} -> {target}")
    return arrows


def violations() -> set[str]:
    graph = import_graph()
    return {"cycle: " + ", ".join(c) for c in cycles(graph)} | set(forbidden_arrows(graph))


def test_import_graph_has_only_the_known_violations():
    found = violations()
    new, fixed = sorted(found - KNOWN_VIOLATIONS), sorted(KNOWN_VIOLATIONS - found)
    assert not new, "new import cycles or forbidden arrows (see the layer rules in this file's docstring):\n" + \
        "\n".join(new)
    assert not fixed, "fixed, so strike them off KNOWN_VIOLATIONS in tests/test_import_graph.py:\n" + "\n".join(fixed)


def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    package = tmp_path / ROOT
    (package / "train").mkdir(parents=True)
    (package / "eval").mkdir()
    (package / "__init__.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "eval" / "__init__.py").write_text("")
    (package / "train" / "a.py").write_text("def f():\n    from ..eval import b\n")
    (package / "eval" / "b.py").write_text("from . import c\n")
    (package / "eval" / "c.py").write_text("def g():\n    import zhiling.eval.b\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    graph = import_graph()
    assert graph["zhiling.train.a"] == {"zhiling.eval.b"}
    assert cycles(graph) == [["zhiling.eval.b", "zhiling.eval.c"]]
    assert forbidden_arrows(graph) == ["zhiling.train.a -> zhiling.eval.b"]
