"""``bench/finetune_table.py --smoke``: the whole grid on the tiny model (in-process, seconds). The
shared machinery it runs on (results files, claims, ``drive``) is tested in test_bench_harness.py."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "finetune_table.py"
sys.path.insert(0, str(BENCH.parent))
import harness  # noqa: E402  (bench/harness.py)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("finetune_table", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_table")
    args = ["--smoke", "--results-dir", str(out), "--runs-dir", str(out / "runs")]
    missing = bench.main(args)
    return out, args, missing


def test_smoke_records_every_configured_run(bench, smoke_run):
    out, _, missing = smoke_run
    assert missing == []
    jobs = bench.mode_settings("smoke")["jobs"]
    data = json.loads((out / "finetune_table_smoke.json").read_text())
    assert sorted(r["key"] for r in data["runs"]) == sorted(j["key"] for j in jobs)
    kinds = {j["settings"]["kind"] for j in jobs}
    assert kinds == {"eval_before", "train"}
    for record in data["runs"]:
        result = record["result"]
        metrics = result["eval"] if record["settings"]["kind"] == "eval_before" else result["eval_after"]
        assert math.isfinite(metrics["answer_loss"]) and 0.0 <= metrics["accuracy"] <= 1.0
        assert metrics["n"] == record["settings"]["n_test"]
        if record["settings"]["kind"] == "train":
            assert record["settings"]["eval_before"] is False and result["steps"] == 3 and result["tokens"] > 0
    # the same steps and tokens for every method at a seed
    for seed in (0, 1):
        tokens = {r["result"]["tokens"] for r in data["runs"]
                  if r["settings"]["kind"] == "train" and r["settings"]["seed"] == seed}
        assert len(tokens) == 1


def test_smoke_markdown_has_every_row(bench, smoke_run):
    out, _, _ = smoke_run
    md = (out / "finetune_table_smoke.md").read_text()
    for job in bench.mode_settings("smoke")["jobs"]:
        for table, label in job["tables"].items():
            if table != "before":
                assert f"| {label} |" in md
    assert "GaLore+ residual ablation" in md and "paper" in md
    assert "Nothing: every configured run is recorded." in md
    assert "0,1" in md  # both seeds in the rows


def test_rerun_resumes_and_runs_nothing(bench, smoke_run):
    out, args, _ = smoke_run
    before = json.loads((out / "finetune_table_smoke.json").read_text())
    assert bench.main(args) == []
    after = json.loads((out / "finetune_table_smoke.json").read_text())
    assert [r["started"] for r in after["runs"]] == [r["started"] for r in before["runs"]]


def test_eval_before_equals_finetunes_own(bench, smoke_run, tmp_path):
    """The shared "eval before" is what finetune() itself would have computed for the run."""
    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.finetune import finetune

    out, _, _ = smoke_run
    data = json.loads((out / "finetune_table_smoke.json").read_text())
    job = next(j for j in bench.mode_settings("smoke")["jobs"]
               if j["settings"]["kind"] == "train" and j["settings"]["method"] == "adamw" and j["settings"]["seed"] == 1)
    before = next(r for r in data["runs"] if r["settings"]["kind"] == "eval_before" and r["settings"]["seed"] == 1)
    settings = {k: v for k, v in job["settings"].items() if k != "kind"}
    settings.update(rank=4, eval_before=True, max_steps=1, output_dir=str(tmp_path / "run"))
    own = finetune(FinetuneConfig(**settings))["eval_before"]
    assert own["answer_loss"] == pytest.approx(before["result"]["eval"]["answer_loss"], rel=1e-6)
    assert own["accuracy"] == before["result"]["eval"]["accuracy"]


def test_seeds_filter_runs_only_those_seeds(bench, tmp_path):
    """``--seeds 1`` (like ``--tasks``) splits the work between invocations: only seed-1 runs are recorded."""
    missing = bench.main(["--smoke", "--seeds", "1", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    data = json.loads((tmp_path / "finetune_table_smoke.json").read_text())
    jobs = bench.mode_settings("smoke")["jobs"]
    assert sorted(r["key"] for r in data["runs"]) == sorted(j["key"] for j in jobs if j["settings"]["seed"] == 1)
    assert missing and all(m.endswith("/ seed 0") for m in missing)


def test_a_run_claimed_by_a_live_invocation_is_skipped_then_taken_over(bench, tmp_path):
    """Two invocations never run the same job: a live claim is skipped; a dead one's claim is taken over."""
    import subprocess
    import sys

    args = ["--smoke", "--seeds", "0", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    json_path = tmp_path / "finetune_table_smoke.json"
    job = next(j for j in bench.mode_settings("smoke")["jobs"] if j["settings"]["seed"] == 0)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        claim = harness.claim(job, tmp_path / "runs", json_path)
        claim.write_text(f"{other.pid} another invocation\n")
        missing = bench.main(args)
        recorded = {r["key"] for r in json.loads(json_path.read_text())["runs"]}
        assert job["key"] not in recorded and len(missing) == 1 + sum(
            j["settings"]["seed"] == 1 for j in bench.mode_settings("smoke")["jobs"])
        assert claim.exists()  # not ours to remove
    finally:
        other.kill()
        other.wait()
    bench.main(args)  # the claimant is gone: this invocation takes the run over
    recorded = {r["key"] for r in json.loads(json_path.read_text())["runs"]}
    assert job["key"] in recorded and not claim.exists()
    assert harness.claim(job, tmp_path / "runs", json_path) is None  # recorded now


def test_the_recorded_grid_keeps_its_keys(bench):
    """The full grid's jobs are keyed by their settings; the recorded results must stay reachable when
    FinetuneConfig gains fields (those that are not settings are left out of the key)."""
    recorded = json.loads((BENCH.parents[0] / "results" / "finetune_table.json").read_text())
    assert {r["key"] for r in recorded["runs"]} == {j["key"] for j in bench.mode_settings("full")["jobs"]}


def test_a_run_stopped_by_a_non_finite_loss_is_a_result_and_other_failures_raise(bench, monkeypatch):
    """``run_or_diverged`` (the sweeps' runner) records the command's divergence as a result."""
    def diverging(job, runs_dir, in_process):
        raise RuntimeError("worker exited with 1; log x.log:\nTraceback ...\nFloatingPointError: loss is nan. "
                           "A smaller --lr may help.")

    monkeypatch.setattr(bench, "run", diverging)
    assert bench.run_or_diverged({}, "runs", False) == {
        "diverged": True, "error": "FloatingPointError: loss is nan. A smaller --lr may help."}

    def failing(job, runs_dir, in_process):
        raise RuntimeError("worker exited with 1: out of memory")

    monkeypatch.setattr(bench, "run", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.run_or_diverged({}, "runs", False)
