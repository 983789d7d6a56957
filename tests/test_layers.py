"""The layers' import rules (docs/architecture.md), read from the source with ``ast``: nothing is imported.

- ``alignment`` (the ML) imports nothing above it: no ``tasks``, ``flows``, ``infra``, ``bench`` or ``tests``;
- ``tasks`` imports no ``flows``, ``infra``, ``bench`` or ``tests``;
- ``tasks.lake`` is a library: it imports neither ``prefect`` nor ``mlflow`` (no submodule, not even inside
  a function) and no ``tasks`` module outside itself;
- everything else reaches the lake through its public names: no ``_private`` name of ``tasks.lake`` or its
  submodules, whether imported or read as an attribute of an imported lake module;
- ``tasks/`` itself holds at most ``MAX_TASK_MODULES`` modules: the stages, their runner and the run
  reference; anything else belongs in one of its packages (lake, tracking, report).

Every import counts, at any depth (function bodies included), and so do ``importlib.import_module`` and
``__import__`` calls with a literal module name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("alignment", "tasks", "flows", "infra", "bench", "tests")
MAX_TASK_MODULES = 18


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` for everything ``path`` imports: ``import a.b`` gives ``a.b``,
    ``from a import b`` gives ``a.b`` (a submodule or a name, the rules treat both alike)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def bindings(path: Path) -> dict[str, str]:
    """The local names ``path``'s imports bind, and the dotted name each stands for."""
    bound: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """``a.b.c`` for an attribute chain on an imported name, with the name replaced by what it stands for."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        head = dotted(node.value, bound)
        return f"{head}.{node.attr}" if head else None
    return None


def fail_if(found: list[str], rule: str) -> None:
    if found:
        pytest.fail(rule + "\n" + "\n".join(found), pytrace=False)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def violations(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in python_files(folder):
        for line, name in imports(path):
            if any(within(name, f) for f in forbidden) and not any(within(name, a) for a in allowed):
                found.append(f"{where(path, line)} imports {name}")
    return found


def test_alignment_imports_no_layer_above_it():
    found = violations("alignment", ("tasks", "flows", "infra", "bench", "tests"))
    fail_if(found, "alignment is the ML and imports nothing above it (orchestration, storage and tracking live in tasks/):")


def test_tasks_import_no_flows_infra_bench_or_tests():
    found = violations("tasks", ("flows", "infra", "bench", "tests"))
    fail_if(found, "tasks are called by the flows, never the other way round:")


def test_lake_imports_no_prefect_no_mlflow_and_no_other_task_module():
    found = violations("tasks/lake", ("prefect", "mlflow", "tasks"), allowed=("tasks.lake",))
    fail_if(found, "tasks.lake is a library a worker, notebook or script uses alone: no Prefect, no MLflow, "
                   "no other tasks module:")


def test_no_private_lake_name_is_used_outside_the_lake():
    found = []
    for folder in CODE:
        for path in python_files(folder):
            if within(module_of(path), "tasks.lake"):
                continue
            for line, name in imports(path):
                if within(name, "tasks.lake") and any(map(is_private, name.split(".")[2:])):
                    found.append(f"{where(path, line)} imports {name}")
            bound = {k: v for k, v in bindings(path).items() if within(v, "tasks") or v == "tasks"}
            if not bound:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and is_private(node.attr):
                    name = dotted(node, bound)
                    if name and within(name, "tasks.lake"):
                        found.append(f"{where(path, node.lineno)} uses {name}")
    fail_if(found, "Outside tasks/lake, reach the lake through its public names (tasks/lake/__init__.py lists them); "
                   "make a name public there rather than reaching past it:")


def test_tasks_holds_at_most_the_stages_their_runner_and_the_run_reference():
    modules = sorted(p.name for p in (ROOT / "tasks").glob("*.py"))
    if len(modules) > MAX_TASK_MODULES:
        pytest.fail(
            f"tasks/ holds {len(modules)} modules (at most {MAX_TASK_MODULES}): {', '.join(modules)}. "
            "Put what is not a stage, its runner or the run reference into a package beside them "
            "(tasks/lake, tasks/tracking, tasks/report) or a new one.",
            pytrace=False,
        )
