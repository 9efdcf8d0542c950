"""Low-rank options: their defaults and their checks, each stated once.

The optimizers check every group with these functions at construction and in ``add_param_group``;
the command line and the Trainer glue call the same functions on their own values, so a bad value is
refused with the same message before any model is loaded. Checks raise ``ValueError`` naming the
value and what is allowed (``TypeError`` for unknown keys is the optimizer's, which knows its keys).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import projection, residual

#: Low-rank group keys and their defaults, defined once. T=200 and α=0.25 are GaLore's pre-training
#: settings (galore-torch README); fine-tuning usually wants a larger α (the GaLore+ paper uses 16–128
#: at lr 1e-6). The GaLore+ keys default to plain GaLore: exact SVD, no cross-head, no residual
#: (DESIGN.md, "Options").
LOW_RANK_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    # "exact" (galore-torch's SVD) or "randomized" subspace iteration (DESIGN.md, "Projectors").
    "svd": "exact",
    "oversample": 8,
    "power_iters": 2,
    "warm_start": False,
    # heads stacked along the rows (q_proj: attention heads, k_proj: key/value heads).
    "num_heads": None,
    # --- fused q/k/v cross-head (integration.find_targets; check_head_blocks below) ---------------
    # None, or {"count": c, "eligible": [i, ...], "dim": 0 | 1}: the matrix's rows (dim 0) or
    # columns (dim 1, GPT-2's Conv1D) cut into c equal head blocks; the cross-head projector is
    # computed from blocks drawn among ``eligible`` (the q and k blocks), then used for the whole
    # matrix. Plain ints and lists, so state dicts load with torch.load(weights_only=True).
    "head_blocks": None,
    # -----------------------------------------------------------------------------------------------
    # fraction of entries with a sparse residual (0 = off); GaLore+ uses PAPER_RESIDUAL_RATIO on q/k.
    "residual_ratio": 0.0,
    "residual_warmup": 20,
    "residual_mode": "exact",
    "residual_reselect": False,
    # storage dtype of the projector (None: the compute dtype). torch.bfloat16 halves its memory;
    # it is cast back to the compute dtype for each use (the math stays in the compute dtype).
    "proj_dtype": None,
}

#: The paper's residual ratio ρ (1.2% in all its runs), applied by the GaLore+ recipe to q/k groups.
PAPER_RESIDUAL_RATIO = 0.012

#: projector storage dtypes accepted by ``proj_dtype`` (names are accepted too: "bfloat16")
PROJ_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

SVD_METHODS = ("exact", "randomized")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """A real number that is not a bool and not NaN (infinities pass; callers bound them)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


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
    """The low-rank keys of ``group`` (``rank`` and every key of ``LOW_RANK_DEFAULTS`` present).

    Normalises ``proj_dtype`` given as a name (``"bfloat16"``) to the dtype, in place.
    """
    rank = group["rank"]
    if not is_int(rank) or rank < 1:
        raise ValueError(f"{where}: rank={rank!r} must be an int ≥ 1")
    gap = group.get("update_proj_gap", 1)
    if not is_int(gap) or gap < 1:
        raise ValueError(f"{where}: update_proj_gap={gap!r} must be an int ≥ 1")
    scale = group.get("scale", 1.0)
    if not is_real(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: scale={scale!r} must be a finite number > 0")
    if group.get("proj_type", "std") not in projection.PROJ_TYPES:
        raise ValueError(f"{where}: proj_type={group['proj_type']!r} is not one of {projection.PROJ_TYPES}")
    if group.get("svd", "exact") not in SVD_METHODS:
        raise ValueError(f"{where}: svd={group['svd']!r} is not one of {SVD_METHODS}")
    for key in ("oversample", "power_iters"):
        if key in group and (not is_int(group[key]) or group[key] < 0):
            raise ValueError(f"{where}: {key}={group[key]!r} must be an int ≥ 0")
    for key in ("warm_start", "residual_reselect"):
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"{where}: {key}={group[key]!r} must be a bool")
    heads = group.get("num_heads")
    if heads is not None and (not is_int(heads) or heads < 1):
        raise ValueError(f"{where}: num_heads={heads!r} must be None or an int ≥ 1")
    check_head_blocks(group, where)  # fused q/k/v cross-head (the head_blocks block above)
    ratio = group.get("residual_ratio", 0.0)
    if not is_real(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{where}: residual_ratio={ratio!r} must be a number in [0, 1]")
    warmup = group.get("residual_warmup", 1)
    if not is_int(warmup) or warmup < 1:
        raise ValueError(f"{where}: residual_warmup={warmup!r} must be an int ≥ 1")
    if group.get("residual_mode", "exact") not in residual.RESIDUAL_MODES:
        raise ValueError(f"{where}: residual_mode={group['residual_mode']!r} is not one of {residual.RESIDUAL_MODES}")
    proj_dtype = group.get("proj_dtype")
    if isinstance(proj_dtype, str):
        proj_dtype = group["proj_dtype"] = getattr(torch, proj_dtype, proj_dtype)
    if proj_dtype is not None and proj_dtype not in PROJ_DTYPES:
        raise ValueError(f"{where}: proj_dtype={group['proj_dtype']!r} must be None or one of "
                         f"{[str(d).removeprefix('torch.') for d in PROJ_DTYPES]}")


# --- fused q/k/v cross-head: head_blocks -----------------------------------------------------------
def check_head_blocks(group: dict[str, Any], where: str) -> None:
    """``head_blocks``: None, or ``{"count": int ≥ 1, "eligible": strictly increasing block indices in
    [0, count), at least one, "dim": 0 or 1}``; not together with ``num_heads``."""
    blocks = group.get("head_blocks")
    if blocks is None:
        return
    ok = isinstance(blocks, dict) and set(blocks) == {"count", "eligible", "dim"}
    if ok:
        count, eligible, dim = blocks["count"], blocks["eligible"], blocks["dim"]
        ok = (is_int(count) and count >= 1 and is_int(dim) and dim in (0, 1) and isinstance(eligible, (list, tuple))
              and len(eligible) >= 1 and all(map(is_int, eligible))
              and all(0 <= a < b for a, b in zip(eligible, [*eligible[1:], count])))
    if not ok:
        raise ValueError(f"{where}: head_blocks={blocks!r} must be None or {{'count': int ≥ 1, 'eligible': "
                         "strictly increasing block indices in [0, count), at least one, 'dim': 0 (row blocks) "
                         "or 1 (column blocks)}")
    if group.get("num_heads") is not None:
        raise ValueError(f"{where}: num_heads={group['num_heads']!r} and head_blocks={blocks!r} cannot both be set "
                         "(num_heads is head_blocks with every row block eligible)")


def _check_head_blocks_matrix(group: dict[str, Any], p: Tensor, name: str, where: str) -> None:
    """``p``'s head axis splits into ``count`` blocks, and its eligible blocks can reach ``rank``."""
    blocks, rank = group["head_blocks"], group["rank"]
    dim, count, eligible = blocks["dim"], blocks["count"], blocks["eligible"]
    size, axis = p.shape[dim], ("rows" if dim == 0 else "columns")
    if size % count:
        raise ValueError(f"{where}: head_blocks count={count} does not divide the {size} {axis} of {name} "
                         f"(shape {tuple(p.shape)})")
    if projection.heads_needed(rank, size // count) > len(eligible):
        raise ValueError(f"{where}: rank={rank} is more than the {len(eligible)} eligible head blocks of "
                         f"{size // count} {axis} of {name} can reach")
# ---------------------------------------------------------------------------------------------------


def check_matrix(group: dict[str, Any], p: Tensor, name: str, where: str) -> None:
    """A low-rank group's parameter: 2-D, real floating point, and ``rank`` within what it allows."""
    rank, heads = group["rank"], group.get("num_heads")
    if p.dim() != 2:
        raise ValueError(f"{where}: {name} has shape {tuple(p.shape)}; a low-rank group takes 2-D matrices "
                         "only (put biases, norms and other tensors in a group without 'rank')")
    if rank > projection.max_rank(p.shape):
        raise ValueError(f"{where}: rank={rank} is larger than {name} (shape {tuple(p.shape)}) allows "
                         f"(at most min(m, n) = {projection.max_rank(p.shape)})")
    if heads is not None:
        rows = p.shape[0]
        if rows % heads:
            raise ValueError(f"{where}: num_heads={heads} does not divide the {rows} rows of {name} "
                             f"(shape {tuple(p.shape)})")
        if projection.heads_needed(rank, rows // heads) > heads:
            raise ValueError(f"{where}: rank={rank} is more than the {heads} heads of {rows // heads} rows of "
                             f"{name} can reach")
    if group.get("head_blocks") is not None:  # fused q/k/v cross-head
        _check_head_blocks_matrix(group, p, name, where)
