"""The rules of the house (ARCHITECTURE.md), checked on the source: no import cycles (imports
inside functions count), the runtime imports nothing of celery_nb, the magics neither Celery
nor Docker, and no function of the worker grows past 60 lines."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("celery_nb", "celery_nb_runtime")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path))
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project's modules that ``module`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(module.split(".")[:-node.level] + [node.module])
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" imports mod
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != module)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {module: _imports(module, tree, known) for module, tree in sources.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_runtime_imports_nothing_of_celery_nb() -> None:
    graph = _graph()
    offenders = {m: sorted(t for t in targets if t.split(".")[0] == "celery_nb")
                 for m, targets in graph.items() if m.startswith("celery_nb_runtime")}
    assert not any(offenders.values()), offenders


def test_the_magics_import_neither_celery_nor_docker() -> None:
    tree = ast.parse((ROOT / "celery_nb/magics.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"celery", "kombu", "docker"}, imported


def test_worker_functions_stay_short() -> None:
    long = []
    for path in sorted((ROOT / "celery_nb/worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {length} lines")
    assert not long, "\n".join(long)
