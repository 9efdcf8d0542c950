"""The options of ``galore-plus evaluate`` (:class:`EvaluateConfig`) and their check, with
``finetune``'s defaults and the same checks (``config``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .checks import check_device, check_output_dir, check_types
from .config import DTYPES, SEED_LIMIT, SPLITS, FinetuneConfig, absolute_data, flag, option
from .errors import ConfigError


@dataclass(frozen=True)
class EvaluateConfig:
    """The options of ``galore-plus evaluate``: the evaluation ``finetune`` runs after training, for any
    model. Defaults are ``finetune``'s."""

    model: str = option(None, "a model directory (a run's final/, any Hugging Face causal LM), smollm2, tiny, or "
                              "a .gguf file", shown="required")
    data: str = option(None, "arithmetic, gsm_symbolic, or a .jsonl/.json/.parquet/.csv file (the forms of "
                             "finetune --data)", shown="required")
    n_test: int = option(FinetuneConfig.n_test, "examples evaluated (of a data file: a seeded sample when it holds "
                                                "more)")
    split: str = option(FinetuneConfig.split, "gsm_symbolic: the held-out set of finetune's --split",
                        choices=SPLITS)
    n_train: int = option(FinetuneConfig.n_train, "gsm_symbolic --split template: finetune's --n-train (the "
                                                  "held-out templates depend on it)")
    seed: int = option(FinetuneConfig.seed, "the data sample (finetune's --seed gives the same held-out set)")
    max_length: int = option(FinetuneConfig.max_length, "tokens per example")
    max_new_tokens: int | None = option(None, "tokens generated per answer", shown="16 for arithmetic, 256 otherwise")
    eval_batch_size: int = option(FinetuneConfig.eval_batch_size, "examples per batch")
    dtype: str = option(FinetuneConfig.dtype, "the weights' dtype", choices=DTYPES,
                        shown="auto: bfloat16 on a CUDA GPU that has it, else float32")
    device: str = option(FinetuneConfig.device, "auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps, ...")
    output: str | None = option(None, "also write the metrics to this JSON file", shown="unset: stdout only")


def validated_evaluate(config: EvaluateConfig) -> EvaluateConfig:
    """``galore-plus evaluate``'s options checked like ``validation.validated`` checks finetune's; the data
    path made absolute."""
    from .data import DataError, check_source
    from .models import check_spec

    check_types(config)
    c = config
    for name, least in (("n_test", 1), ("max_length", 2), ("max_new_tokens", 1), ("eval_batch_size", 1)):
        value = getattr(c, name)
        if value is not None and value < least:
            raise ConfigError(f"evaluate: {flag(name, EvaluateConfig)} must be ≥ {least}, got {value}")
    if not 0 <= c.seed < SEED_LIMIT:
        raise ConfigError(f"evaluate: --seed must be in [0, 2**32), got {c.seed}")
    check_device(c.device)
    if c.output is not None:
        check_output_dir(os.path.dirname(os.path.abspath(c.output)), "--output")
    try:
        check_source(c.data, c.split)
    except DataError as err:
        raise ConfigError(f"evaluate: --data {err}") from None
    try:
        check_spec(c.model)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"evaluate: {err}") from None
    return dataclasses.replace(c, data=absolute_data(c.data))
