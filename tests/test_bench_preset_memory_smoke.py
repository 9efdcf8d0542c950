"""CI smoke test of bench/preset_memory.py (tiny LLaMA): the command runs per method (one allocator, to
keep it short), and the table's ratio is the records'; each allocator's environment."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "preset_memory.py"


def load():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("preset_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_allocator_sets_only_its_own_malloc_settings():
    bench = load()
    base = {"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "8"}
    assert bench.environment("glibc", base) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert bench.environment("live", base) == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def test_preset_memory_smoke(tmp_path):
    bench = load()
    bench.main(["--smoke", "--steps", "2", "--allocators", "live", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "preset_memory.json").read_text())
    runs = {(r["method"], r["allocator"]): r for r in result["runs"]}
    assert set(runs) == {(m, "live") for m in bench.METHODS} and len(result["runs"]) == 2
    assert all(r["peak_memory_bytes"] > 0 for r in runs.values())
    md = (tmp_path / "preset_memory.md").read_text()
    ratio = runs[("quality preset", "live")]["peak_memory_bytes"] / runs[("adamw", "live")]["peak_memory_bytes"]
    assert "| live |" in md and f"| {ratio:.3f} |" in md and "| glibc |" not in md
