"""The import graph of ``care_megatron``: no cycles, and no imports of the conversion tools' package.

Built statically with :mod:`ast` over every module of the package (nothing is imported), counting
every import statement wherever it stands (module level, inside functions and methods, in ``try``
blocks), except those under ``if TYPE_CHECKING:``, which never run. ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``. Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``; those implicit edges are left out, since a package's ``__init__``
importing its own submodules is the normal shape and would otherwise read as a cycle everywhere.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "care_megatron"
CONVERSION_TOOLS = "checkpoints_convert"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root / package``."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node that can run: all depths, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking_guard(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """``(absolute base, names)`` per import: ``import a.b`` -> ``("a.b", ())``, ``from .x import y, z``
    -> ``("<package>.x", ("y", "z"))``."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".")[:None if is_package else -1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        found.append((base, tuple(alias.name for alias in node.names)))
    return found


def _deepest_module(name: str, modules) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in modules:
            return ".".join(parts[:cut])
    return None


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(module -> modules of the package it imports, module -> every absolute name it imports)``."""
    modules = module_names(root, package)
    edges: dict[str, set[str]] = {}
    imported: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        imported[module] = set()
        for base, names in imports_of(module, path):
            imported[module].add(base)
            for name in names or (None,):
                submodule = f"{base}.{name}" if name else None
                target = submodule if submodule in modules else _deepest_module(base, modules)
                if target is not None:
                    targets.add(target)
        targets.discard(module)
        edges[module] = targets
    return edges, imported


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(start: str) -> None:  # Tarjan, iterative: no recursion limit on long import chains
        nonlocal counter
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    return [_cycle_in(component, edges) for component in sorted(components)]


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if child in members and child != start and child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle found in component {component}")


@pytest.fixture(scope="module")
def package_graph():
    return import_graph(REPO, PACKAGE)


def test_graph_covers_the_package(package_graph):
    edges, _ = package_graph
    assert f"{PACKAGE}.trainer" in edges and f"{PACKAGE}.models.weight_mapping.rules" in edges
    # a function-level import is an edge (parallel_state imports layers_per_stage inside a function)
    assert f"{PACKAGE}.models.weight_mapping" in edges[f"{PACKAGE}.training.megatron.parallel_state"]


def test_no_import_cycles_in_the_package(package_graph):
    edges, _ = package_graph
    cycles = find_cycles(edges)
    assert not cycles, "import cycles inside care_megatron:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_package_does_not_import_the_conversion_tools(package_graph):
    """The CLI converters sit on top of the library (care_megatron.models.weight_mapping), never below."""
    _, imported = package_graph
    offenders = sorted(f"{module} imports {name}" for module, names in imported.items() for name in names
                       if name == CONVERSION_TOOLS or name.startswith(CONVERSION_TOOLS + "."))
    assert not offenders, "\n".join(offenders)


def test_conversion_tools_use_the_library_mapping():
    """checkpoints_convert keeps no copy of the mapping: its modules import it from care_megatron."""
    tools = module_names(REPO, CONVERSION_TOOLS)
    library = f"{PACKAGE}.models.weight_mapping"
    users = {m for m, p in tools.items() if any(base.startswith(library) for base, _ in imports_of(m, p))}
    assert {f"{CONVERSION_TOOLS}.{m}" for m in ("qwen2", "qwen3", "qwen2_5_vl", "qwen3_vl", "hf_to_megatron",
                                                  "megatron_to_hf", "megatron_io")} <= users
    assert f"{CONVERSION_TOOLS}.common" not in tools


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_detector_finds_function_level_and_relative_cycles(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, one through a relative
    ``from . import``, and a TYPE_CHECKING-only import that is not a cycle."""
    _write(tmp_path, "pkg/__init__.py", "")
    _write(tmp_path, "pkg/a.py", "from pkg.b import helper\n")
    _write(tmp_path, "pkg/b.py", "def helper():\n    from pkg import a\n    return a\n")
    _write(tmp_path, "pkg/sub/__init__.py", "from . import c\n")
    _write(tmp_path, "pkg/sub/c.py", "from .d import value\n")
    _write(tmp_path, "pkg/sub/d.py", "import pkg.sub.c as c\nvalue = 1\n")
    _write(tmp_path, "pkg/e.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.f import X\n")
    _write(tmp_path, "pkg/f.py", "from pkg.e import TYPE_CHECKING\nX = 1\n")
    _write(tmp_path, "pkg/g.py", "def convert():\n    from checkpoints_convert.qwen2 import SPEC\n    return SPEC\n")
    edges, imported = import_graph(tmp_path, "pkg")
    assert imported["pkg.g"] == {"checkpoints_convert.qwen2"} and edges["pkg.g"] == set()
    assert edges["pkg.b"] == {"pkg.a"}  # `from pkg import a`: the submodule, not pkg/__init__
    assert edges["pkg.sub"] == {"pkg.sub.c"}
    cycles = find_cycles(edges)
    assert sorted(cycles) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub.c", "pkg.sub.d", "pkg.sub.c"]]
