"""Gradient low-rank projection: the pure math, tensors in and tensors out.

Layout is PyTorch's: a ``nn.Linear`` weight ``W`` is ``m×n = [out_features, in_features]``, ``G``
its gradient, ``r`` the rank (DESIGN.md, "Notation"). A projector is a pair ``(left, right)``; either may
be ``None``:

- *left*:  ``P ∈ R^{m×r}`` (stored ``m×r``);   ``R = Pᵀ G`` (``r×n``),   back ``P N``.
- *right*: ``Q ∈ R^{n×r}`` (stored as ``Qᵀ``, ``r×n``, the rows ``Vh[:r]`` of an SVD, the layout
  galore-torch uses);  ``R = G Q`` (``m×r``),   back ``N Qᵀ``.
- *full*:  both;  ``R = Pᵀ G Q`` (``r×r``),   back ``P N Qᵀ``.

The side rule (``projection_side``) is defined here once. Bases are computed in the dtype of the
gradient handed in: callers pass float32 (or float64) gradients, never bf16/fp16.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

LEFT, RIGHT, FULL = 0, 1, 2
SIDE_NAMES = {LEFT: "left", RIGHT: "right", FULL: "full"}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def projection_side(shape: tuple[int, int] | torch.Size, proj_type: str) -> int:
    """Which side of an ``m×n`` matrix ``proj_type`` projects: LEFT, RIGHT or FULL.

    ``std`` projects the smaller side (right when ``m ≥ n``, so the state is ``m×r``), ``reverse_std``
    the larger one, ``left``/``right``/``full`` are fixed. Ties (``m == n``) go as galore-torch 1.0.
    """
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type == "left":
        return LEFT
    if proj_type == "right":
        return RIGHT
    if proj_type == "full":
        return FULL
    raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}")


def max_rank(shape: tuple[int, int] | torch.Size) -> int:
    """The largest rank an ``m×n`` gradient has, so the largest a projector of it can take."""
    return min(shape)


#: ``rank="full"``: every matrix at its own ``min(m, n)`` (issue 29 item 6; DESIGN.md, "Options", rank)
FULL_RANK = "full"


def resolve_rank(rank: int | float | str, shape: tuple[int, int] | torch.Size) -> int:
    """The rank a group's ``rank`` gives an ``m×n`` matrix; the one place it is resolved.

    An int is itself (a check elsewhere refuses one above ``min(m, n)``); ``"full"`` is
    ``min(m, n)``; a float fraction ``f`` in (0, 1] is ``f·min(m, n)`` rounded half up, at least 1.
    Per matrix, because one int cannot fit a model's matrices of different widths (SmolLM2's 192×576
    ``k_proj`` refuses any rank above 192 that its 576×576 ``q_proj`` could take). Half up rather than
    Python's ``round`` (half to even), so ``0.5`` of 5 is 3 as one would write it by hand.
    """
    if isinstance(rank, str):  # only "full" passes spec.check_group_values
        return max_rank(shape)
    if isinstance(rank, float):
        return max(1, math.floor(rank * max_rank(shape) + 0.5))
    return rank


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """Thin SVD's ``(U, Vh)`` of a matrix, or None when every attempt falls over.

    LAPACK/cuSOLVER can fail to converge on ill-conditioned input (galore-torch issue 58) or return
    non-finite factors. We retry once in float64 (with the QR-based ``gesvd`` driver on CUDA, which
    converges where the default Jacobi one does not) before giving up.
    """
    attempts = [(matrix, None)]
    attempts.append((matrix.double(), "gesvd" if matrix.is_cuda else None))
    for attempt, driver in attempts:
        try:
            U, _, Vh = torch.linalg.svd(attempt, full_matrices=False, driver=driver)
        except (torch.linalg.LinAlgError, RuntimeError) as err:  # RuntimeError: cuSOLVER errors
            warnings.warn(f"SVD of a {tuple(matrix.shape)} gradient failed ({err}); retrying", RuntimeWarning)
            continue
        if torch.isfinite(U).all() and torch.isfinite(Vh).all():
            return U.to(matrix.dtype), Vh.to(matrix.dtype)
    return None


def svd_projector(grad: Tensor, rank: int, side: int) -> tuple[Tensor | None, Tensor | None] | None:
    """Exact top-``rank`` singular vectors of ``grad`` on ``side``, in ``grad``'s dtype (DESIGN.md, "Projectors").

    Computed as galore-torch 1.0 does (``torch.linalg.svd`` of the gradient itself: ``U[:, :r]`` for
    a left projection, ``Vh[:r]`` for a right one), so the signs of the vectors, which GaLore's
    moments depend on across refreshes, agree with it. Returns None if the SVD falls over.
    """
    factors = _svd(grad)
    if factors is None:
        return None
    U, Vh = factors
    left = U[:, :rank].contiguous() if side in (LEFT, FULL) else None
    right = Vh[:rank].contiguous() if side in (RIGHT, FULL) else None
    return left, right


def random_projector(
    shape: tuple[int, int] | torch.Size, rank: int, side: int, generator: torch.Generator
) -> tuple[Tensor | None, Tensor | None]:
    """A random orthonormal projector (QR of a Gaussian), float32 on the CPU; callers cast it.

    The safe path when no projector can be computed from the gradient: it carries no information
    about the gradient but keeps the update well defined and bounded.
    """
    m, n = shape

    def orthonormal(rows: int) -> Tensor:
        gaussian = torch.randn(rows, rank, generator=generator, dtype=torch.float32)
        return torch.linalg.qr(gaussian).Q

    left = orthonormal(m) if side in (LEFT, FULL) else None
    right = orthonormal(n).T.contiguous() if side in (RIGHT, FULL) else None
    return left, right


def orthonormalize(Y: Tensor, rows: RowSharding | None = None) -> Tensor:
    """An orthonormal basis of the columns of a tall ``Y`` (``m×k``, ``k ≤ m``).

    CholeskyQR2: ``Y ← Y L⁻ᵀ`` with ``L Lᵀ = Yᵀ Y``, twice (the second pass restores orthogonality
    lost to the squared condition number of the first). Only matrix products and a triangular
    solve, so it runs at BLAS-3 speed; LAPACK's Householder QR of the same 4096×136 block is several
    times slower on CPU. Falls back to Householder QR when ``Yᵀ Y`` is not numerically positive
    definite (a rank-deficient or very ill-conditioned ``Y``).

    ``rows``: ``Y``'s rows are sharded across ranks (FSDP2, DESIGN.md "Distributed"); ``Yᵀ Y`` is then the all-reduced
    sum of the shards' ``k×k`` Gram matrices and the result is this rank's rows of the basis. The
    Householder fallback gathers the thin ``m×k`` ``Y`` (never a gradient).
    """
    Q = Y
    for _ in range(2):
        gram = Q.T @ Q
        L, info = torch.linalg.cholesky_ex(gram if rows is None else rows.sum(gram))
        if info.item() != 0:
            if rows is not None:
                return rows.local(torch.linalg.qr(rows.gather(Y)).Q)
            return torch.linalg.qr(Y).Q
        Q = torch.linalg.solve_triangular(L.T, Q, upper=True, left=False)
    return Q


def randomized_svd(
    matrix: Tensor,
    rank: int,
    generator: torch.Generator,
    oversample: int = 8,
    power_iters: int = 2,
    start: Tensor | None = None,
    rows: RowSharding | None = None,
) -> tuple[Tensor, Tensor]:
    """Approximate top-``rank`` singular vectors ``(U_r, Vh_r)`` by randomized subspace iteration.

    Halko, Martinsson & Tropp 2011, Algorithm 4.4 (DESIGN.md, "Projectors"), for ``A = matrix`` (``m×n``)::

        Ω ~ N(0, 1)^{n×k}, k = rank + oversample     (first columns = ``start`` when warm-starting)
        Y = orth(A Ω)
        repeat power_iters:  Z = orth(Aᵀ Y);  Y = orth(A Z)
        B = Yᵀ A  (k×n);  B = Ũ Σ Vh  (small SVD);  U_r = Y Ũ[:, :r],  Vh_r = Vh[:r]

    Re-orthonormalising after every product keeps the small singular values from drowning in
    rounding (4.4 rather than 4.3); ``2q + 2`` products of ``A`` in all. Ω is drawn on the CPU from ``generator`` and moved, so every device and every rank gets the same numbers.
    ``start`` (``n×j``, j ≤ k) replaces the first columns of Ω: passing the previous right basis
    starts the iteration from the old subspace. Computed in ``matrix``'s dtype (float32 or
    float64). ``k`` is capped at min(m, n).

    ``rows``: ``matrix`` is this rank's row shard of ``A`` (FSDP2, DESIGN.md "Distributed"). Every product with ``A``
    on the left is local (``A Ω``, ``A Z`` are row-sharded like ``A``), every product with ``Aᵀ`` is a
    sum over shards, all-reduced: ``Aᵀ Y`` (``n×k``), ``Yᵀ A`` (``k×n``) and the ``k×k`` Gram matrices
    of the orthonormalisations. ``U_r`` is then this rank's rows; ``Vh_r`` is the same on every rank.
    """
    m, n = matrix.shape if rows is None else (rows.global_rows, matrix.shape[1])
    k = min(rank + oversample, m, n)
    total = (lambda x: x) if rows is None else rows.sum
    omega = torch.randn(n, k, generator=generator, dtype=torch.float32).to(device=matrix.device, dtype=matrix.dtype)
    if start is not None:
        j = min(start.shape[1], k)
        omega[:, :j] = start[:, :j].to(omega.dtype)
    Y = orthonormalize(matrix @ omega, rows)
    for _ in range(power_iters):
        Z = orthonormalize(total(matrix.T @ Y))
        Y = orthonormalize(matrix @ Z, rows)
    small = _svd(total(Y.T @ matrix))
    if small is None:
        raise torch.linalg.LinAlgError("SVD of the sketched matrix failed")
    U_small, Vh = small
    return (Y @ U_small[:, :rank]).contiguous(), Vh[:rank].contiguous()


def randomized_projector(
    grad: Tensor,
    rank: int,
    side: int,
    generator: torch.Generator,
    oversample: int = 8,
    power_iters: int = 2,
    warm: tuple[Tensor | None, Tensor | None] | None = None,
    rows: RowSharding | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The projector of ``side`` from ``randomized_svd`` (GaLore+; DESIGN.md, "Projectors").

    ``warm`` is the previous ``(left, right)`` projector: its right basis seeds Ω directly, a left
    basis ``P`` through ``Gᵀ P`` (its image in the row space). With ``rows`` (``grad`` and a left
    basis are this rank's row shards) the left basis returned is this rank's rows.
    """
    start = None
    if warm is not None:
        left, right = warm
        if right is not None:
            start = right.T
        elif left is not None:
            start = grad.T @ left.to(grad.dtype)
            start = start if rows is None else rows.sum(start)
    U, Vh = randomized_svd(grad, rank, generator, oversample, power_iters, start, rows)
    return (U if side in (LEFT, FULL) else None), (Vh if side in (RIGHT, FULL) else None)


def heads_needed(rank: int, head_dim: int) -> int:
    """One head's row block has rank ≤ head_dim, so a rank-r projector needs ⌈r / head_dim⌉ heads."""
    return -(-rank // head_dim)


def choose_heads(num_heads: int, rank: int, head_dim: int, generator: torch.Generator,
                 eligible: list[int] | None = None) -> list[int]:
    """⌈r/d_k⌉ distinct heads drawn uniformly at random from ``generator`` (DESIGN.md, "Projectors"), sorted.

    ``eligible``: the head blocks the draw is made from (a fused q/k/v matrix's q and k blocks; see
    ``cross_head_projector``), or None for all ``num_heads``. The draw is one ``randperm`` of the
    candidates, so with ``eligible=None`` it is the same as ever (and resumes bitwise)."""
    count = heads_needed(rank, head_dim)
    candidates = num_heads if eligible is None else len(eligible)
    if count > candidates:
        raise ValueError(f"rank={rank} needs {count} heads of {head_dim} rows but the matrix has {candidates}"
                         + ("" if eligible is None else " eligible"))
    drawn = torch.randperm(candidates, generator=generator)[:count].tolist()
    return sorted(drawn if eligible is None else (eligible[i] for i in drawn))


def cross_head_side(dim: int) -> int:
    """The side of a cross-head projector whose head blocks lie along ``dim``: row blocks (0) share a
    right basis, column blocks (1, a transposed layout such as GPT-2's ``Conv1D``) a left one."""
    return RIGHT if dim == 0 else LEFT


def head_rows(grad: Tensor | FactoredGradient, num_heads: int, heads: list[int]) -> Tensor | FactoredGradient:
    """The row blocks of ``heads`` stacked: head ``i`` owns rows ``[i·d_k, (i+1)·d_k)`` (of a
    ``FactoredGradient``: the factored block, ``dy``'s columns of those rows)."""
    head_dim = grad.shape[0] // num_heads
    if isinstance(grad, FactoredGradient):
        return grad.row_block([j for i in heads for j in range(i * head_dim, (i + 1) * head_dim)])
    return torch.cat([grad[i * head_dim:(i + 1) * head_dim] for i in heads], dim=0)


def cross_head_projector(
    grad: Tensor,
    rank: int,
    num_heads: int,
    generator: torch.Generator,
    randomized: bool = False,
    oversample: int = 8,
    power_iters: int = 2,
    warm: Tensor | None = None,
    *,
    eligible: list[int] | None = None,
    dim: int = 0,
) -> tuple[Tensor | None, Tensor | None]:
    """A projector shared by all heads, from randomly chosen heads' blocks (GaLore+; DESIGN.md, "Projectors").

    The paper's ``P_i`` spans the ``d_model`` side of head ``i``'s gradient: in PyTorch layout the
    top-``rank`` right singular vectors of the head's ``d_k × d_model`` row block. With ``rank > d_k``
    the blocks of ⌈r/d_k⌉ distinct heads are stacked. The SVD then works on a ``d_k × d_model``
    block instead of the whole ``h·d_k × d_model`` matrix. A right projection:
    ``R = G Q`` (``h·d_k × r``), returned as ``(None, Q)``. ``warm`` is the previous right basis (``r×n``).

    ``eligible``: the blocks the heads are drawn from, None for all. A fused q/k/v matrix is cut
    into ``num_heads`` blocks of ``d_k`` (its q, k and v heads, in the model's order) and the draw is
    made among its q and k blocks only, so a value block never stands in for them; the basis is then
    used for the whole matrix, v rows included, as a q/k matrix's is (``integration.find_targets``
    gives the layouts). ``dim=1``: the blocks are *columns* (a transposed weight, ``in × out``, such
    as GPT-2's ``Conv1D`` ``c_attn``): the basis is the top-``rank`` left singular vectors of the
    chosen column blocks side by side, a left projection ``R = Pᵀ G`` returned as ``(P, None)``, and
    ``warm`` is the previous left basis (``m×r``).

    With ``randomized`` the block is sketched only when the sketch is at most half the block's
    smaller side; otherwise (the usual case: a ``d_k``-row block with ``r`` near ``d_k``) the exact
    SVD of the small block is both cheaper and exact (measured: 0.05 s vs 0.5 s for 128×4096, r=128).
    """
    if dim not in (0, 1):
        raise ValueError(f"dim={dim!r} must be 0 (row blocks) or 1 (column blocks)")
    size = grad.shape[dim]
    if size % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the {size} {'rows' if dim == 0 else 'columns'} "
                         "of the matrix")
    heads = choose_heads(num_heads, rank, size // num_heads, generator, eligible)
    if dim == 0:
        block = head_rows(grad, num_heads, heads)
        return head_block_projector(block, rank, generator, randomized, oversample, power_iters, warm)
    # column blocks: the same computation on the transpose (its rows are the columns), whose right
    # basis is the left basis of the chosen columns
    block = head_rows(grad.T, num_heads, heads)
    _, right = head_block_projector(block, rank, generator, randomized, oversample, power_iters,
                                    None if warm is None else warm.T)
    return right.T.contiguous(), None


def head_block_projector(
    block: Tensor,
    rank: int,
    generator: torch.Generator,
    randomized: bool = False,
    oversample: int = 8,
    power_iters: int = 2,
    warm: Tensor | None = None,
) -> tuple[None, Tensor]:
    """The cross-head right projector from the chosen heads' stacked rows (``cross_head_projector``
    after the heads are drawn from ``generator``; the distributed code gathers the block itself)."""
    if rank > min(block.shape):
        raise ValueError(f"rank={rank} exceeds the rank {min(block.shape)} of the stacked head rows "
                         f"{tuple(block.shape)}")
    if randomized and rank + oversample <= min(block.shape) // 2:
        start = warm.T if warm is not None else None
        return None, randomized_svd(block, rank, generator, oversample, power_iters, start)[1]
    factors = _svd(block.dense() if isinstance(block, FactoredGradient) else block)  # |heads|·d_k × n: small
    if factors is None:
        raise torch.linalg.LinAlgError(f"SVD of the {tuple(block.shape)} head block failed")
    return None, factors[1][:rank].contiguous()


class RowSharding:
    """How a row-sharded matrix's collectives are done (FSDP2 ``Shard(0)``; ``distributed.py``).

    ``global_rows``: rows of the whole matrix; ``rank``, ``world``: this rank's place (ranks hold
    consecutive row blocks in rank order) and the number of ranks; ``sum(t)``: the all-reduced sum
    over ranks of a small replicated-shape tensor; ``gather(t)``: all ranks' row shards stacked (used
    only for thin ``m×k`` bases); ``local(t)``: this rank's rows of a whole ``m×…`` tensor.
    """

    global_rows: int
    rank: int
    world: int

    def sum(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def gather(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def local(self, t: Tensor) -> Tensor:
        raise NotImplementedError


def project(grad: Tensor | FactoredGradient, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``Pᵀ G``, ``G Q`` or ``Pᵀ G Q``: the low-rank gradient."""
    if isinstance(grad, FactoredGradient):
        return grad.project(left, right)
    out = grad
    if left is not None:
        out = left.T @ out
    if right is not None:
        out = out @ right.T
    return out


def project_back(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``P N``, ``N Qᵀ`` or ``P N Qᵀ``: a low-rank update mapped back to the weight's shape."""
    out = low
    if left is not None:
        out = left @ out
    if right is not None:
        out = out @ right
    return out


def back_factors(low: Tensor, left: Tensor | None, right: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``a @ b = project_back(low, left, right)``: ``(N, Qᵀ)``, ``(P, N)`` or
    ``(P, N Qᵀ)``, so the update can be added to the weight in one ``addmm_``."""
    if left is None:
        return low, right
    if right is None:
        return left, low
    return left, low @ right


def project_back_at(low: Tensor, left: Tensor | None, right: Tensor | None, index: Tensor, n: int) -> Tensor:
    """``project_back(low, left, right)`` flattened, at the flat ``index`` only (``n`` columns):
    ``|index|·r`` work instead of ``m·n·r``."""
    a, b = back_factors(low, left, right)
    # ``bᵀ`` made contiguous (``n×r``) before its rows are gathered: a gather from the transposed view
    # took 1.7× as long (issue 26, one thread, 3146 entries of 512×512 at r 32); the same values
    return (a.index_select(0, index // n) * b.T.contiguous().index_select(0, index % n)).sum(1)


# ---------------------------------------------------------------------------------------------------
# Canonical signs (issue 29 item 5; DESIGN.md, "Projectors", signs): off by default, galore-torch
# parity keeps the SVD's own signs.


def canonical_signs(basis: Tensor, rows: RowSharding | None = None) -> Tensor:
    """``basis`` (``m×r``, one vector per column) with each column's sign fixed: its entry of largest
    magnitude is made positive (the first such entry in row order on an exact tie; an all-zero column
    is left as it is), i.e. ``basis · diag(s)``, ``s_j = −1`` where that entry is negative, else 1.

    A singular vector is defined up to sign, and LAPACK's choice jumps under a 1e-16 change of the
    input; this rule depends only on the vector, so two computations that agree up to rounding and
    sign agree up to rounding. It moves only where two entries of opposite sign tie in magnitude to
    within rounding (any rule that depends continuously on the vector has such a set: ``v`` and ``−v``
    must map to the same vector). The largest entry (sklearn's ``svd_flip``) rather than, say, the
    sign of the sum: a sum of many entries of both signs is often near 0 for a vector orthogonal to
    others, the largest entry stands out. Negation is exact, so the vectors are otherwise unchanged
    bit for bit.

    ``rows``: ``basis`` is this rank's rows of a row-sharded basis (FSDP2); the entry is chosen over
    the whole column (each rank's candidates all-reduced as a ``world×r`` table, lowest rank first on
    ties), so every rank flips the same columns and the result is the unsharded one's rows.
    """
    r = basis.shape[1]
    if basis.shape[0]:
        anchor = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))[0]  # argmax: first index on ties
    else:  # an empty shard proposes zeros, which never win over an entry of its column
        anchor = basis.new_zeros(r)
    if rows is not None:
        table = basis.new_zeros(rows.world, r)
        table[rows.rank] = anchor
        table = rows.sum(table)  # one candidate per rank: x + 0 is exact, so the sum is the table itself
        anchor = table.gather(0, table.abs().argmax(dim=0, keepdim=True))[0]
    return basis * torch.where(anchor < 0, -1.0, 1.0).to(basis.dtype)


def canonical_projector(left: Tensor | None, right: Tensor | None,
                        rows: RowSharding | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(left, right)`` with canonical signs (``canonical_signs``): a left basis's columns, a right
    basis's rows (``Qᵀ``, the vectors of ``Vh[:r]``), each vector on its own (a full projector's pairs
    ``u_i``, ``v_i`` need not flip together: ``Pᵀ G Q`` with any signs is a valid projection).
    ``rows``: ``left`` is this rank's rows of a row-sharded basis; a right basis is whole on every rank."""
    return (None if left is None else canonical_signs(left, rows),
            None if right is None else canonical_signs(right.T).T.contiguous())


# ---------------------------------------------------------------------------------------------------
# A weight gradient kept as its factors (issue 26; DESIGN.md, "Projected backward", refresh without
# the full gradient).

#: at most this many ``tokens × indices`` products at a time when computing entries of ``G``
RESIDUAL_CHUNK_ELEMENTS = 2**22


class TokenRows:
    """``S`` (``tokens×vocab``), the one-hot matrix of an embedding lookup's token ids (``S[t, ids[t]] = 1``),
    never formed: the lookup's weight gradient is ``G = Sᵀ D`` (``D``: ``tokens×n``, the lookup's output
    gradient), so a lookup is a ``FactoredGradient`` pair ``(x = D, dy = S)`` (issue 26; DESIGN.md,
    "Projected backward", a tied embedding refreshed from factors). Its products are cheap:
    ``S M = M[ids]`` (``rows``) and ``Sᵀ A`` = the rows of ``A`` added at ``ids`` (``scatter``, an
    ``index_add_`` into ``vocab×k``). ``numel()`` counts what it holds (the ids), for the factors' cap."""

    def __init__(self, ids: Tensor, vocab: int, dtype: torch.dtype):
        self.ids, self.vocab, self.dtype = ids.reshape(-1).long(), vocab, dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.ids.numel(), self.vocab))

    def numel(self) -> int:
        return self.ids.numel()

    def to(self, dtype: torch.dtype) -> TokenRows:
        return self if dtype == self.dtype else TokenRows(self.ids, self.vocab, dtype)

    def rows(self, M: Tensor) -> Tensor:
        """``S M`` (``M``: ``vocab×k``): the rows of the ids."""
        return M.index_select(0, self.ids)

    def scatter(self, A: Tensor, into: Tensor | None = None) -> Tensor:
        """``Sᵀ A`` (``A``: ``tokens×k``): each token's row added at its id (into ``into`` in place if given)."""
        out = A.new_zeros(self.vocab, A.shape[1]) if into is None else into
        return out.index_add_(0, self.ids, A)

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        """``S``'s columns ``index`` (``dim`` 1), formed (``tokens×|index|``): a row block of ``G`` (small)."""
        if dim != 1:
            raise ValueError("TokenRows selects columns only")
        return (self.ids.unsqueeze(1) == index.to(self.ids.device).unsqueeze(0)).to(self.dtype)


def _times(t: Tensor | TokenRows, M: Tensor) -> Tensor:
    """``t @ M`` for a factor ``t`` (a tensor or ``TokenRows``)."""
    return t.rows(M) if isinstance(t, TokenRows) else t @ M


def _t_times(t: Tensor | TokenRows, A: Tensor) -> Tensor:
    """``tᵀ @ A`` for a factor ``t`` (a tensor or ``TokenRows``)."""
    return t.scatter(A) if isinstance(t, TokenRows) else t.T @ A


def lookup_entries(ids: Tensor, grad_rows: Tensor, index: Tensor, n: int) -> Tensor:
    """``G = onehot(ids)ᵀ grad_rows`` flattened (row-major, ``n`` columns) at the flat ``index``: the rows
    of equal ids summed once, then read at the index set's rows present (0 at absent ones)."""
    index = index.long()
    rows_at, cols_at = index.div(n, rounding_mode="floor"), index % n
    unique, inverse = torch.unique(ids, return_inverse=True)
    summed = grad_rows.new_zeros(unique.numel(), n).index_add_(0, inverse, grad_rows)
    where = torch.searchsorted(unique, rows_at).clamp_max(unique.numel() - 1)
    return torch.where(unique[where] == rows_at, summed[where, cols_at], summed.new_zeros(()))


class FactoredGradient:
    """A linear layer's weight gradient ``G = Σ_b dy_bᵀ x_b`` (``m×n``) kept as its factors: the
    inputs ``x_b`` (``tokens×n``) and output gradients ``dy_b`` (``tokens×m``) of the micro-batches
    ``b`` summed into it. It is never formed: it offers what the range finder, the cross-head block,
    the projection and the residual need of ``G``, each as thin products (``tokens·k·(m+n)``
    multiply-adds for ``k`` columns instead of ``tokens·m·n`` and an ``m×n`` tensor):

    - ``G @ M = Σ dyᵀ (x M)``, ``Y @ G = Σ (dy Yᵀ)ᵀ x`` (``Y``: ``k×m``), and ``.T`` (``Gᵀ``) with
      the roles of ``x`` and ``dy`` swapped, so ``randomized_svd`` runs on it unchanged;
    - ``row_block(rows)``: ``G``'s rows ``rows`` as a ``FactoredGradient`` (``dy``'s columns), and
      ``dense()`` to form a block that small (the cross-head block);
    - ``project(left, right)``, ``entries(index)``: the projected gradient and ``G`` at a flat index
      set (``G[i, j] = dyᵀ[i]·xᵀ[j]``, chunked);
    - ``shape``, ``dtype``, ``device``, ``to(dtype)``, ``all_finite()``.

    A pair's ``dy`` may be a ``TokenRows`` (an embedding lookup's ``G = Sᵀ D``, ``x = D``): every
    product above then takes rows of ``S`` or adds at them (``S M = M[ids]``, ``Sᵀ A`` by ``index_add_``).

    Sums over micro-batches are taken in their order (``add_``), so one micro-batch computes exactly
    what the projected backward computes between refreshes."""

    is_sparse = False

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], transposed: bool = False):
        if not pairs:
            raise ValueError("a FactoredGradient needs at least one (x, dy) pair")
        self.pairs = list(pairs)
        self.transposed = transposed

    @classmethod
    def of(cls, x: Tensor, dy: Tensor) -> FactoredGradient:
        """``dyᵀ x`` of one micro-batch (``x``: ``tokens×n``, ``dy``: ``tokens×m``)."""
        return cls([(x, dy)])

    @property
    def shape(self) -> torch.Size:
        x, dy = self.pairs[0]
        m, n = dy.shape[1], x.shape[1]
        return torch.Size((n, m) if self.transposed else (m, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.pairs[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.pairs[0][0].device

    def numel(self) -> int:
        m, n = self.shape
        return m * n

    @property
    def T(self) -> FactoredGradient:
        return FactoredGradient(self.pairs, not self.transposed)

    def to(self, dtype: torch.dtype) -> FactoredGradient:
        if all(x.dtype == dtype and dy.dtype == dtype for x, dy in self.pairs):
            return self
        return FactoredGradient([(x.to(dtype), dy.to(dtype)) for x, dy in self.pairs], self.transposed)

    def add_(self, other: FactoredGradient) -> FactoredGradient:
        """Add another micro-batch's gradient (its factors are kept, nothing is summed yet)."""
        if other.transposed != self.transposed or other.shape != self.shape:
            raise ValueError(f"cannot add a {tuple(other.shape)} factored gradient to a {tuple(self.shape)} one")
        self.pairs.extend(other.pairs)
        return self

    def _factors(self) -> list[tuple[Tensor, Tensor]]:
        """``(a, b)`` per micro-batch with this matrix ``= Σ bᵀ a`` (``(x, dy)``, or ``(dy, x)`` for ``Gᵀ``)."""
        return [(dy, x) for x, dy in self.pairs] if self.transposed else self.pairs

    @staticmethod
    def _sum(parts) -> Tensor:
        total = None
        for part in parts:
            total = part if total is None else total.add_(part)
        return total

    def __matmul__(self, other: Tensor) -> Tensor:
        """``A @ M`` = ``Σ bᵀ (a M)``."""
        return self._sum(_t_times(b, _times(a, other)) for a, b in self._factors())

    def __rmatmul__(self, other: Tensor) -> Tensor:
        """``Y @ A`` = ``Σ (b Yᵀ)ᵀ a`` (``(aᵀ (b Yᵀ))ᵀ`` where ``a`` is a ``TokenRows``)."""
        return self._sum(a.scatter(_times(b, other.T)).T if isinstance(a, TokenRows) else _times(b, other.T).T @ a
                         for a, b in self._factors())

    def row_block(self, rows: list[int]) -> FactoredGradient:
        """The rows ``rows`` of ``G`` (in that order) as a factored gradient."""
        if self.transposed:
            raise ValueError("row_block of a transposed factored gradient")
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return FactoredGradient([(x, dy.index_select(1, index)) for x, dy in self.pairs])

    def dense(self) -> Tensor:
        """``G`` itself: for blocks that are small (a cross-head block), or where the factors have grown
        larger than ``G`` (the projected backward's cap); the micro-batches summed in place, in order."""
        total = None
        for a, b in self._factors():
            if isinstance(b, TokenRows):  # a lookup: its rows added at the ids
                total = b.scatter(a, total)
            elif isinstance(a, TokenRows):  # a lookup in Gᵀ
                part = a.scatter(b).T
                total = part if total is None else total.add_(part)
            else:
                total = b.T @ a if total is None else total.addmm_(b.T, a)
        return total

    def project(self, left: Tensor | None, right: Tensor | None) -> Tensor:
        """``Pᵀ G = Σ (dy P)ᵀ x``, ``G Q = Σ dyᵀ (x Q)`` or ``Pᵀ G Q = Σ (dy P)ᵀ (x Q)``."""
        if self.transposed:
            raise ValueError("project a transposed factored gradient")
        def one(x: Tensor, dy: Tensor | TokenRows) -> Tensor:
            x = x if right is None else x @ right.T
            if isinstance(dy, TokenRows):  # Sᵀ(x Q) by index_add_, or P[ids]ᵀ (x Q)
                return dy.scatter(x) if left is None else dy.rows(left).T @ x
            return (dy if left is None else dy @ left).T @ x

        return self._sum(one(x, dy) for x, dy in self.pairs)

    def entries(self, index: Tensor) -> Tensor:
        """``G`` flattened (row-major) at the flat ``index``: ``G[i, j] = Σ_t dy[t, i]·x[t, j]``.

        For float32/float64 factors, one sampled product per micro-batch (``torch.sparse.sampled_addmm``,
        SDDMM: ``dyᵀ x`` at a sparse CSR pattern, which holds only the index set's values; issue 26:
        4-10× faster than the gathers below at 128-512 tokens, DESIGN.md "Projected backward"). Other
        dtypes (bf16 under autocast, which that kernel does not take): dot products of rows of the
        transposes (gathering whole rows is 2-4x faster than gathering columns, measured at tokens
        128-1536, 576×576), in chunks that bound the gathered copies. Equal to rounding."""
        if self.transposed:
            raise ValueError("entries of a transposed factored gradient")
        index = index.long()
        if index.numel() == 0:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        lookups = [(x, dy) for x, dy in self.pairs if isinstance(dy, TokenRows)]
        if lookups:  # lookup pairs by their rows of equal ids, the others as below
            n = self.shape[1]
            looked = self._sum(lookup_entries(dy.ids, x, index, n) for x, dy in lookups)
            dense = [(x, dy) for x, dy in self.pairs if not isinstance(dy, TokenRows)]
            return looked if not dense else FactoredGradient(dense).entries(index).add_(looked)
        if self.dtype in (torch.float32, torch.float64):
            return self._sampled_entries(index)
        n = self.shape[1]
        rows, cols = index // n, index % n

        def one(x: Tensor, dy: Tensor) -> Tensor:
            dy_t, x_t = dy.T.contiguous(), x.T.contiguous()
            chunk = max(1, RESIDUAL_CHUNK_ELEMENTS // max(1, x.shape[0]))
            return torch.cat([torch.einsum("kt,kt->k", dy_t.index_select(0, rows[k:k + chunk]),
                                           x_t.index_select(0, cols[k:k + chunk]))
                              for k in range(0, index.numel(), chunk)])

        return self._sum(one(x, dy) for x, dy in self.pairs)

    def _sampled_entries(self, index: Tensor) -> Tensor:
        """``entries`` by ``torch.sparse.sampled_addmm``: the index set as a CSR pattern (sorted by
        row, then column, as CSR requires; the values come back in ``index``'s order)."""
        m, n = self.shape
        order = torch.argsort(index)
        flat = index[order]
        rows = flat.div(n, rounding_mode="floor")
        crow = torch.zeros(m + 1, dtype=torch.long, device=index.device)
        crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernel used is stable since torch 2.0
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, flat - rows * n, torch.zeros(flat.numel(), dtype=self.dtype,
                                                                                 device=index.device),
                                              (m, n), check_invariants=False)
            values = self._sum(torch.sparse.sampled_addmm(pattern, dy.T, x, beta=0.0).values()
                               for x, dy in self.pairs)
        out = torch.empty_like(values)
        out[order] = values
        return out

    def all_finite(self) -> bool:
        """Whether every factor is finite (then ``G`` is, barring overflow; a NaN/Inf factor makes
        ``G`` non-finite wherever it meets a non-zero entry, and the refresh refuses it)."""
        return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
                   for pair in self.pairs for t in pair if isinstance(t, Tensor))  # (TokenRows: ids)

    def held_elements(self) -> int:
        """Elements its factors hold: ``Σ tokens·(m+n)`` over the micro-batches (what the factors' cap
        compares with ``m·n``; DESIGN.md, "Projected backward")."""
        return sum(x.numel() + dy.numel() for x, dy in self.pairs)


class RankFactoredGradient(FactoredGradient):
    """One rank's share ``G_r`` of a gradient averaged across ranks (``distributed_sketch.RankMeanGradient``
    under DDP, ``sharding.FactoredRows`` under FSDP2): its micro-batches' factors and, past the factors'
    cap, a ``dense_part`` that this rank forms once and never sends (``fold_beyond``)."""

    dense_part: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.pairs[0][0].dtype if self.pairs else self.dense_part.dtype

    @property
    def device(self) -> torch.device:
        return self.pairs[0][0].device if self.pairs else self.dense_part.device

    def fold_beyond(self, limit: int) -> None:
        """The factors' cap per rank: once the factors hold more than ``limit`` elements (the target's
        ``m·n``), and from then on (later micro-batches as they come, as on one process), they are summed
        into this rank's dense ``G_r``; the refresh's collectives do not change."""
        if self.dense_part is None and self.held_elements() <= limit:
            return
        dense = self.dense_part
        for x, dy in self.pairs:
            dense = dy.T @ x if dense is None else dense.addmm_(dy.T, x)
        self.pairs, self.dense_part = [], dense

    @staticmethod
    def _plus(part: Tensor | None, dense: Tensor | None) -> Tensor:
        """The factors' product plus the dense part's (either may be absent)."""
        return dense if part is None else part if dense is None else part.add_(dense)
