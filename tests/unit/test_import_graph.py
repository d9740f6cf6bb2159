"""No import cycle in the trainhealth package: modules import in one direction, as the data flows.

The graph is built from the source with ``ast`` (every ``import`` and ``from ... import``, also those inside
functions), resolved against the installed package's folders (``monitor/`` is ``trainhealth``,
``trainer/`` is ``trainhealth.trainer``). Imports under ``if TYPE_CHECKING:`` count too: a cycle that only the
type checker sees is still two modules that each need the other to be read (a Protocol breaks it).
A package's ``__init__`` importing its own modules is not an edge back from them (Python imports the
parent package first by design): only the modules an import statement names count, so
``from . import host_memory`` is an edge to ``host_memory``, not to the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trainhealth
import trainhealth.trainer

ROOTS = {"trainhealth": Path(trainhealth.__file__).parent,
         "trainhealth.trainer": Path(trainhealth.trainer.__file__).parent}


def modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the package (packages as their __init__)."""
    out: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement: at module level, in functions, under ``if TYPE_CHECKING:``."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (when it runs, or when it is type-checked)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:  # ``from pkg import module`` names the module; ``from mod import name``, mod
            sub = f"{source}.{alias.name}"
            if sub in known:
                out.add(sub)
            elif source in known:
                out.add(source)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_the_imports_it_must() -> None:
    """The check can fail: it resolves relative imports, from-imports of modules and function-level imports."""
    edges = graph()
    assert "trainhealth.pipeline" in edges["trainhealth.service"]  # from .pipeline import Pipeline
    assert "trainhealth.assembly" in edges["trainhealth.cli"]  # inside serve()
    assert "trainhealth.detectors.base" in edges["trainhealth.detectors"]  # from .base import Detector
    assert "trainhealth.detectors" in edges["trainhealth.config.load"]  # from .. import detectors (a package)
    assert "trainhealth.config.rules" in edges["trainhealth.detectors.spikes"]  # from ..config.rules import flag
    assert "trainhealth.trainer" not in edges["trainhealth.trainer.client"]  # from . import host_memory
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
