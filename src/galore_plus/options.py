"""Low-rank options: their defaults and their checks, each stated once.

The optimizers check every group with these functions at construction and in ``add_param_group``;
the command line and the Trainer glue call the same functions on their own values, so a bad value is
refused with the same message before any model is loaded. Checks raise ``ValueError`` naming the
value and what is allowed (``TypeError`` for unknown keys is the optimizer's, which knows its keys).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import projection
from .spec import GROUP_DEFAULTS, PAPER_RESIDUAL_RATIO, PROJ_DTYPES, SVD_METHODS, check_group_values, is_int, is_real

__all__ = ["LOW_RANK_DEFAULTS", "PAPER_RESIDUAL_RATIO", "PROJ_DTYPES", "SVD_METHODS", "is_int", "is_real", "as_float",
           "check_common", "check_low_rank", "check_matrix"]

#: Low-rank group keys and their defaults, defined once: the group fields of ``spec.LowRankSpec``
#: (T=200 and α=0.25 are GaLore's pre-training settings; DESIGN.md, "Options").
LOW_RANK_DEFAULTS: dict[str, Any] = GROUP_DEFAULTS


def as_float(x: Any) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def check_common(group: dict[str, Any], where: str, lr_may_be_none: bool = False) -> None:
    """``lr`` (a finite number ≥ 0, or a one-element tensor; None where the rule computes its own),
    ``weight_decay`` (finite, ≥ 0), ``seed`` (an int) and ``stochastic_rounding`` (a bool)."""
    lr = group["lr"]
    if not (lr is None and lr_may_be_none):
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}: lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
            lr = lr.item()
        if not is_real(lr) or not 0.0 <= lr < math.inf:
            raise ValueError(f"{where}: invalid learning rate lr={group['lr']!r}; it must be a finite number ≥ 0")
    wd = group["weight_decay"]
    if not is_real(wd) or not 0.0 <= wd < math.inf:
        raise ValueError(f"{where}: invalid weight_decay={wd!r}; it must be a finite number ≥ 0")
    if not is_int(group["seed"]):
        raise ValueError(f"{where}: seed={group['seed']!r} must be an int")
    if not isinstance(group.get("stochastic_rounding", True), bool):
        raise ValueError(f"{where}: stochastic_rounding={group['stochastic_rounding']!r} must be a bool")


def check_low_rank(group: dict[str, Any], where: str) -> None:
    """The low-rank keys of ``group`` (``rank`` and every key of ``LOW_RANK_DEFAULTS`` present), checked
    by the spec's one check (``spec.check_group_values``).

    Normalises ``proj_dtype`` given as a name (``"bfloat16"``) to the dtype, in place.
    """
    check_group_values(group, where)
    if isinstance(group.get("proj_dtype"), str):
        group["proj_dtype"] = getattr(torch, group["proj_dtype"])


def _shown(given: Any, resolved: int) -> str:
    """A rank in a message: an int as it is, ``'full'`` or a fraction with what it gives this matrix."""
    return str(given) if is_int(given) else f"{given!r} (here {resolved})"


def _check_head_blocks_matrix(group: dict[str, Any], p: Tensor, name: str, where: str) -> None:
    """``p``'s head axis splits into ``count`` blocks, and its eligible blocks can reach ``rank``."""
    blocks, rank = group["head_blocks"], projection.resolve_rank(group["rank"], p.shape)
    dim, count, eligible = blocks["dim"], blocks["count"], blocks["eligible"]
    size, axis = p.shape[dim], ("rows" if dim == 0 else "columns")
    if size % count:
        raise ValueError(f"{where}: head_blocks count={count} does not divide the {size} {axis} of {name} "
                         f"(shape {tuple(p.shape)})")
    if projection.heads_needed(rank, size // count) > len(eligible):
        raise ValueError(f"{where}: rank={_shown(group['rank'], rank)} is more than the {len(eligible)} eligible "
                         f"head blocks of {size // count} {axis} of {name} can reach")
# ---------------------------------------------------------------------------------------------------


def check_matrix(group: dict[str, Any], p: Tensor, name: str, where: str) -> None:
    """A low-rank group's parameter: 2-D, real floating point, and ``rank`` within what it allows."""
    heads = group.get("num_heads")
    if p.dim() != 2:
        raise ValueError(f"{where}: {name} has shape {tuple(p.shape)}; a low-rank group takes 2-D matrices "
                         "only (put biases, norms and other tensors in a group without 'rank')")
    rank = projection.resolve_rank(group["rank"], p.shape)  # "full" or a fraction: this matrix's own
    if rank > projection.max_rank(p.shape):
        raise ValueError(f"{where}: rank={rank} is larger than {name} (shape {tuple(p.shape)}) allows "
                         f"(at most min(m, n) = {projection.max_rank(p.shape)})")
    if heads is not None:
        rows = p.shape[0]
        if rows % heads:
            raise ValueError(f"{where}: num_heads={heads} does not divide the {rows} rows of {name} "
                             f"(shape {tuple(p.shape)})")
        if projection.heads_needed(rank, rows // heads) > heads:
            raise ValueError(f"{where}: rank={_shown(group['rank'], rank)} is more than the {heads} heads of "
                             f"{rows // heads} rows of {name} can reach")
    if group.get("head_blocks") is not None:  # fused q/k/v cross-head
        _check_head_blocks_matrix(group, p, name, where)
