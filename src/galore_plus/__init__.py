"""galore-plus: memory-efficient full-parameter training by gradient low-rank projection.

Layers, dependencies pointing one way: ``projection`` (pure math) and ``functional`` (inner-rule
kernels) ← ``lowrank`` (optimizer state machinery) ← ``adamw`` (the optimizers users import).
"""

from .adamw import GaLoreAdamW
from .lowrank import LOW_RANK_DEFAULTS, LowRankOptimizer

__all__ = ["GaLoreAdamW", "LowRankOptimizer", "LOW_RANK_DEFAULTS"]
__version__ = "0.1.0"
