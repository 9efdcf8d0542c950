"""What a fine-tune writes in its output directory beside the checkpoint: the names of its files
(:data:`OUTPUTS`), the per-step log (cut back on resume), the loss plot, and ``final/``, the
trained model (:func:`export`, with a ``manifest.json`` like the checkpoint's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import checkpoint
from .configfile import CONFIG_FILE
from .retention import kept_checkpoints

__all__ = ["LOG", "METRICS", "PLOT", "FINAL", "OUTPUTS", "LOCK", "lock_output_dir", "remove", "truncate_log", "export",
           "plot_losses", "run_files"]

LOG = "log.jsonl"
METRICS = "metrics.json"
PLOT = "loss.png"
FINAL = "final"
#: what a run writes in its directory: a directory holding any of them holds a run
OUTPUTS = (checkpoint.RUN, LOG, METRICS, PLOT, checkpoint.CHECKPOINT, checkpoint.CHECKPOINT + ".tmp",
           checkpoint.CHECKPOINT + ".old", FINAL, FINAL + ".tmp", CONFIG_FILE)
OUTPUTS += ("tensorboard", "wandb", "mlruns", "best", "best.tmp")  # app/reporting.py's: where a run reports


def run_files(out: Path) -> list[str]:
    """The names of :data:`OUTPUTS` present in ``out``, and the earlier checkpoints kept there
    (``checkpoint-STEP/``, ``--save-total-limit``): what a fresh run into ``out`` would replace."""
    return [name for name in OUTPUTS if (out / name).exists()] + [p.name for p in kept_checkpoints(out)]


#: held (``flock``) by the run writing the directory, for as long as it runs: a second run into the same
#: directory is refused instead of interleaving its files with the first's (issue 25)
LOCK = ".lock"


def lock_output_dir(out: Path) -> Any:
    """Take the output directory's lock (``out/.lock``, exclusive, not waiting) and return its open
    file, which holds it until closed; ``ConfigError`` naming the holder when another run has it."""
    import fcntl
    import os

    from .errors import ConfigError

    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"--output-dir {out} is in use by another run ({holder}); wait for it to finish or choose "
                          "another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def truncate_log(path: Path, step: int) -> None:
    """Keep the log's lines up to ``step``; a line cut short by a crash is dropped."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def export(run: Any, built: Any) -> Path:
    """``OUTPUT/final/`` of ``run`` (a ``preflight.Run``) from ``built`` (``finetune.Built``): the trained model as a Hugging Face model directory (``save_pretrained``, the
    tokenizer beside it; LoRA/DoRA adapters merged into the weights by PEFT's ``merge_and_unload``)
    that ``AutoModelForCausalLM.from_pretrained`` and ``galore-plus evaluate`` load. Written to
    ``final.tmp`` and renamed into place, so a previous ``final/`` is replaced whole or not at all.
    Under FSDP2 every rank takes part in gathering the full weights; rank 0 writes."""
    from .adapters import ADAPTER, save_adapter
    from .models import save_model

    model, state_dict = built.model, None
    if run.config.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = run.out / FINAL
    if run.runtime.is_main:
        tmp = run.out / (FINAL + ".tmp")
        remove(tmp)
        if run.config.method in ("lora", "dora"):  # the adapter alone first: merging changes the model in place
            save_adapter(model, tmp / ADAPTER, run.config.model)
            model = model.merge_and_unload()
        save_model(model, built.tokenizer, tmp, state_dict)
        checkpoint.make_readable(tmp)  # save_pretrained's modes: safetensors writes its file 0600 (issue 28)
        checkpoint.write_manifest(tmp)  # evaluate verifies the files against it (issue 25)
        remove(final)
        tmp.replace(final)
        print(f"saved the model to {final} (from_pretrained loads it)", file=sys.stderr)
    run.runtime.barrier()
    return final


def plot_losses(log: list[dict[str, Any]], path: Path, title: str) -> None:
    """The training loss of ``log`` (log.jsonl's records; a step logged twice counts once, the later)
    with its running mean, and the ``--eval-every`` answer losses (the records with ``eval_loss``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = {r["step"]: r["loss"] for r in log if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in log if r.get("eval_loss") is not None}
    steps, losses = list(train), list(train.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    if evals:
        split = next(r.get("split", "eval") for r in log if r.get("eval_loss") is not None)
        ax.plot(list(evals), list(evals.values()), "o-", ms=3, lw=1.2, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
