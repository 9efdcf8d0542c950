"""The quality preset's training memory against AdamW's (issue 29: "at AdamW's memory + ≤ 10%").

Runs the command itself, ``galore-plus finetune``, once per (method, allocator) in a fresh process,
interleaved, and reads the training's peak RSS it records (``metrics.json``: ``peak_memory_bytes``,
evaluation excluded): ``--method adamw`` against ``--preset quality`` (GaLore, every matrix at full
rank, α 1), on the quality grid's settings (SmolLM2-135M, gsm_symbolic, batch 4, 384 tokens; a few
steps, the first a refresh of every projector). Two allocators:

- ``live``: ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc returns freed large tensors to the OS and RSS
  follows the live tensors (as ``bench/peak_memory.py`` measures);
- ``glibc``: glibc's default, whose adaptive mmap threshold keeps freed tensors on the heap; RSS then
  grows with the allocation pattern over the first steps, by an amount that differs between
  optimizers (the quality grid's ``train_peak_memory_bytes`` are measured so).

    python bench/preset_memory.py                      # 4 runs, ~16 min on one thread beside two others
    python bench/preset_memory.py --smoke --out /tmp/pm  # tiny model, arithmetic: the test's

Writes ``preset_memory.json`` and ``preset_memory.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (write_json, write_text, table_header)

METHODS = {"adamw": ["--method", "adamw"], "quality preset": ["--preset", "quality"]}
ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc": {}}
GIB = harness.GIB


def command(smoke, steps, output_dir):
    """The command line of one run, without the method's options."""
    if smoke:
        data = ["--model", "tiny", "--data", "arithmetic", "--batch-size", "2", "--max-length", "64"]
    else:
        data = ["--model", "smollm2", "--data", "gsm_symbolic", "--batch-size", "4", "--max-length", "384"]
    return [sys.executable, "-m", "galore_plus.app", "finetune", *data, "--max-steps", str(steps), "--n-train", "64",
            "--n-test", "4", "--n-validation", "0", "--lr", "3e-4", "--no-generate", "--no-save-checkpoint",
            "--output-dir", str(output_dir)]


def environment(allocator, base=None):
    """The run's environment: ``base`` (this one's) without glibc's ``MALLOC_*`` settings, one torch
    thread, and the allocator's own settings."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("MALLOC_")}
    return dict(env, OMP_NUM_THREADS="1", **ALLOCATORS[allocator])


def run_one(method, allocator, smoke, steps):
    """The training's peak RSS and seconds of one fresh run (one torch thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.run(command(smoke, steps, out) + METHODS[method], env=environment(allocator),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            raise SystemExit(f"{method} ({allocator}) failed: {tail[0] if tail else proc.returncode}")
        metrics = json.loads((out / "metrics.json").read_text())
    return {"method": method, "allocator": allocator, "peak_memory_bytes": metrics["peak_memory_bytes"],
            "train_seconds": metrics["train_seconds"]}


def ratios(results):
    """``{allocator: the quality preset's peak / AdamW's}``, for each allocator both ran under."""
    by = {(r["method"], r["allocator"]): r["peak_memory_bytes"] for r in results}
    return {a: by[("quality preset", a)] / by[("adamw", a)] for a in ALLOCATORS
            if ("adamw", a) in by and ("quality preset", a) in by}


def table(results, steps):
    by = {(r["method"], r["allocator"]): r["peak_memory_bytes"] for r in results}
    lines = ["# The quality preset's training memory against AdamW's", "",
             f"`python bench/preset_memory.py`: `galore-plus finetune`, {steps} steps, peak RSS of the training "
             "(evaluation excluded), one fresh process per cell. live: `MALLOC_MMAP_THRESHOLD_=65536` (RSS follows "
             "the live tensors); glibc: the default allocator settings.", "",
             *harness.table_header("allocator", "AdamW GiB", "quality preset GiB", "× AdamW")]
    for allocator, ratio in ratios(results).items():
        lines.append(f"| {allocator} | {by[('adamw', allocator)] / GIB:.2f} | "
                     f"{by[('quality preset', allocator)] / GIB:.2f} | {ratio:.3f} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--allocators", default=",".join(ALLOCATORS), help="of: " + ", ".join(ALLOCATORS))
    ap.add_argument("--smoke", action="store_true", help="the tiny model on arithmetic (the test's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    allocators = args.allocators.split(",")
    unknown = sorted(set(allocators) - set(ALLOCATORS))
    if unknown:
        ap.error(f"--allocators: unknown {', '.join(unknown)} (of: {', '.join(ALLOCATORS)})")
    results = []
    for allocator in allocators:  # interleaved: the two methods back to back under each allocator
        for method in METHODS:
            results.append(run_one(method, allocator, args.smoke, args.steps))
            print(f"{method} ({allocator}): {results[-1]['peak_memory_bytes'] / GIB:.2f} GiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / "preset_memory.json", {"steps": args.steps, "smoke": args.smoke, "runs": results,
                                                         "machine": harness.machine_info()})
    harness.write_text(args.out / "preset_memory.md", "\n".join(table(results, args.steps)) + "\n")
    return results


if __name__ == "__main__":
    main()
