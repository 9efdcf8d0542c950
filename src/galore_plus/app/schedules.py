"""The learning-rate schedule of a run: ``--lr-scheduler`` with its warm-up (``--warmup-steps`` or
``--warmup-ratio``), built by transformers' ``get_scheduler`` (DESIGN.md, "Schedules").

The default, ``cosine`` with ``--warmup-steps 10``, is the schedule every run had before the option
existed (``get_cosine_schedule_with_warmup``: linear warm-up, then a half cosine to 0), the same
function with the same arguments, so old runs resume and reproduce bitwise. ``constant`` has no
warm-up (transformers' ``get_constant_schedule``); ``constant_with_warmup`` has one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .config import SCHEDULERS, FinetuneConfig

if TYPE_CHECKING:
    import torch

__all__ = ["SCHEDULERS", "warmup_steps", "build_scheduler"]


def warmup_steps(config: FinetuneConfig, total_steps: int) -> int:
    """The run's warm-up steps: ``--warmup-ratio`` of ``total_steps`` (rounded up, as transformers'
    ``TrainingArguments.get_warmup_steps``) when given, else ``--warmup-steps``. A run extended at
    resume (a larger ``--max-steps``) takes the schedule of its new length, warm-up included."""
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * total_steps)
    return config.warmup_steps


def build_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int) -> Any:
    """The ``LambdaLR`` of ``config.lr_scheduler`` over ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(config, total_steps),
                         num_training_steps=total_steps)
