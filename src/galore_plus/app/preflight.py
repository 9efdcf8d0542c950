"""A fine-tune's set-up: every check that needs no weights, in the order a user would fix them,
giving the :class:`Run` the other phases share (:func:`setup`).

What the user can get wrong is found before the model loads: the options
(:func:`~galore_plus.app.validation.validated`), a run already in the output directory (refused without
``--overwrite``), the checkpoint to resume (verified against its manifest; the same world size and
data file), the data, the evaluation's dependencies, whether the low-rank options fit the
model's matrices (the optimizer built for the model on the ``meta`` device), and the encoding of every
example with the model's tokenizer (a chat template's refusal is a ``FILE:LINE`` error).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, sources
from .checks import check_launch
from .config import LOW_RANK_METHODS, FinetuneConfig
from .resume import changes, resumed
from .errors import ConfigError
from .examples import Task
from .interrupts import Interrupts
from .methods import build_method, check_target_modules
from .outputs import run_files
from .runtime import Runtime
from .tasks import TASKS, load_task
from .validation import validated

__all__ = ["Run", "setup", "describe_data", "check_fits", "one_line"]


@dataclass
class Run:
    """What set-up established: the checked config, where the run writes, this process's place in
    it, the task and its data files' sha256, when resuming the verified checkpoint state (None before
    the first save), and the model's tokenizer with the training examples it encoded."""

    config: FinetuneConfig
    out: Path
    resume: bool
    runtime: Runtime
    task: Task
    data_sha256: str | None
    eval_data_sha256: str | None
    state: dict[str, Any] | None
    tokenizer: Any
    features: list[dict[str, list[int]]]
    #: the output directory's lock while the run writes it (``outputs.lock_output_dir``; the main rank)
    lock: Any = None
    #: the signal handlers of the run (``finetune`` installs them; DESIGN.md, "Interrupts and checkpoints")
    interrupts: Interrupts = field(default_factory=Interrupts)
    #: whether ``run.json`` is written (the run can be resumed), the steps done, the step of the checkpoint on disk
    started: bool = False
    step: int = 0
    saved_step: int | None = None


def setup(config: FinetuneConfig, resume: str | Path | None) -> Run:
    """Every check that needs no weights, in the order a user would fix them. Writes nothing (beyond
    finishing a checkpoint save that a crash cut short: see ``checkpoint.recover``)."""
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
        existing = run_files(out)
        if existing and not config.overwrite:
            raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(existing)}): continue it with "
                              f"--resume {out}, replace it with --overwrite, or choose another --output-dir")
    torch.manual_seed(config.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    check_launch(config.distributed)  # under torchrun: rank 0 alone writes logs, metrics and the plot
    runtime = Runtime.start(config.distributed, device)
    if config.batch_size % runtime.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
                          f"{runtime.world_size} ranks")
    data_sha256 = None if config.data in TASKS else sources.sha256(config.data)  # all the files, one digest
    eval_data_sha256 = None if config.eval_data is None else sources.sha256(config.eval_data)
    if resume is not None:
        checkpoint.check_resumable(state, record, out, config.data, data_sha256, runtime.world_size,
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
    if config.packing:
        from .packing import pack

        count, features = len(features), pack(features, config.max_length, config.seed)
    if runtime.is_main:
        print(describe_data(task), file=sys.stderr)
        if config.packing:
            print(f"packing: {count} training examples in {len(features)} sequences of up to {config.max_length} "
                  "tokens", file=sys.stderr)
    return Run(config, out, resume is not None, runtime, task, data_sha256, eval_data_sha256, state, tokenizer,
               features)


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

    from .encoding import encode
    from .examples import record_errors
    from .models import load_tokenizer
    from .templates import use_chat_template

    try:
        tokenizer = load_tokenizer(config.model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {config.model}: its tokenizer cannot be loaded: {one_line(err)}") from None
    if config.chat_template is not None:  # --chat-template: rendered once now, a one-line error if it fails
        use_chat_template(tokenizer, config.chat_template)
    refuser = (f"the chat template {config.chat_template}" if config.chat_template is not None
               else f"the tokenizer of --model {config.model}")
    features, errors, totals = [], [], {}
    for i, example in enumerate(task.train + task.validation + task.test):
        where = example.where or f"example {i + 1}"
        source = where.rpartition(":")[0]
        totals[source] = totals.get(source, 0) + 1
        try:
            encoded = encode(tokenizer, example, config.max_length)
        except (TemplateError, ValueError) as err:  # a template's raise_exception(), or turns it cannot split
            errors.append((where, f"{refuser} refuses it: {one_line(err)}"))
            continue
        if i < len(task.train):
            features.append(encoded)
    if errors:
        errors.sort(key=lambda error: _position(error[0]))  # in file order (the split shuffled the examples)
        raise record_errors(errors, totals)  # one line per problem, with its count
    return tokenizer, features


def _position(where: str) -> tuple[str, int]:
    """``(FILE, N)`` of ``FILE:N`` or ``FILE:record N`` (``example N``: ``("", N)``)."""
    import re

    match = re.fullmatch(r"(.*?):(?:record )?(\d+)|example (\d+)", where)
    if not match:
        return (where, 0)
    return (match[1], int(match[2])) if match[3] is None else ("", int(match[3]))


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
                          f"{one_line(err)}") from None
    check_target_modules(config, shapes)
    if config.method not in LOW_RANK_METHODS:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the seed's stream stays untouched
        model = AutoModelForCausalLM.from_config(shapes)
        try:
            build_method(config, model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"--rank {config.rank} on --model {config.model}: {err}") from None


def one_line(err: BaseException) -> str:
    """An exception's message on one line (at most 300 characters)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:299] + "…"

