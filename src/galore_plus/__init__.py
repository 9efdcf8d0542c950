"""galore-plus: memory-efficient full-parameter training by gradient low-rank projection.

Layers, dependencies pointing one way: ``projection``, ``residual`` (pure math) and ``functional``
(inner-rule kernels) ← ``registry`` (rules and refresh policies by name) ← ``spec`` (the typed
options) ← ``lowrank`` (optimizer state machinery) ← the optimizers users import
(``adamw``, ``adamw8bit``, ``adafactor``), ``groups`` (the GaLore+ parameter-group recipe),
``layerwise`` (updates inside backward), ``memory`` (state-size estimates) and ``distributed``
(DDP / FSDP2; import ``galore_plus.distributed`` when you need it) ← ``integration``
(targets and head counts of any model, Hugging Face layouts by name; one-call optimizer) ← ``trainer`` (Trainer glue)
and the ``app`` subpackage (the ``galore-plus finetune`` command: options, data, evaluation, model
loading; it imports transformers).
"""

from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW, GaLorePlusAdamW
from .adamw8bit import GaLoreAdamW8bit
from .groups import galore_plus_param_groups
from .integration import Target, build_optimizer, find_targets, optimizer_summary
from .layerwise import LayerwiseOptimizer
from .layerwise import engine_of
from .lowrank import (InnerRule, LowRankGradient, LowRankOptimizer, RefreshPolicy, register_refresh_policy,
                      register_rule)
from .memory import estimate_state_bytes, state_bytes
from .refresh import CaptureRefresh, refresh_gap  # registers refresh='capture'
from .options import LOW_RANK_DEFAULTS, PAPER_RESIDUAL_RATIO
from .spec import LowRankSpec, spec_for

__all__ = [
    "GaLoreAdamW",
    "GaLorePlusAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdafactor",
    "LayerwiseOptimizer",
    "estimate_state_bytes",
    "state_bytes",
    "galore_plus_param_groups",
    "build_optimizer",
    "find_targets",
    "optimizer_summary",
    "Target",
    "LowRankOptimizer",
    "LowRankGradient",
    "InnerRule",
    "engine_of",
    "LowRankSpec",
    "spec_for",
    "RefreshPolicy",
    "register_rule",
    "register_refresh_policy",
    "CaptureRefresh",
    "refresh_gap",
    "LOW_RANK_DEFAULTS",
    "PAPER_RESIDUAL_RATIO",
]
__version__ = "0.1.0"
