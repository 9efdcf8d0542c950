"""Smoke test of bench/projected_backward.py: the whole pipeline on a tiny random LLaMA (one process
per configuration, the table, the LLaMA-layer part on a small layer). Nothing about speed is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_projected_backward_bench_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/projected_backward.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "projected_backward_smoke.json").read_text())
    methods = {json.loads(k)["method"] for k in record["results"]}
    assert methods == {"galore+ projected", "galore+ full", "lora"}
    for runs in record["results"].values():
        for r in runs:
            assert r["tokens_per_second"] > 0 and math.isfinite(r["tokens_per_second_amortized"])
            assert r["refresh_step_seconds"] > 0 and r["peak_rss_bytes"] > r["rss_after_load_bytes"] > 0
    b = record["part_b"]
    assert b["ddp_bytes_per_step"]["refresh step"] == b["full_gradient_bytes"]  # full gradients at a refresh
    assert 0 < b["ddp_bytes_per_step"]["projected step"] < b["full_gradient_bytes"] / 4
    table = (tmp_path / "projected_backward_smoke.md").read_text()
    assert "galore+ projected r4, embedding frozen" in table and "| 1.00 |" in table  # LoRA against itself


def test_small_mode_with_a_baseline_smoke(tmp_path):
    """``--small`` (the small LLaMA, here with a small vocabulary) with ``--baseline-src``: every GaLore+
    configuration twice ([before] from the given tree), CPU and wall times, the step split."""
    done = subprocess.run([sys.executable, "bench/projected_backward.py", "--small", "8", "--vocab", "256", "--repeat",
                           "1", "--steps", "1", "--warmup", "1", "--baseline-src", str(ROOT / "src"), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "projected_backward_small.json").read_text())
    configs = [json.loads(k) for k in record["results"]]
    assert sorted((c["method"], c["embeddings"], c.get("code", "")) for c in configs) == [
        ("galore+ projected", "frozen", ""), ("galore+ projected", "frozen", "before"),
        ("galore+ projected", "full", ""), ("galore+ projected", "full", "before"),
        ("galore+ projected", "low_rank", ""), ("galore+ projected", "low_rank", "before"), ("lora", "frozen", "")]
    for key, runs in record["results"].items():
        for r in runs:
            assert r["tokens_per_cpu_second"] > 0 and set(r["cpu_phases"]) == {"forward", "backward", "step"}
            if json.loads(key)["embeddings"] in ("full", "low_rank"):
                assert r["step_split"]["plain"] > 0 and r["step_split"]["low_rank"] > 0
    table = (tmp_path / "projected_backward_small.md").read_text()
    assert "embedding full [before]" in table and "| 1.00 |" in table  # LoRA against itself


def test_small_capture_mode_smoke(tmp_path):
    """``--small --capture``: LoRA and GaLore+ on the interval and with the captured-share refresh, sketched
    (threshold 1e-9: the sketch alone; 1.0: a late refresh every other update) and exact; the refreshes
    each run took are recorded and shown."""
    done = subprocess.run([sys.executable, "bench/projected_backward.py", "--small", "8", "--vocab", "256", "--repeat",
                           "1", "--steps", "4", "--warmup", "1", "--capture", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "projected_backward_small_capture.json").read_text())
    counts = {(c["method"], c.get("capture")): runs[0]["refreshes_per_matrix"]
              for c, runs in ((json.loads(k), v) for k, v in record["results"].items())}
    assert counts[("lora", None)] is None
    # 6 updates (1 warm-up, 4 timed, 1 more): the first refresh, then at 3 and 5 with threshold 1
    assert counts[("galore+ projected", 1.0)] == 3
    assert counts[("galore+ projected", 1e-9)] == counts[("galore+ full", 1e-9)] == 1
    assert counts[("galore+ projected", None)] == 2  # the interval's: 1, and the step after the timed ones
    table = (tmp_path / "projected_backward_small_capture.md").read_text()
    assert "capture < 1 (sketched)" in table and "capture < 1e-09 (exact)" in table


def test_small_fira_mode_smoke(tmp_path):
    """``--small --fira``: LoRA, GaLore+ projected and on the full path, and with Fira's term."""
    done = subprocess.run([sys.executable, "bench/projected_backward.py", "--small", "8", "--vocab", "256", "--repeat",
                           "1", "--steps", "1", "--warmup", "1", "--fira", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "projected_backward_small_fira.json").read_text())
    assert sorted((json.loads(k)["method"], json.loads(k).get("outside", "")) for k in record["results"]) == [
        ("galore+ full", ""), ("galore+ full", "fira"), ("galore+ projected", ""), ("lora", "")]
    assert "embedding frozen, Fira term" in (tmp_path / "projected_backward_small_fira.md").read_text()
