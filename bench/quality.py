"""Full-parameter quality (issue 29): each method at its own tuned rate, 200 steps, rank 16, 3 seeds.

The fine-tuning protocol: gsm_symbolic on SmolLM2-135M-Instruct, rank 16, 200 optimizer steps (4
refreshes at the command's T 50), 200 validation examples held out of the training side for every
choice, the test split only for reporting, scored by answer loss (no generation; BENCHMARKS.md §8
says why). Methods: LoRA, DoRA (PEFT), AdamW (full), Fira (its own package, α 1), GaLore and GaLore+
as the command runs them today ("galore+ (old recipe)": α 4, T 50, lr as swept), and the new recipe
and ablations as issue 29's mechanisms land (:data:`METHODS`).

1. **Sweep** (seed 0): three rungs ~3× apart on :data:`LADDER`, started at §8's optima; a winner at
   either end adds the next rung beyond it (at most :data:`MAX_RUNGS`), so the chosen rate has a worse
   neighbour on both sides or the ladder's end is reported. Chosen by validation answer loss.
2. **Ablation** (right after GaLore+'s sweep, :data:`ABLATIONS`): each of issue 29's mechanisms alone,
   seed 0, at GaLore+'s chosen rate, beside its base run: what the new recipe is built from.
3. **Ranks** (right after GaLore's sweep, :data:`RANKS`): GaLore at its chosen rate with ranks 8, 32,
   64 and full, seed 0 (issue 29 item 6; the pre-training half has the same study).
4. **Finals**: seeds 0, 1, 2 at the chosen rate on the test split (seed 0's final is the sweep's run),
   once every sweep of its round has closed (choices before confirmations; the sweeps in :data:`METHODS`'
   order). In rounds (:data:`ROUNDS`), each to its finals before the next: the recipe against the old
   one and LoRA; AdamW, the full-rank preset and DoRA; then the other peers.

Runs are ``bench/finetune_table.py``'s (one fresh subprocess and one torch thread per run), driven by
``bench/harness.py``'s ``drive`` (each finished run recorded at once in
``bench/results/quality_runs.json``, claims so that two invocations share the grid; resumable: run
the same command again).

The pre-training half (``--task pretrain``; ``bench/quality_pretrain.py``: a 5.3M LLaMA from scratch,
1,500 steps; the same ablations on GaLore+ once its rate is chosen, the sweeps, GaLore's ranks, then
seeds 0 and 1) runs in-process at one thread, each finished run recorded at once in
``quality_pretrain_runs.json``.

    python bench/quality.py --smoke          # seconds: tiny model, in-process (CI)
    python bench/quality.py                  # the fine-tuning grid (~33 min a run on one thread here)
    python bench/quality.py --task pretrain  # the pre-training grid (~11 CPU-min a run); --task all: both
    python bench/quality.py --task pretrain --estimate 50   # its CPU-hours from 50 timed steps a set-up
    python bench/quality.py --methods lora,dora   # only these rows
    python bench/quality.py --table-only     # rewrite quality.{json,md,png}

Outputs (``bench/results``): ``quality_runs.json`` and ``quality_pretrain_runs.json`` (every run, raw,
with its loss curves), ``quality.json`` (one record per finished run of both tasks: task, method, rank,
seed, lr, steps, test_loss — the final validation loss for pre-training —, ``final`` on the runs that
make the tables), ``quality.md`` (sweeps, finals, ablations, paired differences with t; the
pre-training section after the fine-tuning one) and ``quality.png`` (the sweeps and curves, fine-tuning
on top, pre-training below). The report always merges both raw files, whichever task ran.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_table as ft  # noqa: E402  (its runs: train_settings, run_or_diverged, smollm2_export)
import harness  # noqa: E402  (results files, claims, drive, tables)
import preset_memory as pm  # noqa: E402  (the preset's memory against AdamW's: its ratios)
import quality_pretrain as qp  # noqa: E402  (the pre-training half: its protocol, plan, runs and report)

LADDER = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
MAX_RUNGS = 6
SEEDS = (0, 1, 2)
RANK = 16
#: row name → (the command's --method, rank or None, extra FinetuneConfig options, starting rungs).
#: Starts: §8's chosen rates at 40 steps (LoRA/DoRA 3e-3, AdamW 3e-4 and 1e-4, GaLore(+) 3e-4) in the
#: middle; Fira, new here, at GaLore's. In this order (the sweeps'; every row's finals come after all sweeps):
#: LoRA and GaLore+ (old recipe) first, then AdamW and the full-rank preset (issue 29's targets are
#: measured against AdamW), then the other peers.
METHODS = {
    "lora": ("lora", RANK, {}, (1e-3, 3e-3, 1e-2)),
    "galore+ (old recipe)": ("galore+", RANK, {}, (1e-4, 3e-4, 1e-3)),
    "adamw": ("adamw", None, {}, (3e-5, 1e-4, 3e-4)),
    # the library's quality preset (--preset quality: GaLore, every matrix at full rank, α 1) at AdamW's rungs;
    # named as issue 29's records name it (DESIGN.md, "Presets": not GaLore+, whose cross-head q/k is lossy there)
    "galore+ (full rank)": ("galore", "full", {"scale": 1.0}, (3e-5, 1e-4, 3e-4)),
    "dora": ("dora", RANK, {}, (1e-3, 3e-3, 1e-2)),
    "fira": ("fira", RANK, {}, (1e-4, 3e-4, 1e-3)),
    "galore": ("galore", RANK, {}, (1e-4, 3e-4, 1e-3)),
}
#: Issue 29's ablation: each mechanism alone on top of :data:`ABLATION_BASE` at that row's chosen rate
#: × the factor, seed 0, scored beside the base row's seed-0 run (validation and test): (name, extra
#: FinetuneConfig options, lr factor). They run right after the base row's sweep (before its finals and
#: the other rows), since they decide the new recipe. "plain lr ×4": the embeddings, lm_head and norms
#: step at 4·lr, as large as the projected step α·lr with the command's α 4 (§8's one lead).
ABLATION_BASE = "galore+ (old recipe)"
ABLATIONS = (
    ("plain lr x4", {"plain_lr_ratio": 4.0}, 1.0),
    ("plain lr x16", {"plain_lr_ratio": 16.0}, 1.0),
    ("8 refreshes (T 25)", {"refreshes": 8}, 1.0),
    ("capture refresh < 0.5", {"refresh_policy": "capture", "capture_threshold": 0.5}, 1.0),
    # added 2026-12-07 after bench/subspace_noise.py (BENCHMARKS.md §9): one batch's input-side subspace
    # holds across batches, its output side (std's choice for v, k and down) does not
    ("input side (proj_type right)", {"proj_type": "right"}, 1.0),
    ("moments projected", {"moment_transport": "project"}, 1.0),
    ("moments reset", {"moment_transport": "reset"}, 1.0),
    ("canonical signs", {"canonical_signs": True}, 1.0),
    ("Fira term", {"outside": "fira"}, 1.0),
)
#: fine-tuning only (a model trained from scratch needs its embedding): LoRA's choice for the embedding
#: and ``lm_head`` against the published recipe's full training, which decides issue 26's speed target; run
#: right after §8's one lead (plain lr ×4), before the other mechanisms
FINETUNE_ABLATIONS = ABLATIONS[:1] + (
    ("embedding frozen", {"embeddings": "frozen"}, 1.0),
    ("embedding low-rank", {"embeddings": "low_rank"}, 1.0),
) + ABLATIONS[1:4] + (
    # added 2026-12-07 (session 35), next to the exact capture (ABLATIONS[3]): the capture refresh on the
    # projected backward (its share estimated from an 8-column sketch, the refresh one update later;
    # DESIGN.md, "Refresh"): whether the recipe keeps its gain at the projected path's speed
    ("capture < 0.5, projected backward", {"refresh_policy": "capture", "capture_threshold": 0.5,
                                           "projected_backward": True}, 1.0),
) + ABLATIONS[4:] + (
    # added 2026-12-07 (session 35) after Fira's term alone took 0.044 off (the capture refresh 0.021):
    # whether the two add, which decides whether the recipe takes both
    ("Fira term + capture < 0.5", {"outside": "fira", "refresh_policy": "capture", "capture_threshold": 0.5}, 1.0),
    # the plain rate's sweep downward, after ×4 hurt (+0.035) and a frozen embedding hurt (+0.019):
    # whether the optimum lies between them, below the projected step's rate
    ("plain lr x1/4", {"plain_lr_ratio": 0.25}, 1.0),
)
#: the new GaLore+ recipe: ``(extra FinetuneConfig options, starting rungs)`` at rank 16, the row "galore+",
#: planned right after the base row (before the peers' rows). Chosen by the ablation (seed 0, Δ validation
#: against the base at 1e-3; BENCHMARKS.md §9): Fira's term (``outside="fira"``: the gradient outside the
#: subspace, scaled by the projected update's norm ratio) took 0.044 off (test 0.047), the capture refresh
#: at 0.5 0.021; every other mechanism made it worse (plain lr ×4 +0.035, embedding frozen +0.019,
#: low-rank +0.027, T 25 +0.006, input side +0.019, moments projected +0.013, reset +0.012). Fira's term
#: alone, the larger; the two together would join only if the ablation "Fira term + capture < 0.5" beat it
#: by more than 0.01: it did by 0.003 (session 36), so Fira's term stays alone.
#: Its 1e-3 rung is the ablation's run (the same settings). ``bench/quality_pretrain.py``'s ``NEW_RECIPE`` is
#: its pre-training twin (a different choice: the plain rate ×4; Fira's term +0.003 there).
NEW_RECIPE = ({"outside": "fira"}, (3e-4, 1e-3, 3e-3))
#: fine-tuning: an ablation that extends another runs only once that one beat the base run on validation
#: (a sweep of the plain rate goes further only while it helps: at LoRA-like rates ×16 puts the
#: embedding past the rate where LoRA's 1e-2 broke down); otherwise the table says it was skipped
EXTENDS = {"plain lr x16": "plain lr x4"}
#: issue 29 item 6, "ranks 8, 16, 32, 64 and full in both protocols": this row at its chosen rate, seed 0,
#: with each rank of :data:`RANKS` (16 is the row itself; "full" here is GaLore at its own α and rate,
#: unlike the preset's α 1 at AdamW's), after its sweep; the pre-training half has the same study
RANK_ROW = "galore"
RANKS = (8, 32, 64, "full")
#: :func:`plan`'s rounds, each run to its finals before the next starts (added 2026-12-07, session 36, as
#: the grid heads past its budget): first the recipe against the old one and LoRA (which decides the
#: command's GaLore+ default), then the rest of what issue 29's targets are measured on (AdamW, the full-rank
#: preset, DoRA); the other peers (Fira's package, GaLore and its ranks) in a last round after them
ROUNDS = (("lora", "galore+ (old recipe)", "galore+"), ("adamw", "galore+ (full rank)", "dora"))
#: pairs reported with paired differences over the seeds (when both rows are final)
PAIRS = (("galore+", "lora"), ("galore+", "dora"), ("galore+", "adamw"), ("galore+", "galore+ (old recipe)"),
         ("galore+ (old recipe)", "lora"), ("galore+ (old recipe)", "dora"), ("galore+ (old recipe)", "adamw"),
         ("galore+ (old recipe)", "galore"), ("galore+ (old recipe)", "fira"), ("lora", "adamw"), ("dora", "adamw"),
         ("fira", "adamw"), ("lora", "dora"), ("galore+ (full rank)", "adamw"))


def protocol(mode):
    """The options every run shares (FinetuneConfig fields), the seeds and the rows of ``mode``."""
    if mode == "smoke":
        common = dict(model="tiny", data="arithmetic", max_steps=3, batch_size=2, n_train=16, n_test=4, n_validation=4,
                      max_length=64, eval_batch_size=4, warmup_steps=1, update_proj_gap=2, residual_warmup=1,
                      generate=False, max_new_tokens=4)
        methods = {"lora": ("lora", 4, {}, (1e-3, 3e-3, 1e-2)), "galore+ (old recipe)": ("galore+", 4, {}, (1e-3, 3e-3, 1e-2))}
        return {"common": common, "seeds": (0, 1), "methods": methods,
                "ablations": (("plain lr x4", {"plain_lr_ratio": 4.0}, 1.0),), "ranks": ()}
    common = dict(model="smollm2", data="gsm_symbolic", max_steps=200, batch_size=4, n_train=2000, n_test=200,
                  n_validation=200, max_length=384, eval_batch_size=32, generate=False, max_new_tokens=256)
    return {"common": common, "seeds": SEEDS, "methods": with_new_recipe(METHODS, NEW_RECIPE),
            "ablations": FINETUNE_ABLATIONS, "ranks": RANKS}


def with_new_recipe(methods, recipe):
    """``methods`` with the row "galore+" (``recipe``: options and starting rungs) right after
    :data:`ABLATION_BASE`, or as they are while ``recipe`` is None."""
    if recipe is None:
        return dict(methods)
    out = {}
    for name, row in methods.items():
        out[name] = row
        if name == ABLATION_BASE:
            out["galore+"] = ("galore+", RANK, *recipe)
    return out


def job(proto, name, lr, seed, stage, ablation=None, rank=None):
    """One run of row ``name``: with an ablation's ``(name, options, factor)`` on top (its own row), or
    at another ``rank`` (the same row; its label and its record's rank say which)."""
    method, row_rank, extra, _ = proto["methods"][name]
    other_rank, rank = rank is not None, row_rank if rank is None else rank
    options = dict(proto["common"], method=method, seed=seed, lr=lr, eval_before=False, **extra,
                   **(ablation[1] if ablation else {}))
    settings = ft.train_settings(options, rank)
    if ablation:
        name = f"{name} + {ablation[0]}"
    label = f"{name}{f' r{rank}' if other_rank else ''} lr{lr:g}"  # a rank run keeps its row (its record's rank says)
    return {"key": harness.settings_key(settings), "settings": settings, "tables": {stage: label},
            "label": label, "task": proto["common"]["data"], "stage": stage, "row": name}


def sweep_state(proto, name, by_key):
    """(pending sweep jobs, curve {lr: validation loss}, chosen lr or None): ``harness.bracket`` on
    :data:`LADDER`, at most :data:`MAX_RUNGS` rates."""
    return harness.sweep(proto["methods"][name][3], lambda lr: job(proto, name, lr, 0, "sweep"), by_key,
                         harness.validation_loss, LADDER, MAX_RUNGS)


def plan(proto, by_key, names=None):
    """Everything still to run, in order, round by round (:data:`ROUNDS`, then every other row). In each
    round, each row's sweep (with, once its rate is chosen, the ablation or the rank study it carries),
    row after row; then that round's chosen rows' finals. Choices before confirmations within a round: a
    row's other seeds wait until the round's sweeps have closed (as in pre-training); a round's finals
    before the next round's sweeps, since the earlier rounds decide the command's defaults."""
    rows = [n for n in proto["methods"] if not names or n in names]
    rounds = [[n for n in rows if n in round_] for round_ in ROUNDS]
    rounds.append([n for n in rows if not any(n in r for r in ROUNDS)])
    return [j for round_ in rounds for j in plan_round(proto, by_key, round_)]


def plan_round(proto, by_key, rows):
    """:func:`plan` for ``rows``: their sweeps (with what each carries), then their finals."""
    out, finals = [], []
    for name in rows:
        pending, _, chosen = sweep_state(proto, name, by_key)
        out += pending
        if chosen is None:
            continue
        if name == RANK_ROW:
            out += [j for j in rank_jobs(proto, chosen) if j["key"] not in by_key]
        if name == ABLATION_BASE:
            out += [j for j in ablation_jobs(proto, chosen)
                    if j["key"] not in by_key and extension_state(proto, chosen, by_key, j) == "run"]
        finals += [j for j in (job(proto, name, chosen, seed, "final") for seed in proto["seeds"])
                   if j["key"] not in by_key]
    return out + finals


def ablation_jobs(proto, chosen):
    return [job(proto, ABLATION_BASE, chosen * factor, 0, "ablation", (name, options, factor))
            for name, options, factor in proto["ablations"]]


def rank_jobs(proto, chosen):
    return [job(proto, RANK_ROW, chosen, 0, "rank", rank=r) for r in proto["ranks"]]


def extension_state(proto, chosen, by_key, job_):
    """Whether ablation ``job_`` may run: "run" (it extends nothing, or what it extends beat the base
    run on validation), "wait" (not both recorded yet) or "skip" (it did not: :data:`EXTENDS`)."""
    extended = EXTENDS.get(job_["row"].split(" + ", 1)[1])
    if extended is None:
        return "run"
    by_name = {j["row"].split(" + ", 1)[1]: j for j in ablation_jobs(proto, chosen)}
    if extended not in by_name:  # a protocol without it (the smoke one)
        return "run"
    base = by_key.get(job(proto, ABLATION_BASE, chosen, 0, "final")["key"])
    other = by_key.get(by_name[extended]["key"])
    if base is None or other is None:
        return "wait"
    return "run" if harness.validation_loss(other) < harness.validation_loss(base) else "skip"


def run_one(job_, runs_dir, in_process):
    """The run's result with its training-loss curve; a run that stopped on a non-finite loss or
    update is recorded as diverged (a rate too high is a result of the sweep)."""
    result = ft.run_or_diverged(job_, runs_dir, in_process)
    if result.get("diverged"):
        return result
    log = Path(result["output_dir"]) / "log.jsonl"
    result["curve"] = [[r["step"], round(r["loss"], 4)] for r in map(json.loads, log.read_text().splitlines())
                       if r.get("loss") is not None]
    return result


# ---------------------------------------------------------------------------------------------- tables


def summary(proto, by_key):
    """Per row: the sweep curve, the chosen rate, the finals per seed; and the flat records."""
    rows, records = [], []
    finals = set()
    for name in proto["methods"]:
        _, curve, chosen = sweep_state(proto, name, by_key)
        seed_jobs = ([(seed, job(proto, name, chosen, seed, "final")) for seed in proto["seeds"]]
                     if chosen is not None else [])
        per_seed, keys = harness.final_losses(seed_jobs, by_key,
                                              lambda rec: rec["result"]["eval_after"]["answer_loss"])
        finals |= keys
        # the training's peak RSS (the command's own measure; issue 29: the full-rank preset at AdamW's memory + ≤ 10%)
        peak, _ = harness.final_losses(seed_jobs, by_key, lambda rec: rec["result"].get("train_peak_memory_bytes"))
        rows.append({"method": name, "rank": proto["methods"][name][1], "curve": sorted(curve.items()),
                     "chosen_lr": chosen, "test_loss": per_seed,
                     "train_peak_rss": {s: v for s, v in peak.items() if v is not None}})
        if name == ABLATION_BASE and chosen is not None:
            ablations = []
            for j in [job(proto, name, chosen, 0, "final")] + ablation_jobs(proto, chosen):
                rec = by_key.get(j["key"])
                res = rec["result"] if rec else None
                skipped = (rec is None and j["stage"] == "ablation"
                           and extension_state(proto, chosen, by_key, j) == "skip")
                ablations.append({"name": j["row"], "lr": j["settings"]["lr"], "done": rec is not None,
                                  "skipped": skipped,
                                  "diverged": bool(res and res.get("diverged")),
                                  "validation_loss": res["eval_validation"]["answer_loss"] if res and not res.get("diverged") else None,
                                  "test_loss": res["eval_after"]["answer_loss"] if res and not res.get("diverged") else None})
            rows[-1]["ablations"] = ablations
        if name == RANK_ROW and chosen is not None:
            cells = []
            for r, j in zip(proto["ranks"], rank_jobs(proto, chosen)):
                res = (by_key.get(j["key"]) or {}).get("result")
                ok = res is not None and not res.get("diverged")
                cells.append({"rank": r, "done": res is not None, "diverged": bool(res and res.get("diverged")),
                              "validation_loss": res["eval_validation"]["answer_loss"] if ok else None,
                              "test_loss": res["eval_after"]["answer_loss"] if ok else None})
            rows[-1]["ranks"] = cells
    for rec in by_key.values():
        if rec["settings"].get("kind") != "train" or "row" not in rec:
            continue
        res = rec["result"]
        records.append({"task": rec["task"], "method": rec["row"], "rank": rec["settings"]["rank"],
                        "seed": rec["settings"]["seed"], "lr": rec["settings"]["lr"],
                        "steps": rec["settings"]["max_steps"], "stage": rec.get("stage"),
                        "test_loss": None if res.get("diverged") else res["eval_after"]["answer_loss"],
                        "validation_loss": None if res.get("diverged") else res["eval_validation"]["answer_loss"],
                        "diverged": bool(res.get("diverged")), "train_seconds": res.get("train_seconds"),
                        "train_peak_memory_bytes": res.get("train_peak_memory_bytes"),
                        "final": rec["key"] in finals})
    return rows, records


paired = harness.paired_rows


#: issue 29's targets (the row the new recipe will fill; until it exists the old recipe stands in, said so)
TARGET_ROW, STAND_IN = "galore+", "galore+ (old recipe)"


def target_lines(rows, pre_rows, seeds, pre_seeds, preset_memory=None):
    """quality.md's "Targets" section: each of issue 29's targets met, missed (by how much) or not yet
    measurable, from the finals' means over every seed (a row counts only with all its seeds).
    ``preset_memory``: ``{allocator: the preset's peak / AdamW's}`` from ``bench/preset_memory.py``, whose
    "live" ratio (RSS following the live tensors) decides the memory target when given; the grid's own
    peaks are RSS under glibc's default allocator, which keeps freed tensors by an amount that differs
    between optimizers (BENCHMARKS.md §9, session 38)."""
    def means(table, n_seeds):
        out = {}
        for r in table:
            v = r["test_loss"]
            if len(v) == len(n_seeds) and all(s in v for s in n_seeds):
                out[r["method"]] = statistics.mean(v.values())
        return out

    def row_name(m):
        return TARGET_ROW if TARGET_ROW in m else STAND_IN

    def stand_in_note(m):
        return "" if TARGET_ROW in m else f" ({STAND_IN} stands in: the new recipe's row has not run)"

    def below(half, a, b, what, strict=True):
        m, table, n_seeds = half
        if a not in m or b not in m:
            return f"- {what}: not measured yet (needs the finals of {a} and {b})"
        gap = m[a] - m[b]
        ok = gap < 0 if strict else gap <= 0
        p = paired(table, a, b, n_seeds)
        spread = "" if p is None else f"; paired per seed {', '.join(f'{x:+.3f}' for x in p[0])}, t {p[2]:.1f}"
        return f"- {what}: {'met' if ok else 'missed'} ({a} {m[a]:.3f} against {b} {m[b]:.3f}, {gap:+.3f}){spread}"

    ft, pt = means(rows, seeds), means(pre_rows, pre_seeds)
    g, pg = row_name(ft), row_name(pt)
    fine_tuning, pre_training = (ft, rows, seeds), (pt, pre_rows, pre_seeds)
    lines = ["## Issue 29's targets (means over every seed of the finals)", ""]
    lines.append(below(fine_tuning, g, "lora", "Fine-tuning: GaLore+ below LoRA" + stand_in_note(ft)))
    lines.append(below(fine_tuning, g, "dora", "Fine-tuning: GaLore+ below DoRA" + stand_in_note(ft)))
    if all(k in ft for k in (g, "lora", "adamw")):
        ours, lora = ft[g] - ft["adamw"], ft["lora"] - ft["adamw"]
        ok = ours <= 0.5 * lora
        lines.append(f"- Fine-tuning: GaLore+'s gap to AdamW at most half LoRA's{stand_in_note(ft)}: "
                     f"{'met' if ok else 'missed'} ({ours:+.3f} against half of {lora:+.3f})")
    else:
        lines.append(f"- Fine-tuning: GaLore+'s gap to AdamW at most half LoRA's: not measured yet (needs {g}, lora, adamw)")
    lines.append(below(fine_tuning, "galore+ (full rank)", "adamw", "Fine-tuning: the full-rank preset below AdamW"))
    peak = {r["method"]: statistics.mean(r["train_peak_rss"].values()) for r in rows if r.get("train_peak_rss")}
    grid = peak["galore+ (full rank)"] / peak["adamw"] if "galore+ (full rank)" in peak and "adamw" in peak else None
    live = (preset_memory or {}).get("live")
    if live is not None:
        others = "".join(f", {a} allocator {r:.3f}×" for a, r in preset_memory.items() if a != "live")
        beside = "" if grid is None else f"; the grid's runs, glibc's default allocator: {grid:.3f}×"
        lines.append(f"- The full-rank preset at AdamW's memory + ≤ 10% (the command's training peak RSS with RSS "
                     f"following the live tensors, bench/preset_memory.py): {'met' if live <= 1.10 else 'missed'} "
                     f"({live:.3f}× AdamW's{others}{beside})")
    elif grid is not None:
        lines.append(f"- The full-rank preset at AdamW's memory + ≤ 10% (fine-tuning's training peak RSS): "
                     f"{'met' if grid <= 1.10 else 'missed'} ({grid:.3f}× AdamW's)")
    else:
        lines.append("- The full-rank preset at AdamW's memory + ≤ 10%: not measured yet (needs both rows' finals)")
    lines.append(below(pre_training, "galore+ (full rank)", "adamw", "Pre-training: the full-rank preset below AdamW"))
    for peer in ("adamw", "apollo", "fira"):
        lines.append(below(pre_training, pg, peer, f"Pre-training: GaLore+ at or below {peer}" + stand_in_note(pt), strict=False))
    return lines + [""]


def render(proto, rows, path_md, command, pretrain_lines=(), target_section=()):
    lines = ["# Quality protocol (issue 29)", "", f"Written by `{command}`; BENCHMARKS.md §9 discusses it.",
             f"Options shared by every run: `{json.dumps(proto['common'])}`.", "",
             "## Sweeps (seed 0, validation answer loss; * chosen)", "", *harness.table_header("method", "rates tried")]
    for r in rows:
        cells = ", ".join(f"{lr:g}: {'diverged' if math.isinf(v) else f'{v:.3f}'}{'*' if lr == r['chosen_lr'] else ''}"
                          for lr, v in r["curve"])
        lines.append(f"| {r['method']} | {cells or 'not run'} |")
    lines += ["", "## Finals (test answer loss at the chosen rate)", "",
              "Peak RSS: the training's (the command's `train_peak_memory_bytes`: model, optimizer state, activations; "
              "evaluation excluded), mean over the seeds; × AdamW: against AdamW's finals.", "",
              *harness.table_header("method", "lr", "seeds", "mean ± sd", "per seed", "peak RSS GiB", "× AdamW")]
    adamw_peak = next((statistics.mean(r["train_peak_rss"].values()) for r in rows
                       if r["method"] == "adamw" and r.get("train_peak_rss")), None)
    for r in rows:
        v = [r["test_loss"][s] for s in sorted(r["test_loss"])]
        if not v:
            continue
        mean, sd = harness.mean_sd(v)
        spread = "" if sd is None else f" ± {sd:.3f}"
        peak = statistics.mean(r["train_peak_rss"].values()) if r.get("train_peak_rss") else None
        ratio = f"{peak / adamw_peak:.3f}" if peak and adamw_peak else "—"
        lines.append(f"| {r['method']} | {r['chosen_lr']:g} | {len(v)} | {mean:.3f}{spread} | "
                     f"{', '.join(f'{x:.3f}' for x in v)} | {'—' if peak is None else f'{peak / 2**30:.2f}'} | {ratio} |")
    for r in rows:
        if not r.get("ablations"):
            continue
        base = r["ablations"][0]
        lines += ["", f"## Ablation: each mechanism alone on {r['method']} (seed 0; Δ against the base run)", "",
                  *harness.table_header("run", "lr", "validation", "Δ validation", "test", "Δ test")]
        for a in r["ablations"]:
            def cell(key):
                if a.get("skipped"):
                    return f"skipped: {EXTENDS[a['name'].split(' + ', 1)[1]]} did not help", ""
                if not a["done"]:
                    return "not run", ""
                if a["diverged"]:
                    return "diverged", ""
                delta = "" if base[key] is None or a is base else f"{a[key] - base[key]:+.3f}"
                return f"{a[key]:.3f}", delta
            (v, dv), (t, dt) = cell("validation_loss"), cell("test_loss")
            lines.append(f"| {a['name']} | {a['lr']:g} | {v} | {dv} | {t} | {dt} |")
    for r in rows:
        if not r.get("ranks"):
            continue
        seed0 = r["test_loss"].get(0)
        lines += ["", f"## Ranks: {r['method']} at its chosen rate {r['chosen_lr']:g} (seed 0; rank {r['rank']} is the row's "
                  "own run)", "", *harness.table_header("rank", "validation", "test", "Δ test against the row")]
        for c in r["ranks"]:
            if not c["done"] or c["diverged"]:
                lines.append(f"| {c['rank']} | {'diverged' if c['diverged'] else 'not run'} | | |")
                continue
            delta = "" if seed0 is None else f"{c['test_loss'] - seed0:+.3f}"
            lines.append(f"| {c['rank']} | {c['validation_loss']:.3f} | {c['test_loss']:.3f} | {delta} |")
    lines += ["", "## Paired differences (a − b, test answer loss; negative: a better)", "",
              *harness.table_header("pair", "per seed", "mean", "t")]
    for a, b in PAIRS:
        p = paired(rows, a, b, proto["seeds"])
        if p is not None:
            d, mean, t = p
            lines.append(f"| {a} − {b} | {', '.join(f'{x:+.3f}' for x in d)} | {mean:+.3f} | {t:.1f} |")
    lines += ["", *pretrain_lines, "", *target_section]
    harness.write_text(path_md, "\n".join(lines) + "\n")


def plot(rows, by_key, proto, path, pretrain=None):
    """quality.png: the fine-tuning sweeps and curves on top; ``pretrain`` ``(rows, by_key, proto)``:
    the pre-training half's below."""
    plt = harness.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (a, b), (pre_sweeps, pre_curves) = axes
    if pretrain is not None:
        qp.plot(*pretrain, pre_sweeps, pre_curves)
    for r in rows:
        pts = [(lr, v) for lr, v in r["curve"] if not math.isinf(v)]
        if pts:
            a.plot(*zip(*pts), marker="o", label=r["method"])
        finite = [(lr, v) for lr, v in r["curve"] if not math.isinf(v)]
        best = r["chosen_lr"] if r["chosen_lr"] is not None else min(finite, key=lambda c: c[1])[0] if finite else None
        if best is not None:  # the chosen rate, or while the sweep is open the best so far
            rec = by_key.get(job(proto, r["method"], best, 0, "final")["key"])
            if rec and rec["result"].get("curve"):
                steps, losses = zip(*rec["result"]["curve"])
                k = 10  # a moving mean over 10 steps: single-batch losses are noisy
                smooth = [statistics.mean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
                b.plot(steps, smooth, label=f"{r['method']} {best:g}" + ("" if r["chosen_lr"] is not None else " (open)"))
    a.set(xscale="log", xlabel="learning rate", ylabel="validation answer loss",
          title="gsm_symbolic sweeps (seed 0)")
    b.set(xlabel="step", ylabel="training loss (10-step mean)",
          title="gsm_symbolic, seed 0 at the chosen (or best so far) rate")
    for ax in (a, b):
        if ax.lines:
            ax.legend(fontsize=7)
    if not a.lines:
        a.text(0.5, 0.5, "no runs recorded yet", ha="center", transform=a.transAxes)
    harness.save_figure(fig, path)


def runs_left(proto, by_key):
    """Runs still to go: :func:`plan`'s, and those a row adds once its open sweep closes (seeds 1, 2 of its
    finals, and the rank study of :data:`RANK_ROW`); a sweep that extends past its rungs adds more."""
    later = 0
    for name in proto["methods"]:
        if sweep_state(proto, name, by_key)[2] is None:
            later += len(proto["seeds"]) - 1 + (len(proto["ranks"]) if name == RANK_ROW else 0)
    return len(plan(proto, by_key)) + later


def cost_lines(halves):
    """What the grid has cost so far and what its plan still holds: ``halves`` is ``(name, records, left)``
    per half, ``left`` the runs still to go (:func:`runs_left`). One-thread hours are the runs' wall seconds
    (each run takes one torch thread; training and evaluation), so they count CPU-hours."""
    lines = ["## Cost (one-thread hours: each run's wall time, training and evaluation)", "",
             *harness.table_header("half", "runs recorded", "hours", "hours per run", "runs left", "hours left (estimate)")]
    total = left_total = 0.0
    for name, records, left in halves:
        hours = [r["result"]["wall_seconds"] / 3600 for r in records if r["result"].get("wall_seconds")]
        per_run = statistics.median(hours) if hours else None
        later = None if per_run is None else left * per_run
        total += sum(hours)
        left_total += later or 0.0
        lines.append(f"| {name} | {len(records)} | {sum(hours):.1f} | {'—' if per_run is None else f'{per_run:.2f}'} | "
                     f"{left} | {'—' if later is None else f'{later:.1f}'} |")
    lines += ["", f"Total so far {total:.1f} hours; the runs still to go about {left_total:.1f} more at the median run's "
              "time (a sweep that extends past its rungs adds runs)."]
    return lines


def preset_memory_ratios(path):
    """``{allocator: the quality preset's peak / AdamW's}`` from ``bench/preset_memory.py``'s results at
    ``path`` (its full runs, not a smoke run's), or None without them."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return None if data.get("smoke") else pm.ratios(data["runs"])


def write_tables(proto, json_path, results_dir, command, plot_too=True, *, pretrain_proto):
    """quality.json, .md and .png from both raw files: the fine-tuning runs (``json_path``) and the
    pre-training runs (``quality_pretrain_runs.json`` beside it, protocol ``pretrain_proto``), written
    under one lock so that two invocations (one per task) never interleave their writes."""
    pretrain_json = Path(json_path).with_name(qp.RAW)
    with harness.results_lock(results_dir / "quality.json"):
        with harness.results_lock(json_path):
            by_key = harness.load_records(json_path)
        with harness.results_lock(pretrain_json):
            pre_by_key = harness.load_records(pretrain_json)
        rows, records = summary(proto, by_key)
        pre_rows, pre_records = qp.summary(pretrain_proto, pre_by_key)
        harness.write_json(results_dir / "quality.json",
                           {"runs": records + pre_records, "rows": rows, "pretrain_rows": pre_rows})
        memory = preset_memory_ratios(results_dir / "preset_memory.json")
        cost = cost_lines((("fine-tuning", list(by_key.values()), runs_left(proto, by_key)),
                           ("pre-training", list(pre_by_key.values()), len(qp.plan(pretrain_proto, pre_by_key)))))
        render(proto, rows, results_dir / "quality.md", command, qp.render(pretrain_proto, pre_rows),
               [*target_lines(rows, pre_rows, proto["seeds"], pretrain_proto["seeds"], memory), "", *cost])
        if plot_too:
            plot(rows, by_key, proto, results_dir / "quality.png", (pre_rows, pre_by_key, pretrain_proto))
    return rows, records + pre_records


TASKS = ("gsm_symbolic", "pretrain")


def task_list(text):
    """``--task``: one task, ``all`` (both, fine-tuning first) or tasks in the order to run them, comma-separated
    (``pretrain,gsm_symbolic``: the pre-training grid, then this invocation joins the fine-tuning one)."""
    tasks = TASKS if text == "all" else tuple(text.split(","))
    bad = [t for t in tasks if t not in TASKS]
    if bad or len(set(tasks)) != len(tasks) or not tasks:
        raise argparse.ArgumentTypeError(f"{text!r}: give all, or one or more of {', '.join(TASKS)} without repeats")
    return tasks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_grid_arguments(ap, "quality")
    ap.add_argument("--task", type=task_list, default=("gsm_symbolic",),
                    help="which half of the protocol to run: fine-tuning (gsm_symbolic, the default), pre-training, "
                         "all (both, one after the other), or a comma-separated order such as pretrain,gsm_symbolic "
                         "(the report always shows both)")
    ap.add_argument("--methods", default=None, help="only these rows (comma-separated names of METHODS or of "
                                                    "quality_pretrain.METHODS)")
    ap.add_argument("--cache", type=Path, default=qp.pretrain.DEFAULT_CACHE,
                    help="pre-training: the corpus and token cache (bench/pretrain.py's)")
    ap.add_argument("--estimate", type=int, metavar="STEPS", default=None,
                    help="pre-training: time STEPS steps of each distinct set-up of the grid, print its CPU-hour "
                         "estimate and exit (records nothing)")
    args = ap.parse_args(argv)
    harness.pin_threads(1)
    mode = harness.mode(args)
    proto = protocol(mode)
    pretrain_proto = qp.protocol(mode, ABLATIONS if mode != "smoke" else proto["ablations"], LADDER, MAX_RUNGS)
    names = args.methods.split(",") if args.methods else None
    unknown = sorted(set(names or ()) - set(proto["methods"]) - set(pretrain_proto["methods"]))
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} not among {', '.join(proto['methods'])} (fine-tuning) "
                         f"or {', '.join(pretrain_proto['methods'])} (pre-training)")
    tasks = args.task
    results_dir, runs_dir = harness.grid_dirs(args, "quality")
    json_path = results_dir / "quality_runs.json"
    pretrain_json = results_dir / qp.RAW
    command = "python bench/quality.py" + (" --smoke" if args.smoke else "")
    in_process = args.in_process or args.smoke
    harness.offline()
    if args.estimate:
        lines, _ = qp.estimate(pretrain_proto, args.cache, args.estimate, names)  # it prints them as it goes
        return lines
    if "gsm_symbolic" in tasks and not args.smoke and not args.table_only:
        ft.smollm2_export(runs_dir)  # once, before two invocations could race to make it

    def tables():
        return write_tables(proto, json_path, results_dir, command, plot_too=not args.smoke,
                            pretrain_proto=pretrain_proto)

    def grid(task):
        """(the task's plan, raw file, run_job): each row's jobs still to run given what is recorded."""
        if task == "pretrain":
            rows = [n for n in names if n in pretrain_proto["methods"]] if names else None
            return (lambda by_key: [] if rows == [] else qp.plan(pretrain_proto, by_key, rows), pretrain_json,
                    lambda job_, _runs, _in: qp.run_one(job_, pretrain_proto, args.cache))
        rows = [n for n in names if n in proto["methods"]] if names else None
        return lambda by_key: [] if rows == [] else plan(proto, by_key, rows), json_path, run_one

    if not args.table_only:
        # every task once without waiting for runs held by other invocations, then again waiting for them
        # (their results may decide what comes next): with --task all, one task's wait does not hold up the other
        failed, made = set(), 0
        for wait in ((False, True) if len(tasks) > 1 else (True,)):
            for task in tasks:
                plan_of, raw, run_job = grid(task)
                n, _ = harness.drive(plan_of, raw, runs_dir, run_job=run_job, in_process=in_process,
                                     machine=harness.machine_info(), wait_for_others=wait, stop_on_failure=args.smoke,
                                     after_each=tables, failed=failed,
                                     max_runs=None if args.max_runs is None else args.max_runs - made)
                made += n
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed in this invocation (not recorded; see above)")
    out = tables()
    left = sum(len(plan_of(harness.load_records(raw))) for plan_of, raw, _ in map(grid, tasks))
    print(f"wrote {results_dir / 'quality.md'}; {left} runs known to be pending", flush=True)
    return out


if __name__ == "__main__":
    main()
