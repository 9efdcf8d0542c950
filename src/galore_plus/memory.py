"""Optimizer-state memory: an estimate from the configuration, and the bytes actually held."""

from __future__ import annotations

import torch
from torch import Tensor

from . import projection, residual
from .lowrank import LowRankOptimizer, compute_dtype


def estimate_state_bytes(optimizer: LowRankOptimizer) -> int:
    """Optimizer-state bytes once every parameter has stepped past the residual warm-up, computed
    from the groups' shapes and options alone (before any step).

    Low-rank parameter: projector (``m·r``, ``r·n`` or both, in ``proj_dtype`` or else the compute
    dtype) + the inner rule's state on the low-rank shape (compute dtype; 8-bit: one byte per entry
    plus a float32 absmax per 256) + the residual ``round(ρ·m·n)·(4 + 2·4)`` bytes (int64 indices
    past 2³¹ entries) + Fira's limiter norm (one number, with ``outside="fira"``). Other parameters:
    the inner rule's state on the full shape. Python numbers (step counters) are free.
    """
    total = 0
    rule = optimizer.rule
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "rank" not in group:  # the rule's state in its own dtype (AdamW: at least float32)
                total += rule.state_bytes(tuple(p.shape), rule.state_dtype("exp_avg", p.dtype), group)
                continue
            m, n = p.shape
            r = projection.resolve_rank(group["rank"], p.shape)
            dtype = compute_dtype(p)
            side = optimizer.projection_side(p)
            low_shape = {projection.LEFT: (r, n), projection.RIGHT: (m, r), projection.FULL: (r, r)}[side]
            basis = {projection.LEFT: m * r, projection.RIGHT: r * n, projection.FULL: (m + n) * r}[side]
            total += basis * (group["proj_dtype"] or dtype).itemsize + rule.state_bytes(low_shape, dtype, group)
            if group["residual_ratio"] > 0:
                k = residual.residual_size(m * n, group["residual_ratio"])
                total += k * ((4 if m * n < 2**31 else 8) + 2 * dtype.itemsize)
            if group["outside"] != "off":  # Fira's limiter: one 0-d tensor (outside.py)
                total += dtype.itemsize
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, as allocated."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor))
