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

from .projection import FactoredGradient, RankFactoredGradient, project

__all__ = ["RankMeanGradient", "is_rank_mean"]

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


class RankMeanGradient(RankFactoredGradient):
    """The mean over the ranks of ``group`` of each rank's gradient ``G_r`` (module docstring), ``G_r``
    held as this rank's factors and, past the factors' cap, a ``dense_part`` (``fold_beyond``): every
    product with it is this rank's product with ``G_r`` all-reduced and divided by the number of ranks;
    its collectives' payloads are counted in ``counter`` (the optimizer's ``CommCounter``). Whatever
    each rank holds, the collectives are the same on every rank, and none carries ``m×n``."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], transposed: bool = False, *, group: Any, counter: Any,
                 dense_part: Tensor | None = None):
        self.pairs, self.transposed, self.dense_part = list(pairs), transposed, dense_part
        self.group, self.counter = group, counter

    def _like(self, pairs: list[tuple[Tensor, Tensor]], transposed: bool, dense_part: Tensor | None) -> RankMeanGradient:
        return RankMeanGradient(pairs, transposed, group=self.group, counter=self.counter, dense_part=dense_part)

    # what the factors alone do not give when every micro-batch was folded
    @property
    def shape(self) -> torch.Size:
        if self.pairs:
            return super().shape
        return self.dense_part.T.shape if self.transposed else self.dense_part.shape

    def _oriented(self) -> Tensor | None:
        return None if self.dense_part is None or not self.transposed else self.dense_part.T

    def _mean(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        self.counter.add("all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return _mark(t.div_(dist.get_world_size(self.group)))

    @property
    def T(self) -> RankMeanGradient:
        return self._like(self.pairs, not self.transposed, self.dense_part)

    def to(self, dtype: torch.dtype) -> RankMeanGradient:
        pairs = [(x.to(dtype), dy.to(dtype)) for x, dy in self.pairs]
        return self._like(pairs, self.transposed, None if self.dense_part is None else self.dense_part.to(dtype))

    def add_(self, other: FactoredGradient) -> RankMeanGradient:
        if other.shape != self.shape:
            raise ValueError(f"cannot add a {tuple(other.shape)} factored gradient to a {tuple(self.shape)} one")
        self.pairs.extend(other.pairs)
        return self

    def __matmul__(self, other: Tensor) -> Tensor:
        a = self.dense_part if not self.transposed else self._oriented()
        return self._mean(self._plus(super().__matmul__(other), None if a is None else a @ other))

    def __rmatmul__(self, other: Tensor) -> Tensor:
        a = self.dense_part if not self.transposed else self._oriented()
        return self._mean(self._plus(super().__rmatmul__(other), None if a is None else other @ a))

    def row_block(self, rows: list[int]) -> RankMeanGradient:
        if self.transposed:
            raise ValueError("row_block of a transposed factored gradient")
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self._like([(x, dy.index_select(1, index)) for x, dy in self.pairs], False,
                          None if self.dense_part is None else self.dense_part.index_select(0, index))

    def dense(self) -> Tensor:
        """The mean block itself: only for what is small (the cross-head block, ``⌈r/d_k⌉·d_k × n``)."""
        a = self.dense_part if not self.transposed else self._oriented()
        return self._mean(self._plus(super().dense(), None if a is None else a.clone()))

    def project(self, left: Tensor | None, right: Tensor | None) -> Tensor:
        dense = None if self.dense_part is None else project(self.dense_part, left, right)
        return self._mean(self._plus(super().project(left, right), dense))

    def entries(self, index: Tensor) -> Tensor:
        dense = None if self.dense_part is None else self.dense_part.reshape(-1)[index.long()]
        return self._mean(self._plus(super().entries(index) if self.pairs else None, dense))

    def all_finite(self) -> bool:
        """Whether every rank's factors are finite (one all-reduce of a flag: the ranks refuse together)."""
        mine = super().all_finite() and (self.dense_part is None or bool(torch.isfinite(self.dense_part).all()))
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=self.device)
        with self.counter.refresh():
            self.counter.add("all_reduce", flag)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())
