"""Smoke test of bench/sketched_refresh.py: the four modes on a tiny random LLaMA (one process each)
and the residual index-set comparison. Nothing about speed or memory is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sketched_refresh_bench_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/sketched_refresh.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "sketched_refresh_smoke.json").read_text())
    assert set(record["results"]) == {"full", "full_in_backward", "sketched", "sketched_in_backward"}
    for runs in record["results"].values():
        assert all(len(r["steps"]) == record["steps"] and r["steps"][0]["seconds"] > 0 for r in runs), runs
    assert "| sketched_in_backward |" in (tmp_path / "sketched_refresh_smoke.md").read_text()


def test_residual_index_set_comparison_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/sketched_refresh.py", "--residual", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "sketched_refresh_residual.md").read_text()
    rows = [line.split("|") for line in table.splitlines()[2:]]
    assert len(rows) == 4 and all(float(row[4]) == 1.0 for row in rows)  # q/k of 2 layers: the same set


def test_layer_refresh_time_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/sketched_refresh.py", "--layer", "--repeat", "1", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    times = json.loads((tmp_path / "sketched_refresh_layer.json").read_text())["seconds"]
    assert set(times) == {"from G (formed)", "from x and dy"} and all(len(v) == 1 and v[0] > 0 for v in times.values())
