"""Smoke tests of bench/step_7b.py (a tiny shape at 2 and 4 layers: the bf16 model from the meta
device, the layer-wise 8-bit projected step, both memory measures and the fit) and of
bench/autocast_speed.py (every configuration once). Nothing about speed or memory size is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_7b_bench_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/step_7b.py", "--smoke", "--layers", "2", "4", "--rank", "8",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "step_7b_smoke.json").read_text())
    runs = record["results"]
    assert [r["layers"] for r in runs] == [2, 4] and all("error" not in r for r in runs), runs
    for r in runs:
        assert len(r["steps"]) == 2 and r["state_bytes"] > 0 and r["peak_rss"] > r["param_bytes"]
        # the tensor peak counts at least the parameters and the state alive at the second step
        assert r["steps"][1]["tensor_peak"] > r["param_bytes"] + r["state_bytes"]
    assert runs[1]["param_bytes"] > runs[0]["param_bytes"]
    assert set(record["summary"]["fits"]) == {"peak RSS (process)", "tensor peak", "parameters", "optimizer state"}
    assert "| 4 |" in (tmp_path / "step_7b_smoke.md").read_text()


def test_autocast_speed_bench_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/autocast_speed.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "autocast_speed_smoke.json").read_text())["results"]
    assert sorted(r["config"] for r in results) == sorted(["projected fp32", "projected bf16-autocast", "full fp32",
                                                          "full bf16-autocast"])
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in results), results
