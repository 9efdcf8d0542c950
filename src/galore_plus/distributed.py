"""Data-parallel GaLore: DDP and FSDP2 without gathering full gradients (SPEC 3).

``distribute(optimizer)`` makes a ``LowRankOptimizer`` (``GaLoreAdamW``, ``GaLorePlusAdamW``,
``GaLoreAdamW8bit``; ``GaLoreAdafactor`` under DDP only) work under ``torch.distributed``; the
single-process machinery (``lowrank.py``) runs unchanged and only the pieces that must talk to other
ranks are replaced here.

**DDP** (plain parameters, gradients already averaged by DDP): at a step where projectors are due,
each rank computes the projectors of its share of the parameters (owners balanced by estimated cost,
largest first) and broadcasts them, so a refresh costs about 1/N of the single-process one; everything else
is the single-process step on identical gradients, so parameters stay identical across ranks. The
random draws come from ``rng.generator_for(seed, parameter index, refresh count)``, so the owner's
projector is the one a single process would compute.

**FSDP2** (``fully_shard``: parameters and gradients are DTensors ``Shard(0)`` over a 1-D mesh): the
low-rank math runs on the row shards. With ``G_i`` this rank's rows of ``G`` (``m×n``):

- right projection ``R = G Q``: ``R_i = G_i Q`` is local, so are the moments (sharded like the
  parameter) and the update ``N_i Qᵀ``: no communication per step;
- left projection ``R = Pᵀ G = Σ_i P_iᵀ G_i``: one all-reduce of the ``r×n`` product per step; the
  moments are ``r×n`` and replicated, the update ``P_i N`` is local (full: ``r×r``);
- randomized range finder (GaLore+): ``A Ω`` and ``A Z`` are local, ``Aᵀ Y`` (``n×k``), ``Yᵀ A``
  (``k×n``) and the ``k×k`` Gram matrices of the CholeskyQR2 steps are all-reduced
  (``projection.randomized_svd(rows=...)``);
- cross-head: the chosen heads' rows (``⌈r/d_k⌉·d_k × n``) are summed from the rank(s) holding them;
- exact SVD (``svd="exact"``): an exact SVD has no sharded form that reproduces LAPACK's vectors
  (and GaLore's moments depend on their signs), so the full gradient is *gathered to one owner rank*
  (not all-gathered) at a refresh only; the owner computes the projector and broadcasts it.
  Prefer ``svd="randomized"`` (GaLore+'s default) under FSDP2.

Projectors are stored as DTensors (right ``Q``: replicated; left ``P``: ``Shard(0)`` rows), moments
as DTensors placed like the low-rank gradient (``GaLoreAdamW8bit``: each rank quantizes its shard, so
the uint8 codes are placed like the moment and the per-block absmax is sharded with them, see
``adamw8bit.GaLoreAdamW8bit``), residual indices/values as this rank's local tensors (the residual index set is chosen globally: a top-ρ over all shards, from the
candidates each rank proposes, so it equals the single-process set).

Checkpoints go through ``torch.distributed.checkpoint`` (``save_checkpoint`` / ``load_checkpoint``):
every value is a tensor (numbers as 0-d tensors), so nothing is unpickled on load. DTensors are
saved sharded; per-rank state (the residual) under per-rank keys, so a resume needs the same world
size.

Layer-wise mode (``LayerwiseOptimizer``) is refused under DDP and FSDP2: its hooks run inside
``backward()`` on this rank's gradient before DDP's bucketed all-reduce has averaged it (DDP writes
the averaged gradient back only at the end of backward), and FSDP2 assigns the reduce-scattered
sharded gradient after the autograd hooks, so ranks would step on different or missing gradients.

Bytes that the optimizer itself communicates are counted in ``optimizer.comm_bytes`` (per phase,
``"step"`` and ``"refresh"``, and per collective); FSDP2's own all-gather/reduce-scatter of parameters
and gradients, and DDP's gradient all-reduce, are the same as for any optimizer and not counted.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import projection, residual
from .lowrank import LowRankOptimizer, _all_finite, _basis, compute_dtype
from .rng import generator_for

__all__ = ["distribute", "save_checkpoint", "load_checkpoint", "init_from_env", "wrap_model", "layerwise_unsupported_reason"]


def layerwise_unsupported_reason() -> str:
    return ("layer-wise updates (LayerwiseOptimizer) cannot run under DDP or FSDP2: the per-parameter hooks "
            "fire inside backward() on this rank's own gradient, before DDP's bucketed all-reduce has averaged "
            "it (DDP writes the averaged gradient back only when backward ends), and FSDP2 assigns the "
            "reduce-scattered sharded gradient only after those hooks; ranks would step on different "
            "gradients. Use optimizer.step() with galore_plus.distributed.distribute(optimizer)")


# ---------------------------------------------------------------------------------------------- comm


class _Counter:
    """Bytes of the optimizer's own collectives (payload of each call, as seen by one rank)."""

    def __init__(self) -> None:
        self.phase = "step"
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, op: str, t: Tensor) -> None:
        self.bytes[self.phase][op] += t.numel() * t.element_size()


class _ShardRows(projection.RowSharding):
    """The row sharding of one FSDP2 ``Shard(0)`` DTensor (torch.chunk sizes: ``⌈m/N⌉`` rows per rank)."""

    def __init__(self, like: DTensor, counter: _Counter):
        mesh = like.device_mesh
        self.mesh, self.group = mesh, mesh.get_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.global_rows = like.shape[0]
        self.chunk = -(-self.global_rows // self.world)
        self.offset = min(self.rank * self.chunk, self.global_rows)
        self.rows = max(0, min(self.chunk, self.global_rows - self.offset))
        self.counter = counter

    def sum(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        self.counter.add("all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return t

    def _padded(self, t: Tensor) -> Tensor:
        if t.shape[0] == self.chunk:
            return t.contiguous()
        out = t.new_zeros((self.chunk, *t.shape[1:]))
        out[: t.shape[0]] = t
        return out

    def gather(self, t: Tensor) -> Tensor:
        """All ranks' row shards stacked (only thin ``m×k`` bases go through here)."""
        parts = [torch.empty_like(self._padded(t)) for _ in range(self.world)]
        self.counter.add("all_gather", t)
        dist.all_gather(parts, self._padded(t), group=self.group)
        return torch.cat(parts)[: self.global_rows]

    def gather_to(self, t: Tensor, owner: int) -> Tensor | None:
        """The whole matrix on ``owner`` (None elsewhere): the exact-SVD refresh only."""
        padded = self._padded(t)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        if self.rank != owner:
            self.counter.add("gather", padded)
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, owner), group=self.group)
        return torch.cat(parts)[: self.global_rows] if parts is not None else None

    def broadcast(self, t: Tensor, owner: int) -> Tensor:
        t = t.contiguous()
        self.counter.add("broadcast", t)
        dist.broadcast(t, src=dist.get_global_rank(self.group, owner), group=self.group)
        return t

    def local(self, t: Tensor) -> Tensor:
        return t[self.offset: self.offset + self.rows]

    def head_block(self, grad_local: Tensor, heads: list[int], head_dim: int) -> Tensor:
        """The chosen heads' rows stacked, from the rank(s) that hold them (one all-reduce of the block)."""
        block = grad_local.new_zeros((len(heads) * head_dim, grad_local.shape[1]))
        for j, h in enumerate(heads):
            lo, hi = max(h * head_dim, self.offset), min((h + 1) * head_dim, self.offset + self.rows)
            if lo < hi:
                block[j * head_dim + lo - h * head_dim: j * head_dim + hi - h * head_dim] = \
                    grad_local[lo - self.offset: hi - self.offset]
        return self.sum(block)


def _sharded(local: Tensor, like: DTensor, cols: int) -> DTensor:
    """A ``Shard(0)`` DTensor of ``like``'s rows and ``cols`` columns from this rank's rows."""
    return DTensor.from_local(local.contiguous(), like.device_mesh, [Shard(0)], run_check=False,
                              shape=torch.Size((like.shape[0], cols)), stride=(cols, 1))


def _replicated(t: Tensor, like: DTensor) -> DTensor:
    return DTensor.from_local(t.contiguous(), like.device_mesh, [Replicate()], run_check=False)


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------- optimizer


class _DistributedLowRank:
    """Mixin put in front of a ``LowRankOptimizer`` subclass by ``distribute``."""

    comm_bytes: dict[str, dict[str, int]]
    #: projectors this rank computed itself (DDP: its share; FSDP2: every one, each on shards)
    projectors_computed: int

    # ---------------------------------------------------------------- DDP: split refresh
    def _split_refresh(self, _optimizer: Any, args: tuple, kwargs: dict) -> None:
        """Step pre-hook: compute this rank's share of the due projectors, then broadcast them all.

        With a closure the gradients do not exist yet; every rank then refreshes every projector in
        step() itself (the same result, without the split)."""
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:
            return
        with torch.no_grad():
            due = []
            for group in self.param_groups:
                if "rank" not in group:
                    continue
                for i, p in enumerate(group["params"]):
                    if p.grad is None or isinstance(p, DTensor):
                        continue
                    if self._refresh_due(group, self.state.get(p, {})):
                        self._check_gradient(group, p, f"parameter #{i}")
                        due.append((group, p))
            if not due:
                return
            rank, world = dist.get_rank(self._ddp_group), dist.get_world_size(self._ddp_group)
            self._counter.phase = "refresh"
            try:
                owners = _balanced_owners([_refresh_cost(group, p) for group, p in due], world)
                for (group, p), owner in zip(due, owners):
                    if owner == rank:
                        state = self.state[p]
                        self._refresh(group, p, p.grad, state, state.get("step", 0))
                        self.projectors_computed += 1
                for (group, p), owner in zip(due, owners):
                    self._receive_projector(group, p, owner, owner == rank)
            finally:
                self._counter.phase = "step"

    def _receive_projector(self, group: dict[str, Any], p: Tensor, owner: int, mine: bool) -> None:
        state = self.state[p]
        dtype = compute_dtype(p)
        side = (projection.RIGHT if group["num_heads"] is not None
                else projection.projection_side(p.shape, group["proj_type"]))
        m, n, r = p.shape[0], p.shape[1], group["rank"]
        shapes = {"proj_left": (m, r) if side in (projection.LEFT, projection.FULL) else None,
                  "proj_right": (r, n) if side in (projection.RIGHT, projection.FULL) else None}
        for key, shape in shapes.items():
            if shape is None:
                continue
            t = state[key].to(dtype).contiguous() if mine else torch.empty(shape, dtype=dtype, device=p.device)
            self._counter.add("broadcast", t)
            dist.broadcast(t, src=dist.get_global_rank(self._ddp_group, owner), group=self._ddp_group)
            if not mine:
                state[key] = t.to(group.get("proj_dtype") or dtype)
        if not mine:
            state["proj_side"] = side
            state["last_refresh"] = state.get("step", 0)
            state["refresh_count"] = state.get("refresh_count", 0) + 1

    # ---------------------------------------------------------------- FSDP2: DTensor pieces
    def _check_gradient(self, group: dict[str, Any], p: Tensor, name: str) -> None:
        if not isinstance(p.grad, DTensor):
            return super()._check_gradient(group, p, name)
        if "rank" in group and self._refresh_due(group, self.state.get(p, {})):
            finite = torch.tensor([int(_all_finite(p.grad.to_local()))], dtype=torch.int32, device=p.grad.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=p.grad.device_mesh.get_group())
            if not finite.item():
                raise FloatingPointError(
                    f"the gradient of {name} (shape {tuple(p.shape)}) has NaN or Inf at a projector refresh "
                    f"(step {self.state.get(p, {}).get('step', 0) + 1}); nothing was updated")

    def _compute_projector(self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], side: int):
        if not isinstance(grad, DTensor):
            return super()._compute_projector(group, p, grad, state, side)
        self._counter.phase = "refresh"
        try:
            basis = self._sharded_projector(group, p, grad, state, side)
        finally:
            self._counter.phase = "step"
        self.projectors_computed += 1
        return basis

    def _sharded_projector(self, group: dict[str, Any], p: DTensor, grad: DTensor, state: dict[str, Any],
                           side: int) -> tuple[DTensor | None, DTensor | None]:
        if grad.placements != (Shard(0),) or grad.device_mesh.ndim != 1:
            raise ValueError(f"galore_plus.distributed supports FSDP2 gradients sharded Shard(0) over a 1-D "
                             f"mesh; got placements {grad.placements} on a {grad.device_mesh.ndim}-D mesh")
        rows = _ShardRows(grad, self._counter)
        local = grad.to_local().to(compute_dtype(p))
        m, n = grad.shape
        rank = group["rank"]
        gen = generator_for(group["seed"], self._param_index[id(p)], state.get("refresh_count", 0))
        warm = None
        if group["warm_start"] and state.get("proj_side") == side:
            warm = tuple(None if b is None else _local(b).to(local.dtype)
                         for b in (state.get("proj_left"), state.get("proj_right")))
        left = right = None
        try:
            if group["num_heads"] is not None:
                heads = group["num_heads"]
                chosen = projection.choose_heads(heads, rank, m // heads, gen)
                block = rows.head_block(local, chosen, m // heads)
                left, right = projection.head_block_projector(
                    block, rank, gen, group["svd"] == "randomized", group["oversample"], group["power_iters"],
                    warm=warm[1] if warm is not None else None)
            elif group["svd"] == "randomized":
                left, right = projection.randomized_projector(
                    local, rank, side, gen, group["oversample"], group["power_iters"], warm, rows)
            else:
                left, right = self._gathered_svd(p, local, rows, rank, side)
        except torch.linalg.LinAlgError:
            left = right = None
            failed = True
        else:
            failed = left is None and right is None
        if failed:  # lowrank._refresh's fallbacks, shard-aware
            if "proj_side" in state:
                warnings.warn(f"projector refresh failed for a {tuple(p.shape)} parameter; keeping the previous "
                              "projector", RuntimeWarning)
                return state.get("proj_left"), state.get("proj_right")
            warnings.warn(f"projector refresh failed for a {tuple(p.shape)} parameter at its first step; using a "
                          "seeded random orthonormal projector", RuntimeWarning)
            left, right = projection.random_projector(p.shape, rank, side, gen)
            left = None if left is None else rows.local(left)
        return (None if left is None else _sharded(left.to(local.dtype), grad, left.shape[1]),
                None if right is None else _replicated(right.to(local.dtype), grad))

    def _gathered_svd(self, p: DTensor, local: Tensor, rows: _ShardRows, rank: int, side: int):
        """Exact SVD: the whole gradient on the owner rank only, projector broadcast (see module doc)."""
        owner = self._param_index[id(p)] % rows.world
        whole = rows.gather_to(local, owner)
        m, n = rows.global_rows, local.shape[1]
        ok = torch.ones(1, dtype=torch.int32)
        left = torch.empty(m, rank, dtype=local.dtype) if side in (projection.LEFT, projection.FULL) else None
        right = torch.empty(rank, n, dtype=local.dtype) if side in (projection.RIGHT, projection.FULL) else None
        if whole is not None:
            basis = projection.svd_projector(whole, rank, side)
            if basis is None:
                ok.zero_()
            else:
                left, right = basis
        ok = rows.broadcast(ok, owner)
        if not ok.item():
            return None, None
        left = None if left is None else rows.local(rows.broadcast(left, owner))
        right = None if right is None else rows.broadcast(right, owner)
        return left, right

    def _project(self, p: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        if not isinstance(grad, DTensor):
            return super()._project(p, grad)
        state = self.state[p]
        grad = grad.to(compute_dtype(p))
        low = projection.project(grad, *_basis(state, p))
        if any(placement.is_partial() for placement in low.placements):  # Σ_i P_iᵀ G_i: r×n (or r×r)
            self._counter.add("all_reduce", low.to_local())
            low = low.redistribute(low.device_mesh, [Replicate()])
        grad_s = None
        if "residual_index" in state:
            grad_s = grad.to_local().reshape(-1)[state["residual_index"].long()]
        return low, grad_s

    @staticmethod
    def _flat_local(t: Tensor) -> Tensor:
        """This rank's rows of ``t``, flattened (a view): the residual runs on them with local indices."""
        return _local(t).reshape(-1)

    def _select_residual(self, reconstructed: Tensor, ratio: float) -> Tensor:
        """The index set as this rank's part of the global top-ρ (``_select_sharded``), in local
        flat indices; a plain tensor (DDP, one process) selects as ``LowRankOptimizer`` does."""
        if not isinstance(reconstructed, DTensor):
            return super()._select_residual(reconstructed, ratio)
        return self._select_sharded(reconstructed, ratio)

    def _select_sharded(self, reconstructed: DTensor, ratio: float) -> Tensor:
        """This rank's local flat indices of the global top-ρ of ``|P M'|`` (``residual.select_indices``
        over the whole matrix): each rank proposes its top ``k`` candidates, the ``N·k`` candidate
        values are all-gathered (ρ-sized, never the matrix) and every rank keeps its winners."""
        rows = _ShardRows(reconstructed, self._counter)
        flat = reconstructed.to_local().reshape(-1).abs()
        k = residual.residual_size(reconstructed.numel(), ratio)
        values, index = flat.topk(min(k, flat.numel()), sorted=False)
        padded = torch.full((k,), -1.0, dtype=flat.dtype)  # |x| ≥ 0 > -1: padding never wins
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(rows.world)]
        phase, self._counter.phase = self._counter.phase, "refresh"  # an index-set refresh, not per step
        self._counter.add("all_gather", padded)
        self._counter.phase = phase
        dist.all_gather(parts, padded, group=rows.group)
        everyone = torch.cat(parts)
        winners = everyone.topk(k, sorted=False).indices  # the same on every rank
        mine = winners[(winners // k) == rows.rank] % k
        local_index = index[mine].sort().values
        return local_index.to(torch.int32) if reconstructed.numel() < 2**31 else local_index


def _refresh_cost(group: dict[str, Any], p: Tensor) -> float:
    """Rough flops of one projector refresh, to balance the owners (SPEC 2.1, 2.2)."""
    m, n = p.shape
    if group["num_heads"] is not None:  # the SVD of the chosen heads' rows
        rows = projection.heads_needed(group["rank"], m // group["num_heads"]) * (m // group["num_heads"])
        return rows * n * min(rows, n)
    if group["svd"] == "randomized":
        return m * n * (group["rank"] + group["oversample"]) * (2 * group["power_iters"] + 2)
    return m * n * min(m, n)


def _balanced_owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each refresh: largest first to the least-loaded rank (the same on every rank)."""
    load, owners = [0.0] * world, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owners[j] = min(range(world), key=lambda r: (load[r], r))
        load[owners[j]] += costs[j]
    return owners


_CLASSES: dict[type, type] = {}


def distribute(optimizer: LowRankOptimizer, process_group: dist.ProcessGroup | None = None) -> LowRankOptimizer:
    """Make ``optimizer`` work under DDP or FSDP2 (see the module docstring); returns it.

    Call it right after constructing the optimizer, before an LR scheduler wraps ``step``. Parameters
    that are DTensors (FSDP2) get the sharded math; plain parameters (DDP) get the split refresh over
    ``process_group`` (default: the world). The optimizer's class becomes a subclass of its own, so
    ``isinstance`` checks and ``state_dict`` keep working.

    Raises:
        TypeError: not a ``LowRankOptimizer``; ValueError: a ``LayerwiseOptimizer`` (see
        ``layerwise_unsupported_reason``), or FSDP2 parameters not ``Shard(0)`` on a 1-D mesh, or a mix
        of DTensor and plain parameters in one optimizer; NotImplementedError: ``GaLoreAdafactor`` with
        FSDP2 parameters (it works under DDP); RuntimeError: no process group.
    """
    from .layerwise import LayerwiseOptimizer

    if isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError(layerwise_unsupported_reason())
    if not isinstance(optimizer, LowRankOptimizer):
        raise TypeError(f"distribute() needs a galore_plus LowRankOptimizer, got {type(optimizer).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distribute() needs an initialised torch.distributed process group "
                           "(launch with torchrun and call torch.distributed.init_process_group)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded) and not all(sharded):
        raise ValueError(f"{sum(sharded)} of the optimizer's {len(params)} parameters are FSDP2 DTensors and the "
                         "others are not; shard the whole model with fully_shard (its root module too)")
    if any(sharded):
        from .adafactor import GaLoreAdafactor

        if isinstance(optimizer, GaLoreAdafactor):
            raise NotImplementedError(
                "GaLoreAdafactor under FSDP2 is not supported yet: its factored second moment needs column means over "
                "all rows of a sharded matrix (an all-reduce per step that is not implemented); use it under DDP, or "
                "GaLoreAdamW / GaLoreAdamW8bit under FSDP2")
    for p in params:
        if isinstance(p, DTensor) and (p.placements != (Shard(0),) or p.device_mesh.ndim != 1):
            raise ValueError(f"galore_plus.distributed supports FSDP2 parameters sharded Shard(0) over a 1-D mesh; "
                             f"a {tuple(p.shape)} parameter has placements {p.placements} on a "
                             f"{p.device_mesh.ndim}-D mesh (HSDP and tensor parallelism are not supported)")
    cls = type(optimizer)
    if not isinstance(optimizer, _DistributedLowRank):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Distributed{cls.__name__}", (_DistributedLowRank, cls), {"__module__": __name__})
        optimizer.__class__ = _CLASSES[cls]
        optimizer._counter = _Counter()
        optimizer.comm_bytes = optimizer._counter.bytes
        optimizer.projectors_computed = 0
        optimizer._ddp_group = process_group if process_group is not None else dist.group.WORLD
        if not any(sharded) and dist.get_world_size(optimizer._ddp_group) > 1:
            optimizer.register_step_pre_hook(optimizer._split_refresh)
    return optimizer


# ---------------------------------------------------------------------------------------------- checkpoints


def _flat_state(model: torch.nn.Module, optimizer: LowRankOptimizer) -> dict[str, Any]:
    """Model and optimizer as one flat dict of tensors for ``torch.distributed.checkpoint``.

    Keys: ``model/<name>``; ``optim/state/<param name>/<key>/<layout>`` with layout ``shard`` or
    ``replicate`` (DTensors), ``rank<r>`` (this rank's local state of a sharded parameter), ``tensor``
    (replicated plain tensor), ``int``/``float`` (numbers as 0-d tensors); ``optim/group/<i>/<key>/...``
    for the groups' numeric hyper-parameters."""
    rank = process_rank()
    out: dict[str, Any] = {f"model/{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key == "params":
                continue
            encoded = _encode_number(value)
            if encoded is not None:
                out[f"optim/group/{i}/{key}/{encoded[1]}"] = encoded[0]
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                base = f"optim/state/{names[id(p)]}/{key}"
                if isinstance(value, DTensor):
                    layout = "shard" if value.placements == (Shard(0),) else "replicate"
                    out[f"{base}/{layout}"] = value
                elif isinstance(value, Tensor):
                    out[f"{base}/rank{rank}" if isinstance(p, DTensor) and value.dim() > 0 else f"{base}/tensor"] = value
                else:
                    encoded = _encode_number(value)
                    if encoded is None:
                        raise TypeError(f"optimizer state {key!r} of {names[id(p)]} is a {type(value).__name__}; "
                                        "only tensors and numbers can be checkpointed")
                    out[f"{base}/{encoded[1]}"] = encoded[0]
    return out


def _encode_number(value: Any) -> tuple[Tensor, str] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64), "int"
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64), "float"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in value):
        return torch.tensor(value, dtype=torch.float64), "tuple"
    return None


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save model and optimizer to directory ``path`` with ``torch.distributed.checkpoint``; call it on
    every rank (each writes its shards). ``model`` is the DDP or FSDP2 model the optimizer trains (or
    the module inside DDP); any optimizer whose state is tensors and numbers works."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_flat_state(model, optimizer), checkpoint_id=str(path))


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (same world size), in place;
    the optimizer's state is replaced. Call it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import empty as dtensor_empty

    rank = process_rank()
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model_state = model.state_dict()
    params = {n: p for n, p in model.named_parameters()}
    template: dict[str, Any] = {f"model/{k}": v for k, v in model_state.items()}
    missing = sorted(k for k in template if k not in metadata)
    if missing:
        raise KeyError(f"checkpoint {path} has no {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for key, meta in metadata.items():
        if not key.startswith("optim/"):
            continue
        layout = key.rsplit("/", 1)[1]
        size, dtype = tuple(meta.size), meta.properties.dtype
        if layout in ("shard", "replicate"):
            name = _param_of(key)
            mesh = params[name].device_mesh
            placement = Shard(0) if layout == "shard" else Replicate()
            template[key] = dtensor_empty(*size, dtype=dtype, device_mesh=mesh, placements=[placement])
        elif layout.startswith("rank"):
            if layout == f"rank{rank}":
                template[key] = torch.empty(size, dtype=dtype)
        else:
            template[key] = torch.empty(size, dtype=dtype)
    dcp.load(template, checkpoint_id=str(path))
    model.load_state_dict({k[len("model/"):]: v for k, v in template.items() if k.startswith("model/")})
    by_name = {id(p): n for n, p in params.items()}
    states: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in template.items():
        if key.startswith("optim/state/"):
            name = _param_of(key)
            state_key, layout = key[len(f"optim/state/{name}/"):].rsplit("/", 1)
            states[name][state_key] = _decode(value, layout)
        elif key.startswith("optim/group/"):
            _, _, i, rest = key.split("/", 3)
            group_key, layout = rest.rsplit("/", 1)
            optimizer.param_groups[int(i)][group_key] = _decode(value, layout)
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if by_name[id(p)] in states:
                optimizer.state[p] = states[by_name[id(p)]]


def _param_of(key: str) -> str:
    """The parameter name inside ``optim/state/<name>/<key>/<layout>`` (names contain dots, not slashes)."""
    return key[len("optim/state/"):].split("/", 1)[0]


def _decode(value: Tensor, layout: str) -> Any:
    if layout == "int":
        return int(value.item())
    if layout == "float":
        return float(value.item())
    if layout == "tuple":
        return tuple(float(v) for v in value.tolist())
    return value


# ---------------------------------------------------------------------------------------------- launching


def init_from_env(device_type: str = "cpu") -> tuple[int, int, int]:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on CUDA);
    returns ``(rank, world size, local rank)``. Raises RuntimeError outside torchrun."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"a distributed run needs torchrun (or accelerate launch); {', '.join(missing)} "
                           "not set: torchrun --nproc_per_node N -m galore_plus.cli finetune --distributed ddp ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return dist.get_rank(), dist.get_world_size(), local_rank


def wrap_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """``mode="ddp"``: the ``DistributedDataParallel`` wrapper (train with it, evaluate and save the
    model itself). ``mode="fsdp"``: ``fully_shard`` on every block of each ``nn.ModuleList`` (a
    transformer's decoder layers), then on the root, over a 1-D mesh of all ranks; returns ``model``,
    sharded in place. Build the optimizer after ``fsdp`` wrapping (its parameters become DTensors)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"mode={mode!r} is not 'ddp' or 'fsdp'")


def process_rank() -> int:
    """This process's rank in the default group (0 when none is initialised)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_across_ranks(*numbers: float) -> tuple[float, ...]:
    """The sums over ranks of a few numbers (for logging), in float64."""
    t = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())


def shutdown() -> None:
    """Wait for every rank, then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
