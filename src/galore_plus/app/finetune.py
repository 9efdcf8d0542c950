"""``finetune(config)``: one fine-tuning run — set up, build, train, evaluate, write.

Loads a task and a model offline, trains with a cosine schedule, evaluates before and after on the
held-out split, and writes ``metrics.json``, ``log.jsonl`` (one line per step), ``loss.png``,
``run.json``, a resumable checkpoint (:mod:`galore_plus.app.checkpoint`) and ``final/`` (the trained
model as a Hugging Face model directory, adapters merged) to the output directory.
``finetune(config, resume=DIR)`` continues a run and ends where the uninterrupted run would,
bitwise: data order, optimizer randomness and schedule are pure functions of the seed and the step.

What the user can get wrong is found before the model loads: the options
(:func:`~galore_plus.app.config.validated`), a run already in the output directory (refused without
``--overwrite``), the checkpoint to resume (verified against its manifest; the same world size and
data file), the data, the evaluation's dependencies, whether the low-rank options fit the
model's matrices (the optimizer built for the model on the ``meta`` device), and the encoding of every
example with the model's tokenizer (a chat template's refusal is a ``FILE:LINE`` error). A non-finite
training loss stops the run before its step is applied; what was saved is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..sharding import local
from . import checkpoint
from .config import (LOW_RANK_METHODS, FinetuneConfig, changes, check_launch, default_max_new_tokens,
                     low_rank_spec, projected_backward, resumed, torch_dtype, validated)
from .data import TASKS, DataError, Task
from .errors import CheckpointError, ConfigError, RunError

LOG = "log.jsonl"
METRICS = "metrics.json"
PLOT = "loss.png"
FINAL = "final"
#: what a run writes in its directory: a directory holding any of them holds a run
OUTPUTS = (checkpoint.RUN, LOG, METRICS, PLOT, checkpoint.CHECKPOINT, checkpoint.CHECKPOINT + ".tmp",
           checkpoint.CHECKPOINT + ".old", FINAL, FINAL + ".tmp")


@dataclass
class Run:
    """What set-up established: the checked config, where the run writes, this process's place in
    it, the task and its data files' sha256, when resuming the verified checkpoint state (None before
    the first save), and the model's tokenizer with the training examples it encoded."""

    config: FinetuneConfig
    out: Path
    resume: bool
    device: torch.device
    rank: int
    world: int
    task: Task
    data_sha256: str | None
    eval_data_sha256: str | None
    state: dict[str, Any] | None
    tokenizer: Any
    features: list[dict[str, list[int]]]


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


def finetune(config: FinetuneConfig, resume: str | Path | None = None, *,
             trust_unverified_checkpoint: bool = False) -> dict[str, Any]:
    """Run a fine-tune, or continue the one in directory ``resume``; returns the metrics written to
    ``metrics.json``.

    Resuming, ``config`` is the run's (``checkpoint.saved_config(resume)``); it may differ only by a
    larger ``max_steps`` (the run is extended), and its ``output_dir`` is ignored.
    ``trust_unverified_checkpoint``: a checkpoint from before manifests gets one
    (:func:`~galore_plus.app.checkpoint.trust_unverified`) instead of being refused. Raises
    :class:`~galore_plus.app.errors.CommandError` for what the user can fix (before anything slow)
    and :class:`~galore_plus.app.errors.RunError` when training has to stop.
    """
    if trust_unverified_checkpoint:
        if resume is None:
            raise ConfigError("--trust-unverified-checkpoint applies to the checkpoint of --resume DIR")
        checkpoint.trust_unverified(Path(resume))
    run = setup(config, resume)
    built = build(run)
    start_step, history = start(run, built)
    history, saved_step = train(run, built, start_step, history)
    return finish(run, built, history, saved_step)


# ---------------------------------------------------------------------------------------------- set-up


def setup(config: FinetuneConfig, resume: str | Path | None) -> Run:
    """Every check that needs no weights, in the order a user would fix them. Writes nothing (beyond
    finishing a checkpoint save that a crash cut short: see ``checkpoint.recover``)."""
    from .data import load_task
    from .evaluate import check_prerequisites

    state = record = None
    if resume is not None:
        saved = checkpoint.saved_config(Path(resume))
        config = resumed(saved, changes(config, saved), resume)
    config = validated(config)
    out = Path(config.output_dir)
    if resume is not None:
        state, record = checkpoint.read_state(out), checkpoint.read_run(out)
    else:
        existing = [name for name in OUTPUTS if (out / name).exists()]
        if existing and not config.overwrite:
            raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(existing)}): continue it with "
                              f"--resume {out}, replace it with --overwrite, or choose another --output-dir")
    torch.manual_seed(config.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    rank, world = 0, 1
    if config.distributed != "none":  # under torchrun: rank 0 alone writes logs, metrics and the plot
        from .. import distributed

        check_launch(config.distributed)
        rank, world, local_rank = distributed.init_from_env(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if config.batch_size % world:
            raise ConfigError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
                              f"{world} ranks")
    data_sha256 = None if config.data in TASKS else checkpoint.sha256_file(config.data)
    eval_data_sha256 = None if config.eval_data is None else checkpoint.sha256_file(config.eval_data)
    if resume is not None:
        checkpoint.check_resumable(state, record, out, config.data, data_sha256, world,
                                   eval_data=config.eval_data, eval_data_sha256=eval_data_sha256)
    task = load_task(config.data, n_train=config.n_train, n_test=config.n_test, seed=config.seed,
                     split=config.split, eval_data=config.eval_data,
                     eval_fraction=config.eval_fraction,
                     n_validation=config.n_validation)  # a malformed file raises DataError: FILE:LINE: problem
    if task.test:
        try:
            check_prerequisites(task.kind)
        except ImportError as err:
            raise ConfigError(str(err)) from None
    check_fits(config)
    tokenizer, features = _encode(config, task)
    if rank == 0:
        print(describe_data(task), file=sys.stderr)
    return Run(config, out, resume is not None, device, rank, world, task, data_sha256, eval_data_sha256, state,
               tokenizer, features)


def describe_data(task: Task) -> str:
    """What the run trains and evaluates on, in a line: the source, its detected form, the split."""
    info = task.info
    source = f"{info['source']} ({info['n_file']} examples, {info['form_name']})" if "form" in info else task.name
    held = (f"{len(task.test)} from {info['eval_source']} ({info['eval_form_name']})" if "eval_source" in info
            else f"{len(task.test)} held out" if task.test else "none held out: no evaluation")
    scored = {"math": "accuracy of the final number, answer loss", "text": "BLEU, ROUGE-L, answer loss"}[task.kind]
    validation = f", {len(task.validation)} for validation" if task.validation else ""
    return (f"data: {source}: {len(task.train)} for training{validation}, {held}"
            + (f"; scored by {scored}" if task.test else ""))


def _encode(config: FinetuneConfig, task: Task) -> tuple[Any, list[dict[str, list[int]]]]:
    """The model's tokenizer and the training examples' encodings; every held-out example is encoded
    too, so an example the tokenizer (its chat template) refuses is a ``FILE:LINE`` error now."""
    from jinja2 import TemplateError  # what transformers' chat templates raise

    from .data import encode
    from .models import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {config.model}: its tokenizer cannot be loaded: {_one_line(err)}") from None
    features, errors = [], []
    for i, example in enumerate(task.train + task.validation + task.test):
        try:
            encoded = encode(tokenizer, example, config.max_length)
        except (TemplateError, ValueError) as err:  # a template's raise_exception(), or turns it cannot split
            errors.append(f"{example.where or 'example ' + str(i + 1)}: the tokenizer of --model {config.model} "
                          f"refuses it: {_one_line(err)}")
            continue
        if i < len(task.train):
            features.append(encoded)
    if errors:
        errors.sort(key=_position)  # in file order (the split shuffled the examples)
        listed = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise DataError("\n".join(listed), errors)
    return tokenizer, features


def _position(error: str) -> tuple[str, int]:
    """``(FILE, N)`` of an error that starts ``FILE:N:`` or ``FILE:record N:``."""
    import re

    match = re.match(r"(.*?):(?:record )?(\d+): ", error)
    return (match[1], int(match[2])) if match else (error, 0)


def check_fits(config: FinetuneConfig) -> None:
    """The model's configuration can be read, and the low-rank options fit its matrices (``--rank``
    at most ``min(m, n)``, and what cross-head projection allows), before any weight loads: the
    optimizer is built for the model on the ``meta`` device (shapes only), so the library's own
    checks give the message."""
    from transformers import AutoModelForCausalLM

    from .models import shape_config

    try:
        shapes = shape_config(config.model)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--model {config.model}: its configuration cannot be read: "
                          f"{_one_line(err)}") from None
    if config.method not in LOW_RANK_METHODS:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the seed's stream stays untouched
        model = AutoModelForCausalLM.from_config(shapes)
        try:
            build_method(config, model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"--rank {config.rank} on --model {config.model}: {err}") from None


# ---------------------------------------------------------------------------------------------- build


def build(run: Run) -> Built:
    """Load the model, encode the training set, build the optimizer and the schedule."""
    from transformers import get_cosine_schedule_with_warmup

    from .models import load_model

    config = run.config
    dtype = torch_dtype(config.dtype, run.device)
    try:
        model, tokenizer = load_model(config.model, seed=config.seed, dtype=dtype, tokenizer=run.tokenizer)
    except (OSError, ValueError) as err:  # e.g. a model directory without its weights
        raise ConfigError(f"--model {config.model} cannot be loaded: {_one_line(err)}") from None
    if config.gradient_checkpointing:  # non-reentrant: works with layer-wise hooks and the projected backward
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    max_new_tokens = config.max_new_tokens or default_max_new_tokens(config.data)
    features = run.features
    steps_per_epoch = math.ceil(len(features) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)

    model.to(run.device)
    train_model = model
    distributed = None
    if config.distributed != "none":
        from .. import distributed
    if config.distributed == "fsdp":  # shard first: the optimizer must see the DTensor parameters
        train_model = distributed.wrap_model(model, "fsdp", run.device)
    model, optimizer = build_method(config, model)
    if distributed is not None:
        if config.distributed == "ddp":
            train_model = distributed.wrap_model(model, "ddp", run.device)
        if config.method in LOW_RANK_METHODS:
            optimizer = distributed.distribute(optimizer)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)
    if config.method in LOW_RANK_METHODS and run.rank == 0:
        from ..integration import optimizer_summary

        print(optimizer_summary(optimizer), file=sys.stderr)
    return Built(model, train_model, tokenizer, optimizer, scheduler, features, total_steps, max_new_tokens, dtype)


def build_method(config: FinetuneConfig, model: torch.nn.Module):
    """``(model, optimizer)`` for ``config.method`` (LoRA/DoRA wrap the model with PEFT)."""
    if config.method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
                                 target_modules="all-linear", use_dora=config.method == "dora")
        model = get_peft_model(model, peft_config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.method == "fira":
        return model, fira_optimizer(config, model)
    if config.method == "adamw8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    from ..integration import build_optimizer

    projected = projected_backward(config)
    # one backward per step, one process, step() mode: refreshing each projector inside backward is the
    # same refresh and keeps the targets' full gradients from piling up at a refresh step (layer-wise
    # mode does so anyway)
    refresh_in_backward = (projected and config.grad_accum == 1 and config.distributed == "none"
                           and not config.layerwise)
    layerwise = {"accumulation_steps": config.grad_accum} if config.layerwise else {}
    optimizer = build_optimizer(model, low_rank_spec(config), lr=config.lr, weight_decay=config.weight_decay,
                                layerwise=config.layerwise, seed=config.seed, projected_backward=projected,
                                refresh_in_backward=refresh_in_backward, embeddings=config.embeddings,
                                stochastic_rounding=config.stochastic_rounding, **layerwise)
    return model, optimizer


#: the matrices Fira projects: the same q/k/v/o and MLP projections GaLore(+) targets in a LLaMA
FIRA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fira_optimizer(config: FinetuneConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fira (arXiv 2410.01623) from its own package, the published subspace peer (BENCHMARKS.md §9): its
    ``divide_params`` groups at ``--rank`` and ``--update-proj-gap``, α 1 (the package's default; Fira
    subtracts the unscaled projection from the gradient for its residual, so α ≠ 1 mis-sizes it)."""
    import contextlib
    import io

    from fira import FiraAdamW, divide_params  # checked by the config
    with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per matrix
        groups = divide_params(model, target_modules_list=list(FIRA_TARGETS), rank=config.rank,
                               update_proj_gap=config.update_proj_gap, alpha=1.0, proj_type="std")
    return FiraAdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def uses_projected_backward(optimizer: torch.optim.Optimizer) -> bool:
    """Whether backward hands ``optimizer`` projected gradients (``build_optimizer(projected_backward=True)``
    installed it on at least one matrix)."""
    from ..lowrank import engine_of

    engine = engine_of(optimizer)
    return engine is not None and engine.projected_backward is not None


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
    _barrier(run)  # every rank has finished its checks before rank 0 writes
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        if not run.resume:  # only with --overwrite: set-up refused a run's directory otherwise
            for name in OUTPUTS:
                _remove(run.out / name)
        # first: from here on --resume finds the run
        checkpoint.write_run(run.out, run.config, run.data_sha256, run.eval_data_sha256)
        _truncate_log(run.out / LOG, step)
    _barrier(run)
    if step == 0 and run.config.eval_before and run.task.test:
        history["eval_before"] = _evaluate(run, built, "before training")
    return step, history


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _truncate_log(path: Path, step: int) -> None:
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


# ---------------------------------------------------------------------------------------------- train


def train(run: Run, built: Built, start_step: int, history: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Steps ``start_step + 1 .. total_steps``, a log line and (``--save-every``) a checkpoint after
    each; returns the history and the step of the last checkpoint on disk."""
    from tqdm.auto import tqdm

    config = run.config
    saved_step = start_step if run.state is not None else None
    refresh_base = refresh_seconds(built.optimizer) - history["refresh_seconds"]
    built.model.train()
    bar = tqdm(range(start_step, built.total_steps), initial=start_step, total=built.total_steps, desc="fine-tuning",
               dynamic_ncols=True, disable=run.rank != 0)
    for step in bar:
        began = time.perf_counter()
        try:
            loss, tokens = _forward_backward(run, built, step)
            if not math.isfinite(loss):
                raise _stop(run, step + 1, f"the training loss is {loss}, so the run stopped before applying the "
                                           "step", saved_step)
            built.optimizer.step()  # layer-wise: closes the step, the parameters were updated inside backward()
        except FloatingPointError as err:  # a projector refresh on a non-finite gradient
            raise _stop(run, step + 1, f"{err}; the run stopped", saved_step) from None
        built.optimizer.zero_grad(set_to_none=True)
        built.scheduler.step()
        seconds = time.perf_counter() - began
        history["train_seconds"] += seconds
        history["tokens"] += tokens
        history["refresh_seconds"] = refresh_seconds(built.optimizer) - refresh_base
        record = {"step": step + 1, "loss": loss, "lr": built.scheduler.get_last_lr()[0], "tokens": tokens,
                  "seconds": round(seconds, 4), "refresh_seconds": round(history["refresh_seconds"], 4)}
        if run.rank == 0:
            with (run.out / LOG).open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}",
                        refresh_s=f"{history['refresh_seconds']:.1f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < built.total_steps:
            saved_step = _save(run, built, step + 1, history, saved_step)
    bar.close()
    return history, saved_step


def _forward_backward(run: Run, built: Built, step: int) -> tuple[float, int]:
    """The step's gradient over its micro-batches; returns its loss (mean over the step's answer
    tokens, summed over ranks) and its token count."""
    from .data import collate

    config, features = run.config, built.features
    micro_batches = [batch_indices(step * config.grad_accum + j, config.batch_size, len(features), config.seed)
                     for j in range(config.grad_accum)]
    answer_tokens = sum(sum(1 for t in features[i]["labels"] if t != -100) for ids in micro_batches for i in ids)
    loss_sum, tokens = 0.0, 0
    for ids in micro_batches:
        ids = ids[run.rank::run.world]  # this rank's share of the global batch
        batch = {k: v.to(run.device) for k, v in
                 collate([features[i] for i in ids], built.tokenizer.pad_token_id).items()}
        logits = built.train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # token-level mean over the whole step's answer tokens, so accumulation equals a bigger batch
        # (times the world size: DDP and FSDP2 average the ranks' gradients, we want their sum)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
            reduction="sum") * run.world / answer_tokens
        loss.backward()
        loss_sum += loss.item() / run.world
        tokens += int(batch["attention_mask"].sum())
    if run.world > 1:  # every rank sees the same sum, so all stop together on a non-finite one
        from .. import distributed

        loss_sum, tokens = distributed.sum_across_ranks(loss_sum, tokens)
    return loss_sum, int(tokens)


def _stop(run: Run, step: int, what: str, saved_step: int | None) -> RunError:
    if saved_step is not None:
        kept = f"its checkpoint of step {saved_step} is kept in {run.out / checkpoint.CHECKPOINT}"
    elif run.config.save_checkpoint:
        kept = "no checkpoint had been written yet"
    else:
        kept = "it writes no checkpoint (--no-save-checkpoint)"
    return RunError(f"step {step}: {what}; {kept}. A smaller --lr (in a new run: a resumed one keeps its options) "
                    "usually helps")


def batch_indices(micro_index: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of one micro-batch: epoch ``e`` visits a permutation seeded by ``seed + e``, so
    the order is a pure function of (seed, micro-batch index) and a resumed run sees the same data."""
    out = []
    for position in range(micro_index * batch_size, (micro_index + 1) * batch_size):
        epoch, offset = divmod(position, n)
        generator = torch.Generator().manual_seed(seed + epoch)
        out.append(int(torch.randperm(n, generator=generator)[offset]))
    return out


def refresh_seconds(optimizer: torch.optim.Optimizer) -> float:
    """Seconds the low-rank engine behind ``optimizer`` spent computing projectors (0 for others)."""
    from ..lowrank import engine_of

    engine = engine_of(optimizer)
    return float(engine.refresh_seconds) if engine is not None else 0.0


# ---------------------------------------------------------------------------------------------- finish


def finish(run: Run, built: Built, history: dict[str, Any], saved_step: int | None) -> dict[str, Any]:
    """The final checkpoint, the evaluation after training, ``metrics.json``, ``loss.png``."""
    config = run.config
    if saved_step != built.total_steps:
        saved_step = _save(run, built, built.total_steps, history, saved_step)
    train_peak = peak_memory_bytes(run.device)  # the evaluation's batches (logits of 32 long answers) can exceed it
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
        "peak_memory_bytes": train_peak, "peak_memory_bytes_with_eval": peak_memory_bytes(run.device),
        "refresh_seconds": round(history["refresh_seconds"], 3),
        "eval_before": history.get("eval_before"), "eval_after": eval_after, "eval_validation": eval_validation,
        "config": dataclasses.asdict(config),
    }
    if run.rank == 0:
        log = {r["step"]: r for r in map(json.loads, (run.out / LOG).read_text().splitlines())}
        plot_losses(list(log.values()), run.out / PLOT, f"{config.method} rank {config.rank} on {run.task.name}")
        try:
            checkpoint.write_json(run.out / METRICS, metrics)
        except ValueError:  # NaN or infinity: not JSON, and not a result
            raise _stop(run, built.total_steps, f"the evaluation after training gave a non-finite result "
                                                f"({eval_after}; validation {eval_validation}), so {METRICS} is "
                                                "not written", saved_step) from None
    if config.export:  # after the evaluation: merging LoRA/DoRA adapters changes the model in place
        export(run, built)
    if run.rank == 0:
        shown = ("method", "steps", "train_seconds", "eval_before", "eval_after") + (
            ("eval_validation",) if eval_validation else ())
        print(json.dumps({k: metrics[k] for k in shown}, indent=1))
    if config.distributed != "none":
        from .. import distributed

        distributed.shutdown()
    return metrics


def _save(run: Run, built: Built, step: int, history: dict[str, Any], saved_step: int | None) -> int | None:
    """Checkpoint ``step`` (with ``--save-checkpoint``) and return the step of the checkpoint on disk.
    Parameters made non-finite by the update stop the run instead: a finite loss does not rule them
    out (an overflowing gradient makes Adam's update NaN), and no checkpoint may hold them."""
    if not run.config.save_checkpoint:
        return saved_step
    bad = sum(int((~torch.isfinite(local(p))).sum()) for p in built.model.parameters())
    if run.world > 1:  # every rank stops, or none
        from .. import distributed

        (bad,) = distributed.sum_across_ranks(bad)
    if bad:
        raise _stop(run, step, f"the update left {int(bad)} parameter entries non-finite, so the run stopped "
                               "without saving them", saved_step)
    checkpoint.save(run.out, built.model, built.optimizer, built.scheduler, step, run.config, history,
                    world_size=run.world, data_sha256=run.data_sha256, eval_data_sha256=run.eval_data_sha256)
    return step


def export(run: Run, built: Built) -> Path:
    """``OUTPUT/final/``: the trained model as a Hugging Face model directory (``save_pretrained``, the
    tokenizer beside it; LoRA/DoRA adapters merged into the weights by PEFT's ``merge_and_unload``)
    that ``AutoModelForCausalLM.from_pretrained`` and ``galore-plus evaluate`` load. Written to
    ``final.tmp`` and renamed into place, so a previous ``final/`` is replaced whole or not at all.
    Under FSDP2 every rank takes part in gathering the full weights; rank 0 writes."""
    from .models import save_model

    model, state_dict = built.model, None
    if run.config.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = run.out / FINAL
    if run.rank == 0:
        if run.config.method in ("lora", "dora"):
            model = model.merge_and_unload()
        tmp = run.out / (FINAL + ".tmp")
        _remove(tmp)
        save_model(model, built.tokenizer, tmp, state_dict)
        _remove(final)
        tmp.replace(final)
        print(f"saved the model to {final} (from_pretrained loads it)", file=sys.stderr)
    _barrier(run)
    return final


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


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (at most 300 characters)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _barrier(run: Run) -> None:
    if run.config.distributed != "none":
        from .. import distributed

        distributed.barrier()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def plot_losses(log: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
