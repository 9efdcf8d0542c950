"""Where a parameter's low-rank math runs: on a whole tensor, or on FSDP2 row shards.

``layout_of(p)`` picks the layout from the parameter itself, so an optimizer built with its plain
constructor works on an FSDP2 model (DESIGN.md, "Distributed"):

- ``WholeTensor``: a plain tensor (one process, or DDP after its all-reduce): the projection math of
  ``projection.py`` as it is.
- ``RowShards``: a ``DTensor`` sharded ``Shard(0)`` over a 1-D mesh (``fully_shard``). With ``G_i``
  this rank's rows of ``G`` (``m×n``):

  - right projection ``R = G Q``: ``R_i = G_i Q`` is local, so are the moments (sharded like the
    parameter) and the update ``N_i Qᵀ``: no communication per step;
  - left projection ``R = Pᵀ G = Σ_i P_iᵀ G_i``: one all-reduce of the ``r×n`` product per step; the
    moments are ``r×n`` and replicated, the update ``P_i N`` is local (full: ``r×r``);
  - randomized range finder (GaLore+): ``A Ω`` and ``A Z`` are local, ``Aᵀ Y`` (``n×k``), ``Yᵀ A``
    (``k×n``) and the ``k×k`` Gram matrices of the CholeskyQR2 steps are all-reduced
    (``projection.randomized_svd(rows=...)``);
  - cross-head: the chosen heads' rows (``⌈r/d_k⌉·d_k × n``) are summed from the rank(s) holding them;
  - exact SVD (``svd="exact"``): an exact SVD has no sharded form that reproduces LAPACK's vectors
    (and GaLore's moments depend on their signs), so the gradient is *gathered to one owner rank*
    (never all-gathered) at a refresh; the owner computes the projector and broadcasts it;
  - the residual index set is each rank's part of the global top-ρ (ρ-sized candidates all-gathered);
  - moment transport (``moment_transport="project"``): a left change of basis ``P_newᵀ P_old`` sums
    ``r×r`` products over the ranks (one all-reduce per refresh); a right one is local.
  - canonical signs (``canonical_signs``): a left basis's sign per column is chosen over all its rows,
    one ``world×r`` all-reduce at a refresh (``projection.canonical_signs``).

  Projectors are DTensors (right ``Q``: replicated; left ``P``: ``Shard(0)`` rows), moments DTensors
  placed like the low-rank gradient, the residual's indices and values this rank's local tensors.

This module is the one place that handles distributed tensors (imports ``torch.distributed.tensor``,
reads placements and meshes, wraps local parts; ``tests/test_seams.py`` checks it). The rest of the
package goes through it: ``layout_of(p).sharded`` / ``is_dtensor`` to ask, ``local`` for this
process's part, ``placed_like`` / ``placed_blocks`` to place a local result (8-bit state),
``checkpoint_placement`` / ``empty_placed`` for checkpoints, and ``shard_rows`` (how many rows a full
shard holds).

``ProjectedRows``: the projected backward on an FSDP2 weight (issue 26): a rank's projected gradient
of its batch over all rows, reduce-scattered (``G Q``) or all-reduced (``Pᵀ G``) across the ranks.

Bytes the optimizer itself communicates are counted in ``CommCounter`` (per phase, ``"step"`` and
``"refresh"``, and per collective); FSDP2's own all-gather / reduce-scatter of parameters and
gradients are the same as for any optimizer and not counted.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from . import projection, residual


class CommCounter:
    """Bytes of the optimizer's own collectives (payload of each call, as seen by one rank)."""

    def __init__(self) -> None:
        self.phase = "step"
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, op: str, t: Tensor) -> None:
        self.bytes[self.phase][op] += t.numel() * t.element_size()

    @contextmanager
    def refresh(self) -> Iterator[None]:
        """Count what is sent inside as refresh traffic (not per-step)."""
        phase, self.phase = self.phase, "refresh"
        try:
            yield
        finally:
            self.phase = phase


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (0.4 s) when no
    DTensor can exist because the module was never loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor | None) -> Tensor | None:
    """This process's part of ``t`` (a DTensor's local shard; a plain tensor itself)."""
    return t.to_local() if is_dtensor(t) else t


def shard_rows(rows: int, world: int) -> int:
    """Rows of a full shard when ``rows`` rows are split over ``world`` ranks: ``⌈rows/world⌉``
    (FSDP2's ``Shard(0)``, torch.chunk's even split; the last ranks hold fewer rows, or none). The
    one place this formula is written."""
    return -(-rows // world)


def local_offset(p: Tensor) -> int:
    """The flat index, in the whole of ``p``, of this process's first element: 0 for a plain tensor,
    ``rank · ⌈m/N⌉ · (elements per row)`` for an FSDP2 row shard (0 for an empty shard)."""
    part = local(p)
    if not is_dtensor(p) or not part.numel():
        return 0
    return p.device_mesh.get_local_rank() * shard_rows(p.shape[0], p.device_mesh.size()) * part[0].numel()


def placed_like(part: Tensor, like: Tensor) -> Tensor:
    """``part`` (this process's part) placed like ``like``: for a DTensor ``like``, a DTensor on its
    mesh with its placements and global shape; for a plain ``like``, ``part`` itself."""
    if not is_dtensor(like):
        return part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(part.contiguous(), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def placed_blocks(part: Tensor, like: Tensor, block_size: int) -> Tensor:
    """Per-block values (one per ``block_size`` elements of this process's part of ``like``, e.g. the
    absmax of blockwise 8-bit codes) as a DTensor that checkpoints like ``like``: replicated with a
    replicated ``like``; for a ``Shard(0)`` one, ``Shard(0)`` of ``world × B`` entries, ``B`` the blocks
    of a full shard (``shard_rows`` rows), this rank's padded to ``B`` (the even split DCP expects)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = like.device_mesh
    if all(isinstance(pl, Replicate) for pl in like.placements):
        return DTensor.from_local(part.contiguous(), mesh, [Replicate()], run_check=False)
    if like.placements != (Shard(0),) or mesh.ndim != 1:
        raise ValueError(f"per-block state is sharded for tensors placed Shard(0) or Replicate on a 1-D mesh; got "
                         f"{like.placements} on a {mesh.ndim}-D mesh")
    world = mesh.size()
    rows = shard_rows(like.shape[0], world)
    full = -(-rows * math.prod(like.shape[1:]) // block_size)
    padded = part.new_zeros(full)
    padded[: part.numel()] = part
    return DTensor.from_local(padded, mesh, [Shard(0)], run_check=False, shape=torch.Size((world * full,)),
                              stride=(1,))


def checkpoint_placement(t: Any) -> str | None:
    """How a checkpoint stores ``t``: ``"shard"`` (a ``Shard(0)`` DTensor), ``"replicate"`` (any other
    DTensor: the same on every rank), None (a plain tensor or not a tensor)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Shard

    return "shard" if t.placements == (Shard(0),) else "replicate"


def empty_placed(size: tuple[int, ...], dtype: torch.dtype, like: Tensor, placement: str) -> Tensor:
    """An empty DTensor of global ``size`` on the mesh of ``like`` (a DTensor parameter), placed as
    ``checkpoint_placement`` named it: a template ``torch.distributed.checkpoint`` loads into."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import empty as dtensor_empty

    placements = [Shard(0) if placement == "shard" else Replicate()]
    return dtensor_empty(*size, dtype=dtype, device_mesh=like.device_mesh, placements=placements)


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN/Inf: one reduction (a NaN/Inf makes the sum non-finite); the
    elementwise check runs only when the sum is not finite (it may have overflowed)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def null_tolerance(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Below ``tol · largest``, a projected gradient direction is round-off: ``max(m, n)·ε`` of the
    compute dtype, the rank tolerance of ``numpy.linalg.matrix_rank`` (DESIGN.md)."""
    return max(shape) * torch.finfo(dtype).eps


class WholeTensor:
    """A plain tensor: the projection math as it is, no communication."""

    sharded = False

    def check_parameter(self, p: Tensor, name: str, where: str, rule: Any) -> None:
        """Raise if the optimizer cannot train ``p`` in this layout."""

    def all_finite(self, grad: Tensor | projection.FactoredGradient) -> bool:
        if isinstance(grad, projection.FactoredGradient):  # a refresh without G (issue 26)
            return grad.all_finite()
        return all_finite(grad)

    def compute_projector(self, grad: Tensor, group: dict[str, Any], side: int, gen: torch.Generator,
                          warm: tuple[Tensor | None, Tensor | None] | None,
                          index: int) -> tuple[Tensor | None, Tensor | None] | None:
        """The new ``(left, right)`` basis from ``grad`` (compute dtype), or None when it cannot be
        computed. Random draws come from ``gen``, a pure function of (seed, parameter index, refresh
        count)."""
        rank = projection.resolve_rank(group["rank"], grad.shape)
        try:
            if group["num_heads"] is not None:
                return projection.cross_head_projector(
                    grad, rank, group["num_heads"], gen, group["svd"] == "randomized", group["oversample"],
                    group["power_iters"], warm=warm[1] if warm is not None else None)
            blocks = group.get("head_blocks")
            if blocks is not None:  # fused q/k/v cross-head; warm[side]: the previous basis on its side
                return projection.cross_head_projector(
                    grad, rank, blocks["count"], gen, group["svd"] == "randomized", group["oversample"],
                    group["power_iters"], warm=warm[side] if warm is not None else None,
                    eligible=blocks["eligible"], dim=blocks["dim"])
            if group["svd"] == "randomized":
                return projection.randomized_projector(grad, rank, side, gen, group["oversample"],
                                                       group["power_iters"], warm)
        except torch.linalg.LinAlgError:
            return None
        return projection.svd_projector(grad, rank, side)

    def direction_norms(self, grad: Tensor, left: Tensor | None,
                        right: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``‖p_iᵀ G‖`` for each left basis vector and ``‖G q_j‖`` for each right one."""
        return (None if left is None else (left.T @ grad).norm(dim=1),
                None if right is None else (grad @ right.T).norm(dim=0))

    def drop_null_directions(self, grad: Tensor, left: Tensor | None,
                             right: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Zero the basis vectors along which ``grad`` is numerically zero.

        A gradient of rank ``k < r`` (fewer tokens than the rank, say) has ``r − k`` singular vectors
        that only carry round-off; Adam would normalise that round-off into full-size steps outside
        the gradient's row space. A zeroed vector projects every later gradient to exactly 0 there,
        so its moments stay 0 and so does the update (DESIGN.md, "Projectors")."""
        norms = self.direction_norms(grad, left, right)
        tol = null_tolerance(tuple(grad.shape), grad.dtype)
        out = []
        for basis, norm, columns in ((left, norms[0], True), (right, norms[1], False)):
            keep = None if basis is None else norm > tol * norm.max()
            if basis is None or bool(keep.all()):
                out.append(basis)
            else:
                mask = keep.to(basis.dtype)
                out.append(basis * self._like(mask.unsqueeze(0) if columns else mask.unsqueeze(1), basis))
        return out[0], out[1]

    @staticmethod
    def _like(t: Tensor, basis: Tensor) -> Tensor:
        """``t`` (the same on every rank) in a form that combines with ``basis``."""
        return t

    def canonical_signs(self, left: Tensor | None, right: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The basis with canonical signs (``projection.canonical_projector``; group key ``canonical_signs``)."""
        return projection.canonical_projector(left, right)

    def random_projector(self, p: Tensor, rank: int, side: int,
                         gen: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
        return projection.random_projector(p.shape, rank, side, gen)

    # issue 29, moment transport (DESIGN.md, "Moment transport"; transport.py)
    def same_basis(self, old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None]) -> bool:
        """Whether two ``(left, right)`` bases are bitwise the same (the same answer on every rank)."""
        return all((a is None) == (b is None) and (a is None or torch.equal(local(a), local(b)))
                   for a, b in zip(old, new))

    def change_of_basis(self, old: tuple[Tensor | None, Tensor | None],
                        new: tuple[Tensor | None, Tensor | None]) -> tuple[Tensor | None, Tensor | None]:
        """``(R_l, R_r)`` from the old basis to the new one, plain ``r×r`` tensors: ``R_l = P_newᵀ P_old``,
        ``R_r = S_old S_newᵀ`` (``S = Qᵀ`` as stored)."""
        return (None if new[0] is None else new[0].T @ old[0],
                None if new[1] is None else old[1] @ new[1].T)

    def project(self, grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
        return projection.project(grad, left, right)

    def squared_norms(self, *tensors: Tensor) -> tuple[float, ...]:
        """``‖t‖_F²`` of each whole tensor, as floats (the captured share, DESIGN.md, "Refresh")."""
        return tuple(torch.stack([t.square().sum() for t in tensors]).tolist())

    @staticmethod
    def flat_local(t: Tensor) -> Tensor:
        """``t`` flattened in row-major order (a view when ``t`` is contiguous, a copy when not: a
        ``Parameter(w.t())`` has a transposed gradient, issue 25): the residual's indices address it."""
        return t.reshape(-1)

    def sum_parts(self, value: Tensor, like: Tensor) -> Tensor:
        """``value`` (0-d, computed from this process's part of a matrix) summed over the parts of
        ``like`` (the parameter): here the one part, ``value`` itself."""
        return value

    def select_residual(self, moment: Tensor, left: Tensor | None, right: Tensor | None, ratio: float) -> Tensor:
        """The residual's flat index set: the top-ρ of ``|P M'|`` (``M'`` the low-rank first moment
        ``moment`` projected back), by row blocks: no ``m×n`` tensor (issue 26)."""
        return residual.select_top_product(*projection.back_factors(moment, left, right), ratio)


class RowShards(WholeTensor):
    """A ``Shard(0)`` DTensor over a 1-D mesh (FSDP2): the math on this rank's rows (module doc)."""

    sharded = True

    def __init__(self, counter: CommCounter | None):
        self.counter = counter if counter is not None else CommCounter()

    def check_parameter(self, p: Tensor, name: str, where: str, rule: Any) -> None:
        from torch.distributed.tensor import Shard

        if p.placements != (Shard(0),) or p.device_mesh.ndim != 1:
            raise ValueError(f"{where}: {name} (shape {tuple(p.shape)}) is a DTensor with placements {p.placements} "
                             f"on a {p.device_mesh.ndim}-D mesh; galore_plus supports FSDP2 parameters sharded "
                             "Shard(0) over a 1-D mesh (HSDP and tensor parallelism are not supported)")
        if not rule.shards:
            raise NotImplementedError(
                f"{where}: {name} is an FSDP2 parameter and the {rule.name} rule does not run on row shards "
                f"({rule.shard_reason})")

    def all_finite(self, grad: Tensor) -> bool:
        import torch.distributed as dist

        if isinstance(grad, FactoredRows):  # the projected backward's sketched refresh (issue 26)
            finite = torch.tensor([int(grad.local_finite())], dtype=torch.int32, device=grad.device)
        else:
            shard = grad.to_local()
            finite = torch.tensor([int(all_finite(shard))], dtype=torch.int32, device=shard.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=grad.device_mesh.get_group())
        return bool(finite.item())

    def compute_projector(self, grad, group, side, gen, warm, index):
        if not isinstance(grad, FactoredRows) and grad.placements != self._placements():
            raise ValueError(f"galore_plus supports FSDP2 gradients sharded Shard(0) over a 1-D mesh; got "
                             f"placements {grad.placements} on a {grad.device_mesh.ndim}-D mesh")
        with self.counter.refresh():
            rows = ShardRows(grad, self.counter)
            local = grad.to_local()
            m = grad.shape[0]
            rank = projection.resolve_rank(group["rank"], grad.shape)  # the global shape
            warm = None if warm is None else tuple(None if b is None else b.to_local() for b in warm)
            try:
                if group["num_heads"] is not None:
                    heads = group["num_heads"]
                    chosen = projection.choose_heads(heads, rank, m // heads, gen)
                    block = rows.head_block(local, chosen, m // heads)
                    left, right = projection.head_block_projector(
                        block, rank, gen, group["svd"] == "randomized", group["oversample"], group["power_iters"],
                        warm=warm[1] if warm is not None else None)
                elif group.get("head_blocks") is not None:  # fused q/k/v cross-head
                    left, right = self._head_blocks_projector(local, rows, group, gen, warm)
                elif group["svd"] == "randomized":
                    left, right = projection.randomized_projector(
                        local, rank, side, gen, group["oversample"], group["power_iters"], warm, rows)
                else:
                    basis = self._gathered_svd(local, rows, rank, side, owner=index % rows.world)
                    if basis is None:
                        return None
                    left, right = basis
            except torch.linalg.LinAlgError:
                return None
        return self._wrap(left, right, grad)

    @staticmethod
    def _head_blocks_projector(local: Tensor, rows: ShardRows, group: dict[str, Any], gen: torch.Generator,
                               warm: tuple[Tensor | None, Tensor | None] | None):
        """A fused q/k/v matrix's cross-head projector (``projection.cross_head_projector`` with
        ``eligible``) on row shards. Row blocks: the chosen rows summed from the ranks holding them,
        as for ``num_heads``. Column blocks (a ``Conv1D`` weight, ``in × out``, sharded along ``in``):
        the thin ``m × c·d_k`` block of the chosen columns is all-gathered (never the gradient) and
        every rank computes the same left basis, keeping its own rows."""
        blocks, rank = group["head_blocks"], projection.resolve_rank(group["rank"], (rows.global_rows, local.shape[1]))
        count, eligible, dim = blocks["count"], blocks["eligible"], blocks["dim"]
        options = (group["svd"] == "randomized", group["oversample"], group["power_iters"])
        size = (rows.global_rows if dim == 0 else local.shape[1]) // count
        chosen = projection.choose_heads(count, rank, size, gen, eligible)
        if dim == 0:
            block = rows.head_block(local, chosen, size)
            return projection.head_block_projector(block, rank, gen, *options,
                                                   warm=warm[1] if warm is not None else None)
        block = rows.gather(torch.cat([local[:, i * size:(i + 1) * size] for i in chosen], dim=1))
        start = None if warm is None or warm[0] is None else rows.gather(warm[0]).T
        _, right = projection.head_block_projector(block.T.contiguous(), rank, gen, *options, warm=start)
        return rows.local(right.T).contiguous(), None

    @staticmethod
    def _placements():
        from torch.distributed.tensor import Shard

        return (Shard(0),)

    @staticmethod
    def _wrap(left: Tensor | None, right: Tensor | None, like: Tensor):
        """A left basis as ``Shard(0)`` rows, a right one replicated, on ``like``'s mesh."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = like.device_mesh
        if left is not None:
            r = left.shape[1]
            left = DTensor.from_local(left.contiguous(), mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((like.shape[0], r)), stride=(r, 1))
        if right is not None:
            right = DTensor.from_local(right.contiguous(), mesh, [Replicate()], run_check=False)
        return left, right

    def _gathered_svd(self, local: Tensor, rows: ShardRows, rank: int, side: int, owner: int):
        """Exact SVD: the whole gradient on the owner rank only, the projector broadcast."""
        whole = rows.gather_to(local, owner)
        m, n = rows.global_rows, local.shape[1]
        device = local.device  # NCCL broadcasts only device tensors
        ok = torch.ones(1, dtype=torch.int32, device=device)
        left = torch.empty(m, rank, dtype=local.dtype, device=device) if side in (projection.LEFT, projection.FULL) \
            else None
        right = torch.empty(rank, n, dtype=local.dtype, device=device) if side in (projection.RIGHT, projection.FULL) \
            else None
        if whole is not None:
            basis = projection.svd_projector(whole, rank, side)
            if basis is None:
                ok.zero_()
            else:
                left, right = basis
        if not rows.broadcast(ok, owner).item():
            return None
        left = None if left is None else rows.local(rows.broadcast(left, owner))
        right = None if right is None else rows.broadcast(right, owner)
        return left, right

    def direction_norms(self, grad, left, right):
        with self.counter.refresh():
            rows = ShardRows(grad, self.counter)
            local = grad.to_local()
            left_norms = right_norms = None
            if left is not None:
                left_norms = rows.sum(left.to_local().T @ local).norm(dim=1)
            if right is not None:
                right_norms = rows.sum((local @ right.to_local().T).square().sum(0)).sqrt()
        return left_norms, right_norms

    def canonical_signs(self, left, right):
        """A left basis's sign of each column is decided over all its rows (one ``world×r``
        all-reduce); a replicated right basis's on each rank alike, with no communication."""
        with self.counter.refresh():
            rows = None if left is None else ShardRows(left, self.counter)
            new_left, new_right = projection.canonical_projector(local(left), local(right), rows)
        return self._wrap(new_left, new_right, left if left is not None else right)

    @staticmethod
    def _like(t: Tensor, basis: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor, Replicate

        return DTensor.from_local(t, basis.device_mesh, [Replicate()], run_check=False)

    def random_projector(self, p, rank, side, gen):
        left, right = projection.random_projector(p.shape, rank, side, gen)
        rows = ShardRows(p, self.counter)
        return self._wrap(None if left is None else rows.local(left), right, p)

    def same_basis(self, old, new):
        """Each rank compares its rows of a left basis; the ranks agree by one all-reduce (a right
        basis is replicated: every rank's answer is the same without talking)."""
        import torch.distributed as dist

        same = super().same_basis(old, new)
        if new[0] is None:
            return same
        flag = torch.tensor([int(same)], dtype=torch.int32, device=local(new[0]).device)
        with self.counter.refresh():
            self.counter.add("all_reduce", flag)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=new[0].device_mesh.get_group())
        return bool(flag.item())

    def change_of_basis(self, old, new):
        """``R_l = Σ_i P_new,iᵀ P_old,i`` over the ranks' rows (one ``r×r`` all-reduce); ``R_r`` from the
        replicated right bases, locally."""
        left = right = None
        with self.counter.refresh():
            if new[0] is not None:
                left = ShardRows(new[0], self.counter).sum(local(new[0]).T @ local(old[0]))
        if new[1] is not None:
            right = local(old[1]) @ local(new[1]).T
        return left, right

    def project(self, grad, left, right):
        from torch.distributed.tensor import Replicate

        low = projection.project(grad, left, right)
        if any(placement.is_partial() for placement in low.placements):  # Σ_i P_iᵀ G_i: r×n (or r×r)
            self.counter.add("all_reduce", low.to_local())
            low = low.redistribute(low.device_mesh, [Replicate()])
        return low

    def squared_norms(self, *tensors: Tensor) -> tuple[float, ...]:
        """``‖t‖_F²`` of each whole tensor: replicated ones (a left projection's ``r×n``) from this
        rank's copy, row-sharded ones summed over the ranks in one scalar all-reduce."""
        sums = [local(t).square().sum() for t in tensors]
        sharded = [is_dtensor(t) and any(pl.is_shard() for pl in t.placements) for t in tensors]
        if any(sharded):
            rows = ShardRows(next(t for t, s in zip(tensors, sharded) if s), self.counter)
            shared = iter(rows.sum(torch.stack([v for v, s in zip(sums, sharded) if s])).tolist())
            return tuple(next(shared) if s else float(v) for v, s in zip(sums, sharded))
        return tuple(float(v) for v in sums)

    @staticmethod
    def flat_local(t: Tensor) -> Tensor:
        """This rank's rows of ``t``, flattened (a view): the residual runs on them with local indices."""
        return local(t).reshape(-1)

    def sum_parts(self, value: Tensor, like: Tensor) -> Tensor:
        """Summed over the ranks' row shards: one 0-d all-reduce."""
        return ShardRows(like, self.counter).sum(value)

    def select_residual(self, moment: Tensor, left: Tensor | None, right: Tensor | None, ratio: float) -> Tensor:
        """This rank's local flat indices of the global top-ρ of ``|P M'|`` (``residual.select_indices``
        over the whole matrix): each rank proposes its top ``k`` candidates, the ``N·k`` candidate
        values are all-gathered (ρ-sized, never the matrix) and every rank keeps its winners."""
        import torch.distributed as dist

        reconstructed = projection.project_back(moment, left, right)
        if not is_dtensor(reconstructed):  # a replicated moment's reconstruction: every rank the same
            return residual.select_indices(reconstructed, ratio)
        rows = ShardRows(reconstructed, self.counter)
        flat = reconstructed.to_local().reshape(-1).abs()
        k = residual.residual_size(reconstructed.numel(), ratio)
        values, index = flat.topk(min(k, flat.numel()), sorted=False)
        padded = torch.full((k,), -1.0, dtype=flat.dtype)  # |x| ≥ 0 > -1: padding never wins
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(rows.world)]
        with self.counter.refresh():  # an index-set refresh, not per step
            self.counter.add("all_gather", padded)
        dist.all_gather(parts, padded, group=rows.group)
        winners = torch.cat(parts).topk(k, sorted=False).indices  # the same on every rank
        mine = winners[(winners // k) == rows.rank] % k
        local_index = index[mine].sort().values
        return local_index.to(torch.int32) if reconstructed.numel() < 2**31 else local_index


class ShardRows(projection.RowSharding):
    """The row sharding of one FSDP2 ``Shard(0)`` DTensor (torch.chunk sizes: ``⌈m/N⌉`` rows per rank)."""

    def __init__(self, like: Tensor, counter: CommCounter):
        import torch.distributed as dist

        mesh = like.device_mesh
        self.group = mesh.get_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.global_rows = like.shape[0]
        self.chunk = shard_rows(self.global_rows, self.world)
        self.offset = min(self.rank * self.chunk, self.global_rows)
        self.rows = max(0, min(self.chunk, self.global_rows - self.offset))
        self.counter = counter

    def sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

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
        import torch.distributed as dist

        parts = [torch.empty_like(self._padded(t)) for _ in range(self.world)]
        self.counter.add("all_gather", t)
        dist.all_gather(parts, self._padded(t), group=self.group)
        return torch.cat(parts)[: self.global_rows]

    def gather_to(self, t: Tensor, owner: int) -> Tensor | None:
        """The whole matrix on ``owner`` (None elsewhere): the exact-SVD refresh only."""
        import torch.distributed as dist

        padded = self._padded(t)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        if self.rank != owner:
            self.counter.add("gather", padded)
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, owner), group=self.group)
        return torch.cat(parts)[: self.global_rows] if parts is not None else None

    def broadcast(self, t: Tensor, owner: int) -> Tensor:
        import torch.distributed as dist

        t = t.contiguous()
        self.counter.add("broadcast", t)
        dist.broadcast(t, src=dist.get_global_rank(self.group, owner), group=self.group)
        return t

    def local(self, t: Tensor) -> Tensor:
        return t[self.offset: self.offset + self.rows]

    def head_block(self, grad_local: Tensor, heads: list[int], head_dim: int) -> Tensor:
        """The chosen heads' rows stacked, from the rank(s) that hold them (one all-reduce of the block)."""
        if isinstance(grad_local, LocalRows):  # from the ranks' factors (issue 26)
            return grad_local.head_block(heads, head_dim)
        block = grad_local.new_zeros((len(heads) * head_dim, grad_local.shape[1]))
        for j, h in enumerate(heads):
            lo, hi = max(h * head_dim, self.offset), min((h + 1) * head_dim, self.offset + self.rows)
            if lo < hi:
                block[j * head_dim + lo - h * head_dim: j * head_dim + hi - h * head_dim] = \
                    grad_local[lo - self.offset: hi - self.offset]
        return self.sum(block)


_WHOLE = WholeTensor()


def layout_of(p: Tensor, counter: CommCounter | None) -> WholeTensor:
    """The layout of parameter (or tensor) ``p``: ``RowShards`` for a DTensor, else ``WholeTensor``."""
    return RowShards(counter) if is_dtensor(p) else _WHOLE


class ProjectedRows:
    """The projected backward of one FSDP2 ``Shard(0)`` weight (issue 26; DESIGN.md, "Distributed",
    FSDP2 projected). In backward each rank holds its own micro-batch's ``x`` and ``dy`` with every
    row of the (all-gathered) weight, so it computes the projected gradient of *its* batch over all
    rows; ``reduce`` then sums the ranks' contributions and averages them as FSDP2 averages a full
    gradient:

    - right projection ``G Q`` (``m×r``): reduce-scattered along FSDP2's row shards, each rank
      receiving its rows, which is where the row-sharded moments live (``RowShards.project``'s
      layout); the payload ``m×r`` against the full path's ``m×n`` reduce-scatter;
    - left ``Pᵀ G`` (``r×n``) and full ``Pᵀ G Q`` (``r×r``): all-reduced (the moments are
      replicated; the full path all-reduces the same product after reducing ``G`` itself);
    - the residual's entries: each rank computes its batch's entries at every rank's index set
      (``global_index``), all-reduced, each keeping its own (ρ-sized).

    What a rank needs of the projector and index set that another rank holds, the whole left basis
    (``m×r``) and every rank's residual indices, is all-gathered once per refresh or reselection
    (counted in the ``"refresh"`` phase) and cached by the caller."""

    def __init__(self, p: Tensor, counter: CommCounter):
        self.rows = ShardRows(p, counter)
        self.counter = counter
        self.shape = tuple(p.shape)
        self.mesh = p.device_mesh

    def whole_basis(self, left: Tensor | None, right: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The whole ``(P, Q)``: ``P`` (``Shard(0)`` rows) all-gathered, ``Q`` (replicated) this rank's copy."""
        with self.counter.refresh():
            whole_left = None if left is None else self.rows.gather(left.to_local())
        return whole_left, local(right)

    def global_index(self, index: Tensor | None) -> tuple[Tensor | None, list[int]]:
        """Every rank's residual indices (flat into its own rows) as flat indices into the whole
        matrix, concatenated by rank, and how many each rank has: two all-gathers (counts, then the
        indices padded to the longest)."""
        import torch.distributed as dist

        if index is None:
            return None, []
        rows = self.rows
        with self.counter.refresh():
            count = torch.tensor([index.numel()], dtype=torch.int64, device=index.device)  # NCCL: on the device
            counts = [torch.empty_like(count) for _ in range(rows.world)]
            self.counter.add("all_gather", count)
            dist.all_gather(counts, count, group=rows.group)
            sizes = [int(c) for c in counts]
            padded = index.new_zeros(max(sizes)).long()
            padded[: index.numel()] = index.long()
            parts = [torch.empty_like(padded) for _ in range(rows.world)]
            self.counter.add("all_gather", padded)
            dist.all_gather(parts, padded, group=rows.group)
        n = self.shape[1]
        whole = torch.cat([part[:size] + k * rows.chunk * n for k, (part, size) in enumerate(zip(parts, sizes))])
        return whole, sizes

    def reduce(self, low: Tensor, entries: Tensor | None, sizes: list[int], side_right: bool) -> tuple[Tensor, Tensor | None]:
        """The ranks' summed projected gradient, divided by the world size (FSDP2's mean): ``low``
        placed as ``RowShards.project`` places it, ``entries`` cut to this rank's residual set."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Replicate, Shard

        rows, world = self.rows, self.rows.world
        if side_right:  # G Q: m×r, this rank's rows
            r = low.shape[1]
            whole = low.new_zeros((rows.chunk * world, r))
            whole[: low.shape[0]] = low
            part = low.new_empty((rows.chunk, r))
            self.counter.add("reduce_scatter", whole)
            dist.reduce_scatter_single(output=part, input=whole, group=rows.group)
            part = part[: rows.rows].div_(world)
            low = DTensor.from_local(part.contiguous(), self.mesh, [Shard(0)], run_check=False,
                                     shape=torch.Size((self.shape[0], r)), stride=(r, 1))
        else:  # Pᵀ G (r×n) or Pᵀ G Q (r×r): replicated
            low = rows.sum(low).div_(world)
            low = DTensor.from_local(low, self.mesh, [Replicate()], run_check=False)
        if entries is not None:
            entries = rows.sum(entries).div_(world)
            start = sum(sizes[: rows.rank])
            entries = entries[start: start + sizes[rows.rank]].clone()
        return low, entries


# ---------------------------------------------------------------------------------------------------
# FSDP2: a refresh without the full gradient across ranks (issue 26; DESIGN.md, "Distributed", FSDP2
# with the projected backward, sketched refresh)


class FactoredRows(projection.RankFactoredGradient):
    """The mean over the ranks of an FSDP2 target's gradient, ``G = (1/N) Σ_r G_r``, with this rank's
    ``G_r = Σ_b dy_bᵀ x_b`` held as its factors (its micro-batches' ``x`` and ``dy``, which cover every
    row of the all-gathered weight) and, past the factors' cap, a ``dense_part`` (``fold_beyond``),
    standing where ``RowShards`` expects the target's ``Shard(0)`` gradient: ``shape`` is the whole
    ``m×n``, ``device_mesh`` the weight's, ``to_local()`` this rank's rows as ``LocalRows`` (``G_i``).
    What a refresh takes of ``G`` is then the row-sharded algorithm's products with ``G_i``
    (``projection.randomized_svd(rows=...)``, the head block, the null-direction norms), each computed
    from this rank's ``G_r``; ``project`` and ``entries`` give the first projected gradient, placed and
    reduced as between refreshes (``ProjectedRows``). Whatever a rank holds, the collectives are the
    same on every rank, and none carries an ``m×n`` tensor."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], p: Tensor, counter: CommCounter,
                 dense_part: Tensor | None = None):
        self.pairs, self.transposed, self.dense_part = list(pairs), False, dense_part
        self.param, self.counter = p, counter
        self.device_mesh = p.device_mesh
        self.rows = ShardRows(p, counter)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def to(self, dtype: torch.dtype) -> FactoredRows:
        pairs = [(x.to(dtype), dy.to(dtype)) for x, dy in self.pairs]
        return FactoredRows(pairs, self.param, self.counter,
                            None if self.dense_part is None else self.dense_part.to(dtype))

    def add_(self, other: projection.FactoredGradient) -> FactoredRows:
        self.pairs.extend(other.pairs)
        return self

    # this rank's G_r, from its factors and its dense part
    def _local(self) -> projection.FactoredGradient | None:
        return projection.FactoredGradient(self.pairs) if self.pairs else None

    def _times(self, other: Tensor) -> Tensor:
        """``G_r M``."""
        local, dense = self._local(), self.dense_part
        return self._plus(None if local is None else local @ other, None if dense is None else dense @ other)

    def _left_times(self, Y: Tensor) -> Tensor:
        """``Yᵀ G_r`` (``Y``: ``m×k``)."""
        local, dense = self._local(), self.dense_part
        return self._plus(None if local is None else Y.T @ local, None if dense is None else Y.T @ dense)

    def _projected(self, left: Tensor | None, right: Tensor | None) -> Tensor:
        local, dense = self._local(), self.dense_part
        return self._plus(None if local is None else local.project(left, right),
                          None if dense is None else projection.project(dense, left, right))

    def _entries(self, index: Tensor) -> Tensor:
        local, dense = self._local(), self.dense_part
        return self._plus(None if local is None else local.entries(index),
                          None if dense is None else dense.reshape(-1)[index.long()])

    def _block(self, rows: list[int]) -> Tensor:
        local, dense = self._local(), self.dense_part
        return self._plus(None if local is None else local.row_block(rows).dense(),
                          None if dense is None else dense[torch.tensor(rows, dtype=torch.long, device=dense.device)])

    def local_finite(self) -> bool:
        """Whether this rank's factors are finite (``RowShards.all_finite`` makes the ranks agree)."""
        return (all(bool(torch.isfinite(t).all()) for pair in self.pairs for t in pair)
                and (self.dense_part is None or all_finite(self.dense_part)))

    def all_finite(self) -> bool:
        return RowShards(self.counter).all_finite(self)

    def to_local(self) -> LocalRows:
        return LocalRows(self)

    def project(self, left: Tensor | None, right: Tensor | None) -> Tensor:
        """The projected gradient under the new projector, placed as ``RowShards.project`` places it:
        this rank's batch over all rows (the whole left basis all-gathered, ``m×r``), then reduced as
        between refreshes (``G Q`` reduce-scattered to the row shards, ``Pᵀ G`` all-reduced)."""
        rows = ProjectedRows(self.param, self.counter)
        whole_left, whole_right = rows.whole_basis(left, right)
        return rows.reduce(self._projected(whole_left, whole_right), None, [], side_right=left is None)[0]

    def entries(self, index: Tensor) -> Tensor:
        """``G`` at this rank's residual set (flat into its rows): every rank's batch at every rank's set
        (``ProjectedRows.global_index``), all-reduced, this rank's part kept."""
        rows = ProjectedRows(self.param, self.counter)
        whole, sizes = rows.global_index(index)
        entries = self.rows.sum(self._entries(whole)).div_(self.rows.world)
        start = sum(sizes[: self.rows.rank])
        return entries[start: start + sizes[self.rows.rank]].clone()


class LocalRows:
    """This rank's rows ``G_i`` of a ``FactoredRows`` mean gradient, for the row-sharded refresh
    (``projection.randomized_svd(rows=...)`` and ``RowShards``): ``G_i M`` is the ranks' ``G M``
    (``m×k``) reduce-scattered to the row shards; ``G_iᵀ Y_i`` and ``Y_iᵀ G_i`` (which the caller sums
    over the ranks) are this rank's share ``(1/N) x_rᵀ (dy_r Y)``, ``Y`` the thin ``m×k`` basis
    all-gathered; ``head_block`` the chosen heads' rows all-reduced."""

    def __init__(self, whole: FactoredRows, transposed: bool = False):
        self.whole, self.transposed = whole, transposed
        rows = whole.rows
        self.shape = torch.Size((whole.shape[1], rows.rows) if transposed else (rows.rows, whole.shape[1]))
        self.dtype, self.device = whole.dtype, whole.device

    @property
    def T(self) -> LocalRows:
        return LocalRows(self.whole, not self.transposed)

    def _share(self, Y_local: Tensor, left: bool) -> Tensor:
        """This rank's share of ``Yᵀ G`` (``left``: ``(1/N) (dy_r Y)ᵀ x_r``, ``k×n``) or of ``Gᵀ Y`` (its
        transpose), ``Y`` all-gathered from the ranks' rows ``Y_local``."""
        rows = self.whole.rows
        out = self.whole._left_times(rows.gather(Y_local)).div_(rows.world)
        return out if left else out.T

    def __matmul__(self, other: Tensor) -> Tensor:
        import torch.distributed as dist

        if self.transposed:  # G_iᵀ Y_i: this rank's share, summed over the ranks by the caller
            return self._share(other, left=False)
        rows = self.whole.rows
        full = self.whole._times(other)  # this rank's batch, every row: m×k
        padded = full.new_zeros((rows.chunk * rows.world, full.shape[1]))
        padded[: full.shape[0]] = full
        part = full.new_empty((rows.chunk, full.shape[1]))
        self.whole.counter.add("reduce_scatter", padded)
        dist.reduce_scatter_single(output=part, input=padded, group=rows.group)
        return part[: rows.rows].div_(rows.world)

    def __rmatmul__(self, other: Tensor) -> Tensor:
        if self.transposed:
            raise ValueError("Y @ G_iᵀ is not used by the row-sharded refresh")
        return self._share(other.T, left=True)  # Y_iᵀ G_i: this rank's share, summed by the caller

    def head_block(self, heads: list[int], head_dim: int) -> Tensor:
        """The chosen heads' rows of ``G`` stacked, the ranks' shares all-reduced (``ShardRows.head_block``)."""
        rows = [j for i in heads for j in range(i * head_dim, (i + 1) * head_dim)]
        block = self.whole._block(rows)
        return self.whole.rows.sum(block).div_(self.whole.rows.world)
