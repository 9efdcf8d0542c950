"""galore-plus: memory-efficient full-parameter training by gradient low-rank projection.

Layers, dependencies pointing one way: ``projection``, ``residual`` (pure math) and ``functional``
(inner-rule kernels) ← ``lowrank`` (optimizer state machinery) ← ``adamw`` (the optimizers users
import) and ``groups`` (the GaLore+ parameter-group recipe).
"""

from .adamw import GaLoreAdamW, GaLorePlusAdamW
from .groups import PAPER_RESIDUAL_RATIO, galore_plus_param_groups
from .lowrank import LOW_RANK_DEFAULTS, LowRankOptimizer

__all__ = [
    "GaLoreAdamW",
    "GaLorePlusAdamW",
    "galore_plus_param_groups",
    "LowRankOptimizer",
    "LOW_RANK_DEFAULTS",
    "PAPER_RESIDUAL_RATIO",
]
__version__ = "0.1.0"
