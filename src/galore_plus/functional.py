"""Inner update rules as functional kernels: they see tensors and numbers, never param_groups.

Each kernel updates its moment tensors in place and returns ``(direction, step_factor)``: the
parameter moves by ``-lr · step_factor · direction`` (for a low-rank group, after the direction is
projected back and multiplied by ``scale``). The low-rank wrapper in ``lowrank.py`` applies the same
kernel to a full gradient (plain groups) or to a projected one.
"""

from __future__ import annotations

import math

from torch import Tensor


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[Tensor, float]:
    """One Adam moment update, with ``torch.optim.AdamW``'s conventions.

    ``M ← β1 M + (1−β1) G``,  ``V ← β2 V + (1−β2) G²``,
    ``direction = M / (sqrt(V) / sqrt(1−β2^t) + ε)``,  ``step_factor = 1 / (1−β1^t)``.

    ε sits outside the bias-corrected square root as in torch (galore-torch, copying the old Hugging
    Face AdamW, adds it before the correction; the two agree when ε is tiny).
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg / denom, 1.0 / bias_correction1


def adafactor_update(
    grad: Tensor,
    exp_avg_sq_row: Tensor | None,
    exp_avg_sq_col: Tensor | None,
    exp_avg_sq: Tensor | None,
    step: int,
    decay_rate: float,
    eps1: float,
    clip_threshold: float,
) -> Tensor:
    """Adafactor's normalised, clipped update (before the learning rate), ``transformers.Adafactor``'s math.

    ``β2_t = 1 − t^decay_rate``. A 2-D ``grad`` uses the factored statistics: row and column means of
    ``G² + ε₁`` averaged with ``β2_t``, ``V̂ = (row / mean(row)) ⊗ col``; otherwise the full
    ``exp_avg_sq``. ``U = G / sqrt(V̂)``, then ``U / max(1, RMS(U) / clip_threshold)``.
    """
    beta2t = 1.0 - step**decay_rate
    squared = grad * grad + eps1
    if exp_avg_sq_row is not None:
        exp_avg_sq_row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
        exp_avg_sq_col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
        row_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = row_factor * exp_avg_sq_col.unsqueeze(-2).rsqrt()
        update.mul_(grad)
    else:
        exp_avg_sq.mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
        update = exp_avg_sq.rsqrt().mul_(grad)
    rms = update.norm(2) / math.sqrt(update.numel())
    return update.div_((rms / clip_threshold).clamp_(min=1.0))
