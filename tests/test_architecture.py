"""The package's shape, read from its source: no import cycle, and stages that meet only in ftl.flows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ftl"
STAGES = {"extract", "train", "finetune", "predict"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every ftl module `path` imports, at the top or inside a function (a lazy import is still an arrow)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ftl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftl"):
            # `from ftl.train import stage` runs ftl/train/__init__.py, then imports ftl.train.stage: both arrows.
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or module.endswith("__init__") else parts[-1]


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_stages_meet_only_in_flows(graph):
    crossings = sorted((m, d) for m, deps in graph.items() for d in deps
                       if package(m) in STAGES and package(d) in STAGES and package(m) != package(d))
    assert not crossings, f"a stage imports another stage (compose them in ftl.flows instead): {crossings}"


def test_only_the_cli_runs_flows(graph):
    users = sorted(m for m, deps in graph.items() for d in deps
                   if package(d) == "flows" and package(m) != "flows" and m != "ftl.cli")
    assert not users, f"flows are entry points, composed by the CLI only: {users}"


def test_shared_layers_import_no_stage(graph):
    shared = {"fitting", "model", "io", "pipeline", "sources", "config", "tracking"}
    arrows = sorted((m, d) for m, deps in graph.items() for d in deps
                    if package(m) in shared and package(d) in STAGES | {"flows"})
    assert not arrows, f"a shared layer imports a stage: {arrows}"


def test_the_walk_sees_the_package(graph):
    """The rules above are only as good as the graph: it must hold every stage and the arrows into them."""
    assert {package(m) for m in graph} >= STAGES | {"flows", "fitting"}
    assert "ftl.extract.stage" in graph["ftl.flows.run"] and "ftl.train.stage" in graph["ftl.flows.run"]
