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
