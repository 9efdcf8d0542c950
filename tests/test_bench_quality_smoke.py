"""``bench/quality.py`` (issue 29's protocol): the bracketing rule and the pairing on made-up records,
and ``--smoke``: the whole harness on the tiny model (in-process, seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports finetune_table beside it
    spec = importlib.util.spec_from_file_location("quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill(bench, proto, name, losses, by_key):
    while True:
        pending, curve, chosen = bench.sweep_state(proto, name, by_key)
        if not pending:
            return curve, chosen
        for j in pending:
            loss = losses[j["settings"]["lr"]]
            result = {"diverged": True} if loss is None else {"eval_validation": {"answer_loss": loss},
                                                               "eval_after": {"answer_loss": loss + 0.1}}
            by_key[j["key"]] = {"key": j["key"], "settings": j["settings"], "result": result, "row": name,
                                "task": j["task"], "stage": j["stage"]}


def test_the_sweep_brackets_the_winner_and_the_finals_follow(bench):
    proto = bench.protocol("full")
    assert proto["common"]["max_steps"] == 200 and proto["methods"]["lora"][1] == 16
    base = bench.ABLATION_BASE
    base_runs = {}
    _, chosen = fill(bench, proto, base, {1e-4: 1.0, 3e-4: 0.9, 1e-3: 0.95}, base_runs)
    todo = bench.plan(proto, base_runs, [base])
    ablations = [j for j in todo if j["stage"] == "ablation"]
    # every ablation but the one extending another (it waits for plain lr ×4's result)
    assert chosen == 3e-4 and len(ablations) == len(bench.FINETUNE_ABLATIONS) - len(bench.EXTENDS)
    assert todo[0]["stage"] == "ablation" and not any(j["row"].endswith("plain lr x16") for j in ablations)
    assert all(j["settings"]["lr"] == 3e-4 and j["settings"]["seed"] == 0 for j in ablations)
    by_key = {}
    # LoRA starts at 1e-3, 3e-3, 1e-2; falling to 1e-2 adds 3e-2, which is worse: 1e-2 chosen
    curve, chosen = fill(bench, proto, "lora", {1e-3: 1.0, 3e-3: 0.9, 1e-2: 0.8, 3e-2: 0.85}, by_key)
    assert chosen == 1e-2 and sorted(curve) == [1e-3, 3e-3, 1e-2, 3e-2]
    finals = [j for j in bench.plan(proto, by_key, ["lora"]) if j["stage"] == "final"]
    assert [j["settings"]["seed"] for j in finals] == [1, 2]  # seed 0's final is the sweep's run
    assert all(j["settings"]["lr"] == 1e-2 for j in finals)
    # round by round (bench.ROUNDS, then the other peers): a round's sweeps before its rows' other seeds, its
    # finals before the next round's sweeps
    todo = bench.plan(proto, {**base_runs, **by_key})
    round_of = {n: i for i, r in enumerate(bench.ROUNDS) for n in r}
    rounds = [round_of.get(j["row"].split(" + ")[0], len(bench.ROUNDS)) for j in todo]  # an ablation: its base's
    assert rounds == sorted(rounds) and set(rounds) == set(range(len(bench.ROUNDS) + 1))
    for i in set(rounds):
        stages = [j["stage"] for j, r in zip(todo, rounds) if r == i]
        assert "final" not in stages or stages.index("final") > max(k for k, s in enumerate(stages) if s == "sweep")
    first = [j for j, r in zip(todo, rounds) if r == 0]
    assert [j["row"] for j in first if j["stage"] == "sweep"][:1] == (["galore+"] if bench.NEW_RECIPE else [])
    assert {j["row"] for j in first if j["stage"] == "final"} == {"lora", base}
    second = [j for j, r in zip(todo, rounds) if r == 1]
    assert list(dict.fromkeys(j["row"] for j in second)) == ["adamw", "galore+ (full rank)", "dora"]
    peers = [j for j, r in zip(todo, rounds) if r == len(bench.ROUNDS)]
    assert {j["row"] for j in peers} == set(bench.METHODS) - {n for r in bench.ROUNDS for n in r}
    assert not [j for j in second + peers if j["stage"] == "final"]  # no rate chosen there yet
    # every rate diverging moves the sweep down the ladder
    curve, chosen = fill(bench, proto, "fira", {1e-5: 1.3, 3e-5: 1.2, 1e-4: None, 3e-4: None, 1e-3: None}, {})
    assert chosen == 3e-5 and math.isinf(curve[1e-3])


def test_plain_lr_x16_runs_only_after_x4_beat_the_base(bench):
    proto = bench.protocol("full")
    base = bench.ABLATION_BASE
    by_key = {}
    _, chosen = fill(bench, proto, base, {1e-4: 1.0, 3e-4: 0.9, 1e-3: 0.95}, by_key)  # base run: 0.9
    x4 = next(j for j in bench.ablation_jobs(proto, chosen) if j["row"].endswith("plain lr x4"))

    def x16_planned(x4_loss):
        runs = dict(by_key)
        if x4_loss is not None:
            runs[x4["key"]] = {"key": x4["key"], "settings": x4["settings"], "row": x4["row"], "task": x4["task"],
                               "stage": "ablation", "result": {"eval_validation": {"answer_loss": x4_loss},
                                                               "eval_after": {"answer_loss": x4_loss}}}
        rows, _ = bench.summary(proto, runs)
        shown = next(a for a in next(r for r in rows if r["method"] == base)["ablations"]
                     if a["name"].endswith("plain lr x16"))
        return any(j["row"].endswith("plain lr x16") for j in bench.plan(proto, runs, [base])), shown["skipped"]

    assert x16_planned(None) == (False, False)  # waits for ×4
    assert x16_planned(0.85) == (True, False)  # ×4 helped: the ratio sweep goes on
    assert x16_planned(0.95) == (False, True)  # ×4 did not: ×16 skipped, and the table says so


def test_galore_runs_the_other_ranks_at_its_chosen_rate(bench, tmp_path):
    proto = bench.protocol("full")
    by_key = {}
    _, chosen = fill(bench, proto, bench.RANK_ROW, {1e-4: 1.0, 3e-4: 0.9, 1e-3: 0.95}, by_key)
    ranks = [j for j in bench.plan(proto, by_key, [bench.RANK_ROW]) if j["stage"] == "rank"]
    assert [j["settings"]["rank"] for j in ranks] == [8, 32, 64, "full"]  # 16: the row's own run
    assert all(j["settings"]["lr"] == chosen and j["settings"]["seed"] == 0 and j["row"] == bench.RANK_ROW
               for j in ranks)
    assert len({j["key"] for j in ranks} | set(by_key)) == len(ranks) + len(by_key)
    for j, loss in zip(ranks, (1.1, 0.8, 0.7, None)):
        by_key[j["key"]] = {"key": j["key"], "settings": j["settings"], "row": j["row"], "task": j["task"],
                            "stage": "rank", "result": {"diverged": True} if loss is None else
                            {"eval_validation": {"answer_loss": loss}, "eval_after": {"answer_loss": loss + 0.1}}}
    assert not [j for j in bench.plan(proto, by_key, [bench.RANK_ROW]) if j["stage"] == "rank"]
    rows, records = bench.summary(proto, by_key)
    cells = next(r for r in rows if r["method"] == bench.RANK_ROW)["ranks"]
    assert [(c["rank"], c["validation_loss"], c["diverged"]) for c in cells] == [
        (8, 1.1, False), (32, 0.8, False), (64, 0.7, False), ("full", None, True)]
    assert sorted(str(r["rank"]) for r in records if r["stage"] == "rank") == ["32", "64", "8", "full"]
    assert all(r["method"] == bench.RANK_ROW for r in records)
    bench.render(proto, rows, tmp_path / "q.md", "test")
    text = (tmp_path / "q.md").read_text()
    assert "## Ranks: galore" in text and "| 64 | 0.700 | 0.800 | -0.200 |" in text and "| full | diverged |" in text


def test_the_targets_section_reads_the_finals(bench):
    seeds, pre_seeds = (0, 1, 2), (0, 1)

    def row(method, losses, peak=None):
        return {"method": method, "test_loss": dict(enumerate(losses)),
                "train_peak_rss": {} if peak is None else {s: peak for s in range(len(losses))}}

    rows = [row("lora", [0.16, 0.17, 0.15]), row("galore+ (old recipe)", [0.20, 0.21, 0.19]),
            row("dora", [0.15, 0.15, 0.15]), row("adamw", [0.10, 0.10, 0.10], peak=100.0),
            row("galore+ (full rank)", [0.09, 0.09, 0.10], peak=112.0), row("fira", [0.3, 0.3])]  # fira: 2 of 3 seeds
    pre = [row("galore+ (old recipe)", [4.50, 4.52]), row("adamw", [4.80, 4.82]), row("apollo", [4.50, 4.52])]
    text = "\n".join(bench.target_lines(rows, pre, seeds, pre_seeds))
    assert "GaLore+ below LoRA (galore+ (old recipe) stands in: the new recipe's row has not run): missed " \
           "(galore+ (old recipe) 0.200 against lora 0.160, +0.040)" in text
    assert "gap to AdamW at most half LoRA's (galore+ (old recipe) stands in" in text and "+0.100 against half of +0.060" in text
    assert "the full-rank preset below AdamW: met (galore+ (full rank) 0.093 against adamw 0.100, -0.007)" in text
    assert "AdamW's memory + ≤ 10% (fine-tuning's training peak RSS): missed (1.120× AdamW's)" in text
    assert "Pre-training: GaLore+ at or below adamw (galore+ (old recipe) stands in" in text and "met (galore+" in text
    assert "at or below apollo" in text and "apollo 4.510, +0.000)" in text  # a tie is "at or below"
    assert "Pre-training: GaLore+ at or below fira (galore+ (old recipe) stands in the new" not in text
    assert "at or below fira (galore+ (old recipe) stands in: the new recipe's row has not run): not measured yet" in text
    # the new recipe's row, once it has every seed, replaces the stand-in
    text = "\n".join(bench.target_lines(rows + [row("galore+", [0.14, 0.14, 0.14])], pre, seeds, pre_seeds))
    assert "GaLore+ below LoRA: met (galore+ 0.140 against lora 0.160, -0.020); paired per seed -0.020, -0.030, " \
           "-0.010, t -3.5" in text  # t = −0.02 / (0.01 / √3)
    # and it is planned right after the base row when set
    methods = bench.with_new_recipe(bench.METHODS, ({"plain_lr_ratio": 4.0}, (3e-4, 1e-3, 3e-3)))
    names = list(methods)
    assert names[names.index(bench.ABLATION_BASE) + 1] == "galore+" and methods["galore+"][:2] == ("galore+", bench.RANK)
    assert bench.with_new_recipe(bench.METHODS, None) == bench.METHODS
    # bench/preset_memory.py's live-allocator ratio decides the memory target, the grid's RSS shown beside it
    text = "\n".join(bench.target_lines(rows, pre, seeds, pre_seeds, {"live": 1.04, "glibc": 1.12}))
    assert "RSS following the live tensors, bench/preset_memory.py): met (1.040× AdamW's, glibc allocator 1.120×; " \
           "the grid's runs, glibc's default allocator: 1.120×)" in text
    text = "\n".join(bench.target_lines(rows, pre, seeds, pre_seeds, {"live": 1.15}))
    assert "bench/preset_memory.py): missed (1.150× AdamW's; the grid's runs" in text


def test_preset_memory_ratios_reads_the_full_runs_only(bench, tmp_path):
    path = tmp_path / "preset_memory.json"
    assert bench.preset_memory_ratios(path) is None
    runs = [{"method": m, "allocator": a, "peak_memory_bytes": b}
            for m, a, b in (("adamw", "live", 100), ("quality preset", "live", 104), ("adamw", "glibc", 100),
                            ("quality preset", "glibc", 111))]
    path.write_text(json.dumps({"smoke": False, "runs": runs}))
    assert bench.preset_memory_ratios(path) == {"live": 1.04, "glibc": 1.11}
    path.write_text(json.dumps({"smoke": True, "runs": runs}))
    assert bench.preset_memory_ratios(path) is None


def test_paired_differences_and_t(bench):
    rows = [{"method": "a", "test_loss": {0: 1.0, 1: 1.1, 2: 0.9}}, {"method": "b", "test_loss": {0: 1.2, 1: 1.2, 2: 1.2}}]
    d, mean, t = bench.paired(rows, "a", "b", (0, 1, 2))
    assert d == pytest.approx([-0.2, -0.1, -0.3]) and mean == pytest.approx(-0.2)
    assert t == pytest.approx(-0.2 / (0.1 / math.sqrt(3)))
    assert bench.paired(rows, "a", "missing", (0, 1, 2)) is None


def test_smoke_writes_one_record_per_run_with_the_issue_fields(bench, tmp_path):
    bench.main(["--smoke", "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs")])
    data = json.loads((tmp_path / "r" / "quality.json").read_text())
    raw = json.loads((tmp_path / "r" / "quality_runs.json").read_text())["runs"]
    assert len(data["runs"]) == len(raw) >= 2 * 4  # two rows, 3 rungs + at least one more or finals
    for rec in data["runs"]:
        assert {"task", "method", "rank", "seed", "lr", "steps", "test_loss", "final"} <= set(rec)
    finals = [r for r in data["runs"] if r["final"]]
    assert sorted((r["method"], r["seed"]) for r in finals) == sorted(
        (m, s) for m in ("lora", "galore+ (old recipe)") for s in (0, 1))
    assert all(len(r["result"]["curve"]) == 3 for r in raw)
    md = (tmp_path / "r" / "quality.md").read_text()
    assert "Paired differences" in md and "| galore+ (old recipe) + plain lr x4 |" in md
    ablation = [r for r in data["runs"] if r["stage"] == "ablation"]
    assert len(ablation) == 1 and ablation[0]["method"] == "galore+ (old recipe) + plain lr x4"
    assert [r for r in raw if r["stage"] == "ablation"][0]["settings"]["plain_lr_ratio"] == 4.0


def test_runs_left_counts_the_finals_an_open_sweep_will_add_and_the_cost_table_sums_wall_time(bench):
    proto = bench.protocol("smoke")  # two rows, seeds 0 and 1, no ranks
    seeds = len(proto["seeds"])
    by_key = {}
    # nothing run: each row's three rungs, and one more final each once its sweep closes
    assert bench.runs_left(proto, by_key) == 2 * 3 + 2 * (seeds - 1)
    fill(bench, proto, "lora", {1e-3: 1.0, 3e-3: 0.9, 1e-2: 0.95}, by_key)
    # LoRA's sweep closed at 3e-3: its seed-1 final is now in the plan; the other row is unchanged
    assert bench.runs_left(proto, by_key) == (seeds - 1) + 3 + (seeds - 1)
    records = [dict(r, result=dict(r["result"], wall_seconds=s)) for r, s in zip(by_key.values(), (3600, 1800, 7200))]
    lines = bench.cost_lines((("fine-tuning", records, 4), ("pre-training", [], 0)))
    # 3.5 hours over three runs, median 1 hour, so 4 runs left are about 4 hours; a half with no runs has no rate
    assert "| fine-tuning | 3 | 3.5 | 1.00 | 4 | 4.0 |" in lines
    assert "| pre-training | 0 | 0.0 | — | 0 | — |" in lines
    assert lines[-1].startswith("Total so far 3.5 hours; the runs still to go about 4.0 more")
