"""Adam moments across a projector refresh (DESIGN.md, "Moment transport"): pure math, tensors in and out.

When a low-rank parameter's projector changes, its moments are still coordinates in the old basis.
The group key ``moment_transport`` says what happens to them (one of :data:`MOMENT_TRANSPORTS`):
``keep`` (GaLore's behaviour, the default: the old coordinates are read in the new basis), ``reset``
(dropped; the bias correction restarts) or ``project`` (carried into the new basis, below).

The change of basis, ``r×r`` (``S = Qᵀ`` is a right basis as stored, ``r×n``)::

    left   R_l = P_newᵀ P_old            right   R_r = Q_oldᵀ Q_new = S_old S_newᵀ

First moment: ``M ← R_l M`` (left), ``M R_r`` (right), ``R_l M R_r`` (full): the old moment's
reconstruction ``P_old M`` projected onto the new basis (``P_newᵀ P_old M``), as LDAdam does.

Second moment, LDAdam's projection-aware rule (Robert et al., arXiv 2410.16103, Algorithm 1 and its
reference code): the old coordinates are taken as independent with mean ``M̂`` and variance ``V̂ − M̂²``
(bias-corrected, ``M̂ = M/(1−β1^t)``, ``V̂ = V/(1−β2^t)``, ``t`` the moments' updates), so a new
coordinate ``Σ_j R_ij g_j`` has second moment ``Σ_j R_ij² (V̂_j − M̂_j²) + (R M̂)_i²``::

    V̂ ← | (R∘R)(V̂ − M̂²) + (R M̂)² |      (two-sided: (R_l∘R_l) X (R_r∘R_r))

Stored uncorrected, ``V ← | (R∘R) V + c·((R M)² − (R∘R) M²) |`` with ``c = (1−β2^t)/(1−β1^t)²``
(:func:`bias_ratio`); the same map, written so that ``R = I`` gives ``V`` back. Why this rule: it is
the only published one we found (GaLore 2, arXiv 2504.20437, keeps the update rule unchanged); it is
exact for a signed permutation, equals ``V`` at ``R = I`` and keeps the first two moments of the
projected gradient consistent with ``M`` (a bare ``(R∘R) V`` drops the cross terms ``(R M)²`` carries).
``|·|`` is LDAdam's too: ``V̂ − M̂²`` is not a variance of one distribution (two EMAs with different
decays) and may be negative; the absolute value keeps ``V ≥ 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

#: ``moment_transport`` values: what a refresh does to the low-rank Adam moments
MOMENT_TRANSPORTS = ("keep", "reset", "project")


def bias_ratio(beta1: float, beta2: float, t: int) -> float:
    """``c = (1−β2^t) / (1−β1^t)²``: ``M̂² = M²/(1−β1^t)²`` in the units of ``V = V̂·(1−β2^t)``."""
    return (1 - beta2**t) / (1 - beta1**t) ** 2


@dataclass
class Rotation:
    """The change of basis of one refresh: ``left`` (``R_l``, applied ``R_l X``) and/or ``right``
    (``R_r``, applied ``X R_r``), plain ``r×r`` tensors, the same on every process. The methods take
    this process's part of a moment (an FSDP2 right projection's moment is row-sharded, ``X R_r`` is
    row-local; a left or full one is replicated) and return new tensors in its dtype."""

    left: Tensor | None
    right: Tensor | None

    def _apply(self, x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
        if left is not None:
            x = left.to(x.dtype) @ x
        if right is not None:
            x = x @ right.to(x.dtype)
        return x

    def first(self, m: Tensor) -> Tensor:
        """``R_l M R_r`` (the sides present)."""
        return self._apply(m, self.left, self.right)

    def second(self, v: Tensor, m: Tensor, m_new: Tensor, c: float) -> Tensor:
        """``| (R∘R) V + c·(M_new² − (R∘R) M²) |`` with ``M_new = first(M)`` and ``c = bias_ratio(...)``."""
        left = None if self.left is None else self.left.square()
        right = None if self.right is None else self.right.square()
        out = self._apply(v, left, right)  # a new tensor: a rotation has at least one side
        out.add_(m_new.square() - self._apply(m.square(), left, right), alpha=c)
        return out.abs_()
