"""The gradient outside the subspace (DESIGN.md, "Outside the subspace"): Fira's term, pure math.

GaLore drops ``G − P PᵀG``, the part of the gradient its projector does not see. Fira (Chen et al.,
arXiv 2410.01623, Section 3) adds it back, scaled like the low-rank Adam step (*norm-based scaling*)
and smoothed (*norm-growth limiter*). With ``R`` the projected gradient and ``ψ(R)`` the inner rule's
normalised low-rank step (its update before the learning rate: AdamW's ``M̂ / (sqrt(V̂) + ε)``):

- ``φ_j = ‖ψ(R)_{:,j}‖ / ‖R_{:,j}‖`` per column ``j`` for a left projection (``R = PᵀG``, ``r×n``), per
  row for a right one (``R = G Q``, ``m×r``): one factor per index of the side that is not projected;
  ``φ_j = 0`` where that column of ``R`` is 0 (nothing says how to scale it; Fira's package divides by
  ``‖R_{:,j}‖ + 1e-8`` and would multiply by 10⁸);
- ``S_t = φ ⊙ (G − P PᵀG)`` (``G − G Q Qᵀ`` on the right);
- the limiter: if ``‖S_t‖ > γ ‖S_{t−1}‖`` then ``S_t ← S_t · γ‖S_{t−1}‖ / ‖S_t‖`` (γ = 1.01), and the
  norm kept for the next step is the limited one. ``‖S_{t−1}‖`` is the norm of the last *applied*
  term; none yet, or 0, limits nothing;
- the update: ``W ← W − α·lr·(P ψ(R) + S_t)``: the term gets the learning rate and α like the
  low-rank step (the residual is scaled by α too: DESIGN.md, "Residual").

A two-sided (``proj_type="full"``) projection has no column or row to scale by and is refused by the
spec's check. The engine hands its component the rule's step ``D = lr·ψ(R)`` (the step it applies,
unchanged) and ``ψ = D / lr`` is recovered from it, so every inner rule (AdamW, 8-bit AdamW,
Adafactor) gets the term without a change.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

#: ``LowRankSpec.outside``: off (GaLore: the gradient outside the subspace is dropped), or fira
OUTSIDE_MODES = ("off", "fira")
#: Fira's γ (the paper's and its package's value)
FIRA_LIMITER = 1.01


def norm_ratio(psi: Tensor, low: Tensor, dim: int) -> Tensor:
    """``φ = ‖ψ‖ / ‖R‖`` along ``dim`` (0: per column, 1: per row); 0 where ``R``'s norm is 0. (Summed
    squares: ``norm(dim=0)`` of a row-major matrix takes a slow strided path on CPU, ~10× here.)"""
    psi_norm, low_norm = psi.square().sum(dim).sqrt(), low.square().sum(dim).sqrt()
    return torch.where(low_norm > 0, psi_norm / low_norm, torch.zeros_like(low_norm))


def outside_part(grad: Tensor, low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``O = G − P R`` (left) or ``G − R Qᵀ`` (right): ``G − P PᵀG`` from ``R`` (one ``addmm``, in the
    compute dtype of ``R``; ``left``/``right`` as ``projection.py`` stores them, one of them)."""
    grad = grad.to(low.dtype)  # a bf16 G is promoted; a float32 one is not copied (addmm writes anew)
    return torch.addmm(grad, left, low, alpha=-1) if right is None else torch.addmm(grad, low, right, alpha=-1)


def growth_limit(norm: Tensor, previous: Tensor | None, gamma: float) -> Tensor:
    """The factor (≤ 1) that keeps ``norm`` within ``γ·previous``: ``γ·previous / norm`` when
    ``norm > γ·previous > 0``, else 1. A 0-d tensor, so no device sync."""
    one = torch.ones_like(norm)
    if previous is None:
        return one
    previous = previous.to(norm)
    bound = previous * gamma
    return torch.where((previous > 0) & (norm > bound), bound / norm, one)


class FiraTerm:
    """Fira's term as a component of the low-rank engine (``lowrank.LowRankOptimizer.apply``): its
    state in a parameter's state dict (``outside_norm``: ``‖S‖`` of the last applied term, limited, a
    0-d tensor in the compute dtype) and the term the engine adds to the update.

    It needs ``G``, so it runs only where ``G`` was formed: ``step()`` with ``p.grad``, the layer-wise
    hooks' full gradients, and the projected backward's refresh steps (between refreshes ``G`` is never
    formed and the term is absent; DESIGN.md, "Outside the subspace"). The layout gives this process's
    part of a tensor (``local``) and sums a number over the parts of a matrix (``sum_parts``: over the
    FSDP2 row shards; the number itself in one process)."""

    def term(self, state: dict, group: dict, grad: Tensor, low: Tensor, direction: Tensor, left: Tensor | None,
             right: Tensor | None, lr: float, index: Tensor | None, local: Callable[[Tensor], Tensor],
             sum_parts: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor] | None:
        """``(S, c)`` with ``c = lr·limit`` (0-d) and ``S`` before the limiter (this process's part), so
        ``lr·S_t = S ⊙ c``; or None when ``lr`` is 0 (nothing moves, and ``ψ`` cannot be recovered from
        ``D = 0``; the limiter's state is left as it was). The engine adds ``α·c·S`` to the update in one
        ``addcmul_``; ``S`` is built in the memory of ``G − P PᵀG`` (one ``m×n`` temporary).

        ``index``: the sparse residual's entries (flat, this process's part), where the update already
        is exact Adam's (or the paper's correction of it): ``S`` is 0 there rather than counted twice."""
        if lr == 0:
            return None
        low, dim = local(low), 0 if right is None else 1  # left: φ per column, the norms down dim 0
        phi = norm_ratio(local(direction) / lr, low, dim)
        s = outside_part(local(grad), low, local(left), local(right)).mul_(phi.unsqueeze(dim))
        if index is not None:
            s.view(-1).index_fill_(0, index.long(), 0)
        total = sum_parts(s.norm().square()).sqrt()
        factor = growth_limit(total, state.get("outside_norm"), group["outside_limiter"])
        state["outside_norm"] = (total * factor).to(s.dtype)
        return s, factor * lr
