"""DDP: a projector refresh without the full gradient across ranks (issue 26; DESIGN.md, "Distributed",
sketched refresh across ranks).

On one process the projected backward refreshes randomized and cross-head projectors from the
factors ``x`` and ``dy`` of ``G = Σ_b dy_bᵀ x_b`` (``projection.FactoredGradient``). Under DDP the
gradient the ranks must agree on is the mean over ranks ``G = (1/N) Σ_r G_r``, and every product the
range finder takes with it is linear in ``G``: ``G Ω``, ``Gᵀ Y``, ``Y G``, the cross-head block,
``Pᵀ G`` / ``G Q`` and ``G`` at the residual's index set. ``RankMeanGradient`` is a
``FactoredGradient`` of this rank's micro-batches whose every such product is computed from the
local factors and then all-reduced (summed, divided by ``N``): one collective per product, of the
product's size (``m×k``, ``n×k``, ``k×n``, a head block, ``r``-sized, ``|index|``), never ``m×n``.
``projection.randomized_svd`` and ``cross_head_projector`` run on it unchanged, so every rank computes
the same projector from the same reduced products (the orthonormalisations and the small SVD, ``k×k``
and ``k×n`` work, are repeated on each rank rather than owned: the products need every rank's
factors anyway, and each rank's share of the product work is its own tokens).

The collectives are issued in ``step()`` (``LowRankOptimizer.settle_factored``), where the held
factors are still alive, after DDP's reducer has waited on its own all-reduces at the end of
backward, so they never interleave with DDP's buckets on the same process group; every rank issues
them in the same order (the targets' order of first backward, the same graph on every rank).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .projection import FactoredGradient

__all__ = ["RankMeanGradient", "mean_over_ranks", "is_rank_mean", "prepare_refresh"]

#: the low-rank gradients already averaged over the ranks by a ``RankMeanGradient`` (by id, with a
#: weak reference to tell a reused id apart): the projected backward's step pre-hook must not
#: all-reduce them again (``projected.clip_grad_norm_`` settles them before ``step()``)
_AVERAGED: dict[int, weakref.ref] = {}


def is_rank_mean(t: Tensor | None) -> bool:
    """Whether ``t`` came out of a ``RankMeanGradient`` product (already the mean over the ranks)."""
    ref = None if t is None else _AVERAGED.get(id(t))
    return ref is not None and ref() is t


def _mark(t: Tensor) -> Tensor:
    key = id(t)
    _AVERAGED[key] = weakref.ref(t, lambda _, key=key: _AVERAGED.pop(key, None))
    return t


class RankMeanGradient(FactoredGradient):
    """The mean over the ranks of ``group`` of each rank's factored gradient (module docstring): every
    product with it is this rank's product all-reduced and divided by the number of ranks; its
    collectives' payloads are counted in ``counter`` (the optimizer's ``CommCounter``).

    ``local()``: this rank's own ``FactoredGradient`` (no communication; ``prepare_refresh`` folds it
    into ``W.grad`` where the ranks agree the factors outgrew ``G``)."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], transposed: bool = False, *, group: Any, counter: Any):
        super().__init__(pairs, transposed)
        self.group, self.counter = group, counter

    def _like(self, grad: FactoredGradient) -> RankMeanGradient:
        return RankMeanGradient(grad.pairs, grad.transposed, group=self.group, counter=self.counter)

    def local(self) -> FactoredGradient:
        return FactoredGradient(self.pairs, self.transposed)

    def _mean(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        self.counter.add("all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return _mark(t.div_(dist.get_world_size(self.group)))

    @property
    def T(self) -> RankMeanGradient:
        return RankMeanGradient(self.pairs, not self.transposed, group=self.group, counter=self.counter)

    def to(self, dtype: torch.dtype) -> RankMeanGradient:
        return self._like(self.local().to(dtype))

    def __matmul__(self, other: Tensor) -> Tensor:
        return self._mean(super().__matmul__(other))

    def __rmatmul__(self, other: Tensor) -> Tensor:
        return self._mean(super().__rmatmul__(other))

    def row_block(self, rows: list[int]) -> RankMeanGradient:
        return self._like(super().row_block(rows))

    def dense(self) -> Tensor:
        """The mean block itself: only for what is small (the cross-head block, ``⌈r/d_k⌉·d_k × n``)."""
        return self._mean(super().dense())

    def project(self, left: Tensor | None, right: Tensor | None) -> Tensor:
        return self._mean(super().project(left, right))

    def entries(self, index: Tensor) -> Tensor:
        return self._mean(super().entries(index))

    def all_finite(self) -> bool:
        """Whether every rank's factors are finite (one all-reduce of a flag: the ranks refuse together)."""
        flag = torch.tensor([1 if super().all_finite() else 0], dtype=torch.int32, device=self.device)
        with self.counter.refresh():
            self.counter.add("all_reduce", flag)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def mean_over_ranks(grad: FactoredGradient, group: Any, counter: Any) -> FactoredGradient:
    """``grad`` (this rank's micro-batch) as a ``RankMeanGradient`` over ``group``; ``grad`` itself
    with one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return grad
    return RankMeanGradient(grad.pairs, grad.transposed, group=group, counter=counter)


def prepare_refresh(engine: Any, weights: list[Tensor], group: Any) -> None:
    """Before the ranks settle a refresh step (``step()``, or ``projected.clip_grad_norm_`` before it):
    turn each due target's held factors into a ``RankMeanGradient`` over ``group``, so the refresh
    and the first projected gradient use the mean over the ranks (DESIGN.md, "Distributed", sketched
    refresh across ranks). Idempotent; a step without a due target communicates nothing.

    The factors' cap is decided per rank in backward (``ProjectedBackward.cap_factors``: a rank
    whose factors outgrow ``G`` folds them into ``W.grad``), and each rank's token count is its own,
    so first the ranks agree: one all-reduce (max) of a flag per due target that refreshes from
    factors (the same list on every rank); where any rank folded, every rank folds its factors into
    ``W.grad`` here (``G`` of this rank, formed once), and the step pre-hook all-reduces ``W.grad``
    as at an exact-SVD refresh."""
    candidates = [w for w in weights if engine.projector_due(w) and engine.refreshes_from_factors(w)]
    if not candidates:
        return
    flags = torch.tensor([0 if w.grad is None else 1 for w in candidates], dtype=torch.int32,
                         device=candidates[0].device)
    with engine.comm.refresh():
        engine.comm.add("all_reduce", flags)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    for w, folded in zip(candidates, flags.tolist()):
        held = engine.pop_factored_gradient(w)
        if held is None:
            continue
        local = held.local() if isinstance(held, RankMeanGradient) else held
        if folded:
            dense = local.dense().to(w.dtype)
            w.grad = dense if w.grad is None else w.grad.add_(dense)
        else:
            engine.add_factored_gradient(w, mean_over_ranks(local, group, engine.comm))
