"""``bench/lr_sweep.py``: the sweep's plan (which rates it adds, which it chooses, what the finals
reuse) on made-up records, and ``--smoke``: the whole harness on the tiny model (in-process, seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lr_sweep.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports finetune_table beside it
    spec = importlib.util.spec_from_file_location("lr_sweep", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(job, loss):
    result = {"diverged": True} if loss is None else {"eval_validation": {"answer_loss": loss}}
    return {"key": job["key"], "settings": job["settings"], "result": result}


def fill(bench, settings, by_key, losses, task="arithmetic", method="galore+", rank=32):
    """Record every pending sweep rung of ``task`` / ``method`` r``rank`` (by default arithmetic /
    galore+ r32) with ``losses[lr]``; returns what the plan then says."""
    while True:
        pending, curve, chosen = bench.sweep_state(settings, task, method, rank, by_key)
        if not pending:
            return curve, chosen
        for job in pending:
            by_key[job["key"]] = record(job, losses[job["settings"]["lr"]])


def test_the_sweep_extends_past_a_winner_at_either_end_and_stops_at_an_interior_one(bench):
    settings = bench.mode_settings("full")
    assert settings["start"]["galore+"] == (1e-5, 3e-5, 1e-4)
    # falling to 3e-4, rising after: 3e-4 is added, then 1e-3 (to see it rise), and 3e-4 is chosen
    losses = {1e-5: 3.0, 3e-5: 2.0, 1e-4: 1.5, 3e-4: 1.2, 1e-3: 1.4}
    curve, chosen = fill(bench, settings, {}, losses)
    assert chosen == 3e-4 and [lr for lr, _ in curve] == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    # the lowest rate best: one rung lower, and the ladder's order is kept
    curve, chosen = fill(bench, settings, {}, {3e-6: 1.1, 1e-5: 1.0, 3e-5: 2.0, 1e-4: 3.0})
    assert chosen == 1e-5 and [lr for lr, _ in curve] == [3e-6, 1e-5, 3e-5, 1e-4]
    # interior at once: nothing added
    curve, chosen = fill(bench, settings, {}, {1e-5: 2.0, 3e-5: 1.0, 1e-4: 2.5})
    assert chosen == 3e-5 and len(curve) == 3
    # a diverged rate is infinitely bad; all diverged: go lower
    curve, chosen = fill(bench, settings, {}, {1e-5: 1.0, 3e-5: 1.1, 1e-4: None, 3e-6: 1.2})
    assert chosen == 1e-5 and dict(curve)[1e-4] == math.inf
    lower = {lr: None for lr in bench.LADDER}
    lower[1e-6] = 5.0
    curve, chosen = fill(bench, settings, {}, lower)
    assert chosen == 1e-6 and len(curve) == 5
    # always falling: stops after MAX_RUNGS rates, the winner reported at the edge
    curve, chosen = fill(bench, settings, {}, {lr: -math.log10(lr) for lr in bench.LADDER})
    assert len(curve) == bench.MAX_RUNGS and chosen == max(lr for lr, _ in curve) == 3e-3


def test_a_task_can_start_a_method_elsewhere_and_the_bracketing_rule_still_decides(bench):
    settings = bench.mode_settings("full")
    rungs = {task: [j["settings"]["lr"] for j in bench.sweep_state(settings, task, "dora", 32, {})[0]]
             for task in ("arithmetic", "gsm_symbolic")}
    assert rungs == {"arithmetic": [1e-4, 3e-4, 1e-3], "gsm_symbolic": [1e-3, 3e-3, 1e-2]}
    assert [j["settings"]["lr"] for j in bench.sweep_state(settings, "gsm_symbolic", "galore+", 8, {})[0]] == \
        [1e-5, 3e-5, 1e-4]
    # a winner at the start's low end still extends downwards
    losses = {1e-3: 1.0, 3e-3: 1.5, 1e-2: 2.0, 3e-4: 0.9, 1e-4: 1.2}
    curve, chosen = fill(bench, settings, {}, losses, "gsm_symbolic", "dora", 32)
    assert chosen == 3e-4 and [lr for lr, _ in curve] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


def test_finals_follow_the_choice_and_reuse_the_sweep_run_where_it_generated(bench):
    settings = bench.mode_settings("full")
    by_key = {}
    fill(bench, settings, by_key, {1e-5: 2.0, 3e-5: 1.0, 1e-4: 2.5})
    todo = bench.plan(settings, by_key, {"arithmetic"})
    finals = [j for j in todo if j["stage"] == "final" and j["label"] == "galore+ r32 lr3e-05"]
    assert [j["settings"]["seed"] for j in finals] == [1, 2]  # seed 0 is the sweep's run
    assert {j["settings"]["n_validation"] for j in finals} == {200} and all(j["settings"]["generate"] for j in finals)
    assert [j["settings"]["seed"] for j in todo if j["stage"] == "before"] == [0, 1, 2]
    # gsm_symbolic neither sweeps nor finals with generation (see the module): seed 0's final is its sweep run too
    gsm = bench.job(settings, "gsm_symbolic", "galore+", 32, 3e-5, 0, "sweep")
    assert gsm["settings"]["generate"] is False and gsm["settings"]["max_steps"] == 40
    assert gsm["key"] == bench.job(settings, "gsm_symbolic", "galore+", 32, 3e-5, 0, "final")["key"]
    # every sweep run has the command's defaults otherwise (the projected backward: on)
    s = bench.job(settings, "arithmetic", "galore+", 32, 3e-5, 0, "sweep")["settings"]
    assert s["projected_backward"] is None and s["max_steps"] == 150 and s["eval_before"] is False


def test_smoke(bench, tmp_path):
    table = bench.main(["--smoke", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    runs = json.loads((tmp_path / "lr_sweep.json").read_text())["runs"]
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"galore+ r4", "lora r4", "galore+ (recipe) r4"}
    for row in rows.values():
        assert row["chosen_lr"] == min(row["curve"], key=lambda p: p["validation_answer_loss"])["lr"]
        assert [f["seed"] for f in row["finals"]] == [0, 1]
        for final in row["finals"]:
            assert final["test"]["n"] == 4 and final["validation"]["n"] == 4 and "accuracy" in final["test"]
    sweep = [r for r in runs if r["stage"] == "sweep"]
    assert len(sweep) >= 9 and all(r["result"]["eval_validation"]["n"] == 4 for r in sweep)
    # the recipe's row: the command's GaLore+ recipe (Fira's term, the backward left to the command: full)
    recipe = [r["settings"] for r in sweep if r["settings"].get("outside") == "fira"]
    assert len(recipe) >= 3 and all(s["method"] == "galore+" and s["projected_backward"] is None for s in recipe)
    assert len(sweep) == len(recipe) + 6
    md = (tmp_path / "lr_sweep.md").read_text()
    assert "| galore+ r4 |" in md and "at the chosen rate" in md
    assert json.loads((tmp_path / "tuned_table.json").read_text()) == json.loads(json.dumps(table))
    # a second invocation finds everything recorded and runs nothing
    bench.main(["--smoke", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert len(json.loads((tmp_path / "lr_sweep.json").read_text())["runs"]) == len(runs)


def test_galore_plus_trailing_lora_gets_one_run_per_hypothesis(bench, tmp_path):
    settings = bench.mode_settings("full")
    by_key = {}
    fill(bench, settings, by_key, {1e-5: 2.0, 3e-5: 1.0, 1e-4: 2.5})  # GaLore+ r32: 3e-5, loss 1.0
    assert bench.diagnose_jobs(settings, "arithmetic", by_key) == []  # LoRA's sweep is open
    lora = {1e-4: 1.2, 3e-4: 0.9, 1e-3: 1.5}
    for lr, loss in lora.items():
        j = bench.job(settings, "arithmetic", "lora", 32, lr, 0, "sweep")
        by_key[j["key"]] = record(j, loss)
    jobs = bench.diagnose_jobs(settings, "arithmetic", by_key)
    assert [j["settings"]["lr"] for j in jobs] == [pytest.approx(1.2e-4), pytest.approx(7.5e-6), 3e-5, 3e-5, 3e-5]
    assert [j["settings"]["scale"] for j in jobs[:3]] == [1.0, 16.0, 4.0] and jobs[2]["settings"]["update_proj_gap"] == 10
    assert jobs[3]["settings"]["residual_ratio"] == 0.0 and jobs[4]["settings"]["embeddings"] == "frozen"
    assert all(j["settings"]["seed"] == 0 and j["settings"]["rank"] == 32 for j in jobs)
    todo = bench.plan(settings, by_key, {"arithmetic"})
    assert all(j in todo for j in jobs)
    # the table: both baselines and each hypothesis, recorded or pending
    by_key[jobs[0]["key"]] = {"key": jobs[0]["key"], "settings": jobs[0]["settings"], "result": {
        "eval_validation": {"answer_loss": 0.95}, "eval_after": {"answer_loss": 0.97, "accuracy": 0.2},
        "train_seconds": 300.0}}
    for j in [bench.job(settings, "arithmetic", m, 32, lr, 0, "sweep") for m, lr in (("galore+", 3e-5), ("lora", 3e-4))]:
        by_key[j["key"]]["result"].update(eval_after={"answer_loss": 1.0, "accuracy": 0.1}, train_seconds=280.0)
    table = bench.summary(settings, by_key)
    (entry,) = table["diagnoses"]
    assert [r["name"] for r in entry["runs"]] == ["galore+ at its chosen rate", "lora at its chosen rate"] + [
        f"galore+ {name}" for name, _, _ in bench.DIAGNOSES]
    assert entry["runs"][2]["validation_answer_loss"] == 0.95 and entry["runs"][3] == {
        "name": "galore+ alpha 16, lr /4", "lr": pytest.approx(7.5e-6), "options": {"scale": 16.0}, "pending": True}
    bench.render(table, "cmd", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    assert "GaLore+ r32 trails LoRA r32" in md and "| galore+ alpha 1, lr x4 | 0.00012 | 0.950 | 0.970 | 20.0 | 300 |" in md
    # LoRA no better: nothing to diagnose
    for lr in lora:
        j = bench.job(settings, "arithmetic", "lora", 32, lr, 0, "sweep")
        by_key[j["key"]] = record(j, lora[lr] + 0.2)
    assert bench.diagnose_jobs(settings, "arithmetic", by_key) == []


def test_the_recorded_sweep_stays_reachable(bench):
    """``bench/results/lr_sweep.json`` holds the whole grid of :data:`METHODS`: given its records, the plan
    has nothing left to run of it (every job's key, derived from the settings, is recorded); what it may
    have left is the recipe's row (:data:`EXTRA_ROWS`), added after."""
    runs = json.loads((BENCH.parent / "results" / "lr_sweep.json").read_text())["runs"]
    settings = bench.mode_settings("full")
    left = bench.plan(settings, {r["key"]: r for r in runs})
    assert all(j["label"].startswith("galore+ (recipe) r32 ") and j["task"] == "arithmetic" for j in left)
    assert all(j["settings"]["outside"] == "fira" for j in left if j["stage"] != "before")


def test_a_variant_row_is_its_method_with_its_options_on_its_task_only(bench):
    settings = bench.mode_settings("full")
    assert ("galore+ (recipe)", 32) in settings["rows"]["arithmetic"]
    assert ("galore+ (recipe)", 32) not in settings["rows"]["gsm_symbolic"]
    recipe = bench.job(settings, "arithmetic", "galore+ (recipe)", 32, 1e-4, 0, "sweep")
    plain = bench.job(settings, "arithmetic", "galore+", 32, 1e-4, 0, "sweep")
    assert recipe["settings"] == dict(plain["settings"], outside="fira") and recipe["key"] != plain["key"]
    assert [j["settings"]["lr"] for j in bench.sweep_state(settings, "arithmetic", "galore+ (recipe)", 32, {})[0]] \
        == [3e-5, 1e-4, 3e-4]
    assert not [j for j in bench.plan(settings, {}, {"gsm_symbolic"}) if "recipe" in j["label"]]


def test_every_option_added_since_the_grids_is_left_out_of_keys_when_off():
    """An option added to FinetuneConfig after the recorded grids must be in ``LATER_OPTIONS`` (left out
    of a run's key at its off value), or every recorded key would change and the grids re-run."""
    import finetune_table as ft

    from galore_plus.app.config import LEGACY_VALUES

    keyed_before = {"eval_data", "eval_fraction", "projected_backward", "embeddings", "dtype", "stochastic_rounding",
                    "gradient_checkpointing", "n_validation", "generate"}
    assert set(LEGACY_VALUES) == keyed_before | set(ft.LATER_OPTIONS)
    settings = ft.train_settings(dict(model="tiny", plain_lr_ratio=1.0), 4)
    assert "plain_lr_ratio" not in settings
    assert ft.train_settings(dict(model="tiny", plain_lr_ratio=4.0), 4)["plain_lr_ratio"] == 4.0


def test_the_recipe_row_is_paired_per_seed_with_the_rows_it_is_judged_against(bench, tmp_path):
    def row(method, rank, losses, diverged=()):
        return {"task": "arithmetic", "method": method, "rank": rank, "finals": [
            {"seed": s, "diverged": s in diverged, "test": {"answer_loss": v}} for s, v in enumerate(losses)]}

    rows = [row("galore+ (recipe)", 32, [1.0, 1.2, 1.1]), row("galore+", 32, [1.1, 1.25, 1.3]),
            row("lora", 32, [0.9, 1.2, 1.2], diverged=(2,)), row("adamw", None, [1.0, 1.1])]
    (pair,) = bench.paired(rows, (0, 1, 2))  # LoRA lacks a seed (diverged), AdamW seed 2, DoRA every seed
    assert (pair["a"], pair["b"]) == ("galore+ (recipe) r32", "galore+ r32")
    assert pair["differences"] == pytest.approx([-0.1, -0.05, -0.2])
    d = [-0.1, -0.05, -0.2]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert pair["mean"] == pytest.approx(mean) and pair["t"] == pytest.approx(mean / (sd / math.sqrt(3)))
    table = {"common": bench.mode_settings("full")["common"], "tasks": {"arithmetic": {"generate": True}},
             "rows": [], "paired": [pair]}
    bench.render(table, "cmd", tmp_path / "t.md")
    assert "| galore+ (recipe) r32 − galore+ r32 | -0.100, -0.050, -0.200 | -0.117 |" in (tmp_path / "t.md").read_text()


def test_the_commands_galore_plus_rate_is_the_recipe_rows_choice(bench):
    """``config.DEFAULT_LR["galore+"]`` is the rate the recorded sweep chose for the command's GaLore+ recipe on
    the main job (arithmetic, r32): changing either without the other fails here."""
    from galore_plus.app.config import DEFAULT_LR

    runs = json.loads((BENCH.parent / "results" / "lr_sweep.json").read_text())["runs"]
    _, curve, chosen = bench.sweep_state(bench.mode_settings("full"), "arithmetic", "galore+ (recipe)", 32,
                                         {r["key"]: r for r in runs})
    assert len(curve) >= 3 and chosen == DEFAULT_LR["galore+"]
