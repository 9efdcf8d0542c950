"""The application layer's layout (Design III): modules small enough to read whole, no import circle
among them (the options below their one check), the data modules still importable as
``galore_plus.app.data``, and one :class:`Runtime` for a process's place in a run."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import galore_plus.app
from galore_plus.app.runtime import Runtime

APP = Path(galore_plus.app.__file__).parent
MAX_LINES = 400

#: what other modules, bench/ and tests import from galore_plus.app.data
DATA_NAMES = ("DataError", "Example", "Task", "TASKS", "FILE_TYPES", "FORMS", "check_source", "load_task",
              "read_examples", "eval_count", "eval_examples", "build_prompt", "prompt_ids", "context_ids",
              "encode", "collate", "normalize_number", "NUMBER_RE", "IGNORE_INDEX", "ARITHMETIC_CONFIG")


@pytest.mark.parametrize("module", [path.name for path in sorted(APP.glob("*.py"))])
def test_each_app_module_is_under_400_lines(module):
    lines = len((APP / module).read_text().splitlines())
    assert lines < MAX_LINES, f"galore_plus/app/{module} has {lines} lines; split it by job"


def app_imports(module: str) -> dict[str, int]:
    """The app modules ``module`` imports, anywhere in it (a function's import too), each with the line
    of its first import."""
    modules = {path.stem for path in APP.glob("*.py")}
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse((APP / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            for name in names:
                if name in modules and name != module:
                    found[name] = min(found.get(name, node.lineno), node.lineno)
    return found


def test_no_import_circle_among_app_modules():
    """Each app module imports only modules below it, a function's import included (a lazy import
    inside a function only hides a circle): DESIGN.md, "The command (`app/`)"."""
    graph = {path.stem: app_imports(path.stem) for path in sorted(APP.glob("*.py"))}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = path[path.index(module):] + [module]
            raise AssertionError("import circle: " + " -> ".join(
                f"{a}.py:{graph[a][b]}" for a, b in zip(circle, circle[1:])) + f" -> {module}.py")
        if module not in done:
            for name in graph[module]:
                visit(name, path + [module])
            done.add(module)

    for module in graph:
        visit(module, [])


def test_the_options_import_none_of_their_checks():
    """``config`` (the options) imports no module that checks them; ``validation`` (the one check)
    imports what it calls at the top, none of which imports it."""
    assert not {"validation", "presets", "option_checks", "reporting", "tasks", "data", "models",
                "templates", "schedules"} & set(app_imports("config"))
    tree = ast.parse((APP / "validation.py").read_text())
    top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert {"config", "presets", "option_checks", "reporting", "tasks", "models", "templates"} <= top
    inner = [node.lineno for f in tree.body if isinstance(f, ast.FunctionDef) for node in ast.walk(f)
             if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not inner, f"validation.py imports inside a function at lines {inner}"


def test_data_still_exposes_its_public_names():
    from galore_plus.app import data

    missing = [name for name in DATA_NAMES if not hasattr(data, name)]
    assert not missing, f"galore_plus.app.data lacks {missing}"
    assert set(data.__all__) <= set(DATA_NAMES)
    # the same objects as in the modules that define them, not copies
    from galore_plus.app import encoding, examples, tasks

    assert data.Example is examples.Example and data.load_task is tasks.load_task and data.encode is encoding.encode


def test_a_single_process_runtime(monkeypatch):
    runtime = Runtime()
    assert (runtime.rank, runtime.world_size, runtime.local_rank) == (0, 1, 0)
    assert runtime.is_main and not runtime.is_distributed and runtime.device == torch.device("cpu")
    assert Runtime.start("none", torch.device("cpu")) == runtime
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.rank = 1

    import galore_plus.distributed as group

    def collective(*args, **kwargs):
        raise AssertionError("a single process took a collective step")

    for name in ("barrier", "sum_across_ranks", "shutdown", "init_from_env"):
        monkeypatch.setattr(group, name, collective)
    runtime.barrier()  # no-ops
    runtime.shutdown()
    assert runtime.sum_across_ranks(1.5, 7) == (1.5, 7)
    assert runtime.share([3, 1, 4, 1, 5]) == [3, 1, 4, 1, 5]


def test_a_ranks_share_of_a_batch():
    ranks = [Runtime(rank=r, world_size=3, distributed="ddp") for r in range(3)]
    assert [r.share(list(range(7))) for r in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [r.is_main for r in ranks] == [True, False, False] and all(r.is_distributed for r in ranks)
