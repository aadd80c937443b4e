"""The import graph of ``sureid``: no cycle, and no module imports a module of a higher layer.

Every Python file under ``sureid/`` is read with ``ast`` (nothing is imported, so this test runs
even when the package does not): imports at module level and inside functions and methods,
relative (``from .x import y``, ``from . import x``) and absolute (``import sureid.x``,
``from sureid.x import y``). The subpackages ``data``, ``analysis`` and ``cli`` are one node
each. Importing a name from the package itself (``from . import __version__``,
``from sureid import SureidModel``) imports ``sureid/__init__.py``, the top layer.

The layers (lower number = lower layer; a module imports its own layer or lower, never
higher) are those of docs/architecture.md; a new module must be added to both.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sureid"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE
INIT = "__init__"  # the node of sureid/__init__.py
MAIN = "__main__"

LAYERS = {
    **dict.fromkeys(
        (
            "configuration_sureid",
            "losses",
            "flops",
            "convert",
            "errors",
            "hooks",
            "permissions",
            "paths",
        ),
        0,
    ),
    **dict.fromkeys(("modeling_sureid", "image_processing_sureid"), 1),
    **dict.fromkeys(("data", "inference"), 2),
    **dict.fromkeys(("evaluation", "gallery", "index", "sharding", "zoo"), 3),
    **dict.fromkeys(("analysis", "model_card"), 4),
    **dict.fromkeys(("trainer", "checkpointing"), 5),
    **dict.fromkeys(("export", "visualize", "benchmark", "encoder"), 6),
    "tracking": 7,
    "demo": 8,
    **dict.fromkeys(("cli", MAIN, INIT), 9),
}
# Top-level folders of the repository that the library must never import.
FORBIDDEN = ("research", "examples", "tools")
ADD_TO_MAP = "add it to the layer map in docs/architecture.md and tests/test_layers.py"


@dataclass(frozen=True)
class Import:
    """One import statement seen in a file: ``source`` imports ``target`` (full dotted names)."""

    source: str  # the importing module, e.g. "sureid.data.datasets"
    target: str  # what it imports, e.g. "sureid.inference", "sureid" or "research.x"
    where: str  # "path/in/package.py:line"


# --------------------------------------------------------------------------------------------
# Reading the sources
# --------------------------------------------------------------------------------------------


def read_package(root: Path = PACKAGE_DIR) -> dict[str, str]:
    """Every ``.py`` file under ``root``: path relative to it (posix) -> source text."""
    return {
        path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(root.rglob("*.py"))
    }


def module_name(path: str) -> str:
    """``"data/datasets.py"`` -> ``"sureid.data.datasets"``; ``"data/__init__.py"`` ->
    ``"sureid.data"``; ``"__init__.py"`` -> ``"sureid"``."""
    parts = [PACKAGE, *path.removesuffix(".py").split("/")]
    if parts[-1] == INIT:
        parts.pop()
    return ".".join(parts)


def known_modules(paths: Iterable[str]) -> set[str]:
    """The dotted names of the modules and (sub)packages these files make up."""
    names = set()
    for path in paths:
        parts = module_name(path).split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def imports_of(path: str, source: str, modules: set[str]) -> list[Import]:
    """The imports in one file, anywhere in it (module level, functions, methods, branches)."""
    name = module_name(path)
    package = name if path.endswith(f"{INIT}.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(package, node.module, node.level)
            for alias in node.names:
                sub = f"{base}.{alias.name}"  # `from . import x`: x may be a submodule
                found.append(Import(name, sub if sub in modules else base, where))
        elif (target := _dynamic_import(node)) is not None:
            found.append(Import(name, target, where))
    return found


def _resolve_from(package: str, module: str | None, level: int) -> str:
    """The absolute module of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    if level - 1 >= len(parts):
        return "<beyond the top-level package>"
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _dynamic_import(node: ast.AST) -> str | None:
    """The module of ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    first = node.args[0]
    if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
        if isinstance(first.value, str) and not first.value.startswith("."):
            return first.value
    return None


def all_imports(sources: Mapping[str, str]) -> list[Import]:
    """The imports of every file of the package (``sources``: as ``read_package`` returns)."""
    modules = known_modules(sources)
    return [imp for path, src in sources.items() for imp in imports_of(path, src, modules)]


# --------------------------------------------------------------------------------------------
# The graph between nodes
# --------------------------------------------------------------------------------------------


def node_of(module: str) -> str | None:
    """The graph node of a ``sureid`` module (None for anything outside the package):
    ``"sureid.data.noda"`` -> ``"data"``, ``"sureid.inference"`` -> ``"inference"``,
    ``"sureid"`` -> ``"__init__"``."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else INIT


def edges(imports: Iterable[Import]) -> dict[tuple[str, str], list[str]]:
    """(importing node, imported node) -> where; imports within one node are left out."""
    out: dict[tuple[str, str], set[str]] = {}
    for imp in imports:
        src, dst = node_of(imp.source), node_of(imp.target)
        if dst is not None and src != dst:
            out.setdefault((src, dst), set()).add(imp.where)
    return {edge: sorted(where, key=_by_line) for edge, where in out.items()}


def _by_line(where: str) -> tuple[str, int]:
    path, _, line = where.rpartition(":")
    return path, int(line)


def find_cycles(graph: Mapping[tuple[str, str], list[str]]) -> list[str]:
    """Cycles as ``a -> b (where) -> a (where)``: a shortest one through each node that no
    cycle reported before passes through.

    The package ``__init__`` and ``__main__`` are left out (they sit on top and import all).
    """
    succ: dict[str, list[str]] = {}
    for src, dst in sorted(graph):
        if INIT not in (src, dst) and MAIN not in (src, dst):
            succ.setdefault(src, []).append(dst)
    reported: set[str] = set()
    cycles = []
    for start in sorted(succ):
        if start in reported:
            continue
        path = _shortest_path_back(succ, start)
        if path is None:
            continue
        reported.update(path)
        hops = [f"{b} ({graph[a, b][0]})" for a, b in zip(path, path[1:] + path[:1])]
        cycles.append(" -> ".join([start, *hops]))
    return cycles


def _shortest_path_back(succ: Mapping[str, list[str]], start: str) -> list[str] | None:
    """The nodes of a shortest cycle through ``start`` (without repeating it), or None."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for dst in succ.get(node, ()):
                if dst == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if dst not in parent:
                    parent[dst] = node
                    nxt.append(dst)
        frontier = nxt
    return None


def upward_imports(
    graph: Mapping[tuple[str, str], list[str]], layers: Mapping[str, int] = LAYERS
) -> list[str]:
    """Every import of a module from a higher layer (modules missing from ``layers`` skipped)."""
    found = []
    for (src, dst), where in sorted(graph.items()):
        if src in layers and dst in layers and layers[dst] > layers[src]:
            found.append(
                f"{src} (layer {layers[src]}) imports {dst} (layer {layers[dst]}) at "
                + ", ".join(where)
            )
    return found


def unmapped_modules(
    sources: Mapping[str, str], imports: Iterable[Import], layers: Mapping[str, int] = LAYERS
) -> list[str]:
    """Nodes (files of the package, or modules it imports) that the layer map lacks."""
    nodes = {node_of(module_name(path)) for path in sources}
    nodes |= {node_of(imp.target) for imp in imports} - {None}
    return sorted(nodes - set(layers))


def forbidden_imports(imports: Iterable[Import], forbidden: Iterable[str] = FORBIDDEN) -> list[str]:
    """Imports of ``research`` / ``examples`` / ``tools`` (or from outside the package)."""
    forbidden = tuple(forbidden)
    return [
        f"{imp.where} imports {imp.target}"
        for imp in imports
        if imp.target.split(".")[0] in forbidden or imp.target.startswith("<beyond")
    ]


def violations(sources: Mapping[str, str], layers: Mapping[str, int] = LAYERS) -> dict:
    """Everything wrong with the import graph of ``sources``, by kind (empty lists if sound)."""
    imports = all_imports(sources)
    graph = edges(imports)
    return {
        "unmapped": unmapped_modules(sources, imports, layers),
        "cycles": find_cycles(graph),
        "upward": upward_imports(graph, layers),
        "forbidden": forbidden_imports(imports),
    }


def _listing(lines: list[str]) -> str:
    return "\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------------------------
# The checker itself catches what it must (so it cannot pass by seeing nothing)
# --------------------------------------------------------------------------------------------


def test_the_checker_catches_cycles_upward_and_forbidden_imports():
    sources = {
        "__init__.py": "from .a import f\n__version__ = '0'\n",
        "a.py": "from . import b\n\ndef f():\n    return b\n",
        # the cycle's way back is an import inside a method
        "b.py": "class B:\n    def g(self):\n        from .a import f\n        return f\n",
        "c.py": "import sureid.sub.deep as d\nfrom . import __version__\n",
        "sub/__init__.py": "",
        "sub/deep.py": "from ..a import f\nfrom .. import c\n",
        "d.py": "def h():\n    import research.tool\n    from examples import x\n",
        "e.py": "import importlib\nm = importlib.import_module('sureid.c')\n",
    }
    layers = {"a": 0, "b": 0, "c": 0, "sub": 1, "d": 0, INIT: 9}
    found = violations(sources, layers)

    assert found["unmapped"] == ["e"]
    assert "a -> b (a.py:1) -> a (b.py:3)" in found["cycles"]
    assert any(c.startswith("c -> sub (c.py:1) -> c (sub/deep.py:2)") for c in found["cycles"])
    assert len(found["cycles"]) == 2
    assert found["upward"] == [
        f"c (layer 0) imports {INIT} (layer 9) at c.py:2",  # `from . import __version__`
        "c (layer 0) imports sub (layer 1) at c.py:1",
    ]
    assert found["forbidden"] == [
        "d.py:2 imports research.tool",
        "d.py:3 imports examples",
    ]
    clean = {
        "__init__.py": "from .a import f\n",
        "a.py": "import os\n",
        "b.py": "from .a import f\n",
    }
    assert violations(clean, {"a": 0, "b": 1, INIT: 9}) == dict.fromkeys(found, [])


# --------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------


def _package_violations() -> dict:
    sources = read_package()
    assert f"{INIT}.py" in sources and len(sources) > 10, f"no package found at {PACKAGE_DIR}"
    return violations(sources)


def test_every_module_is_in_the_layer_map():
    unmapped = _package_violations()["unmapped"]
    assert not unmapped, f"modules without a layer ({ADD_TO_MAP}):{_listing(unmapped)}"


def test_no_import_cycle():
    cycles = _package_violations()["cycles"]
    assert not cycles, f"import cycles between sureid modules:{_listing(cycles)}"


def test_no_import_from_a_higher_layer():
    upward = _package_violations()["upward"]
    assert not upward, (
        "imports from a higher layer (move the code down, or pass it in from above; "
        f"layers in docs/architecture.md):{_listing(upward)}"
    )


def test_the_library_never_imports_research_examples_or_tools():
    forbidden = _package_violations()["forbidden"]
    assert not forbidden, f"sureid/ must not import {', '.join(FORBIDDEN)}:{_listing(forbidden)}"
