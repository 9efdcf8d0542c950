"""Issue 29's pre-training half: a ≥ 5M-parameter LLaMA trained from scratch on the State of the
Union addresses (``bench/pretrain.py``'s corpus, tokenizer, windows, model, optimizers, schedule and
evaluation), each method at its own tuned rate. Driven by ``bench/quality.py --task pretrain``
(BENCHMARKS.md §9, "Pre-training"); this module is the protocol, the plan, one run and its report.

Protocol (:data:`CONFIG`): hidden 256, intermediate 688, 4 layers, 4 heads, vocabulary 4096 (5.26M
parameters, 3.16M of them in the 28 projected matrices), 1,500 steps of 8 × 128 tokens (1.54M tokens,
0.68 of an epoch: no window is seen twice), warm-up 10% then cosine to 10% of the peak, clipping 1.0,
rank 64 (hidden/4), T 200 (8 refreshes), 96 validation windows of 128 tokens (12,288 tokens) every
100 steps; the score is the final validation loss.

Rows (:data:`METHODS`): GaLore+ as ``bench/pretrain.py`` runs it ("galore+ (old recipe)": α 0.25,
T 200), AdamW, GaLore, Fira (its package, α 1, as ``galore-plus finetune --method fira``), APOLLO
(``apollo_torch``, as §4), the library's quality preset (``--preset quality``: GaLore at full rank, α 1;
named "galore+ (full rank)" as issue 29's records name it; not GaLore+, whose cross-head q/k is lossy at full
rank: DESIGN.md, "Presets"), and the new
recipe ("galore+", :data:`NEW_RECIPE`: what this half's own ablation chose). In the order they run:

1. **Sweeps** (seed 0): every row's bracketed sweep (``harness.sweep``: three rungs ~3× apart started
   at §4's optima, a winner at an end adds the next rung), chosen by final validation loss.
2. **Ablation** (seed 0): each of ``bench/quality.py``'s ABLATIONS alone on GaLore+ (old recipe) at its
   chosen rate (their FinetuneConfig names translated to the library's spec, :func:`spec_options`).
3. **Controls** (seed 0, :data:`CONTROLS`): AdamW at its chosen rate with its plainly trained
   parameters (embeddings, ``lm_head``, norms) at 10× and 40× that rate, GaLore+'s plain rates: whether
   GaLore+'s lead over AdamW here is the projection's or the plain parameters' larger step.
4. **Ranks** (seed 0): GaLore at ranks 8, 16, 32, 64 and full at its chosen rate (issue 29, item 6).
5. **Seeds**: seed 1 at each row's chosen rate (seed 0's final is the sweep's run).

Every run is in-process at one torch thread; each finished run is recorded at once in
``quality_pretrain_runs.json`` (``harness.drive``'s format, shared claims, resumable).
"""

from __future__ import annotations

import importlib
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import pretrain  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)

TASK = "pretrain"
RAW = "quality_pretrain_runs.json"
#: the model and run (bench/pretrain.py's cfg keys); BENCHMARKS.md §9 says how it was sized to the budget
CONFIG = dict(hidden=256, intermediate=688, layers=4, heads=4, vocab=4096, seq=128, batch=8, steps=1500,
              eval_every=100, eval_windows=96, update_proj_gap=200, rank=64, warmup=0.1)
SMOKE = dict(hidden=32, intermediate=64, layers=2, heads=4, vocab=320, seq=32, batch=2, steps=6,
             eval_every=3, eval_windows=4, update_proj_gap=3, rank=8, warmup=0.1)
CLIP = 1.0
SEEDS = (0, 1)
RANKS = (8, 16, 32, 64, "full")
RANK_ROW = "galore"
ABLATION_BASE = "galore+ (old recipe)"
#: row → (bench/pretrain.py's method, LowRankSpec options over its rank hidden/4, T, α 0.25, starting
#: rungs). Starts: §4's rates (AdamW 1e-3, GaLore(+), APOLLO 1e-2) in the middle; Fira (α 1: its
#: projected step is 4× GaLore's at equal lr) and the full-rank preset (α 1, Adam in a rotated
#: basis) at AdamW's scale. In this order: the ablation's base first, then the cheapest.
METHODS = {
    "galore+ (old recipe)": ("galore+", {}, (3e-3, 1e-2, 3e-2)),
    "adamw": ("adamw", {}, (3e-4, 1e-3, 3e-3)),
    "galore": ("galore", {}, (3e-3, 1e-2, 3e-2)),
    "apollo": ("apollo", {}, (3e-3, 1e-2, 3e-2)),
    "fira": ("fira", {}, (1e-3, 3e-3, 1e-2)),
    "galore+ (full rank)": ("galore", {"rank": "full", "scale": 1.0}, (3e-4, 1e-3, 3e-3)),
    # the control "adamw + plain lr x10" (4.528, below every GaLore+ row) as a row with its own sweep and
    # seeds (session 35): the strongest AdamW here, tuned as the others are (its 1e-3 rung is the control's run)
    "adamw (plain lr x10)": ("adamw", {"plain_lr_ratio": 10.0}, (3e-4, 1e-3, 3e-3)),
    # both mechanisms that helped alone (plain rate ×4 −0.030, input side −0.018), combined: worse than the
    # plain rate alone (BENCHMARKS.md §9, session 35), so not the recipe; kept as a row with its sweep
    "galore+ (plain lr x4, input side)": ("galore+", {"plain_lr_ratio": 4.0, "proj_type": "right"},
                                          (1e-3, 3e-3, 1e-2)),
}
#: the pre-training GaLore+ recipe, the row "galore+": ``(LowRankSpec options, starting rungs)``. Chosen
#: by this half's own ablation (seed 0, on GaLore+ (old recipe) at its 1e-2; BENCHMARKS.md §9): the plain
#: parameters at 4× (−0.030; ×16 +0.093). The input side (``proj_type="right"``, −0.018 alone) did not
#: add to it: with both, 4.549 at best against 4.542 (row "galore+ (plain lr x4, input side)"); T 25
#: −0.006, the others +0.023 to −0.001. Fine-tuning's ablation disagrees (×4 +0.035 there: pretrained
#: embeddings want the smaller step), so the two halves' recipes differ.
NEW_RECIPE = ({"plain_lr_ratio": 4.0}, (3e-3, 1e-2, 3e-2))
#: controls on :data:`CONTROL_BASE` at its chosen rate, seed 0, (name, LowRankSpec-named options, lr factor):
#: AdamW's plainly trained parameters (embeddings, ``lm_head``, norms) at 10× its rate (GaLore+ (old
#: recipe)'s plain rate at its chosen 1e-2 against AdamW's 1e-3) and 40× (the new recipe's)
CONTROL_BASE = "adamw"
CONTROLS = (("plain lr x10", {"plain_lr_ratio": 10.0}, 1.0), ("plain lr x40", {"plain_lr_ratio": 40.0}, 1.0))
#: pairs reported with paired differences over the seeds (when both rows are final)
PAIRS = (("galore+", "adamw"), ("galore+", "adamw (plain lr x10)"), ("galore+ (plain lr x4, input side)", "galore+"),
         ("galore+ (old recipe)", "adamw"), ("galore+ (old recipe)", "apollo"), ("galore+ (old recipe)", "fira"), ("galore+ (old recipe)", "galore"), ("galore+ (full rank)", "adamw"),
         ("apollo", "adamw"), ("fira", "adamw"), ("galore", "adamw"))
#: FinetuneConfig names of the ablations' options that the library's spec spells differently
SPEC_NAMES = {"refresh_policy": "refresh"}


def protocol(mode, ablations, ladder, max_rungs):
    """The runs' shared settings, seeds, rows, ablations and rank list of ``mode`` ("smoke" or
    "full"); ``ablations``, ``ladder`` and ``max_rungs`` are ``bench/quality.py``'s."""
    methods = dict(METHODS)
    if NEW_RECIPE is not None:
        methods["galore+"] = ("galore+", *NEW_RECIPE)
    cfg = dict(SMOKE if mode == "smoke" else CONFIG)
    proto = {"task": TASK, "mode": mode, "config": cfg, "clip": CLIP, "seeds": SEEDS, "methods": methods,
             "ablations": tuple(ablations), "ranks": (4, "full") if mode == "smoke" else RANKS,
             "controls": CONTROLS[:1] if mode == "smoke" else CONTROLS,
             "ladder": tuple(ladder), "max_rungs": max_rungs,
             "data": "synthetic" if mode == "smoke" else f"npm {pretrain.PACKAGE}"}
    for name, options, _ in proto["ablations"] + proto["controls"]:  # a bad option fails here, before any run
        spec_options(options, cfg["steps"], f"ablation {name!r}")
    return proto


def spec_options(options, steps, where="ablation"):
    """An ablation's FinetuneConfig options as ``LowRankSpec`` fields (``refreshes`` K: T = ⌈steps/K⌉,
    as the command spaces them); ``ValueError`` naming an option the spec has no field for."""
    from galore_plus.refresh import refresh_gap
    from galore_plus.spec import FIELDS

    out = {}
    for name, value in options.items():
        if name == "refreshes":
            out["update_proj_gap"] = refresh_gap(steps, value)
        else:
            out[SPEC_NAMES.get(name, name)] = value
    unknown = sorted(set(out) - FIELDS)
    if unknown:
        raise ValueError(f"{where}: {unknown} are not options of the pre-training runs (LowRankSpec fields)")
    return out


def rank_of(method, options, cfg):
    """A run's projection rank: its options' or the config's (None for AdamW, which has none)."""
    return None if method == "adamw" else options.get("rank", cfg["rank"])


def job(proto, name, lr, seed, stage, ablation=None, options=None):
    """One run of row ``name`` (an ablation's or control's ``(name, options, factor)`` on top: its own
    row name; or extra spec ``options``: the same row)."""
    method, base, _ = proto["methods"][name]
    extra = spec_options(ablation[1], proto["config"]["steps"]) if ablation else dict(options or {})
    opts = {**base, **extra}
    if opts.get("rank") == proto["config"]["rank"]:
        del opts["rank"]  # the default rank: the same run (and key) as the row's own
    settings = {"kind": TASK, "method": method, "options": opts, "lr": lr, "seed": seed,
                "config": proto["config"], "clip": proto["clip"], "data": proto["data"]}
    row = f"{name} + {ablation[0]}" if ablation else name
    rank = rank_of(method, opts, proto["config"])
    label = f"{row}" + (f" r{rank}" if stage == "rank" else "") + f" lr{lr:g}"
    return {"key": harness.settings_key(settings), "settings": settings, "tables": {stage: label}, "label": label,
            "task": TASK, "stage": stage, "row": row, "rank": rank}


def loss(record):
    """A recorded run's final validation loss (infinity when it diverged)."""
    result = record["result"]
    return math.inf if result.get("diverged") else result["final_val_loss"]


def sweep_state(proto, name, by_key):
    return harness.sweep(proto["methods"][name][2], lambda lr: job(proto, name, lr, 0, "sweep"), by_key, loss,
                         proto["ladder"], proto["max_rungs"])


#: the runs made of one row's seed-0 run at its chosen rate × a factor with options on top: key of the
#: proto's ``(name, options, factor)`` list and of the row's table cells → (that row, the runs' stage)
ON_TOP = {"ablations": (ABLATION_BASE, "ablation"), "controls": (CONTROL_BASE, "control")}


def on_top_jobs(proto, kind, chosen):
    """The :data:`ON_TOP` runs of ``kind`` ("ablations" or "controls") at their row's ``chosen`` rate."""
    row, stage = ON_TOP[kind]
    return [job(proto, row, chosen * factor, 0, stage, ablation=(name, options, factor))
            for name, options, factor in proto[kind]]


def rank_jobs(proto, chosen):
    return [job(proto, RANK_ROW, chosen, 0, "rank", options={"rank": r}) for r in proto["ranks"]]


def plan(proto, by_key, names=None):
    """Everything still to run, most informative first: the ablation as soon as its base row's rate is
    chosen (it decides the new recipe, which issue 29's targets are about), then every row's sweep, then
    the controls, the ranks, then the other seeds (each as soon as its row's rate is chosen)."""
    rows = [n for n in proto["methods"] if not names or n in names]
    chosen = {}
    sweeps, ablations, controls, ranks, seeds = [], [], [], [], []
    for name in rows:
        pending, _, chosen[name] = sweep_state(proto, name, by_key)
        sweeps += pending
    if chosen.get(ABLATION_BASE) is not None:
        ablations = on_top_jobs(proto, "ablations", chosen[ABLATION_BASE])
    if chosen.get(CONTROL_BASE) is not None:
        controls = on_top_jobs(proto, "controls", chosen[CONTROL_BASE])
    if chosen.get(RANK_ROW) is not None:
        ranks = rank_jobs(proto, chosen[RANK_ROW])
    for name in rows:
        if chosen[name] is not None:
            seeds += [job(proto, name, chosen[name], seed, "final") for seed in proto["seeds"]]
    return [j for j in harness.dedupe(ablations + sweeps + controls + ranks + seeds) if j["key"] not in by_key]


# ---------------------------------------------------------------------------------------------- one run

_DATA = {}


def data(proto, cache):
    """``(train ids, validation windows, vocab, description)`` of ``proto``, prepared once per process."""
    key = (proto["mode"], harness.settings_key(proto["config"]))
    if key not in _DATA:
        _DATA[key] = pretrain.load_data(proto["mode"], proto["config"], Path(cache), synthetic=proto["mode"] == "smoke")
    return _DATA[key]


def run_one(job_, proto, cache):
    """One run, in this process (at the process's torch threads): bench/pretrain.py's ``run_method``;
    its result with the validation curve and the training loss as 10-step means; ``cpu_s``: the
    process's CPU seconds over the run."""
    s = job_["settings"]
    train_ids, val_windows, vocab, described = data(proto, cache)
    cpu, wall = time.process_time(), time.perf_counter()
    r = pretrain.run_method(job_["label"], s["method"], s["lr"], s["config"], train_ids, val_windows, vocab,
                            s["seed"], s["clip"], s["options"])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    losses = [p["loss"] for p in r.pop("train_curve")]
    r["train_curve"] = [[min(i + 10, len(losses)), round(statistics.mean(losses[i:i + 10]), 4)]
                        for i in range(0, len(losses), 10)]
    r["val_curve"] = [[p["step"], round(p["val_loss"], 4)] for p in r["val_curve"]]
    r.pop("loadavg_end", None)
    if r["diverged"]:  # no score (strict JSON has no infinity); loss() reads it as infinity
        r["final_val_loss"] = r["val_perplexity"] = None
    return dict(r, cpu_s=cpu, wall_seconds=round(wall, 1), data=described,
                eval={"final_val_loss": r["final_val_loss"], "diverged": r["diverged"]},  # what drive prints
                versions=harness.versions(pretrain.VERSIONS, ("fira",)))


# ---------------------------------------------------------------------------------------------- cost


def planned_grid(proto, names=None):
    """Every job of the grid when each sweep closes at its middle starting rung (3 rungs a row)."""
    by_key, jobs = {}, []
    while True:
        todo = plan(proto, by_key, names)
        if not todo:
            return jobs
        for j in todo:
            lr, (_, _, starts) = j["settings"]["lr"], proto["methods"][j["row"].split(" + ")[0]]
            by_key[j["key"]] = {"result": {"final_val_loss": abs(math.log(lr / starts[1]))}}
            jobs.append(j)


#: spec options that do not change a step's cost (a scalar, a sign flip, a k×k product at a refresh):
#: :func:`estimate` times a set-up differing only in them once
COST_NEUTRAL = ("plain_lr_ratio", "moment_transport", "canonical_signs")


def variant(settings):
    """What a run's cost depends on: its method and the options that are not :data:`COST_NEUTRAL`."""
    return harness.settings_key([settings["method"], {k: v for k, v in settings["options"].items()
                                                      if k not in COST_NEUTRAL}])


def estimate(proto, cache, steps=50, names=None):
    """The grid's CPU cost from ``steps`` timed steps of each distinct set-up in it (:func:`variant`;
    one run each, seed 0, at its planned rate): ``(lines, total CPU hours)``, printed as they come.
    Sweeps are counted at 3 rungs and at 4 (one rung added in every row)."""
    jobs = planned_grid(proto, names)
    cfg = dict(proto["config"], steps=steps, eval_every=10**9)
    train_ids, val_windows, vocab, _ = data(proto, cache)
    for module in ("apollo_torch", "fira", "galore_plus"):  # importing is not a step's cost
        importlib.import_module(module)

    model = pretrain.build_model(proto["config"], vocab, 0)
    t = time.process_time()
    pretrain.evaluate(model, val_windows, proto["config"]["batch"] * 2)
    evals = (time.process_time() - t) * (proto["config"]["steps"] // proto["config"]["eval_every"] + 1)
    per_step, lines = {}, []
    for j in jobs:
        s = j["settings"]
        if variant(s) in per_step:
            continue
        t = time.process_time()  # one validation window: its two evaluations (steps 0 and last) cost ~nothing
        pretrain.run_method(j["label"], s["method"], s["lr"], cfg, train_ids, val_windows[:1], vocab, 0, s["clip"],
                            s["options"])
        per_step[variant(s)] = (time.process_time() - t) / steps
        lines.append(f"  {j['row']}{' r' + str(j['rank']) if j['stage'] == 'rank' else ''}: "
                     f"{per_step[variant(s)]:.3f} CPU s/step")
        print(lines[-1], flush=True)
    run_s = {j["key"]: per_step[variant(j["settings"])] * proto["config"]["steps"] + evals for j in jobs}
    total = sum(run_s.values())
    extra = sum(run_s[next(j["key"] for j in jobs if j["row"] == name and j["stage"] == "sweep")]
                for name in proto["methods"] if not names or name in names)
    stages = {}
    for j in jobs:
        stages.setdefault(j["stage"], []).append(run_s[j["key"]])
    lines.append(f"  evaluation: {evals:.0f} CPU s a run; " + "; ".join(
        f"{stage} {len(v)} runs {sum(v) / 3600:.2f} h" for stage, v in stages.items()))
    lines.append(f"grid: {len(jobs)} runs, {total / 3600:.1f} CPU-hours (3-rung sweeps); "
                 f"{(total + extra) / 3600:.1f} with one rung more in every sweep")
    print("\n".join(lines[-2:]), flush=True)
    return lines, total / 3600


# ---------------------------------------------------------------------------------------------- report


def summary(proto, by_key):
    """(rows, flat records): per row its sweep curve, chosen rate, final losses per seed, and for the
    ablation base and the rank row their runs."""
    rows, finals = [], {}  # finals: a final run's key → its row (a run may also be another row's ablation)
    swept = {}  # a sweep run's key → its row as the protocol names it now (a recorded "row" may be older)

    def run_cell(j):
        rec = by_key.get(j["key"])
        return {"name": j["row"], "lr": j["settings"]["lr"], "rank": j["rank"], "done": rec is not None,
                "loss": loss(rec) if rec else None}

    for name in proto["methods"]:
        _, curve, chosen = sweep_state(proto, name, by_key)
        swept.update((job(proto, name, lr, 0, "sweep")["key"], name) for lr in curve)
        seed_jobs = ([(seed, job(proto, name, chosen, seed, "final")) for seed in proto["seeds"]]
                     if chosen is not None else [])
        per_seed, keys = harness.final_losses(seed_jobs, by_key, loss)
        finals.update(dict.fromkeys(keys, name))
        method, options, _ = proto["methods"][name]
        row = {"method": name, "rank": rank_of(method, options, proto["config"]), "curve": sorted(curve.items()),
               "chosen_lr": chosen, "test_loss": per_seed}
        for kind, (base_row, _) in ON_TOP.items():  # the row's own seed-0 run first, then each on top of it
            if name == base_row and chosen is not None:
                row[kind] = [run_cell(j) for j in [job(proto, name, chosen, 0, "final")] + on_top_jobs(proto, kind, chosen)]
        if name == RANK_ROW and chosen is not None:
            row["ranks"] = [run_cell(j) for j in rank_jobs(proto, chosen)]
        rows.append(row)
    records = []
    for rec in by_key.values():
        if rec["settings"].get("kind") != TASK or "row" not in rec:
            continue
        s, res = rec["settings"], rec["result"]
        value = None if res.get("diverged") else res["final_val_loss"]
        records.append({"task": TASK, "method": finals.get(rec["key"], swept.get(rec["key"], rec["row"])), "rank": rank_of(s["method"], s["options"], s["config"]),
                        "seed": s["seed"], "lr": s["lr"], "steps": s["config"]["steps"], "stage": rec.get("stage"),
                        "test_loss": value, "validation_loss": value, "diverged": bool(res.get("diverged")),
                        "train_seconds": res.get("train_s"), "cpu_seconds": res.get("cpu_s"),
                        "parameters": res.get("parameters"), "options": s["options"], "final": rec["key"] in finals})
    return rows, records


def fmt(value):
    return "diverged" if value is not None and math.isinf(value) else f"{value:.3f}"


def render(proto, rows):
    """The pre-training section of quality.md (lines)."""
    c = proto["config"]
    lines = ["## Pre-training from scratch (final validation loss; lower is better)", "",
             f"LLaMA hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, {c['heads']} heads, "
             f"vocabulary {c['vocab']}, untied; {c['steps']} steps × {c['batch']} × {c['seq']} tokens, warm-up "
             f"{c['warmup']:.0%} then cosine to 10%, clipping {proto['clip']}, rank {c['rank']}, "
             f"T {c['update_proj_gap']}; "
             f"data: {proto['data']}; validation {c['eval_windows']} windows every {c['eval_every']} steps.", "",
             "### Sweeps (seed 0; * chosen)", "", *harness.table_header("method", "rank", "rates tried")]
    for r in rows:
        cells = ", ".join(f"{lr:g}: {fmt(v)}{'*' if lr == r['chosen_lr'] else ''}" for lr, v in r["curve"])
        lines.append(f"| {r['method']} | {r['rank'] if r['rank'] is not None else '—'} | {cells or 'not run'} |")
    lines += ["", "### Finals (final validation loss at the chosen rate)", "",
              *harness.table_header("method", "lr", "seeds", "mean ± sd", "per seed")]
    for r in rows:
        v = [r["test_loss"][s] for s in sorted(r["test_loss"])]
        if v:
            mean, sd = harness.mean_sd(v)
            lines.append(f"| {r['method']} | {r['chosen_lr']:g} | {len(v)} | {mean:.3f}"
                         f"{'' if sd is None else f' ± {sd:.3f}'} | {', '.join(f'{x:.3f}' for x in v)} |")
    for r in rows:
        for key, title in (("ablations", f"Ablation: each mechanism alone on {r['method']} (seed 0; Δ against it)"),
                           ("controls", f"Controls: {r['method']} with its plainly trained parameters (embeddings, "
                                        f"lm_head, norms) at k× its rate (seed 0; Δ against it)"),
                           ("ranks", f"Ranks: {r['method']} at its chosen rate (seed 0; Δ against rank {r['rank']})")):
            if not r.get(key):
                continue
            base = r["test_loss"].get(0)  # the row's own seed-0 run at its chosen rate (first in the ablation)
            lines += ["", f"### {title}", "",
                      *harness.table_header("run", "rank", "lr", "validation", "Δ")]
            for a in r[key]:
                if not a["done"]:
                    value, delta = "not run", ""
                else:
                    value = fmt(a["loss"])
                    delta = "" if base is None or a is r[key][0] and key != "ranks" or math.isinf(a["loss"]) \
                        else f"{a['loss'] - base:+.3f}"
                lines.append(f"| {a['name']} | {'—' if a['rank'] is None else a['rank']} | {a['lr']:g} | {value} | {delta} |")
    pairs = [(a, b, harness.paired_rows(rows, a, b, proto["seeds"])) for a, b in PAIRS]
    lines += ["", "### Paired differences (a − b, final validation loss; negative: a better)", "",
              *harness.table_header("pair", "per seed", "mean", "t")]
    lines += [f"| {a} − {b} | {', '.join(f'{x:+.3f}' for x in p[0])} | {p[1]:+.3f} | {p[2]:.1f} |"
              for a, b, p in pairs if p is not None]
    return lines


def plot(rows, by_key, proto, sweep_ax, curve_ax):
    """The pre-training panels of quality.png: the sweeps, and the validation curves of each row's
    seed-0 run at its chosen (or best so far) rate."""
    for r in rows:
        pts = [(lr, v) for lr, v in r["curve"] if not math.isinf(v)]
        if pts:
            sweep_ax.plot(*zip(*pts), marker="o", label=r["method"])
        best = r["chosen_lr"] if r["chosen_lr"] is not None else min(pts, key=lambda c: c[1])[0] if pts else None
        rec = by_key.get(job(proto, r["method"], best, 0, "final")["key"]) if best is not None else None
        if rec and not rec["result"].get("diverged"):
            steps, values = zip(*rec["result"]["val_curve"][1:] or rec["result"]["val_curve"])
            curve_ax.plot(steps, values, marker=".", label=f"{r['method']} {best:g}"
                          + ("" if r["chosen_lr"] is not None else " (open)"))
    sweep_ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss",
                 title="pre-training sweeps (seed 0)")
    curve_ax.set(xlabel="step", ylabel="validation loss", title="pre-training, seed 0 at the chosen rate")
    for ax in (sweep_ax, curve_ax):
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no pre-training runs recorded yet", ha="center", transform=ax.transAxes)
