"""The one check of ``galore-plus finetune``'s options: :func:`validated` (DESIGN.md, "The command
(`app/`)").

A :class:`~.config.FinetuneConfig` says what the options are; this module says whether a config's
values make a run: each value's own check (the low-rank ones by building the run's ``LowRankSpec``,
so a bad value gets the library's message), ``--preset``'s values applied (``presets.with_preset``),
the learning rate resolved (``config.learning_rate``), the checks between options
(``option_checks``), the reporting libraries (``reporting.check``), the data sources, the model's
name and the chat template. It imports the modules it calls; none of them imports it, so the
options (``config``) sit below every check.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import fields

from ..options import check_common, is_real
from .checks import check_device, check_output_dir, check_types
from .config import METHODS, RESOLVED, SEED_LIMIT, FinetuneConfig, absolute_data, flag, low_rank_spec
from .errors import ConfigError
from .examples import DataError
from .models import check_spec
from .option_checks import check_method, check_schedule_and_targets
from .presets import with_preset
from .reporting import check as check_reporting
from .tasks import TASKS, check_source
from .templates import read_chat_template

__all__ = ["validated"]


def validated(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` checked, with a data file's path made absolute (a resumed run must read the same
    file whatever its working directory), ``--preset``'s options applied (``presets.with_preset``) and the
    learning rate resolved (``config.learning_rate``), so the run records what it computes with. Raises
    :class:`ConfigError` naming the value and what is allowed. Cheap: nothing is loaded (the model's shapes are checked by the run, before it loads
    the weights)."""
    if isinstance(config.data, (list, tuple)):  # --data FILE is a list of one: that file
        config = dataclasses.replace(config, data=config.data[0] if len(config.data) == 1 else list(config.data))
    check_types(config)
    c = config
    if c.method not in METHODS:  # before its default rate is looked up
        raise ConfigError(f"{flag('method')} must be one of {', '.join(METHODS)}; got {c.method!r}")
    c = with_preset(c)  # --preset's values (DESIGN.md, "Presets")
    # recorded with the run (DESIGN.md, "Learning rate per method", "The command's GaLore+ recipe")
    c = dataclasses.replace(c, **{name: resolve(c) for name, resolve in RESOLVED.items()})
    try:  # the values the library owns, with its messages: the spec checks its own
        low_rank_spec(c)
        check_common({"lr": c.lr, "weight_decay": c.weight_decay, "seed": c.seed}, "finetune")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if c.lr == 0:
        raise ConfigError(f"--lr {c.lr} would train nothing; give a learning rate > 0")
    if c.lr * c.weight_decay >= 1:  # decoupled decay scales the weights by 1 − lr·λ each step (issue 25)
        raise ConfigError(f"--lr {c.lr:g} × --weight-decay {c.weight_decay:g} = {c.lr * c.weight_decay:g} ≥ 1: each step "
                          "would scale the weights by 1 − lr·λ ≤ 0 (zeroing or flipping them); lower either")
    if not 0 <= c.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be in [0, 2**32), got {c.seed}")
    if not (is_real(c.eval_fraction) and 0 <= c.eval_fraction <= 1):
        raise ConfigError(f"--eval-fraction must be a number in [0, 1], got {c.eval_fraction}")
    for name, least in (("batch_size", 1), ("grad_accum", 1), ("n_train", 1), ("n_test", 1), ("n_validation", 0),
                        ("eval_batch_size", 1), ("max_length", 2), ("warmup_steps", 0), ("save_every", 0), ("max_steps", 1),
                        ("max_new_tokens", 1), ("save_total_limit", 0)):
        value = getattr(c, name)
        if value is not None and value < least:
            raise ConfigError(f"{flag(name)} must be ≥ {least}, got {value}")
    if (c.max_steps is None) == (c.epochs is None):
        raise ConfigError(f"give the run's length as --max-steps or --epochs, not {'both' if c.epochs else 'neither'} "
                          f"(max_steps={c.max_steps}, epochs={c.epochs}; from Python, max_steps=None to train by "
                          "epochs)")
    if c.epochs is not None and not 0 < c.epochs < math.inf:
        raise ConfigError(f"--epochs must be a finite number > 0, got {c.epochs}")
    for f in fields(c):
        choices = f.metadata["choices"]
        if choices and getattr(c, f.name) not in choices:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}; got {getattr(c, f.name)!r}")
    check_method(c)
    check_reporting(c)
    check_schedule_and_targets(c)
    if not c.save_checkpoint and c.save_every:
        raise ConfigError(f"--save-every {c.save_every} with --no-save-checkpoint: checkpoints are either written "
                          "or not; drop one of them")
    check_device(c.device)
    check_output_dir(c.output_dir)
    if c.split == "template" and c.data != "gsm_symbolic":
        raise ConfigError(f"--split template needs --data gsm_symbolic (the only source with templates), not "
                          f"{c.data!r}")
    try:
        check_source(c.data, c.split)
    except DataError as err:
        raise ConfigError(f"--data {err}") from None
    if c.eval_data is not None:
        try:
            check_source(c.eval_data)
        except DataError as err:
            raise ConfigError(f"--eval-data {err}") from None
        if c.eval_data in TASKS:
            raise ConfigError(f"--eval-data {c.eval_data}: give a data file (the held-out set of --data "
                              f"{c.eval_data} is its own)")
    try:
        check_spec(c.model)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if c.chat_template is not None:
        read_chat_template(c.chat_template)
    return dataclasses.replace(c, data=absolute_data(c.data),
                               eval_data=None if c.eval_data is None else absolute_data(c.eval_data),
                               chat_template=None if c.chat_template is None else os.path.abspath(c.chat_template))
