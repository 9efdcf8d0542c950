"""Gradient low-rank projection: the pure math, tensors in and tensors out.

Layout is PyTorch's: a ``nn.Linear`` weight ``W`` is ``m×n = [out_features, in_features]``, ``G``
its gradient, ``r`` the rank (SPEC section 1). A projector is a pair ``(left, right)``; either may
be ``None``:

- *left*:  ``P ∈ R^{m×r}`` (stored ``m×r``);   ``R = Pᵀ G`` (``r×n``),   back ``P N``.
- *right*: ``Q ∈ R^{n×r}`` (stored as ``Qᵀ``, ``r×n``, the rows ``Vh[:r]`` of an SVD, the layout
  galore-torch uses);  ``R = G Q`` (``m×r``),   back ``N Qᵀ``.
- *full*:  both;  ``R = Pᵀ G Q`` (``r×r``),   back ``P N Qᵀ``.

The side rule (``projection_side``) is defined here once. Bases are computed in the dtype of the
gradient handed in: callers pass float32 (or float64) gradients, never bf16/fp16.
"""

from __future__ import annotations

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
    """Exact top-``rank`` singular vectors of ``grad`` on ``side``, in ``grad``'s dtype (GaLore, SPEC 1).

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


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``Pᵀ G``, ``G Q`` or ``Pᵀ G Q``: the low-rank gradient."""
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
