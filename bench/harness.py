"""What the benchmark scripts share: results files, resumable grids, output writing, environment,
machine description, statistics and argument parsing. Every script in ``bench/`` uses it through
the public names below and keeps only its own experiment.

Importing it imports neither torch nor matplotlib (:func:`passive_omp_wait` must run before torch is
loaded). The scripts import it as ``import harness`` (``bench/`` is on ``sys.path`` when a script runs
as ``python bench/NAME.py``; a script that the tests load with ``importlib`` puts it there itself).

**Results files** (``finetune_table.json``, ``lr_sweep.json``, ``quality_runs.json``): ``{"runs":
[record, ...]}``, one record per finished run, keyed by :func:`settings_key` of the run's settings,
read and rewritten whole under :func:`results_lock` (a lock file beside it), replaced atomically.

**Grids** (:func:`drive`): a plan lists the jobs still wanted given what is recorded; each job is
``{"key", "settings", "label", "task", "tables", ...}``. A job about to run is claimed by a file
``<runs-dir>/claims/<hash>.pid`` holding the invocation's pid, so that any number of invocations
share one grid without running anything twice, and one that was killed leaves nothing behind that
blocks the others (its claim names a dead process).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GIB = 2**30

# ---------------------------------------------------------------------------------------------- environment


def passive_omp_wait():
    """``OMP_WAIT_POLICY=PASSIVE`` unless set: on a shared 2-core machine, OpenMP threads that spin
    while waiting slow factorizations down up to 10×. Effective only before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def offline():
    """Never reach the Hugging Face hub (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, unless set)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pin_threads(threads=1):
    """``torch.set_num_threads(threads)``: the benchmarks share 2 cores with other jobs, where one
    thread per run is both fairer and (for small operations) faster than two spinning ones."""
    import torch

    torch.set_num_threads(threads)
    return threads


def child_env(threads=None, **extra):
    """The environment of a benchmark's subprocess: this checkout's ``src`` first on ``PYTHONPATH``,
    ``OMP_NUM_THREADS=threads`` when given, then ``extra`` (name=value strings)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- the machine


def cpu_name():
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """A grid record's ``machine``: Python, torch, cores, torch threads, CPU and the versions of the
    fine-tuning stack."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "processor": cpu_name()}
    from importlib import metadata

    for name in ("transformers", "peft", "reasoning-gym", "galore-plus"):  # reasoning_gym.__version__ lags
        try:
            info[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name.replace("-", "_")] = None
    return info


def machine_line():
    """One line: CPU, cores, torch threads (pre-training runs on the CPU)."""
    import torch

    return f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, no GPU used"


def versions(modules=(), distributions=()):
    """Python's and torch's versions, then each module's ``__version__`` ("?" if it has none or does
    not import) and each installed distribution's version (None if not installed)."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in modules:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version is informative only
            out[mod] = "?"
    from importlib import metadata

    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def proc_status(key):
    """This process's ``/proc/self/status`` entry ``key`` (``VmRSS``, ``VmHWM``: the peak RSS), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def reset_peak_rss():
    """Reset this process's peak RSS (``VmHWM``) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM
        f.write("5")


# ---------------------------------------------------------------------------------------------- files


def _tmp_beside(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process writes (``x.<pid>.json.tmp``)."""
    return path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}.tmp")


def write_text(path, text):
    """Write ``text`` to ``path`` atomically: a reader (or a crash) never sees half a file."""
    path = Path(path)
    tmp = _tmp_beside(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, data, indent=1):
    """``json.dumps(data, indent=indent)`` to ``path``, atomically."""
    write_text(path, json.dumps(data, indent=indent))


def write_outputs(out, stem, data, markdown, plot=None):
    """A result's output set in ``out``: ``stem.json`` (``data``), then ``stem.md``
    (``markdown(data)``), then, with ``plot``, ``stem.png`` (``plot(data, path)``). The JSON goes
    first, so a failure in a table or plot never loses a result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", data)
    write_text(out / f"{stem}.md", markdown(data))
    if plot is not None:
        plot(data, out / f"{stem}.png")


def table_header(*columns):
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=110):
    """Lay ``fig`` out, write it to ``path`` atomically (the format from the suffix) and close it."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    tmp = _tmp_beside(path)
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or None)
    os.replace(tmp, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- results files


def settings_key(settings):
    """A run's key in a results file: its settings as sorted JSON (recorded keys depend on it)."""
    return json.dumps(settings, sort_keys=True)


@contextlib.contextmanager
def results_lock(json_path):
    """An exclusive lock beside the results file (``x.json.lock``), held by whoever reads-then-writes
    it. Not re-entrant: :func:`append_result` and :func:`claim` take it themselves, so call them
    outside it."""
    import fcntl

    with open(Path(json_path).with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_results(path):
    """The results file's content, ``{"runs": []}`` when there is none yet (no lock taken)."""
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def load_records(path):
    """The recorded runs by key (no lock taken: hold :func:`results_lock` where it matters)."""
    return {r["key"]: r for r in load_results(path)["runs"]}


def append_result(path, record):
    """Re-read, append (replacing a record with the same key), write atomically, all under the
    lock: an interruption never leaves a half-written file, and two invocations never drop each
    other's runs."""
    path = Path(path)
    with results_lock(path):
        data = load_results(path)
        data["runs"] = [r for r in data["runs"] if r["key"] != record["key"]] + [record]
        write_json(path, data)


# ---------------------------------------------------------------------------------------------- grids


def dedupe(jobs):
    """One job per settings key; a job in two tables keeps both rows (its ``tables`` merged)."""
    seen, out = {}, []
    for job in jobs:
        if job["key"] in seen:
            seen[job["key"]]["tables"].update(job["tables"])
            continue
        seen[job["key"]] = job
        out.append(job)
    return out


def describe(job):
    return f"{job['task']} / {job['label']} / seed {job['settings']['seed']}"


def alive(pid):
    """Whether process ``pid`` exists (someone else's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(job, runs_dir, json_path):
    """Claim ``job`` for this process (returns the claim file), or return None if it is recorded
    or claimed by a live process. Checked and written under the results file's lock."""
    claims = Path(runs_dir) / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / (hashlib.sha1(job["key"].encode()).hexdigest()[:16] + ".pid")
    with results_lock(json_path):
        if any(r["key"] == job["key"] for r in load_results(json_path)["runs"]):
            return None
        try:
            owner = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = None
        if owner is not None and owner != os.getpid() and alive(owner):
            return None
        path.write_text(f"{os.getpid()} {describe(job)}\n")
    return path


@functools.cache
def code_version() -> str | None:
    """The commit of the checkout this bench runs from (``+`` when ``src/`` or ``bench/`` has uncommitted
    changes), or None outside a git checkout: recorded with each run, since a grid can outlive several
    commits (its keys say what a run computes, not with which code)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src", "bench"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+" if dirty else "")


def record_of(job, result, machine, in_process, started, load_before, **extra):
    """What the results file records of a finished job (``extra``: a plan's own fields)."""
    return {"key": job["key"], "settings": job["settings"], "label": job["label"], "task": job["task"], **extra,
            "result": result, "machine": machine, "in_process": in_process, "started": started,
            "code": code_version(), "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


#: the file in a grid's runs directory that stops :func:`drive` between runs
STOP = "STOP"


def drive(plan, json_path, runs_dir, *, run_job, in_process, machine, max_runs=None, wait_for_others=False,
          after_each=None, stop_on_failure=False, failed=None):
    """Run a grid to the end, resumably and shared with other invocations: ``plan(by_key)`` lists the
    jobs wanted given what is recorded (keyed), in order; each round takes the first that is neither
    recorded nor claimed by a live process, runs it (``run_job(job, runs_dir, in_process)`` returns
    its result), records it at once and calls ``after_each`` (the tables). Re-planning after every
    run lets a plan depend on results (a learning-rate sweep). When all that is left runs elsewhere,
    wait for it (``wait_for_others``: its results may decide what comes next) or stop. A failed run
    is printed, left unrecorded for the next invocation and not retried by this one
    (``stop_on_failure``: raise); ``failed``: a set of keys not to retry, shared by several calls (the
    keys that fail here are added to it). A job's ``stage`` and ``row`` are recorded with it.
    A file named :data:`STOP` in ``runs_dir`` stops every invocation before its next run (each finishes
    and records the one it is in: how a session ends a grid without losing a run; remove the file, or
    start ``quality_background.sh``, which does, to go on).
    Returns (runs made, keys of the runs that failed)."""
    new, failed = 0, set() if failed is None else failed
    while max_runs is None or new < max_runs:
        if (Path(runs_dir) / STOP).exists():
            print(f"  {Path(runs_dir) / STOP} exists: stopping before the next run", flush=True)
            break
        by_key = load_records(json_path)
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


# ---------------------------------------------------------------------------------------------- statistics


def validation_loss(record):
    """A recorded run's validation answer loss (``--n-validation``); infinity for a diverged run."""
    result = record["result"]
    return math.inf if result.get("diverged") else result["eval_validation"]["answer_loss"]


def bracket(tried, curve, ladder, max_rungs):
    """A learning-rate sweep's bracketing rule: given the rates ``tried`` (all recorded) and their
    ``curve`` {lr: loss}, ``(the rate to add or None, the best rate)``. The best (lowest loss, the lower
    rate on a tie; the lowest rate tried when every one diverged) at either end of ``tried`` adds the
    next rung of ``ladder`` beyond it, so a chosen rate has a worse neighbour on both sides, unless the
    ladder or ``max_rungs`` ends the sweep."""
    best = min(sorted(tried), key=lambda lr: curve[lr])
    if math.isinf(curve[best]):  # every rate diverged: go lower
        best = min(tried)
    if len(tried) >= max_rungs:
        return None, best
    step = ladder.index(best)
    if best == min(tried) and step > 0:
        return ladder[step - 1], best
    if best == max(tried) and step < len(ladder) - 1:
        return ladder[step + 1], best
    return None, best


def sweep(starts, job_at, by_key, loss, ladder, max_rungs):
    """A bracketed learning-rate sweep's state given the recorded runs ``by_key``: ``(pending jobs,
    curve {lr: loss}, chosen lr or None)``. The rates ``starts`` first, then :func:`bracket`'s next
    rung while it asks for one; ``job_at(lr)`` is the sweep's job at ``lr`` and ``loss(record)`` a
    recorded run's loss (infinity when it diverged)."""
    tried = list(starts)
    while True:
        jobs = {lr: job_at(lr) for lr in tried}
        curve = {lr: loss(by_key[j["key"]]) for lr, j in jobs.items() if j["key"] in by_key}
        pending = [j for j in jobs.values() if j["key"] not in by_key]
        if pending:
            return pending, curve, None
        nxt, best = bracket(tried, curve, ladder, max_rungs)
        if nxt is None:
            return [], curve, best
        tried.append(nxt)


def mean_half_range(values):
    """(mean, half the range) of the values that are not None, or None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def fmt_mean_half_range(stat, digits, scale=1.0):
    """``mean ± half-range`` (no ± when it is 0) of :func:`mean_half_range`'s pair; "—" for None."""
    if stat is None:
        return "—"
    mean, half = stat
    return f"{mean * scale:.{digits}f}" + (f" ± {half * scale:.{digits}f}" if half else "")


def mean_sd(values):
    """(mean, sample standard deviation or None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_t(differences):
    """(mean, t) of paired differences: t = mean / (sd / √n) with the sample sd; ±inf when the
    differences are all equal and not 0."""
    mean = statistics.mean(differences)
    sd = statistics.stdev(differences) if len(differences) > 1 else 0.0
    t = mean / (sd / math.sqrt(len(differences))) if sd > 0 else math.inf * (1 if mean > 0 else -1 if mean < 0 else 0)
    return mean, t


def final_losses(seed_jobs, by_key, loss):
    """({seed: loss(record)} over the finished, not diverged runs of ``seed_jobs`` ((seed, job) pairs;
    a job's record is ``by_key[job["key"]]``), and the keys of those runs): a table row's finals."""
    per_seed, keys = {}, set()
    for seed, j in seed_jobs:
        rec = by_key.get(j["key"])
        if rec is not None and not rec["result"].get("diverged"):
            per_seed[seed], keys = loss(rec), keys | {j["key"]}
    return per_seed, keys


def paired_rows(rows, a, b, seeds):
    """(differences a − b per seed, mean, t) of two table rows' ``test_loss`` by seed (rows are
    ``{"method", "test_loss": {seed: loss}}``) where both have every seed, else None."""
    ra = next((r for r in rows if r["method"] == a), None)
    rb = next((r for r in rows if r["method"] == b), None)
    if not ra or not rb or any(s not in ra["test_loss"] or s not in rb["test_loss"] for s in seeds):
        return None
    d = [ra["test_loss"][s] - rb["test_loss"][s] for s in seeds]
    return (d, *paired_t(d))


# ---------------------------------------------------------------------------------------------- arguments


def add_modes(ap, smoke=None, quick=None):
    """``--smoke`` and/or ``--quick`` (whichever has a help text), mutually exclusive."""
    group = ap.add_mutually_exclusive_group()
    if smoke:
        group.add_argument("--smoke", action="store_true", help=smoke)
    if quick:
        group.add_argument("--quick", action="store_true", help=quick)
    return group


def mode(args):
    """"smoke", "quick" or "full", from :func:`add_modes`'s flags."""
    return "smoke" if getattr(args, "smoke", False) else "quick" if getattr(args, "quick", False) else "full"


def add_out_argument(ap, help="where the results go (default bench/results)"):
    ap.add_argument("--out", type=Path, default=RESULTS, help=help)


def add_grid_arguments(ap, name, quick=None):
    """The options of a resumable grid (:func:`drive`) called ``name``: ``--smoke`` (and ``--quick``
    with its help text), ``--results-dir``, ``--runs-dir``, ``--in-process``, ``--table-only``,
    ``--max-runs``. :func:`grid_dirs` resolves the directories."""
    add_modes(ap, smoke="tiny model, 3 steps, in-process: seconds", quick=quick)
    ap.add_argument("--results-dir", default=None,
                    help=f"where the .json/.md/.png go (default bench/results; smoke: runs/{name}/smoke)")
    ap.add_argument("--runs-dir", default=None, help=f"run outputs and the SmolLM2 export (default runs/{name})")
    ap.add_argument("--in-process", action="store_true", help="run jobs in this process (smoke's default); "
                    "peak memory is then the whole process's and is not recorded")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the tables from the JSON")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")


def grid_dirs(args, name):
    """(results dir, runs dir) of :func:`add_grid_arguments`'s options, created: by default
    ``bench/results`` and ``runs/NAME``, or ``runs/NAME/smoke`` for both in smoke mode."""
    smoke = getattr(args, "smoke", False)
    results_dir = Path(args.results_dir or (ROOT / (f"runs/{name}/smoke" if smoke else "bench/results")))
    runs_dir = Path(args.runs_dir or (ROOT / "runs" / name / ("smoke" if smoke else "")))
    results_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    return results_dir, runs_dir

