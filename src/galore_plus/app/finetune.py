"""``finetune(config)``: one fine-tuning run — set up, build, train, evaluate, write.

Loads a task and a model offline, trains with its schedule (schedules.py), evaluates before and after on the
held-out split, and writes ``metrics.json``, ``log.jsonl`` (one line per step), ``loss.png``,
``run.json``, a resumable checkpoint (:mod:`galore_plus.app.checkpoint`) and ``final/`` (the trained
model as a Hugging Face model directory, adapters merged) to the output directory.
``finetune(config, resume=DIR)`` continues a run and ends where the uninterrupted run would,
bitwise: data order, optimizer randomness and schedule are pure functions of the seed and the step.

Set-up (:mod:`galore_plus.app.preflight`) finds what the user can get wrong before the model
loads; what the run writes beside the checkpoint is :mod:`galore_plus.app.outputs`'s. A non-finite
training loss stops the run before its step is applied; what was saved is kept, and the message says
what is known of the cause (:mod:`galore_plus.app.diagnosis`). SIGINT and SIGTERM finish the step,
save a checkpoint and stop (:mod:`galore_plus.app.interrupts`); a write to the output directory that
fails (a full disk) is one line too, the last checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .configfile import write_config_file
from .config import LOW_RANK_METHODS, FinetuneConfig, default_max_new_tokens, torch_dtype
from .config import DEFAULT_SAVE_EVERY
from .diagnosis import hints, loss_message, non_finite, update_message
from .errors import CheckpointError, ConfigError, RunError
from .interrupts import REPEAT_WINDOW, Interrupts, Stop, interrupted
from .outputs import LOG, METRICS, PLOT, export, lock_output_dir, plot_losses, remove, run_files, truncate_log
from .methods import build_method, refresh_seconds, uses_projected_backward
from .preflight import Run, one_line, setup
from .reporting import Reporter
from .schedules import build_scheduler


@dataclass
class Built:
    """The model (``train_model`` is what the forward runs through: the DDP wrapper, or the model
    itself), its optimizer and schedule, and the encoded training examples."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    features: list[dict[str, list[int]]]
    total_steps: int
    max_new_tokens: int
    dtype: torch.dtype
    reporter: Reporter | None = None  # app/reporting.py: set by finetune() once the output directory is the run's


def finetune(config: FinetuneConfig, resume: str | Path | None = None, *,
             trust_unverified_checkpoint: bool = False) -> dict[str, Any]:
    """Run a fine-tune, or continue the one in directory ``resume``; returns the metrics written to
    ``metrics.json``.

    Resuming, ``config`` is the run's (``checkpoint.saved_config(resume)``); it may differ only by a
    larger ``max_steps`` (the run is extended), and its ``output_dir`` is ignored.
    ``trust_unverified_checkpoint``: a checkpoint from before manifests gets one
    (:func:`~galore_plus.app.checkpoint.trust_unverified`) instead of being refused. Raises
    :class:`~galore_plus.app.errors.CommandError` for what the user can fix (before anything slow),
    :class:`~galore_plus.app.errors.RunError` when training has to stop, and
    :class:`~galore_plus.app.interrupts.Interrupted` after SIGINT or SIGTERM (DESIGN.md, "Interrupts
    and checkpoints").
    """
    if trust_unverified_checkpoint:
        if resume is None:
            raise ConfigError("--trust-unverified-checkpoint applies to the checkpoint of --resume DIR")
        checkpoint.trust_unverified(Path(resume))
    run = None
    with Interrupts(repeat_window=REPEAT_WINDOW if config.distributed != "none" else 0.0) as interrupts:
        try:
            run = setup(config, resume)
            run.interrupts = interrupts
            try:
                built = build(run)
                try:
                    start_step, history = start(run, built)
                    with Reporter(run, built, start_step, history) as built.reporter:
                        history, saved_step = train(run, built, start_step, history)
                        return finish(run, built, history, saved_step)
                except OSError as err:  # writing the output directory: a full disk, a read-only directory
                    raise _stop(run, run.step if run.started else None, f"writing to {run.out} failed "
                                f"({one_line(err)})", run.saved_step,
                                advice="free space or make it writable, then resume") from None
            finally:
                if run.lock is not None:  # taken by start(): the directory is free again
                    run.lock.close()
                    run.lock = None
        except Stop as stop:  # a signal where nothing was left to finish, or the second one
            raise interrupted(run, stop.signum, at_once=True) from None


# ---------------------------------------------------------------------------------------------- build


def build(run: Run) -> Built:
    """Load the model, encode the training set, build the optimizer and the schedule."""
    from .models import enable_gradient_checkpointing, load_model

    config = run.config
    dtype = torch_dtype(config.dtype, run.runtime.device)
    try:
        model, tokenizer = load_model(config.model, seed=config.seed, dtype=dtype, tokenizer=run.tokenizer)
    except Exception as err:  # e.g. a model directory without its weights, or a truncated one (SafetensorError)
        if not isinstance(err, (OSError, ValueError)) and type(err).__name__ != "SafetensorError":
            raise
        raise ConfigError(f"--model {config.model} cannot be loaded: {one_line(err)}") from None
    bad, first = non_finite(model)
    if bad:  # nothing trains from them, and the first NaN loss would blame the learning rate
        raise ConfigError(f"--model {config.model} has {bad} non-finite weight entries (the first in {first}) before "
                          "training; nothing was trained")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    max_new_tokens = config.max_new_tokens or default_max_new_tokens(config.data)
    features = run.features
    steps_per_epoch = math.ceil(len(features) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)

    model.to(run.runtime.device)
    train_model = model
    distributed = None
    if run.runtime.is_distributed:
        from .. import distributed
    if config.distributed == "fsdp":  # shard first: the optimizer must see the DTensor parameters
        train_model = distributed.wrap_model(model, "fsdp", run.runtime.device)
    model, optimizer = build_method(config, model, total_steps)
    if distributed is not None:
        if config.distributed == "ddp":
            train_model = distributed.wrap_model(model, "ddp", run.runtime.device)
        if config.method in LOW_RANK_METHODS:
            optimizer = distributed.distribute(optimizer)
    scheduler = build_scheduler(optimizer, config, total_steps)
    if config.method in LOW_RANK_METHODS and run.runtime.is_main:
        from ..integration import optimizer_summary

        print(optimizer_summary(optimizer), file=sys.stderr)
    return Built(model, train_model, tokenizer, optimizer, scheduler, features, total_steps, max_new_tokens, dtype)


# ---------------------------------------------------------------------------------------------- start


def start(run: Run, built: Built) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint (resuming) or evaluate the base model; make the output directory the run's:
    a replaced run's files removed (``--overwrite``), the log cut back to the checkpoint's step (the
    steps after it are trained again and logged once), ``run.json`` written."""
    step, history = 0, {"train_seconds": 0.0, "tokens": 0, "refresh_seconds": 0.0}
    if run.state is not None:
        checkpoint.load(run.out, run.state, built.model, built.optimizer, built.scheduler)
        step, history = run.state["step"], run.state["history"]
        if step > built.total_steps:
            raise CheckpointError(f"--resume {run.out}: the checkpoint is at step {step}, past the run's "
                                  f"{built.total_steps} steps")
        print(f"resumed {run.out} at step {step}/{built.total_steps}", file=sys.stderr)
    run.saved_step, run.step = (step if run.state is not None else None), step
    run.runtime.barrier()  # every rank has finished its checks before rank 0 writes
    if run.runtime.is_main:
        with run.interrupts.deferred():  # a signal waits for the directory to be the run's
            run.out.mkdir(parents=True, exist_ok=True)
            run.lock = lock_output_dir(run.out)  # one run at a time in a directory (issue 25)
            existing = run_files(run.out)
            if existing and not run.resume and not run.config.overwrite:  # written since set-up looked
                raise ConfigError(f"--output-dir {run.out} now holds a run ({', '.join(existing)}) that another "
                                  "process wrote after this one started; nothing of it was changed")
            if not run.resume:  # only with --overwrite: set-up refused a run's directory otherwise
                for name in existing:
                    try:
                        remove(run.out / name)
                    except OSError as err:
                        raise ConfigError(f"--overwrite: {run.out / name} cannot be deleted ({one_line(err)}); the "
                                          "new run did not start") from None
            # first: from here on --resume finds the run
            checkpoint.write_run(run.out, run.config, run.data_sha256, run.eval_data_sha256)
            write_config_file(run.out, run.config)  # the resolved options, for --config (DESIGN.md, "Config files")
            truncate_log(run.out / LOG, step)
    run.started = True
    if run.interrupts.requested:
        raise Stop(run.interrupts.signum)
    run.runtime.barrier()
    if step == 0 and run.config.eval_before and run.task.test:
        history["eval_before"] = _evaluate(run, built, "before training")
    return step, history


# ---------------------------------------------------------------------------------------------- train


def train(run: Run, built: Built, start_step: int, history: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Steps ``start_step + 1 .. total_steps``, a log line and (``--save-every``) a checkpoint after
    each; returns the history and the step of the last checkpoint on disk."""
    from tqdm.auto import tqdm

    config = run.config
    saved_step = start_step if run.state is not None else None
    every = DEFAULT_SAVE_EVERY if config.save_every is None else config.save_every
    refresh_base = refresh_seconds(built.optimizer) - history["refresh_seconds"]
    built.model.train()
    bar = tqdm(range(start_step, built.total_steps), initial=start_step, total=built.total_steps, desc="fine-tuning",
               dynamic_ncols=True, disable=not run.runtime.is_main)
    run.interrupts.defer(True)  # a signal waits for the step to end, then stops the run with a checkpoint
    for step in bar:
        began = time.perf_counter()
        try:
            loss, tokens = _forward_backward(run, built, step)
            if not math.isfinite(loss):
                (bad,) = run.runtime.sum_across_ranks(non_finite(built.model)[0])
                what, advice = loss_message(config, built.dtype, built.optimizer, step + 1, loss, saved_step, int(bad))
                raise _stop(run, step + 1, what, saved_step, advice=advice)
            built.optimizer.step()  # layer-wise: closes the step, the parameters were updated inside backward()
        except FloatingPointError as err:  # a projector refresh on a non-finite gradient
            raise _stop(run, step + 1, f"{err}; the run stopped", saved_step,
                        advice=hints(config, built.dtype, updated=step > 0, refresh=True)) from None
        built.optimizer.zero_grad(set_to_none=True)
        built.scheduler.step()
        run.step = step + 1
        seconds = time.perf_counter() - began
        history["train_seconds"] += seconds
        history["tokens"] += tokens
        history["refresh_seconds"] = refresh_seconds(built.optimizer) - refresh_base
        record = {"step": step + 1, "loss": loss, "lr": built.scheduler.get_last_lr()[0], "tokens": tokens,
                  "seconds": round(seconds, 4), "refresh_seconds": round(history["refresh_seconds"], 4)}
        if run.runtime.is_main:
            with (run.out / LOG).open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        built.reporter.after_step(record)  # its scalars; with --eval-every its evaluation (before its checkpoint)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}",
                        refresh_s=f"{history['refresh_seconds']:.1f}")
        if every and (step + 1) % every == 0 and step + 1 < built.total_steps:
            saved_step = _save(run, built, step + 1, history, saved_step)
        _stop_if_interrupted(run, built, step + 1, history, saved_step, bar)
    bar.close()
    run.interrupts.defer(False)
    return history, saved_step


def _stop_if_interrupted(run: Run, built: Built, step: int, history: dict[str, Any], saved_step: int | None,
                         bar: Any) -> None:
    """After step ``step``: when a signal asked the run to stop (on any rank: every rank stops after
    the same step), save the step's checkpoint and raise :class:`Interrupted`."""
    run.step = step
    stop = run.interrupts.requested
    if run.runtime.world_size > 1:  # one all-reduce of a number per step
        (stop,) = run.runtime.sum_across_ranks(float(stop))
    if stop:
        bar.close()
        if saved_step != step:
            _save(run, built, step, history, saved_step)
        raise interrupted(run, run.interrupts.signum or signal.SIGTERM)


def _forward_backward(run: Run, built: Built, step: int) -> tuple[float, int]:
    """The step's gradient over its micro-batches; returns its loss (mean over the step's answer
    tokens, summed over ranks) and its token count."""
    from .encoding import answer_loss_sum, collate

    config, features, runtime = run.config, built.features, run.runtime
    micro_batches = [batch_indices(step * config.grad_accum + j, config.batch_size, len(features), config.seed)
                     for j in range(config.grad_accum)]
    answer_tokens = sum(sum(1 for t in features[i]["labels"] if t != -100) for ids in micro_batches for i in ids)
    loss_sum, tokens = 0.0, 0
    for ids in micro_batches:
        ids = runtime.share(ids)  # this rank's share of the global batch
        batch = {k: v.to(runtime.device) for k, v in
                 collate([features[i] for i in ids], built.tokenizer.pad_token_id).items()}
        # --packing: position ids restart per example; without a mask or a cache each attends to itself
        # only (app/packing.py)
        masks = ({"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch
                 else {"attention_mask": batch["attention_mask"]})
        logits = built.train_model(input_ids=batch["input_ids"], **masks).logits
        # token-level mean over the whole step's answer tokens, so accumulation equals a bigger batch
        # (times the world size: DDP and FSDP2 average the ranks' gradients, we want their sum)
        loss = answer_loss_sum(logits, batch["labels"]) * runtime.world_size / answer_tokens
        loss.backward()
        loss_sum += loss.item() / runtime.world_size
        tokens += int(batch["attention_mask"].sum())
    # every rank sees the same sum, so all stop together on a non-finite one
    loss_sum, tokens = runtime.sum_across_ranks(loss_sum, tokens)
    return loss_sum, int(tokens)


def _stop(run: Run, step: int | None, what: str, saved_step: int | None, advice: str = "") -> RunError:
    if saved_step is not None:
        kept = f"its checkpoint of step {saved_step} is kept in {run.out / checkpoint.CHECKPOINT}"
    elif run.config.save_checkpoint:
        kept = "no checkpoint had been written yet"
    else:
        kept = "it writes no checkpoint (--no-save-checkpoint)"
    return RunError(f"{'' if step is None else f'step {step}: '}{what}; {kept}" + (f". {advice[0].upper()}{advice[1:]}"
                                                                                  if advice else ""))


def batch_indices(micro_index: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of one micro-batch: epoch ``e`` visits a permutation seeded by ``seed + e``, so
    the order is a pure function of (seed, micro-batch index) and a resumed run sees the same data."""
    out = []
    for position in range(micro_index * batch_size, (micro_index + 1) * batch_size):
        epoch, offset = divmod(position, n)
        generator = torch.Generator().manual_seed(seed + epoch)
        out.append(int(torch.randperm(n, generator=generator)[offset]))
    return out


def finish(run: Run, built: Built, history: dict[str, Any], saved_step: int | None) -> dict[str, Any]:
    """The final checkpoint, the evaluation after training, ``metrics.json``, ``loss.png``."""
    config = run.config
    if saved_step != built.total_steps:
        with run.interrupts.deferred():
            saved_step = _save(run, built, built.total_steps, history, saved_step)
        if run.interrupts.requested:
            raise interrupted(run, run.interrupts.signum)
    # the evaluation's batches (logits of 32 long answers) can exceed it
    train_peak = peak_memory_bytes(run.runtime.device)
    built.reporter.restore_best()  # --load-best-at-end: the final evaluation and final/ are the best point's
    # on every rank: an FSDP2 forward is collective
    eval_after = _evaluate(run, built, "after training") if run.task.test else None
    eval_validation = _evaluate(run, built, "after training", validation=True) if run.task.validation else None
    task = run.task
    metrics = {
        "method": config.method, "rank": config.rank, "model": config.model, "data": task.name,
        "data_form": task.info.get("form"), "n_train": len(task.train), "n_test": len(task.test),
        "n_validation": len(task.validation),
        "dtype": str(built.dtype).removeprefix("torch."),
        "projected_backward": uses_projected_backward(built.optimizer),
        "gradient_checkpointing": config.gradient_checkpointing,
        "steps": built.total_steps, "train_seconds": round(history["train_seconds"], 2),
        "tokens_per_second": round(history["tokens"] / max(history["train_seconds"], 1e-9), 1),
        "peak_memory_bytes": train_peak, "peak_memory_bytes_with_eval": peak_memory_bytes(run.runtime.device),
        "refresh_seconds": round(history["refresh_seconds"], 3),
        "eval_before": history.get("eval_before"), "eval_after": eval_after, "eval_validation": eval_validation,
        "config": dataclasses.asdict(config),
    }
    metrics.update(built.reporter.metrics())  # with --eval-every: the best evaluation point
    if run.runtime.is_main:
        log = [json.loads(line) for line in (run.out / LOG).read_text().splitlines()]
        plot_losses(log, run.out / PLOT, f"{config.method} rank {config.rank} on {run.task.name}")
        try:
            checkpoint.write_json(run.out / METRICS, metrics)
        except ValueError:  # NaN or infinity: not JSON, and not a result
            raise _stop(run, built.total_steps, f"the evaluation after training gave a non-finite result "
                                                f"({eval_after}; validation {eval_validation}), so {METRICS} is "
                                                "not written", saved_step) from None
    if config.export:  # after the evaluation: merging LoRA/DoRA adapters changes the model in place
        export(run, built)
    built.reporter.finish(metrics)  # the final metrics logged; the before/after table and samples printed
    run.runtime.shutdown()
    return metrics


def _save(run: Run, built: Built, step: int, history: dict[str, Any], saved_step: int | None) -> int | None:
    """Checkpoint ``step`` (with ``--save-checkpoint``) and return the step of the checkpoint on disk.
    Parameters made non-finite by the update stop the run instead: a finite loss does not rule them
    out (an overflowing gradient makes Adam's update NaN), and no checkpoint may hold them."""
    if not run.config.save_checkpoint:
        return saved_step
    count, first = non_finite(built.model)
    (bad,) = run.runtime.sum_across_ranks(count)  # every rank stops, or none
    if bad:
        what, advice = update_message(run.config, built.dtype, built.optimizer, step, saved_step, int(bad), first)
        raise _stop(run, step, what, saved_step, advice=advice)
    checkpoint.save(run.out, built.model, built.optimizer, built.scheduler, step, run.config, history,
                    runtime=run.runtime, data_sha256=run.data_sha256, eval_data_sha256=run.eval_data_sha256)
    run.saved_step = step
    return step


def _evaluate(run: Run, built: Built, label: str, validation: bool = False) -> dict[str, Any] | None:
    """The test set's metrics (with ``--generate``: accuracy or BLEU/ROUGE-L too), or the validation
    set's answer loss."""
    from .evaluate import evaluate

    examples = run.task.validation if validation else run.task.test
    print(f"evaluating {label} on {len(examples)} {'validation' if validation else 'held-out'} examples...",
          file=sys.stderr)
    return evaluate(built.model, built.tokenizer, examples, run.task.kind, max_new_tokens=built.max_new_tokens,
                    batch_size=run.config.eval_batch_size, max_length=run.config.max_length,
                    generate_answers=run.config.generate and not validation)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
