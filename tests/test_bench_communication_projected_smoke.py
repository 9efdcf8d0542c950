"""Smoke test of ``bench/communication.py --projected-backward --quick``: a hidden-128 LLaMA under FSDP2
on 2 gloo ranks, full against projected backward. Checked: FSDP2's reduce-scatter of the targets as
counted equals the formula from the shapes, and the projected path's steady step carries fewer bytes
than the full path's (issue 26's ratio, which the shapes fix, is r/min(m, n) = 8/128 here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_communication_projected_bench_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/communication.py", "--projected-backward", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "communication_projected_quick.json").read_text())
    assert record["fsdp_target_payload_counted"] == record["fsdp_target_payload_formula"] > 0
    full, projected = record["rows"]["full_payload"], record["rows"]["projected_payload"]
    # refresh steps: the full path reduce-scatters G, the projected one sketches from the ranks' factors
    # (issue 26; its products are refresh-phase traffic) and sends less in all
    assert projected["refresh_step"] < full["refresh_step"]
    assert projected["mean_per_step_T4_with_refresh_work"] < full["mean_per_step_T4_with_refresh_work"] / 2
    assert projected["steady_step"] <= 2 * 8 / 128 * full["steady_step"]
    assert "| ratio projected/full (payload) |" in (tmp_path / "communication_projected_quick.md").read_text()


def test_communication_projected_ddp_bench_smoke(tmp_path):
    """``--projected-backward --ddp --quick``: DDP's all-reduce of the targets as counted by the comm
    hook equals the shapes' formula; the sketched refresh's refresh step carries less than the
    full-gradient refresh's, and DDP never carries the targets on the projected path (issue 26,
    distributed_sketch)."""
    done = subprocess.run([sys.executable, "bench/communication.py", "--projected-backward", "--ddp", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "communication_projected_ddp_quick.json").read_text())
    assert record["ddp_target_payload_counted"] == record["ddp_target_payload_formula"] > 0
    rows = record["rows"]
    full, dense, sketched = (rows[f"{n}_payload"] for n in ("full", "projected_full_refresh", "projected"))
    assert dense["refresh_step"] >= full["steady_step"]  # the full-gradient refresh all-reduces every G
    assert sketched["refresh_step"] < dense["refresh_step"]
    assert sketched["steady_step"] <= 2 * 8 / 128 * full["steady_step"]
    largest = max(e["ddp_all_reduce"] for e in record["steps"]["projected"]["steps"])  # the other parameters
    assert largest == record["ddp_others_payload"]
    assert "| ratio projected/full (payload) |" in (tmp_path / "communication_projected_ddp_quick.md").read_text()
