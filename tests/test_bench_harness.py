"""``bench/harness.py``, the benchmarks' shared machinery: results files, claims, the grid driver,
statistics, output writing; and that no benchmark script reaches into another's private names."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402


def job(name, stage=None, seed=0):
    return {"key": name, "settings": {"seed": seed}, "label": name, "task": "t", "tables": {"main": name},
            **({"stage": stage} if stage else {})}


# ---------------------------------------------------------------------------------------------- results files


def test_settings_key_is_sorted_json():
    assert harness.settings_key({"b": 1, "a": [2, None]}) == '{"a": [2, null], "b": 1}'


def test_append_waits_for_the_lock_and_keeps_both_records(tmp_path):
    """Two read-modify-writes that interleave: the second append blocks on the lock until the first
    is written, then re-reads, so neither record is lost."""
    path = tmp_path / "runs.json"
    harness.append_result(path, {"key": "old", "v": 0})
    with harness.results_lock(path):
        data = harness.load_results(path)  # the first writer has read ...
        other = threading.Thread(target=harness.append_result, args=(path, {"key": "b", "v": 2}))
        other.start()
        time.sleep(0.3)
        assert other.is_alive()  # ... so the second waits
        data["runs"].append({"key": "a", "v": 1})
        harness.write_json(path, data)
    other.join(timeout=10)
    assert not other.is_alive()
    assert [r["key"] for r in harness.load_results(path)["runs"]] == ["old", "a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.json", "runs.json.lock"]  # no temporary left


def test_appends_from_two_processes_all_survive(tmp_path):
    path = tmp_path / "runs.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import harness\n"
            "for i in range(15): harness.append_result(sys.argv[2], {'key': sys.argv[3] + str(i)})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(BENCH), str(path), name]) for name in "xy"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    keys = {r["key"] for r in harness.load_results(path)["runs"]}
    assert keys == {f"{n}{i}" for n in "xy" for i in range(15)}


def test_append_replaces_a_record_with_the_same_key(tmp_path):
    path = tmp_path / "runs.json"
    harness.append_result(path, {"key": "a", "v": 1})
    harness.append_result(path, {"key": "b", "v": 2})
    harness.append_result(path, {"key": "a", "v": 3})
    assert harness.load_results(path) == {"runs": [{"key": "b", "v": 2}, {"key": "a", "v": 3}]}
    assert harness.load_records(path)["a"]["v"] == 3
    assert harness.load_results(tmp_path / "none.json") == {"runs": []}


def test_a_claim_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path):
    json_path, runs_dir = tmp_path / "runs.json", tmp_path / "runs"
    j = job("a")
    mine = harness.claim(j, runs_dir, json_path)
    assert mine.read_text() == f"{os.getpid()} t / a / seed 0\n"
    assert harness.claim(j, runs_dir, json_path) == mine  # our own claim: ours again
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        mine.write_text(f"{other.pid} another invocation\n")
        assert harness.alive(other.pid)
        assert harness.claim(j, runs_dir, json_path) is None  # a live owner keeps it
    finally:
        other.kill()
        other.wait()
    assert not harness.alive(other.pid)
    assert harness.claim(j, runs_dir, json_path) == mine  # a dead owner's claim is taken over
    assert mine.read_text().split()[0] == str(os.getpid())
    harness.append_result(json_path, {"key": "a"})
    assert harness.claim(j, runs_dir, json_path) is None  # recorded: nothing to claim


def test_dedupe_keeps_one_job_per_key_with_every_table():
    a1, b, a2 = job("a"), job("b"), dict(job("a"), tables={"ablation": "a rho"})
    out = harness.dedupe([a1, b, a2])
    assert [j["key"] for j in out] == ["a", "b"] and out[0]["tables"] == {"main": "a", "ablation": "a rho"}


# ---------------------------------------------------------------------------------------------- the driver


def test_drive_replans_after_each_run_and_leaves_a_failed_run_unrecorded(tmp_path):
    """The shared driver re-plans from what is recorded (a later job may depend on an earlier result),
    records each run at once, and neither records nor retries a run that raised."""
    json_path, runs_dir = tmp_path / "grid.json", tmp_path / "runs"

    def plan(by_key):  # "b" is wanted only once "a" is recorded with value 1; "bad" always fails
        out = [job("a", "sweep"), job("bad")]
        if "a" in by_key and by_key["a"]["result"]["value"] == 1:
            out.append(job("b"))
        return out

    ran, tables = [], []

    def run_job(job_, runs_dir_, in_process):
        ran.append(job_["key"])
        if job_["key"] == "bad":
            raise RuntimeError("boom")
        return {"value": 1}

    new, failed = harness.drive(plan, json_path, runs_dir, run_job=run_job, in_process=True, machine={},
                                after_each=lambda: tables.append(1))
    records = json.loads(json_path.read_text())["runs"]
    assert ran == ["a", "bad", "b"] and new == 2 and failed == {"bad"} and len(tables) == 2
    assert [r["key"] for r in records] == ["a", "b"] and records[0]["stage"] == "sweep" and "stage" not in records[1]
    assert set(records[0]) == {"key", "settings", "label", "task", "stage", "result", "machine", "in_process",
                               "started", "code", "loadavg_before", "loadavg_after"}
    head = subprocess.run(["git", "-C", str(Path(harness.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert records[0]["code"] == harness.code_version()  # the checkout's commit (None outside a git checkout)
    assert (records[0]["code"] or "").rstrip("+") == head
    assert not list((runs_dir / "claims").iterdir())  # every claim released, the failed run's too
    with pytest.raises(RuntimeError, match="boom"):  # smoke: a failure stops the grid
        harness.drive(plan, json_path, runs_dir, run_job=run_job, in_process=True, machine={}, stop_on_failure=True)
    assert harness.drive(plan, json_path, runs_dir, run_job=run_job, in_process=True, machine={},
                         max_runs=0) == (0, set())


def test_drive_skips_what_another_invocation_runs(tmp_path):
    json_path, runs_dir = tmp_path / "grid.json", tmp_path / "runs"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        claimed = harness.claim(job("a"), runs_dir, json_path)
        claimed.write_text(f"{other.pid} another invocation\n")
        ran = []
        new, _ = harness.drive(lambda by_key: [job("a"), job("b")], json_path, runs_dir, in_process=True, machine={},
                               run_job=lambda j, r, i: ran.append(j["key"]) or {})
        assert ran == ["b"] and new == 1 and claimed.exists()
    finally:
        other.kill()
        other.wait()


def test_a_stop_file_ends_the_grid_between_runs(tmp_path):
    json_path, runs_dir = tmp_path / "grid.json", tmp_path / "runs"
    ran = []

    def run_job(job_, runs_dir_, in_process):
        ran.append(job_["key"])
        if job_["key"] == "a":  # asked to stop during run "a": it is finished and recorded, "b" is not started
            (runs_dir / harness.STOP).write_text("")
        return {}

    runs_dir.mkdir()
    assert harness.drive(lambda by_key: [job("a"), job("b")], json_path, runs_dir, in_process=True, machine={},
                         run_job=run_job) == (1, set())
    assert ran == ["a"] and [r["key"] for r in json.loads(json_path.read_text())["runs"]] == ["a"]
    (runs_dir / harness.STOP).unlink()
    assert harness.drive(lambda by_key: [job("a"), job("b")], json_path, runs_dir, in_process=True, machine={},
                         run_job=run_job) == (1, set()) and ran == ["a", "b"]


# ---------------------------------------------------------------------------------------------- statistics


def test_paired_t_against_a_hand_computation():
    d = [-0.2, -0.1, -0.3]
    mean, t = harness.paired_t(d)
    # mean −0.2; deviations 0, 0.1, −0.1: sample sd √(0.02 / 2) = 0.1; t = −0.2 / (0.1 / √3) = −2√3
    assert mean == pytest.approx(-0.2) and t == pytest.approx(-2 * math.sqrt(3))
    assert harness.paired_t([0.5, 0.5]) == (0.5, math.inf) and harness.paired_t([-1.0]) == (-1.0, -math.inf)


def test_mean_half_range_mean_sd_and_their_format():
    assert harness.mean_half_range([1.0, None, 3.0]) == (2.0, 1.0) and harness.mean_half_range([None]) is None
    assert harness.fmt_mean_half_range((2.0, 1.0), 1) == "2.0 ± 1.0"
    assert harness.fmt_mean_half_range((0.25, 0.0), 1, 100) == "25.0"  # no ± without a spread
    assert harness.fmt_mean_half_range(None, 2) == "—"
    assert harness.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2))) and harness.mean_sd([4.0]) == (4.0, None)


# ---------------------------------------------------------------------------------------------- outputs and arguments


def test_outputs_are_written_json_first_and_atomically(tmp_path):
    seen = []

    def markdown(data):
        seen.append(json.loads((tmp_path / "out" / "r.json").read_text()))  # the JSON is there already
        return "# r\n"

    def plot(data, path):
        plt = harness.pyplot()
        fig, ax = plt.subplots()
        ax.plot([0, 1], [data["x"], 2])
        harness.save_figure(fig, path)

    harness.write_outputs(tmp_path / "out", "r", {"x": 1}, markdown, plot)
    assert seen == [{"x": 1}] and (tmp_path / "out" / "r.md").read_text() == "# r\n"
    assert (tmp_path / "out" / "r.json").read_text() == '{\n "x": 1\n}'
    assert (tmp_path / "out" / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.json", "r.md", "r.png"]
    assert harness.table_header("a", "b c") == ["| a | b c |", "|---|---|"]


def test_grid_arguments_and_dirs(tmp_path):
    import argparse

    ap = argparse.ArgumentParser()
    harness.add_grid_arguments(ap, "grid", quick="a few minutes")
    args = ap.parse_args(["--quick", "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "u")])
    assert harness.mode(args) == "quick" and not args.table_only and args.max_runs is None
    assert harness.grid_dirs(args, "grid") == (tmp_path / "r", tmp_path / "u") and (tmp_path / "u").is_dir()
    with pytest.raises(SystemExit):
        ap.parse_args(["--quick", "--smoke"])
    args = ap.parse_args(["--smoke", "--table-only"])
    assert harness.mode(args) == "smoke" and args.table_only
    env = harness.child_env(1, EXTRA="x")
    assert env["OMP_NUM_THREADS"] == "1" and env["EXTRA"] == "x"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(harness.ROOT / "src")


# ---------------------------------------------------------------------------------------------- the scripts

#: what the scripts may use of another script: its experiment, by public names
ALLOWED = {"finetune_table": {"train_settings", "eval_job", "run_or_diverged", "smollm2_export"}}


def uses_of_other_scripts(path, scripts):
    """{imported bench module: names used of it} in ``path``, ``from X import name`` included."""
    tree = ast.parse(path.read_text())
    aliases, used = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in scripts:
                    aliases[a.asname or a.name] = a.name
                    used.setdefault(a.name, set())
        elif isinstance(node, ast.ImportFrom) and node.module in scripts:
            used.setdefault(node.module, set()).update(a.name for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used[aliases[node.value.id]].add(node.attr)
    return used


def test_no_script_uses_another_scripts_private_names():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert "harness" in scripts and len(scripts) >= 14
    for path in sorted(BENCH.glob("*.py")):
        for module, names in uses_of_other_scripts(path, scripts).items():
            private = sorted(n for n in names if n.startswith("_"))
            assert not private, f"{path.name} uses private names of {module}: {private}"
            if module in ALLOWED:
                assert names <= ALLOWED[module], f"{path.name} uses {sorted(names - ALLOWED[module])} of {module}"
    # the grid scripts share the harness, not finetune_table's machinery
    for name in ("finetune_table", "lr_sweep", "quality"):
        assert "harness" in uses_of_other_scripts(BENCH / f"{name}.py", scripts)
    assert set(uses_of_other_scripts(BENCH / "harness.py", scripts)) == set()  # the harness imports no script


def test_the_shared_machinery_is_defined_once():
    defining = [p.name for p in BENCH.glob("*.py")
                if any(isinstance(n, ast.FunctionDef) and n.name in ("drive", "claim", "append_result", "load_results")
                       for n in ast.parse(p.read_text()).body)]
    assert defining == ["harness.py"]
