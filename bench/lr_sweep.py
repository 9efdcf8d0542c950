"""Each method at its own best learning rate: a sweep on a validation split, then seeds on the test split.

The paper's claim (GaLore+ ≥ GaLore ≥ LoRA/DoRA at equal rank) compared at one learning rate per
family says little: a method can lose only because its rate was off. So, for every method (AdamW,
LoRA, DoRA, GaLore, GaLore+) at ranks 8 and 32 on each task:

1. **Sweep** learning rates on a ladder with ~3× steps (1e-5, 3e-5, 1e-4, ...), seed 0, each run
   trained by ``galore_plus.app.finetune`` exactly as the command trains (its defaults: the projected
   backward, α 4, T 50) with ``--n-validation 200``: 200 examples held out of the training side, so the
   test set is not touched. The rate with the lowest **validation answer loss** after training wins. A
   winner at either end of the rates tried adds the next rung beyond it (up to :data:`MAX_RUNGS`), so
   the chosen rate has a worse neighbour on both sides, or the ladder's limit is reported.
2. **Finals**: seeds 0, 1, 2 at each method's chosen rate, scored on the **test** split (answer loss
   and, where the task's budget generates, accuracy). Seed 0's final is the sweep's run at that
   rate (the same settings: one run; the sweep's runs score the test split too, unseen by the choice).

One row more on arithmetic (:data:`EXTRA_ROWS`): "galore+ (recipe)", the command's GaLore+ recipe since
issue 29 (Fira's term, the full backward) at rank 32, the main job's settings: its chosen rate is
``galore-plus finetune``'s default rate for GaLore+ (``config.DEFAULT_LR``).

Runs are ``bench/finetune_table.py``'s (one fresh subprocess per run, its peak RSS its own, one
torch thread), driven by ``bench/harness.py``: results appended at once to
``bench/results/lr_sweep.json`` keyed by the complete settings (an interrupted invocation resumes; a
diverged run is recorded as such), and claims so that two invocations on the two cores share the
grid. The next jobs follow from what is recorded, so an invocation that finds everything claimed
waits for the other's results.

    python bench/lr_sweep.py --smoke              # seconds: tiny model, in-process (CI)
    python bench/lr_sweep.py --tasks arithmetic   # the arithmetic grid (~5 CPU-hours on this machine)
    python bench/lr_sweep.py                      # both tasks (gsm_symbolic: see BENCHMARKS.md for its budget)
    python bench/lr_sweep.py --table-only         # rewrite lr_sweep.md/.png and tuned_table.json

Outputs (``bench/results``): ``lr_sweep.json`` (every run), ``tuned_table.json`` (per task and method:
the sweep curve, the chosen rate, the finals per seed and their mean ± half-range), ``lr_sweep.md``
(the tables) and ``lr_sweep.png`` (the sweep curves).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_table as ft  # noqa: E402  (its runs: train_settings, eval_job, run_or_diverged, smollm2_export)
import harness  # noqa: E402  (results files, claims, drive, tables)

GIB = harness.GIB

#: learning rates tried, ~3× apart; each method starts at three adjacent rungs
LADDER = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
#: (the recipe's row, below: around the former recipe's choice on its task, 1e-4)
START = {"adamw": (1e-5, 3e-5, 1e-4), "galore": (1e-5, 3e-5, 1e-4), "galore+": (1e-5, 3e-5, 1e-4),
         "lora": (1e-4, 3e-4, 1e-3), "dora": (1e-4, 3e-4, 1e-3), "galore+ (recipe)": (3e-5, 1e-4, 3e-4)}
#: per task, where a method starts instead, placed by what the grid had already chosen (the bracketing
#: rule below still decides, so a start only saves runs): on gsm_symbolic LoRA chose 3e-3 at both ranks
#: (DoRA is LoRA with a magnitude vector) and GaLore+/GaLore 3e-4 (their full-rank parameters step at lr,
#: as all of AdamW's do; AdamW chose 1e-4 on arithmetic)
START_BY_TASK = {"gsm_symbolic": {"dora": (1e-3, 3e-3, 1e-2), "adamw": (3e-5, 1e-4, 3e-4)}}
#: a row that is a method with options of its own (its name in METHODS or EXTRA_ROWS → the method and them):
#: the command's GaLore+ recipe since issue 29, Fira's term and so the full backward (DESIGN.md, "The command's
#: GaLore+ recipe"); "galore+" stays the recipe the grid was recorded with (the projected backward, no term)
VARIANTS = {"galore+ (recipe)": ("galore+", {"outside": "fira"})}
#: rows of one task only, after METHODS: the recipe on the main job's task and rank (arithmetic, r32: the
#: command's defaults), whose chosen rate is the command's default rate for galore+ (config.DEFAULT_LR)
EXTRA_ROWS = {"arithmetic": (("galore+ (recipe)", 32),)}
#: paired test differences (a − b per seed at each one's chosen rate) in lr_sweep.md: the recipe's row
#: against the former recipe, LoRA, DoRA (its rank) and AdamW
PAIRS = tuple((("galore+ (recipe)", 32), b) for b in (("galore+", 32), ("lora", 32), ("dora", 32), ("adamw", None)))
MAX_RUNGS = 6  # rates per method at most (3 to start, 3 extensions)
SEEDS = (0, 1, 2)
#: the order of the grid: the central comparison first
METHODS = (("galore+", 32), ("lora", 32), ("galore", 32), ("galore+", 8), ("lora", 8), ("galore", 8),
           ("dora", 32), ("dora", 8), ("adamw", None))
#: where GaLore+ loses to LoRA at both their chosen rates (validation answer loss, seed 0), one run per
#: hypothesis of why, at GaLore+'s chosen rate × the factor, seed 0, compared with GaLore+'s sweep run:
#: (name, options, lr factor). α/lr coupling: the projected update is α·lr while the embeddings, lm_head
#: and norms step at lr, so a rate chosen for one part may suit the other badly (the same low-rank
#: step with 4× / ¼ the plain step); the update gap T; the sparse residual; the embeddings and norms,
#: which LoRA leaves frozen. (Cross-head projection is what GaLore+ adds over GaLore besides the
#: randomized SVD and the residual: GaLore's row against GaLore+'s is that comparison.)
DIAGNOSES = (("alpha 1, lr x4", {"scale": 1.0}, 4.0), ("alpha 16, lr /4", {"scale": 16.0}, 0.25),
             ("T 10", {"update_proj_gap": 10}, 1.0), ("rho 0", {"residual_ratio": 0.0}, 1.0),
             ("embeddings frozen", {"embeddings": "frozen"}, 1.0))
DIAGNOSE_AFTER = 3  # in the grid's order: after GaLore+, LoRA and GaLore at rank 32


def label_of(method, rank):
    return method if rank is None else f"{method} r{rank}"


def mode_settings(mode):
    """The common options, per-task options (``generate``: whether the runs, sweep and finals alike,
    generate the test answers for accuracy) and the methods of a mode."""
    if mode == "smoke":
        common = dict(model="tiny", max_steps=3, batch_size=2, n_train=16, n_test=4, n_validation=4, max_length=64,
                      eval_batch_size=4, warmup_steps=1, update_proj_gap=2, residual_warmup=1)
        tasks = {"arithmetic": dict(max_new_tokens=4, generate=True)}
        methods = (("galore+", 4), ("lora", 4))
        extra_rows = {"arithmetic": (("galore+ (recipe)", 4),)}
        start = {"galore+": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2), "galore+ (recipe)": (1e-3, 3e-3, 1e-2)}
        seeds = (0, 1)
    else:
        # the command's defaults (150 steps, T 50, α 4, the projected backward, float32 on CPU), 200
        # validation examples, 200 test examples
        common = dict(model="smollm2", max_steps=150, batch_size=4, n_train=2000, n_test=200, n_validation=200,
                      max_length=384, eval_batch_size=32)
        tasks = {"arithmetic": dict(max_new_tokens=16, generate=True),
                 # 4×~280-token examples: ~12 s a step on one thread; 256-token generation on 200 answers
                 # ~15 min, and at 40 steps accuracy did not move (1% → 1%, finetune_table.md): the
                 # budget is shorter, and the finals are scored by answer loss (BENCHMARKS.md §8)
                 "gsm_symbolic": dict(max_new_tokens=256, max_steps=40, generate=False)}
        methods, extra_rows, start, seeds = METHODS, EXTRA_ROWS, START, SEEDS
    start_by_task = {task: START_BY_TASK.get(task, {}) for task in tasks}
    rows = {task: tuple(methods) + tuple(extra_rows.get(task, ())) for task in tasks}
    return {"mode": mode, "common": common, "tasks": tasks, "methods": methods, "rows": rows, "start": start,
            "start_by_task": start_by_task, "seeds": seeds}


def job(settings_of_mode, task, method, rank, lr, seed, stage, extra=None, name=None):
    """One run: its complete settings (the FinetuneConfig fields that say what it computes) and key;
    ``extra`` options (a diagnosis, ``name``) on top of the grid's; ``method`` may name a :data:`VARIANTS` row."""
    base, own = VARIANTS.get(method, (method, {}))
    options = dict(settings_of_mode["common"], **settings_of_mode["tasks"][task], data=task, method=base, seed=seed,
                   lr=lr, eval_before=False, **own, **(extra or {}))
    settings = ft.train_settings(options, rank)
    label = f"{label_of(method, rank)} lr{lr:g}" + (f" {name}" if name else "")
    return {"key": harness.settings_key(settings), "settings": settings, "tables": {stage: label}, "label": label,
            "task": task, "stage": stage}


def eval_before_job(settings_of_mode, task, seed):
    common = dict(settings_of_mode["common"], **settings_of_mode["tasks"][task])
    return ft.eval_job(common, task, common, seed)


# ---------------------------------------------------------------------------------------------- the plan


def sweep_state(settings_of_mode, task, method, rank, by_key):
    """(jobs to run, curve, chosen lr or None): the sweep's pending rungs, the recorded (lr, loss)
    pairs, and the chosen rate once the winner has a recorded worse neighbour on both sides (or the
    ladder / MAX_RUNGS ends it)."""
    tried = list(settings_of_mode["start_by_task"][task].get(method, settings_of_mode["start"][method]))
    while True:
        jobs = [job(settings_of_mode, task, method, rank, lr, 0, "sweep") for lr in tried]
        pending = [j for j in jobs if j["key"] not in by_key]
        if pending:
            return pending, _curve(jobs, by_key), None
        curve = _curve(jobs, by_key)
        nxt, best = harness.bracket(tried, dict(curve), LADDER, MAX_RUNGS)
        if nxt is None:
            return [], curve, best
        tried.append(nxt)


def _curve(jobs, by_key):
    return sorted((j["settings"]["lr"], harness.validation_loss(by_key[j["key"]])) for j in jobs if j["key"] in by_key)


def plan(settings_of_mode, by_key, tasks=None):
    """Everything still to run, in order, given what is recorded: per task, each method's sweep rungs,
    then (once its rate is chosen) the eval before and the finals. A method whose sweep waits on a
    running rung contributes nothing yet."""
    out = []
    for task in settings_of_mode["tasks"]:
        if tasks and task not in tasks:
            continue
        for i, (method, rank) in enumerate(settings_of_mode["rows"][task]):
            if i == DIAGNOSE_AFTER:
                out += [j for j in diagnose_jobs(settings_of_mode, task, by_key) if j["key"] not in by_key]
            pending, _, chosen = sweep_state(settings_of_mode, task, method, rank, by_key)
            out += pending
            if chosen is None:
                continue
            for seed in settings_of_mode["seeds"]:
                before = eval_before_job(settings_of_mode, task, seed)
                if before["key"] not in by_key:
                    out.append(dict(before, stage="before"))
                final = job(settings_of_mode, task, method, rank, chosen, seed, "final")
                if final["key"] not in by_key:
                    out.append(final)
        if len(settings_of_mode["rows"][task]) <= DIAGNOSE_AFTER:
            out += [j for j in diagnose_jobs(settings_of_mode, task, by_key) if j["key"] not in by_key]
    return harness.dedupe(out)


def diagnose_jobs(settings_of_mode, task, by_key):
    """The :data:`DIAGNOSES` runs of GaLore+ at each rank where LoRA's chosen rate beats GaLore+'s on
    validation answer loss (nothing while either sweep is open)."""
    out = []
    for rank in sorted({r for m, r in settings_of_mode["methods"] if m == "galore+"}, reverse=True):
        if ("lora", rank) not in settings_of_mode["methods"]:
            continue
        _, plus_curve, plus = sweep_state(settings_of_mode, task, "galore+", rank, by_key)
        _, lora_curve, lora = sweep_state(settings_of_mode, task, "lora", rank, by_key)
        if plus is None or lora is None or dict(plus_curve)[plus] <= dict(lora_curve)[lora]:
            continue
        out += [job(settings_of_mode, task, "galore+", rank, plus * factor, 0, "diagnose", extra, name)
                for name, extra, factor in DIAGNOSES]
    return out


# ---------------------------------------------------------------------------------------------- tables


def summary(settings_of_mode, by_key):
    """tuned_table.json's content: per task and method, the curve, the chosen rate and the finals."""
    out = {"mode": settings_of_mode["mode"], "common": settings_of_mode["common"],
           "tasks": settings_of_mode["tasks"], "rows": []}
    for task in settings_of_mode["tasks"]:
        for method, rank in settings_of_mode["rows"][task]:
            pending, curve, chosen = sweep_state(settings_of_mode, task, method, rank, by_key)
            row = {"task": task, "method": method, "rank": rank, "label": label_of(method, rank),
                   "curve": [{"lr": lr, "validation_answer_loss": loss} for lr, loss in curve],
                   "chosen_lr": chosen, "edge": None, "finals": []}
            if chosen is not None:
                lrs = [lr for lr, _ in curve]
                row["edge"] = "lowest tried" if chosen == min(lrs) else "highest tried" if chosen == max(lrs) else None
                for seed in settings_of_mode["seeds"]:
                    rec = by_key.get(job(settings_of_mode, task, method, rank, chosen, seed, "final")["key"])
                    before = by_key.get(eval_before_job(settings_of_mode, task, seed)["key"])
                    if rec is None:
                        continue
                    r = rec["result"]
                    row["finals"].append({
                        "seed": seed, "diverged": bool(r.get("diverged")),
                        "train_seconds": r.get("train_seconds"), "tokens_per_second": r.get("tokens_per_second"),
                        "train_peak_gib": r["train_peak_memory_bytes"] / GIB if r.get("train_peak_memory_bytes") else None,
                        "test": r.get("eval_after"), "validation": r.get("eval_validation"),
                        "before": before["result"]["eval"] if before else None})
            done = [f for f in row["finals"] if not f["diverged"]]
            row["mean"] = {name: harness.mean_half_range([get(f) for f in done]) for name, get in (
                ("train_seconds", lambda f: f["train_seconds"]), ("train_peak_gib", lambda f: f["train_peak_gib"]),
                ("test_answer_loss", lambda f: f["test"]["answer_loss"]),
                ("test_accuracy", lambda f: f["test"].get("accuracy")),
                ("before_answer_loss", lambda f: f["before"]["answer_loss"] if f["before"] else None),
                ("before_accuracy", lambda f: f["before"].get("accuracy") if f["before"] else None))}
            out["rows"].append(row)
    out["diagnoses"] = diagnoses(settings_of_mode, by_key)
    out["paired"] = paired(out["rows"], settings_of_mode["seeds"])
    return out


def paired(rows, seeds):
    """Per task, each of :data:`PAIRS` whose rows both have every seed's final (not diverged): the test answer
    loss differences a − b per seed, their mean and t (``harness.paired_rows``)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        losses = [{"method": (r["method"], r["rank"]), "test_loss": {
            f["seed"]: f["test"]["answer_loss"] for f in r["finals"] if not f["diverged"]}} for r in rows if r["task"] == task]
        for a, b in PAIRS:
            p = harness.paired_rows(losses, a, b, seeds)
            if p is not None:
                out.append({"task": task, "a": label_of(*a), "b": label_of(*b), "differences": p[0], "mean": p[1],
                            "t": p[2]})
    return out


def diagnoses(settings_of_mode, by_key):
    """Per task and rank diagnosed: GaLore+'s and LoRA's seed-0 runs at their chosen rates and each
    recorded :data:`DIAGNOSES` run beside them."""
    def scores(rec):
        if rec is None:
            return None
        r = rec["result"]
        if r.get("diverged"):
            return {"diverged": True}
        return {"validation_answer_loss": r["eval_validation"]["answer_loss"],
                "test_answer_loss": r["eval_after"]["answer_loss"], "test_accuracy": r["eval_after"].get("accuracy"),
                "train_seconds": r["train_seconds"]}

    out = []
    for task in settings_of_mode["tasks"]:
        jobs = diagnose_jobs(settings_of_mode, task, by_key)
        for rank in sorted({j["settings"]["rank"] for j in jobs}, reverse=True):
            chosen = {m: sweep_state(settings_of_mode, task, m, rank, by_key)[2] for m in ("galore+", "lora")}
            entry = {"task": task, "rank": rank, "chosen_lr": chosen, "runs": [
                {"name": f"{m} at its chosen rate", "lr": chosen[m],
                 **scores(by_key.get(job(settings_of_mode, task, m, rank, chosen[m], 0, "sweep")["key"]))}
                for m in ("galore+", "lora")]}
            for (name, extra, _), j in zip(DIAGNOSES, [j for j in jobs if j["settings"]["rank"] == rank]):
                entry["runs"].append({"name": f"galore+ {name}", "lr": j["settings"]["lr"], "options": extra,
                                      **(scores(by_key.get(j["key"])) or {"pending": True})})
            out.append(entry)
    return out


def render(table, command, path_md, path_png=None, machine=None):
    c = table["common"]
    lines = ["# Each method at its own best learning rate", "",
             f"Command: `{command}`. Raw runs: `lr_sweep.json`; per method: `tuned_table.json`.", "",
             f"Machine: {(machine or {}).get('processor', '?')}, {(machine or {}).get('cpu_count', '?')} cores "
             "shared with other jobs, one torch thread per run (each run's load averages in the JSON).", "",
             f"Settings: model {c['model']}, batch {c['batch_size']}, max_length {c['max_length']}, n_train "
             f"{c['n_train']}, {c['n_validation']} validation examples (held out of the training side), "
             f"{c['n_test']} test examples; otherwise `galore-plus finetune`'s defaults (cosine schedule with "
             f"warm-up {c.get('warmup_steps', 10)}, weight decay 0, GaLore/GaLore+: α 4, T 50, the projected backward; galore+ (recipe): "
             "the command's GaLore+ recipe, Fira's term and the full backward; LoRA/DoRA: α = 2r, all linear layers). Per task: " + "; ".join(
                 f"{t} {o.get('max_steps', c['max_steps'])} steps, {'with' if o['generate'] else 'without'} generation "
                 "(accuracy)"
                 for t, o in table["tasks"].items()) + ".", "",
             "Sweep: seed 0, validation answer loss after training (lower is better; ∞: diverged); the chosen "
             "rate in bold. Finals: the chosen rate, seeds " + ", ".join(map(str, sorted({f['seed'] for r in
             table['rows'] for f in r['finals']}))) + " on the test split, mean ± half-range; train s: the "
             "optimizer steps only; train peak GiB: the run process's peak RSS through training.", ""]
    for task in table["tasks"]:
        rows = [r for r in table["rows"] if r["task"] == task]
        lrs = sorted({p["lr"] for r in rows for p in r["curve"]})
        lines += [f"## {task}: sweep (validation answer loss)", "",
                  *harness.table_header("method", *(f"{lr:g}" for lr in lrs), "chosen")]
        for r in rows:
            cells = {p["lr"]: p["validation_answer_loss"] for p in r["curve"]}
            def cell(lr):
                if lr not in cells:
                    return ""
                text = "∞" if math.isinf(cells[lr]) else f"{cells[lr]:.3f}"
                return f"**{text}**" if lr == r["chosen_lr"] else text
            chosen = "—" if r["chosen_lr"] is None else f"{r['chosen_lr']:g}" + (f" ({r['edge']})" if r["edge"] else "")
            lines.append(f"| {r['label']} | " + " | ".join(cell(lr) for lr in lrs) + f" | {chosen} |")
        lines += ["", f"## {task}: at the chosen rate (test split)", "",
                  "| method | lr | seeds | train s | train peak GiB | answer loss before → after | "
                  "accuracy % before → after |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["mean"]
            if not r["finals"]:
                lines.append(f"| {r['label']} | {'—' if r['chosen_lr'] is None else format(r['chosen_lr'], 'g')} | "
                             "none yet | | | | |")
                continue
            seeds = ",".join(str(f["seed"]) + ("✗" if f["diverged"] else "") for f in r["finals"])
            fmt = harness.fmt_mean_half_range
            lines.append(f"| {r['label']} | {r['chosen_lr']:g} | {seeds} | {fmt(m['train_seconds'], 0)} | "
                         f"{fmt(m['train_peak_gib'], 2)} | {fmt(m['before_answer_loss'], 3)} → "
                         f"{fmt(m['test_answer_loss'], 3)} | {fmt(m['before_accuracy'], 1, 100)} → "
                         f"{fmt(m['test_accuracy'], 1, 100)} |")
        lines.append("")
        pairs = [p for p in table.get("paired", []) if p["task"] == task]
        if pairs:
            lines += [f"## {task}: paired test answer loss differences (a − b per seed; negative: a better)", "",
                      *harness.table_header("pair", "per seed", "mean", "t")]
            lines += [f"| {p['a']} − {p['b']} | {', '.join(f'{x:+.3f}' for x in p['differences'])} | {p['mean']:+.3f} | "
                      f"{p['t']:.1f} |" for p in pairs]
            lines.append("")
        for entry in [d for d in table.get("diagnoses", []) if d["task"] == task]:
            lines += [f"## {task}: GaLore+ r{entry['rank']} trails LoRA r{entry['rank']}: one run per hypothesis "
                      "(seed 0)", "", "| run | lr | validation answer loss | test answer loss | test accuracy % | "
                      "train s |", "|---|---|---|---|---|---|"]
            for run in entry["runs"]:
                if run.get("pending") or run.get("diverged"):
                    lines.append(f"| {run['name']} | {run['lr']:g} | {'pending' if run.get('pending') else '∞'} | | | |")
                    continue
                acc = "—" if run["test_accuracy"] is None else f"{100 * run['test_accuracy']:.1f}"
                lines.append(f"| {run['name']} | {run['lr']:g} | {run['validation_answer_loss']:.3f} | "
                             f"{run['test_answer_loss']:.3f} | {acc} | {run['train_seconds']:.0f} |")
            lines.append("")
    harness.write_text(path_md, "\n".join(lines))
    if path_png:
        plot(table, path_png)


def plot(table, path):
    plt = harness.pyplot()
    tasks = list(table["tasks"])
    ranks = sorted({r["rank"] for r in table["rows"] if r["rank"] is not None})
    fig, axes = plt.subplots(len(tasks), len(ranks), figsize=(5.5 * len(ranks), 4 * len(tasks)), squeeze=False)
    colors = {"adamw": "k", "lora": "tab:blue", "dora": "tab:cyan", "galore": "tab:orange", "galore+": "tab:red",
              "galore+ (recipe)": "tab:purple"}
    for i, task in enumerate(tasks):
        for j, rank in enumerate(ranks):
            ax = axes[i][j]
            for r in table["rows"]:
                if r["task"] != task or r["rank"] not in (rank, None) or not r["curve"]:
                    continue
                pts = [(p["lr"], p["validation_answer_loss"]) for p in r["curve"] if not math.isinf(p["validation_answer_loss"])]
                if not pts:
                    continue
                ax.plot(*zip(*pts), marker="o", color=colors[r["method"]], label=r["label"], ls="--" if r["rank"] is None else "-")
                if r["chosen_lr"] is not None:
                    best = dict(pts).get(r["chosen_lr"])
                    if best is not None:
                        ax.plot([r["chosen_lr"]], [best], "*", color=colors[r["method"]], ms=14)
            if not ax.lines:
                ax.text(0.5, 0.5, "no runs recorded yet", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_xscale("log")
                ax.legend(fontsize=7)
            ax.set_xlabel("peak learning rate")
            ax.set_ylabel("validation answer loss (seed 0)")
            ax.set_title(f"{task}, rank {rank} (AdamW dashed; ★ chosen)", fontsize=9)
    harness.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_grid_arguments(ap, "lr_sweep")
    ap.add_argument("--tasks", default=None, help="only these tasks (comma-separated)")
    args = ap.parse_args(argv)
    harness.pin_threads(1)
    settings = mode_settings(harness.mode(args))
    results_dir, runs_dir = harness.grid_dirs(args, "lr_sweep")
    json_path = results_dir / "lr_sweep.json"
    tasks = set(args.tasks.split(",")) if args.tasks else None
    command = "python bench/lr_sweep.py" + (" --smoke" if args.smoke else "")
    in_process = args.in_process or args.smoke
    harness.offline()
    machine = harness.machine_info()
    if not args.smoke:
        ft.smollm2_export(runs_dir)  # once, before two invocations could race to make it
        reuse_evals_before(settings, json_path, results_dir / "finetune_table.json")

    def tables():
        return write_tables(settings, json_path, results_dir, command, machine, plot_too=not args.smoke)

    if not args.table_only:
        _, failed = harness.drive(lambda by_key: plan(settings, by_key, tasks), json_path, runs_dir,
                                  run_job=ft.run_or_diverged, in_process=in_process, machine=machine,
                                  max_runs=args.max_runs, wait_for_others=True, stop_on_failure=args.smoke,
                                  after_each=tables)
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed in this invocation (not recorded; see above)")
    table = tables()
    left = plan(settings, harness.load_records(json_path), tasks)
    print(f"wrote {results_dir / 'lr_sweep.md'}; {len(left)} runs known to be pending", flush=True)
    return table


def reuse_evals_before(settings, json_path, table_json):
    """Copy the base model's evaluations that ``finetune_table.py`` recorded with the same settings
    (the test set does not depend on the validation set): the same key, so the same computation."""
    wanted = {eval_before_job(settings, task, seed)["key"] for task in settings["tasks"] for seed in settings["seeds"]}
    found = [r for r in harness.load_results(table_json)["runs"] if r["key"] in wanted]
    with harness.results_lock(json_path):
        have = set(harness.load_records(json_path))
    for record in found:
        if record["key"] not in have:
            harness.append_result(json_path, dict(record, stage="before", copied_from="finetune_table.json"))


def write_tables(settings, json_path, results_dir, command, machine, plot_too=True):
    with harness.results_lock(json_path):
        table = summary(settings, harness.load_records(json_path))
        harness.write_json(results_dir / "tuned_table.json", table)
        render(table, command, results_dir / "lr_sweep.md", results_dir / "lr_sweep.png" if plot_too else None,
               machine)
    return table


if __name__ == "__main__":
    main()
