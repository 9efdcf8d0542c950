"""Issue 29's pre-training half (``bench/quality_pretrain.py`` through ``bench/quality.py --task
pretrain``): the plan's order and reuse of runs, the ablations' translation to the library's spec, a
diverged run, and ``--smoke`` end to end (tiny model on synthetic text, in-process, seconds): one record
per run, a rerun that runs nothing, and one report merging both tasks."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCH))  # it imports finetune_table, harness, pretrain and quality_pretrain beside it
    spec = importlib.util.spec_from_file_location("quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qp(quality):
    return quality.qp


def full_proto(quality, qp):
    return qp.protocol("full", quality.ABLATIONS, quality.LADDER, quality.MAX_RUNGS)


def record(j, loss):
    return {"key": j["key"], "settings": j["settings"], "row": j["row"], "stage": j["stage"], "task": j["task"],
            "result": {"diverged": True} if loss is None else {"final_val_loss": loss}}


def close_sweep(qp, proto, name, by_key, losses=None):
    """Record made-up sweep runs of row ``name`` until its sweep closes (the middle rung best by default)."""
    starts = proto["methods"][name][2]
    losses = losses or {lr: abs(math.log(lr / starts[1])) for lr in (*proto["ladder"],)}
    while True:
        pending, curve, chosen = qp.sweep_state(proto, name, by_key)
        if not pending:
            return chosen
        for j in pending:
            by_key[j["key"]] = record(j, losses[j["settings"]["lr"]])


def test_the_protocol_is_the_issues(quality, qp):
    proto = full_proto(quality, qp)
    c = proto["config"]
    assert c["steps"] >= 1500 and proto["seeds"] == (0, 1) and proto["ranks"] == (8, 16, 32, 64, "full")
    assert c["rank"] == c["hidden"] // 4
    assert {"adamw", "galore", "galore+ (old recipe)", "apollo", "fira", "galore+ (full rank)"} <= set(proto["methods"])
    assert proto["methods"]["galore+ (full rank)"][:2] == ("galore", {"rank": "full", "scale": 1.0})  # the preset
    # ≥ 5M parameters (counted on the model itself: the vocabulary is the tokenizer's, CONFIG's at most)
    model = qp.pretrain.build_model(c, c["vocab"], 0)
    assert sum(p.numel() for p in model.parameters()) >= 5_000_000


def test_every_ablation_becomes_spec_options(quality, qp):
    from galore_plus.spec import LowRankSpec

    for name, options, _ in quality.ABLATIONS:
        spec = LowRankSpec.recipe("galore+", 64, **qp.spec_options(options, 1500))  # raises on a bad translation
        assert spec is not None, name
    assert qp.spec_options({"refreshes": 8}, 1500) == {"update_proj_gap": 188}
    assert qp.spec_options({"refresh_policy": "capture", "capture_threshold": 0.5}, 1500) == {
        "refresh": "capture", "capture_threshold": 0.5}
    with pytest.raises(ValueError, match="max_steps"):
        qp.spec_options({"max_steps": 3}, 1500)
    with pytest.raises(ValueError, match="ablation 'bad'"):
        qp.protocol("full", (("bad", {"lora_dropout": 0.1}, 1.0),), quality.LADDER, quality.MAX_RUNGS)


def test_the_plan_runs_the_ablation_then_sweeps_then_controls_then_ranks_then_seeds(quality, qp):
    proto = full_proto(quality, qp)
    by_key = {}
    first = qp.plan(proto, by_key)
    assert len(first) == 3 * len(proto["methods"]) and {j["stage"] for j in first} == {"sweep"}
    assert all(j["settings"]["seed"] == 0 for j in first)
    # §4's rates in the middle of the starting rungs
    assert [j["settings"]["lr"] for j in first if j["row"] == "adamw"] == [3e-4, 1e-3, 3e-3]
    base = qp.ABLATION_BASE
    chosen = close_sweep(qp, proto, base, by_key)
    assert chosen == proto["methods"][base][2][1]
    todo = qp.plan(proto, by_key)
    stages = [j["stage"] for j in todo]
    # the ablation as soon as its base is chosen (it decides the new recipe), then the other sweeps, seeds last
    assert stages == sorted(stages, key=["ablation", "sweep", "control", "rank", "final"].index)
    assert stages[0] == "ablation" and "sweep" in stages
    ablation = [j for j in todo if j["stage"] == "ablation"]
    assert len(ablation) == len(quality.ABLATIONS) and all(j["settings"]["lr"] == chosen for j in ablation)
    assert ablation[0]["row"] == f"{base} + {quality.ABLATIONS[0][0]}"
    assert [j["settings"]["seed"] for j in todo if j["stage"] == "final"] == [1]  # seed 0's final is the sweep's run
    for name in proto["methods"]:
        close_sweep(qp, proto, name, by_key)
    todo = qp.plan(proto, by_key)
    ranks = [j for j in todo if j["stage"] == "rank"]
    controls = [j for j in todo if j["stage"] == "control"]
    adamw = proto["methods"][qp.CONTROL_BASE][2][1]
    # the x10 control is the "adamw (plain lr x10)" row's middle rung (the same key): recorded by its sweep
    assert proto["methods"]["adamw (plain lr x10)"][2][1] == adamw
    assert [(j["row"], j["settings"]["lr"], j["settings"]["options"]) for j in controls] == [
        ("adamw + plain lr x40", adamw, {"plain_lr_ratio": 40.0})]
    # rank 64 = hidden/4 is GaLore's own sweep run at that rate: reused, not run again
    assert [j["rank"] for j in ranks] == [8, 16, 32, "full"]
    assert all(j["settings"]["method"] == "galore" for j in ranks)
    # the "plain lr x4" ablation is the new recipe's middle rung (the same settings, so the same key):
    # recorded by that sweep, not run twice
    plain_x4 = [j for j in todo if j["row"] == f"{base} + plain lr x4"]
    assert qp.NEW_RECIPE[0] == {"plain_lr_ratio": 4.0} and plain_x4 == []
    assert len(todo) == len(quality.ABLATIONS) - 1 + len(qp.CONTROLS) - 1 + 4 + len(proto["methods"])
    # the grid, planned whole: every key once
    grid = qp.planned_grid(proto)
    assert len({j["key"] for j in grid}) == len(grid) == 3 * len(proto["methods"]) + len(todo)


def test_a_run_stopped_by_a_non_finite_loss_is_diverged_not_an_earlier_score(qp):
    cfg = dict(qp.SMOKE, steps=4, eval_every=1)
    train_ids, val_windows, vocab, _ = qp.pretrain.load_data("smoke", cfg, Path("/nonexistent"), synthetic=True)
    r = qp.pretrain.run_method("adamw", "adamw", 1e30, cfg, train_ids, val_windows, vocab, 0, 0.0)
    assert r["diverged"] and math.isinf(r["final_val_loss"]) and r["steps"] < cfg["steps"]
    assert math.isinf(qp.loss({"result": r}))


def test_a_failed_key_shared_between_drives_is_not_retried(tmp_path):
    sys.path.insert(0, str(BENCH))
    import harness

    tries = []

    def run_job(job, runs_dir, in_process):
        tries.append(job["key"])
        raise RuntimeError("boom")

    job = {"key": "k", "settings": {"seed": 0}, "label": "k", "task": "t", "tables": {}}
    failed = set()
    for _ in range(2):
        harness.drive(lambda by_key: [job], tmp_path / "r.json", tmp_path, run_job=run_job, in_process=True,
                      machine={}, failed=failed)
    assert tries == ["k"] and failed == {"k"}


def test_smoke_records_resumes_and_merges_the_report(quality, qp, tmp_path, monkeypatch):
    results, runs = tmp_path / "r", tmp_path / "runs"
    args = ["--smoke", "--task", "pretrain", "--results-dir", str(results), "--runs-dir", str(runs),
            "--cache", str(tmp_path / "no-corpus")]
    quality.main(args)
    raw = json.loads((results / qp.RAW).read_text())["runs"]
    assert not (results / "quality_runs.json").exists()  # the fine-tuning raw file is not the pre-training's
    proto = qp.protocol("smoke", quality.protocol("smoke")["ablations"], quality.LADDER, quality.MAX_RUNGS)
    assert qp.plan(proto, {r["key"]: r for r in raw}) == []  # the grid is complete
    steps = proto["config"]["steps"]
    for r in raw:
        assert r["task"] == "pretrain" and r["settings"]["config"]["steps"] == steps
        assert r["result"]["val_curve"][-1][0] == steps and r["result"]["cpu_s"] > 0
    data = json.loads((results / "quality.json").read_text())
    assert len(data["runs"]) == len(raw)
    for rec in data["runs"]:
        assert {"task", "method", "rank", "seed", "lr", "steps", "test_loss", "final"} <= set(rec)
        assert rec["task"] == "pretrain" and rec["steps"] == steps
        assert rec["test_loss"] is None or math.isfinite(rec["test_loss"])
    finals = sorted((r["method"], r["seed"]) for r in data["runs"] if r["final"])
    assert finals == sorted((m, s) for m in proto["methods"] for s in (0, 1))
    (ablation,) = [r for r in data["runs"] if r["stage"] == "ablation"]
    assert ablation["options"] == {"plain_lr_ratio": 4.0} == qp.NEW_RECIPE[0]
    # the same settings as the new recipe's sweep rung at this rate: named by that row
    assert ablation["method"] == "galore+"
    assert sorted(str(r["rank"]) for r in data["runs"] if r["stage"] == "rank") == ["4", "full"]
    # the smoke protocol's one control (x10) is the "adamw (plain lr x10)" row's rung: run once, by that sweep
    assert not [r for r in data["runs"] if r["stage"] == "control"]
    x10 = [r for r in data["runs"] if r["options"] == {"plain_lr_ratio": 10.0}]
    assert x10 and {r["method"] for r in x10} == {"adamw (plain lr x10)"} and len({r["lr"] for r in x10 if r["seed"] == 0}) == len(
        [r for r in x10 if r["seed"] == 0])
    assert {r["rank"] for r in data["runs"] if r["method"] == "adamw"} == {None}

    # resumable: a second invocation finds everything recorded and runs nothing
    monkeypatch.setattr(qp, "run_one", lambda *a: pytest.fail("a recorded run ran again"))
    quality.main(args)
    assert json.loads((results / qp.RAW).read_text())["runs"] == raw

    # one report for both tasks: made-up fine-tuning runs beside the pre-training ones
    gsm = quality.protocol("smoke")
    by_key = {}
    for name in gsm["methods"]:
        while True:
            pending, _, chosen = quality.sweep_state(gsm, name, by_key)
            pending = pending or [j for j in (quality.job(gsm, name, chosen, s, "final") for s in gsm["seeds"])
                                  if j["key"] not in by_key]
            if not pending:
                break
            for j in pending:
                by_key[j["key"]] = {**j, "result": {"eval_validation": {"answer_loss": j["settings"]["lr"]},
                                                    "eval_after": {"answer_loss": 1.0 + j["settings"]["seed"]}}}
    (results / "quality_runs.json").write_text(json.dumps({"runs": list(by_key.values())}))
    quality.write_tables(gsm, results / "quality_runs.json", results, "test", plot_too=True, pretrain_proto=proto)
    data = json.loads((results / "quality.json").read_text())
    assert {r["task"] for r in data["runs"]} == {"arithmetic", "pretrain"}
    assert len(data["runs"]) == len(raw) + len(by_key)
    assert [r["method"] for r in data["pretrain_rows"]] == list(proto["methods"])
    md = (results / "quality.md").read_text()
    assert "## Sweeps (seed 0, validation answer loss" in md and "## Pre-training from scratch" in md
    assert "| galore+ (old recipe) − adamw |" in md and "### Ranks: galore" in md and "### Controls: adamw" in md
    assert (results / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_estimate_times_every_set_up_of_the_grid(quality, qp, tmp_path, capsys):
    lines = quality.main(["--smoke", "--task", "pretrain", "--estimate", "2", "--results-dir", str(tmp_path / "r"),
                          "--runs-dir", str(tmp_path / "runs")])
    proto = qp.protocol("smoke", quality.protocol("smoke")["ablations"], quality.LADDER, quality.MAX_RUNGS)
    timed = [line for line in lines if "CPU s/step" in line]
    grid = qp.planned_grid(proto)
    # each row and rank timed once; "plain lr x4" costs what its base costs and is not timed again
    # and the new recipe ("plain lr x4" on GaLore+) and AdamW's controls cost what their bases cost
    # ("adamw (plain lr x10)" costs what AdamW costs; the input-side row is a set-up of its own)
    assert len(timed) == len({qp.variant(j["settings"]) for j in grid}) == len(proto["methods"]) - 2 + len(proto["ranks"])
    assert f"grid: {len(grid)} runs" in lines[-1]
    assert not (tmp_path / "r" / qp.RAW).exists()  # records nothing


def test_task_all_runs_both_grids_and_max_runs_counts_both(quality, qp, tmp_path, monkeypatch):
    """``--task all``: the fine-tuning grid, then the pre-training one, in one invocation (runs made up
    here: the order and the bookkeeping are under test, not the training)."""
    order = []

    def gsm_run(job, runs_dir, in_process):
        order.append(job["task"])
        loss = abs(math.log(job["settings"]["lr"] / 3e-3))
        return {"eval_validation": {"answer_loss": loss}, "eval_after": {"answer_loss": loss}, "curve": []}

    def pretrain_run(job, proto, cache):
        order.append(job["task"])
        loss = abs(math.log(job["settings"]["lr"] / 1e-2))
        return {"final_val_loss": loss, "diverged": False, "val_curve": [[0, 9.0], [6, loss]]}

    monkeypatch.setattr(quality, "run_one", gsm_run)
    monkeypatch.setattr(qp, "run_one", pretrain_run)
    args = ["--smoke", "--task", "all", "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs")]
    quality.main(args + ["--max-runs", "3"])
    assert order == ["arithmetic"] * 3  # three runs in all, the fine-tuning grid's first
    quality.main(args)
    first_pretrain = order.index("pretrain")
    assert set(order[:first_pretrain]) == {"arithmetic"} and set(order[first_pretrain:]) == {"pretrain"}
    data = json.loads((tmp_path / "r" / "quality.json").read_text())
    assert {r["task"] for r in data["runs"] if r["final"]} == {"arithmetic", "pretrain"}
    assert len(data["runs"]) == len(order)


def test_a_task_order_runs_pretraining_first_then_joins_fine_tuning(quality, qp, tmp_path, monkeypatch):
    """``--task pretrain,gsm_symbolic``: what the second background invocation runs, so that it moves on
    to the fine-tuning grid once the pre-training one is done."""
    order = []
    monkeypatch.setattr(quality, "run_one", lambda job, runs_dir, in_process: order.append(job["task"]) or {
        "eval_validation": {"answer_loss": 1.0}, "eval_after": {"answer_loss": 1.0}, "curve": []})
    monkeypatch.setattr(qp, "run_one", lambda job, proto, cache: order.append(job["task"]) or {
        "final_val_loss": 1.0, "diverged": False, "val_curve": [[0, 9.0], [6, 1.0]]})
    quality.main(["--smoke", "--task", "pretrain,gsm_symbolic", "--results-dir", str(tmp_path / "r"),
                  "--runs-dir", str(tmp_path / "runs")])
    first_gsm = order.index("arithmetic")
    assert set(order[:first_gsm]) == {"pretrain"} and set(order[first_gsm:]) == {"arithmetic"}
    for bad in ("pretrain,pretrain", "finetune", ""):
        with pytest.raises(SystemExit):
            quality.main(["--smoke", "--task", bad, "--table-only"])


def test_adamw_control_steps_the_plain_parameters_at_the_ratio(qp):
    """The control's AdamW: GaLore's targets at lr, every other parameter at ratio × lr, through the
    schedule; without the ratio it is the plain AdamW of one group."""
    from galore_plus import find_targets

    cfg = dict(qp.SMOKE)
    model = qp.pretrain.build_model(cfg, cfg["vocab"], 0)
    targets = {id(t.param) for t in find_targets(model)}
    opt, settings = qp.pretrain.build_optimizer("adamw", model, cfg, 1e-3, 0, {"plain_lr_ratio": 10.0})
    low, plain = opt.param_groups
    assert {id(p) for p in low["params"]} == targets and low["lr"] == 1e-3
    assert plain["lr"] == pytest.approx(1e-2) and settings["plain_lr_ratio"] == 10.0
    assert len(low["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert "embed_tokens" in {n.split(".")[1] for n, p in model.named_parameters() if id(p) in
                              {id(q) for q in plain["params"]}}
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # scales each group's own initial rate
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-3])
    opt, settings = qp.pretrain.build_optimizer("adamw", model, cfg, 1e-3, 0)
    assert len(opt.param_groups) == 1 and "plain_lr_ratio" not in settings
    with pytest.raises(ValueError, match="GaLore"):
        qp.pretrain.build_optimizer("adamw", model, cfg, 1e-3, 0, {"scale": 1.0})


def test_pretrain_script_takes_fira_with_a_rate_only(qp):
    assert qp.pretrain.parse_methods("adamw,fira@0.003") == [("adamw", "adamw", 1e-3), ("fira@0.003", "fira", 3e-3)]
    with pytest.raises(SystemExit, match="fira@LR"):
        qp.pretrain.parse_methods("fira")


def test_in_process_runs_do_not_depend_on_what_ran_before(quality, qp, tmp_path):
    """Runs share one process: each must seed everything it draws (model, data order, projectors), so a
    run's result does not depend on the runs before it (a resumed grid runs them in another order)."""
    proto = qp.protocol("smoke", (), quality.LADDER, quality.MAX_RUNGS)
    first = qp.job(proto, "galore+ (old recipe)", 1e-2, 1, "final")
    other = qp.job(proto, "apollo", 3e-2, 0, "sweep")
    a = qp.run_one(first, proto, tmp_path)
    qp.run_one(other, proto, tmp_path)
    b = qp.run_one(first, proto, tmp_path)
    assert a["val_curve"] == b["val_curve"] and a["train_curve"] == b["train_curve"]
