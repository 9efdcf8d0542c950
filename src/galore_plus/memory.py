"""Optimizer-state memory: an estimate from the configuration, and the bytes actually held."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import projection, residual
from .adafactor import GaLoreAdafactor
from .adamw8bit import BLOCK_SIZE, MIN_8BIT_SIZE, GaLoreAdamW8bit
from .lowrank import LowRankOptimizer, compute_dtype


def _moment_bytes(optimizer: LowRankOptimizer, shape: tuple[int, ...], dtype: torch.dtype, beta1) -> int:
    """Bytes of the inner rule's state for a gradient of ``shape`` stored in ``dtype``."""
    numel = math.prod(shape)
    if isinstance(optimizer, GaLoreAdafactor):
        second = (shape[0] + shape[1]) * 4 if len(shape) >= 2 else numel * 4
        return second + (numel * 4 if beta1 is not None else 0)
    if isinstance(optimizer, GaLoreAdamW8bit) and numel >= MIN_8BIT_SIZE:
        return 2 * (numel + math.ceil(numel / BLOCK_SIZE) * 4)
    return 2 * numel * (4 if isinstance(optimizer, GaLoreAdamW8bit) else dtype.itemsize)


def estimate_state_bytes(optimizer: LowRankOptimizer) -> int:
    """Optimizer-state bytes once every parameter has stepped past the residual warm-up, computed
    from the groups' shapes and options alone (before any step).

    Low-rank parameter: projector (``m·r``, ``r·n`` or both, in ``proj_dtype`` or else the compute
    dtype) + the inner rule's state on the low-rank shape (compute dtype; 8-bit: one byte per entry
    plus a float32 absmax per 256) + the residual ``round(ρ·m·n)·(4 + 2·4)`` bytes (int64 indices
    past 2³¹ entries). Other parameters: the inner rule's state on the full shape. Python numbers
    (step counters) are free.
    """
    total = 0
    for group in optimizer.param_groups:
        beta1 = group.get("beta1")
        for p in group["params"]:
            if "rank" not in group:
                total += _moment_bytes(optimizer, tuple(p.shape), p.dtype, beta1)
                continue
            m, n = p.shape
            r = group["rank"]
            dtype = compute_dtype(p)
            side = projection.RIGHT if group["num_heads"] is not None else projection.projection_side(
                p.shape, group["proj_type"])
            low_shape = {projection.LEFT: (r, n), projection.RIGHT: (m, r), projection.FULL: (r, r)}[side]
            basis = {projection.LEFT: m * r, projection.RIGHT: r * n, projection.FULL: (m + n) * r}[side]
            total += basis * (group["proj_dtype"] or dtype).itemsize + _moment_bytes(optimizer, low_shape, dtype, beta1)
            if group["residual_ratio"] > 0:
                k = residual.residual_size(m * n, group["residual_ratio"])
                total += k * ((4 if m * n < 2**31 else 8) + 2 * dtype.itemsize)
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, as allocated."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor))
