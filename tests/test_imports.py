"""Import structure (issue 12.6): no import cycles between modules, the package root imported by none of the
modules it re-exports, the suites never importing the pytest plugin; the cycle-prone entry points import
first in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import harness

PACKAGE = Path(harness.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(path: Path, lazy: bool) -> set[str]:
    """Harness modules ``path`` imports: at module level, or anywhere (``lazy``: function-level too).
    ``from pkg import sub`` counts as importing ``pkg.sub`` (Python initialises ``pkg`` first anyway)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if lazy else [n for n in tree.body]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m in MODULES}


def _graph(lazy: bool) -> dict[str, set[str]]:
    return {m: _imports(p, lazy) - {m} for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph[m] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycles() -> None:
    assert _cycles(_graph(lazy=False)) == []


def test_package_root_is_imported_by_none_of_what_it_reexports() -> None:
    """harness/__init__ imports checker, models (and through them the store): none of those, at any
    level, imports the root back (the version lives in harness.version)."""
    lazy = _graph(lazy=True)
    behind_root = _closure(lazy, "harness")
    offenders = sorted(m for m in behind_root if "harness" in lazy[m])
    assert offenders == []


def test_suites_never_import_the_pytest_plugin() -> None:
    lazy = _graph(lazy=True)
    offenders = sorted(m for m in lazy if m.startswith("harness.suites") and "harness.pytest_plugin" in lazy[m])
    assert offenders == []
    part = {m for m in lazy if m.startswith(("harness.suites", "harness.pytest_plugin"))}
    assert not _cycles({m: lazy[m] & part for m in part})


@pytest.mark.parametrize("module", ["harness.suites.model_suite", "harness.store", "harness.checker",
                                    "harness.suites.session", "harness.pytest_plugin", "harness.cli"])
def test_imports_first_in_a_fresh_interpreter(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import {module}; import harness; print(harness.__version__)"],
                          capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
