"""The import graph follows the floors of docs/architecture.md (invariant 7).

Parses every module of the package (no import is executed) and fails on: a package cycle, a file
cycle, an import of a higher (or the same) floor from another package, a stage importing another
stage, an aside package (recipe, report) importing anything but io/errors, a package other than cli,
pipeline, rundir and stages reading recipes, and a function-level import of vitopt code. The checker
itself is tested on small synthetic trees, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "vitopt"

#: floor of each top-level part of the package; higher may import lower.
FLOORS = {"__init__": 9, "__main__": 9, "cli": 7, "pipeline": 6, "rundir": 6, "stages": 5, "sparsity": 4,
          "pruning": 4, "deploy": 4, "arch": 3, "train": 3, "io": 1, "errors": 1}
#: packages that stand aside, and what they may import.
ASIDE = {"recipe": {"io", "errors"}, "report": {"io", "errors"}}
#: who may read recipes.
RECIPE_READERS = {"cli", "pipeline", "rundir", "stages"}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, modules: dict[str, Path], package: str) -> tuple[set[str], list[tuple[int, str]]]:
    """Internal modules ``path`` imports, and the (line, module) of function-level internal imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    nested: list[tuple[int, str]] = []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith(package):
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith(package)]
        return []

    for node in ast.walk(tree):
        for t in targets(node):
            if t in modules:
                found.add(t)
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                nested += [(node.lineno, t) for t in targets(node)]
    return found, nested


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def layering_problems(root: Path) -> list[str]:
    """Every problem of the package at ``root`` (empty when it follows the floors)."""
    package = root.name
    modules = _modules(root)
    files: dict[str, set[str]] = defaultdict(set)
    packages: dict[str, set[str]] = defaultdict(set)
    problems = []
    for mod, path in modules.items():
        found, nested = _imports(path, modules, package)
        problems += [f"function-level import of {t} in {mod} (line {line})" for line, t in nested]
        for t in found:
            if t == mod or mod.startswith(t + "."):        # a submodule naming its own package
                continue
            files[mod].add(t)
            a, b = _top(mod), _top(t)
            if a != b:
                packages[a].add(b)
            stages = f"{package}.stages"
            if a == b == "stages" and mod != stages and t not in (stages, f"{stages}.base") and mod != f"{stages}.base":
                problems.append(f"stage imports stage: {mod} -> {t}")
    problems += [f"package cycle: {' <-> '.join(c)}" for c in _cycles(packages)]
    problems += [f"file cycle: {' <-> '.join(c)}" for c in _cycles(files)]
    for a, bs in packages.items():
        for b in bs:
            if a in ASIDE:
                if b not in ASIDE[a]:
                    problems.append(f"aside package {a} imports {b}")
            elif b == "recipe":
                if a not in RECIPE_READERS and a not in ("__init__", "__main__"):
                    problems.append(f"{a} reads recipes (only {', '.join(sorted(RECIPE_READERS))} may)")
            elif b in ASIDE or (a, b) == ("io", "errors"):
                continue
            elif a not in FLOORS or b not in FLOORS:
                problems.append(f"{a} -> {b}: {a if a not in FLOORS else b} has no floor in the layer table")
            elif FLOORS[b] >= FLOORS[a] and a not in ("__init__", "__main__"):
                problems.append(f"back-edge: {a} (floor {FLOORS[a]}) -> {b} (floor {FLOORS[b]})")
    return sorted(problems)


def test_vitopt_follows_the_floors():
    assert layering_problems(ROOT) == []


# ------------------------------------------------------------------------------------ the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"arch/__init__.py": "", "arch/a.py": "from pkg.pruning import x\n", "pruning/__init__.py": "x = 1\n"},
     "back-edge: arch (floor 3) -> pruning (floor 4)"),
    ({"pruning/__init__.py": "", "pruning/a.py": "from pkg.sparsity import s\n",
      "sparsity/__init__.py": "", "sparsity/s.py": "from pkg.pruning import a\n"},
     "package cycle: pruning <-> sparsity"),
    ({"train/__init__.py": "", "train/a.py": "from pkg.train import b\n", "train/b.py": "from pkg.train import a\n"},
     "file cycle: pkg.train.a <-> pkg.train.b"),
    ({"stages/__init__.py": "", "stages/a.py": "from pkg.stages import b\n", "stages/b.py": ""},
     "stage imports stage: pkg.stages.a -> pkg.stages.b"),
    ({"arch/__init__.py": "", "arch/a.py": "def f():\n    from pkg.io import x\n", "io.py": "x = 1\n"},
     "function-level import of pkg.io in pkg.arch.a (line 2)"),
    ({"deploy/__init__.py": "", "deploy/a.py": "from pkg.recipe import r\n", "recipe/__init__.py": "r = 1\n"},
     "deploy reads recipes (only cli, pipeline, rundir, stages may)"),
    ({"report/__init__.py": "", "report/a.py": "from pkg.arch import c\n", "arch/__init__.py": "c = 1\n"},
     "aside package report imports arch"),
])
def test_checker_catches_each_problem(tmp_path, files, expected):
    assert expected in layering_problems(_tree(tmp_path, files))


def test_checker_accepts_downward_imports_and_optional_heavy_imports(tmp_path):
    root = _tree(tmp_path, {"stages/__init__.py": "", "stages/base.py": "from pkg.arch import c\n",
                            "stages/a.py": "from pkg.stages.base import c\nfrom pkg.pruning import p\n",
                            "pruning/__init__.py": "from pkg.arch import c\np = 1\n",
                            "arch/__init__.py": "from pkg.errors import E\nc = 1\n", "errors.py": "E = 1\n",
                            "deploy/__init__.py": "def f():\n    import tensorrt\n"})
    assert layering_problems(root) == []
