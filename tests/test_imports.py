"""The house stays layered: no import circle between modules of ``simclr_tau``.

The graph is read from the source with :mod:`ast` (nothing is imported, so no side effects), and counts
every import: module level, inside functions (lazy imports are still dependencies) and under
``if TYPE_CHECKING:``. ``from simclr_tau.a import b`` is an edge to ``simclr_tau.a.b`` when that is a module,
else to ``simclr_tau.a`` (its package ``__init__``). A package's ``__init__`` re-exporting its submodules is
an edge like any other, so a submodule importing its own package's ``__init__`` is a circle too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simclr_tau"


def module_names(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package directory)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, modules: Dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    """module -> the package modules it imports (anywhere in its source)."""
    modules = module_names(root)
    top = root.name
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" for a in node.names] or [src]
            for t in targets:
                if t == top or t.startswith(top + "."):
                    dep = _resolve(t, modules)
                    if dep is not None and dep != mod:
                        graph[mod].add(dep)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a closed path
    ``[a, b, ..., a]`` through it, sorted. Empty when the graph is a DAG."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    sccs: List[Set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the package's module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_path(graph, comp) for comp in sccs)


def _cycle_path(graph: Dict[str, Set[str]], comp: Set[str]) -> List[str]:
    """A shortest circle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    prev: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"not a strongly connected component: {sorted(comp)}")


def test_find_cycles_on_known_graphs():
    dag = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert find_cycles(dag) == []
    two = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycles(two) == [["a", "b", "a"]]
    three = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d2"}, "d2": {"d"}}
    assert find_cycles(three) == [["a", "b", "c", "a"], ["d", "d2", "d"]]


def test_import_graph_reads_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from pkg.top import y\n")
    (pkg / "top.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import leaf\n")
    g = import_graph(pkg)
    assert g["pkg.sub"] == {"pkg.sub.leaf"}
    assert g["pkg.sub.leaf"] == {"pkg.top"}
    assert g["pkg.top"] == {"pkg.sub.leaf"}
    assert find_cycles(g) == [["pkg.sub.leaf", "pkg.top", "pkg.sub.leaf"]]


def test_simclr_tau_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 30, "the walk found too few modules: is PACKAGE right?"
    cycles = find_cycles(graph)
    assert not cycles, "import circles between modules of simclr_tau (one circle per tangle shown):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit", [400])
def test_modules_stay_small(limit):
    """No module over ~``limit`` lines unless its first lines say why (a line starting 'Long because')."""
    too_long = []
    for name, path in module_names(PACKAGE).items():
        text = path.read_text()
        n = text.count("\n")
        if n > limit and "Long because" not in "\n".join(text.splitlines()[:30]):
            too_long.append(f"{name}: {n} lines")
    assert not too_long, "modules over the size limit without a reason at the top: " + ", ".join(too_long)
