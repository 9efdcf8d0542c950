"""``GaLoreAdafactor``: Adafactor on low-rank projected gradients."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .functional import adafactor_update
from .lowrank import InnerRule, LowRankOptimizer, moment_steps, register_rule
from .options import is_real


@register_rule("adafactor")
class AdafactorRule(InnerRule):
    """``transformers.Adafactor``'s update (see ``GaLoreAdafactor``); statistics in the compute dtype
    (float32, float64 for float64 parameters)."""

    name = "Adafactor"
    defaults = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
                "scale_parameter": True, "relative_step": True, "warmup_init": False}
    lr_may_be_none = True
    shards = False
    # "project" is refused: the factored second moment (row and column means) has no per-coordinate
    # form to rotate (DESIGN.md, "Moment transport")
    moment_transports = ("keep", "reset")
    shard_reason = ("its factored second moment needs column means over all rows of a sharded matrix, an all-reduce "
                    "per step that is not implemented; use it under DDP, or GaLoreAdamW / GaLoreAdamW8bit under FSDP2")

    def check(self, group: dict[str, Any], where: str) -> None:
        if group["relative_step"] and "initial_lr" in group:
            raise ValueError(f"{where}: relative_step=True computes its own step size (lr=None), so an LR scheduler "
                             "has nothing to scale; use relative_step=False with an lr, or no scheduler")
        if group["lr"] is not None and group["relative_step"]:
            raise ValueError(f"{where}: lr={group['lr']!r} cannot be combined with relative_step=True "
                             "(set relative_step=False to use a fixed lr)")
        if group["lr"] is None and not group["relative_step"]:
            raise ValueError(f"{where}: lr=None needs relative_step=True")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError(f"{where}: warmup_init=True requires relative_step=True")
        eps = group["eps"]
        if (not isinstance(eps, (tuple, list)) or len(eps) != 2
                or not all(is_real(e) and e >= 0 for e in eps)):
            raise ValueError(f"{where}: invalid eps={eps!r}; want two numbers ≥ 0")
        if not is_real(group["clip_threshold"]) or not group["clip_threshold"] > 0:
            raise ValueError(f"{where}: clip_threshold={group['clip_threshold']!r} must be > 0")
        if not is_real(group["decay_rate"]) or not group["decay_rate"] < 0:
            raise ValueError(f"{where}: decay_rate={group['decay_rate']!r} must be < 0")
        beta1 = group["beta1"]
        if beta1 is not None and (not is_real(beta1) or not 0 <= beta1 < 1):
            raise ValueError(f"{where}: beta1={beta1!r} must be None or in [0, 1)")
        for key in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{where}: {key}={group[key]!r} must be a bool")

    def step_lr(self, group: dict[str, Any], state: dict[str, Any], p: Tensor) -> float:
        step = state["step"]
        rel_step = group["lr"]
        if group["relative_step"]:
            rel_step = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        param_scale = 1.0
        if group["scale_parameter"]:
            rms = (p.float().norm(2) / math.sqrt(p.numel())).item()
            param_scale = max(group["eps"][1], rms)
        return param_scale * float(rel_step)

    def direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float) -> Tensor:
        work = grad.to(torch.promote_types(grad.dtype, torch.float32))
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            if grad.dim() >= 2:
                state["exp_avg_sq_row"] = work.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = work.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(work)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(work)
        update = adafactor_update(
            work, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"), state.get("exp_avg_sq"),
            moment_steps(state), group["decay_rate"], group["eps"][0], group["clip_threshold"])
        update.mul_(lr)
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        return update.to(grad.dtype)

    def reset_moments(self, state: dict[str, Any]) -> None:
        """Drop the statistics: the next step's ``β2_t = 1 − t^decay_rate`` counts ``t`` from the reset,
        so it takes the gradient's statistics whole, as a first step does (the relative step size keeps
        counting the parameter's steps)."""
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
            state.pop(key, None)

    def state_shapes(self, shape: tuple[int, ...], group: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
        second = ({"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]} if len(shape) >= 2
                  else {"exp_avg_sq": shape})
        return [{**second, "exp_avg": shape} if group["beta1"] is not None else second]

    def state_dtype(self, key: str, grad_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(grad_dtype, torch.float32)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        size = torch.promote_types(dtype, torch.float32).itemsize
        numel = math.prod(shape)
        second = (shape[0] + shape[1]) if len(shape) >= 2 else numel
        return (second + (numel if group.get("beta1") is not None else 0)) * size


class GaLoreAdafactor(LowRankOptimizer):
    """Adafactor (Shazeer & Stern 2018) whose statistics live in the low-rank subspace.

    The inner rule is ``transformers.Adafactor``'s, applied to the projected gradient ``R``: the
    second moment of a 2-D ``R`` is factored into row and column statistics (``r + n`` numbers for an
    ``r×n`` ``R``), the update is clipped to RMS ``clip_threshold``, and with ``relative_step`` the
    step size is ``min(1e-2, 1/sqrt(t))`` (or ``1e-6·t`` with ``warmup_init``), times the RMS of the
    full weight with ``scale_parameter``. ``beta1`` adds a first moment. The projected-back update is
    multiplied by ``scale``; weight decay is decoupled, with the step's learning rate. Groups
    without ``rank`` are plain Adafactor (numerically ``transformers.Adafactor``).

    Args mirror ``transformers.Adafactor``: ``lr`` (None with ``relative_step``), ``eps`` (the pair
    ``(ε₁, ε₂)``: added to ``G²`` and the floor of the parameter RMS), ``clip_threshold``,
    ``decay_rate``, ``beta1``, ``weight_decay``, ``scale_parameter``, ``relative_step``,
    ``warmup_init``; plus the low-rank options and ``seed`` of ``GaLoreAdamW``.
    """

    rule = AdafactorRule()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = AdafactorRule.defaults["eps"],
        clip_threshold: float = AdafactorRule.defaults["clip_threshold"],
        decay_rate: float = AdafactorRule.defaults["decay_rate"],
        beta1: float | None = AdafactorRule.defaults["beta1"],
        weight_decay: float = 0.0,
        scale_parameter: bool = AdafactorRule.defaults["scale_parameter"],
        relative_step: bool = AdafactorRule.defaults["relative_step"],
        warmup_init: bool = AdafactorRule.defaults["warmup_init"],
        *,
        seed: int = 0,
        stochastic_rounding: bool = True,
        **low_rank_options: Any,
    ):
        defaults = {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "warmup_init": warmup_init}
        super().__init__(params, defaults, low_rank_options, seed=seed, stochastic_rounding=stochastic_rounding)
