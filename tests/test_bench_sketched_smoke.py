"""Smoke test of bench/sketched_refresh.py: the four modes on a tiny random LLaMA (one process each),
the residual index-set comparison, and ``--against-lora`` (GaLore+ against PEFT LoRA); its table's
arithmetic on a made-up record. Nothing about speed or memory is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sketched_refresh  # noqa: E402


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


def test_against_lora_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/sketched_refresh.py", "--against-lora", "--smoke", "--adapters", "lora",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "sketched_refresh_vs_lora_smoke.json").read_text())
    rows = {(row["mode"], row["embeddings"], row["checkpointing"]) for row in record["rows"]}
    assert rows == {(mode, emb, ckpt) for ckpt in (False, True) for mode, emb in
                    (("sketched_in_backward", "frozen"), ("sketched_in_backward", "full"), ("lora", "frozen"))}
    for row in record["rows"]:
        (run,) = row["runs"]
        assert len(run["steps"]) == record["steps"], run
        assert set(run["steps"][0]["phase_peaks_above_model_mib"]) == set(sketched_refresh.PHASES), run
        # a step's peak is its largest phase peak; LoRA's adapters are trainable parameters it added
        assert all(s["peak_above_model_mib"] == max(s["phase_peaks_above_model_mib"].values()) for s in run["steps"])
        assert (run["trainable_mib"] > 0) and (run["state_mib"] > 0 or row["mode"] != "lora")
    table = (tmp_path / "sketched_refresh_vs_lora_smoke.md").read_text()
    assert table.count("| lora |") == 2 and table.count("| 1.00 |") >= 2


def test_against_lora_table_arithmetic():
    def run(base, model, peaks):  # peaks: per step, MiB above the model after the method was built
        return {"rss_base_mib": base, "rss_model_mib": model, "state_mib": 1.0, "trainable_mib": 2.0,
                "steps": [{"seconds": 1.0, "peak_above_model_mib": p, "after_backward_above_model_mib": p,
                           "phase_peaks_above_model_mib": {name: p for name in sketched_refresh.PHASES}}
                          for p in peaks]}

    steps = [100.0, 120.0, 110.0, 100.0, 100.0]
    record = {"steps": 5, "gap": 3, "machine": "m", "rows": [
        {"label": "galore+", "mode": "sketched_in_backward", "embeddings": "frozen", "checkpointing": False,
         "runs": [run(1000, 1000, [60.0] * 5), run(1000, 1000, [70.0] * 5)]},
        # the adapters (30 MiB) are counted: the peak above the base model is 120 + 30
        {"label": "lora", "mode": "lora", "embeddings": "frozen", "checkpointing": False,
         "runs": [run(1000, 1030, steps), run(1000, 1030, steps)]},
        {"label": "dora", "mode": "dora", "embeddings": "frozen", "checkpointing": True,
         "runs": [{"mode": "dora", "error": "boom"}]},
        {"label": "lora", "mode": "lora", "embeddings": "frozen", "checkpointing": True, "runs": []}]}
    assert sketched_refresh.peak_above_base(record["rows"][1]["runs"][0]) == 150.0
    lines = sketched_refresh.lora_table(record).splitlines()
    galore, lora, dora, pending = (line.split("|")[1:-1] for line in lines[4:8])
    assert [c.strip() for c in galore[2:5]] == ["2", "65", "0.43"]  # median 65 MiB over 2 runs, 65 / 150
    assert [c.strip() for c in lora[3:5]] == ["150", "1.00"]
    assert "failed" in dora[3] and dora[4].strip() == ""  # the run failed; LoRA's row with checkpointing has no run
    assert "not run" in pending[3]  # a stopped run's JSON


def test_saved_tensors_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/sketched_refresh.py", "--saved-tensors", "--smoke", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "sketched_refresh_saved_smoke.md").read_text().splitlines()
    assert "galore+ projected, embedding frozen" in lines[0] and "lora" in lines[0]
    total = lines[2].split("|")
    assert total[1].strip() == "all" and all(float(cell) > 0 for cell in total[2:4])
