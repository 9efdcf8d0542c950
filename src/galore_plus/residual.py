"""Sparsely coded residuals (GaLore+; DESIGN.md, "Residual"): pure math on a fixed flat index set ``S``.

At the end of warm-up ``S`` is the top-ρ fraction of ``|P M'|`` (the reconstructed low-rank first
moment), stored as flat int32 indices (int64 past 2³¹ elements) with two per-index values, so the
state costs ``ρ·m·n·(4 + 2·4)`` bytes in float32.

Two modes:

- ``exact`` (default): exact Adam moments at ``S`` (``M_S``, ``V_S``, bias-corrected from the step
  ``S`` was fixed), so at ``S`` the update *is* AdamW's and the correction ``δ_S`` is exactly the
  residual GaLore neglects (the intent of Appendix A, Eq. 24–26).
- ``paper``: Algorithm 2 literally (``ΔM``, ``ΔV`` and ``δ = ΔM̂ / (sqrt(P V'/(1−β2^t) + ΔV̂) + ε)``).
  ``P V'`` mixes the non-negative ``V'`` with the signed entries of ``P``, so about half its entries
  are negative and δ explodes (DESIGN.md records relative errors of 3·10⁶ to 3·10⁷ against AdamW).
  Kept for reproduction, guarded: the radicand is clamped at 0, non-finite δ become 0, and
  ``|δ| ≤ 1/sqrt(1−β2)`` (a bound Adam's own ``|M̂|/sqrt(V̂)`` respects), so parameters stay finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .functional import adam_direction

RESIDUAL_MODES = ("exact", "paper")


def residual_size(numel: int, ratio: float) -> int:
    """``|S|``: ``round(ρ·m·n)``, at least one entry."""
    return max(1, min(numel, round(ratio * numel)))


def select_indices(reconstructed_m: Tensor, ratio: float) -> Tensor:
    """Flat indices of the top-ρ fraction of ``|P M'|``, sorted, int32 where it fits."""
    flat = reconstructed_m.reshape(-1)
    index = flat.abs().topk(residual_size(flat.numel(), ratio), sorted=False).indices.sort().values
    return index.to(torch.int32) if flat.numel() < 2**31 else index


#: ``select_top_product`` forms at most this many entries of ``a @ b`` at a time, and at most an
#: eighth of its rows: never a tensor the size of the matrix (issue 26)
SELECT_CHUNK_ELEMENTS = 2**20


def select_top_product(a: Tensor, b: Tensor, ratio: float) -> Tensor:
    """``select_indices(a @ b, ratio)`` without forming ``a @ b`` (``m×n``; ``a``: ``m×r``, ``b``:
    ``r×n``, the factors of ``P M'``): row blocks of at most ``SELECT_CHUNK_ELEMENTS`` entries (and
    at most ⌈m/8⌉ rows) are formed one at a time, and the top ``k`` so far are kept (a running
    ``topk`` over the kept ``k`` and the block's own top ``k``). The same set as ``select_indices``
    wherever no two entries tie at the ``k``-th largest magnitude (and a block's products round as
    the whole product's do); memory ``O(k + block)``."""
    m, n = a.shape[0], b.shape[1]
    numel = m * n
    k = residual_size(numel, ratio)
    rows = max(1, min(SELECT_CHUNK_ELEMENTS // max(1, n), -(-m // 8)))
    values = index = None
    for start in range(0, m, rows):
        block = (a[start:start + rows] @ b).abs_().reshape(-1)
        top = block.topk(min(k, block.numel()), sorted=False)
        block_index = top.indices.add_(start * n)
        if values is None:
            values, index = top.values, block_index
        else:
            values, index = torch.cat([values, top.values]), torch.cat([index, block_index])
            if values.numel() > k:
                keep = values.topk(k, sorted=False).indices
                values, index = values[keep], index[keep]
    index = index.sort().values
    return index.to(torch.int32) if numel < 2**31 else index


def exact_residual(
    grad_s: Tensor, m_s: Tensor, v_s: Tensor, steps_since_fixed: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """AdamW's normalised update at ``S`` from exact moments there (updated in place)."""
    direction, factor = adam_direction(grad_s, m_s, v_s, steps_since_fixed, beta1, beta2, eps)
    return direction.mul_(factor)


def paper_residual(
    grad_s: Tensor,
    ghat_s: Tensor,
    back_v_s: Tensor,
    dm_s: Tensor,
    dv_s: Tensor,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
) -> Tensor:
    """Algorithm 2 at ``S`` (``ΔM``, ``ΔV`` updated in place), guarded against non-finite output.

    ``ghat_s`` is ``(P Pᵀ G)_S`` and ``back_v_s`` is ``(P V')_S``, the projected-back low-rank second
    moment (``V' Qᵀ`` for a right projection).
    """
    delta_g = grad_s - ghat_s
    dm_s.mul_(beta1).add_(delta_g, alpha=1 - beta1)
    dv_s.mul_(beta2).add_(ghat_s * delta_g, alpha=2 * (1 - beta2))
    bias2 = 1 - beta2**step
    radicand = back_v_s / bias2 + dv_s / bias2
    delta = (dm_s / (1 - beta1**step)) / (radicand.clamp_min(0).sqrt() + eps)
    bound = 1 / math.sqrt(1 - beta2)
    return torch.nan_to_num(delta, nan=0.0, posinf=bound, neginf=-bound).clamp_(-bound, bound)


class SparseResidual:
    """The residual as a component of the low-rank engine (``lowrank.LowRankOptimizer.apply``): its
    state in a parameter's state dict (``residual_index``, ``residual_m``, ``residual_v``,
    ``residual_start``), the correction it adds to the projected-back update at ``S``, and when ``S``
    is chosen (at the end of warm-up; again at each refresh with ``residual_reselect``).

    It asks the inner rule for what it needs of it — its moments and their constants
    (``rule.moments(state)``, ``rule.moment_decay(group)``) — and the layout for where the parameter
    lives (``select``: the top-ρ choice over this process's part; ``local``: a tensor's local part),
    so the engine reads neither the rule's hyper-parameters nor the residual's state.
    """

    def __init__(self, rule):
        self.rule = rule

    def correction(self, state: dict, group: dict, entries: Tensor | None, low: Tensor, direction: Tensor,
                   left: Tensor | None, right: Tensor | None, n: int, refreshed: bool, lr: float, dtype: torch.dtype,
                   select, local) -> tuple[Tensor | None, Tensor | None]:
        """``(index, values added to the update there)``, ``(None, None)`` before ``S`` is fixed.

        ``entries`` are the gradient's values at ``S``; ``low`` the projected gradient and ``direction``
        the rule's step on it; entries of the projected-back update are computed at ``S`` only
        (``projection.project_back_at``). The residual moments are kept in ``dtype`` (the compute
        dtype) whatever the rule stores (they are ρ-sized); the low-rank moments are cast to it."""
        from .projection import project_back_at

        step = state["step"]
        beta1, beta2, eps = self.rule.moment_decay(group)
        at = None
        if "residual_index" in state:
            index = state["residual_index"].long()

            def back_at(t: Tensor) -> Tensor:
                return project_back_at(local(t), local(left), local(right), index, n)

            if group["residual_mode"] == "exact":  # the update there becomes AdamW's exactly
                since = step - state["residual_start"]
                exact = exact_residual(entries, state["residual_m"], state["residual_v"], since,
                                       beta1, beta2, eps).mul_(lr)
                at = (index, exact - back_at(direction))
            else:
                back_v_s = back_at(self.rule.moments(state)[1].to(dtype))
                if state.get("moment_start"):  # V' restarted at a reset (moment_transport): its own correction
                    back_v_s.mul_((1 - beta2**step) / (1 - beta2**(step - state["moment_start"])))
                delta = paper_residual(entries, back_at(low), back_v_s, state["residual_m"], state["residual_v"],
                                       step, beta1, beta2, eps)
                at = (index, delta.mul_(lr))
        fix_now = ("residual_index" not in state and step >= group["residual_warmup"]) or (
            "residual_index" in state and refreshed and group["residual_reselect"])
        if fix_now:
            index = select(self.rule.moments(state)[0].to(dtype), left, right, group["residual_ratio"])
            state["residual_index"] = index
            state["residual_m"] = torch.zeros(index.numel(), dtype=dtype, device=index.device)
            state["residual_v"] = torch.zeros_like(state["residual_m"])
            state["residual_start"] = step
        return at if at is not None else (None, None)
