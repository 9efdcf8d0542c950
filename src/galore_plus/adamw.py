"""``GaLoreAdamW``: AdamW on low-rank projected gradients (GaLore, arXiv 2403.03507; DESIGN.md, "GaLore")."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from .functional import adam_direction
from .lowrank import InnerRule, LowRankOptimizer, moment_steps, register_rule
from .options import LOW_RANK_DEFAULTS, is_real
from .sharding import local
from .spec import RECIPES
from .transport import Rotation, bias_ratio


#: what the fused kernel updates: plain tensors (a DTensor's math goes the unfused way) in these dtypes
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_FUSED_DTYPES = (torch.float32, torch.float64)


@register_rule("adamw")
class AdamWRule(InnerRule):
    """``torch.optim.AdamW``'s update on a (projected or full) gradient: moments ``exp_avg`` and
    ``exp_avg_sq`` in the gradient's dtype (the compute dtype for a projected one)."""

    name = "AdamW"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8}
    has_moments = True
    moment_transports = ("keep", "reset", "project")

    def moment_decay(self, group: dict[str, Any]) -> tuple[float, float, float]:
        beta1, beta2 = group["betas"]
        return beta1, beta2, group["eps"]

    def check(self, group: dict[str, Any], where: str) -> None:
        betas = group["betas"]
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{where}: invalid betas={betas!r}; want two numbers in [0, 1)")
        if not is_real(group["eps"]) or not 0.0 <= group["eps"] < float("inf"):
            raise ValueError(f"{where}: invalid eps={group['eps']!r}; it must be a finite number ≥ 0")

    def direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float) -> Tensor:
        # moments at least float32 (issue 25): a bf16/fp16 plain parameter's gradient comes in its own
        # dtype, where ε = 1e-8 is 0 in fp16 (step 2 divides by 0) and 0.999·v rounds back to v in bf16
        dtype = self.state_dtype("exp_avg", grad.dtype)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=dtype, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        direction, factor = adam_direction(
            grad.to(dtype), state["exp_avg"], state["exp_avg_sq"], moment_steps(state), beta1, beta2, group["eps"])
        return direction.mul_(lr * factor)

    # ------------------------------------------------------------------ plain parameters, fused
    # (DESIGN.md, "Plain parameters: one fused update")
    def fusable(self, target: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
        """Whether torch's fused AdamW kernel takes this plain update: a float32/float64 tensor (no
        rounding to write; not a DTensor) on CPU or CUDA, its gradient dense and alike in dtype,
        device and layout, and the moments (if any yet) likewise."""
        if not (type(target) in _PLAIN_TYPES and type(grad) in _PLAIN_TYPES and target.dtype in _FUSED_DTYPES
                and target.device.type in ("cpu", "cuda") and grad.dtype == target.dtype
                and grad.device == target.device and not grad.is_sparse and target.is_contiguous()
                and grad.is_contiguous()):
            return False
        return all(type(m) in _PLAIN_TYPES and m.dtype == target.dtype and m.device == target.device
                   and m.is_contiguous() for m in (state.get("exp_avg"), state.get("exp_avg_sq")) if m is not None)

    def apply_full(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float, write: Any) -> None:
        if not write.low_precision and self.fusable(write.local, grad, state):
            self.apply_full_fused([write.local], [grad], [state], group, lr)
        else:
            super().apply_full(grad, state, group, lr, write)

    def apply_full_fused(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                         group: dict[str, Any], lr: float) -> None:
        """One AdamW update of each of ``params`` (each ``fusable``; its ``step`` already counted and
        the weight decay already applied), through ``torch.optim.adam.adam(fused=True)`` (torch's functional AdamW): one pass over
        each tensor instead of the unfused path's eight. The same math as ``direction`` + the write up
        to rounding (tested in float64); each tensor is updated on its own, so one call with many
        tensors gives bitwise what one call per tensor gives (the layer-wise mode's), and a resumed run
        repeats an uninterrupted one."""
        for grad, state in zip(grads, states):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        # torch's functional counts the step itself (adds 1 to these) before the kernel reads them
        steps = [torch.tensor(float(moment_steps(s) - 1), device=p.device) for p, s in zip(params, states)]
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            torch_adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
                       fused=True, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                       weight_decay=0.0, eps=group["eps"], maximize=False)

    def state_dtype(self, key: str, grad_dtype: torch.dtype) -> torch.dtype:
        """float32 for bf16/fp16 gradients (DESIGN.md, "Precision"), else the gradient's own dtype."""
        return torch.promote_types(grad_dtype, torch.float32)

    def moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return state["exp_avg"], state["exp_avg_sq"]

    # issue 29, moment transport (DESIGN.md, "Moment transport")
    def reset_moments(self, state: dict[str, Any]) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            state.pop(key, None)

    def transport_moments(self, state: dict[str, Any], group: dict[str, Any], rotation: Rotation) -> None:
        """``M ← R M``, ``V`` by LDAdam's rule (``transport.Rotation``), in place (this process's part)."""
        if "exp_avg" not in state:
            return
        m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
        new_m, new_v = self.transported(m, v, group, moment_steps(state), rotation)
        m.copy_(new_m)
        v.copy_(new_v)

    @staticmethod
    def transported(m: Tensor, v: Tensor, group: dict[str, Any], t: int, rotation: Rotation) -> tuple[Tensor, Tensor]:
        """``(R M, V')`` for moments that have taken ``t`` updates (new tensors)."""
        beta1, beta2 = group["betas"]
        new_m = rotation.first(m)
        return new_m, rotation.second(v, m, new_m, bias_ratio(beta1, beta2, t))

    def state_shapes(self, shape: tuple[int, ...], group: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
        return [{"exp_avg": shape, "exp_avg_sq": shape}]

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 2 * math.prod(shape) * dtype.itemsize


class GaLoreAdamW(LowRankOptimizer):
    r"""AdamW whose moments live in a low-rank subspace of each matrix's gradient: the ``adamw`` rule's
    alias, ``LowRankOptimizer.from_spec(params, LowRankSpec(rank, rule="adamw", ...))`` with
    galore-torch's signature.

    For a group with ``rank``, each 2-D parameter's gradient ``G`` is projected, ``R = Pᵀ G`` (or
    ``G Q``, ``Pᵀ G Q``, by ``proj_type``), Adam runs on ``R`` and the normalised update is projected
    back and multiplied by ``scale``::

        W ← W (1 − lr·λ)                                  (decoupled weight decay, full weight)
        M ← β1 M + (1−β1) R;   V ← β2 V + (1−β2) R²
        W ← W − lr · scale · P [ M̂ / (sqrt(V̂) + ε) ]

    The projector holds the top-``rank`` singular vectors of the gradient, recomputed at the first
    step and then every ``update_proj_gap`` steps (exact SVD, as galore-torch 1.0 computes it); the
    moments are kept as they are when it changes (the paper's behaviour; ``moment_transport="reset"``
    or ``"project"`` drops them or carries them into the new basis, DESIGN.md "Moment transport").
    Groups without ``rank`` are plain ``torch.optim.AdamW``.

    The group keys are galore-torch's (``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` in
    ``std``, ``reverse_std``, ``left``, ``right``, ``full``): switching is a change of import. Where
    galore-torch copied the old Hugging Face AdamW, this follows ``torch.optim.AdamW``: ε is added
    after the bias correction of ``sqrt(V)``, weight decay is applied before the update, and the
    defaults are torch's (ε = 1e-8 and weight_decay = 1e-2, where galore-torch has 1e-6 and 0).

    Low-rank math, moments and projectors are at least float32 (float32 for bf16/fp16 parameters,
    float64 for float64 ones; they are ``r``-sized); plain groups keep torch's moments in the
    parameter's dtype. Unknown group keys raise
    ``TypeError`` (a typo such as ``rnak`` must not silently train full-rank); bad values raise
    ``ValueError``. See ``LowRankOptimizer.step`` for sparse and non-finite gradients, and
    ``LowRankOptimizer.refresh_projector`` for what happens when the SVD falls over.

    Args:
        params: parameters or groups; give the matrices to project a group with ``rank``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        update_proj_gap, scale, proj_type: defaults for the low-rank groups.
        seed: seeds every random draw (fallback projectors; GaLore+ sketches and head choices).
        **low_rank_options: defaults for the other low-rank keys of ``LOW_RANK_DEFAULTS`` (the GaLore+
            options ``svd``, ``oversample``, ``power_iters``, ``warm_start``, ``num_heads``,
            ``residual_ratio``, ``residual_warmup``, ``residual_mode``, ``residual_reselect``).
    """

    rule = AdamWRule()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = AdamWRule.defaults["betas"],
        eps: float = AdamWRule.defaults["eps"],
        weight_decay: float = 1e-2,
        *,
        update_proj_gap: int = LOW_RANK_DEFAULTS["update_proj_gap"],
        scale: float = LOW_RANK_DEFAULTS["scale"],
        proj_type: str = LOW_RANK_DEFAULTS["proj_type"],
        seed: int = 0,
        stochastic_rounding: bool = True,
        **low_rank_options: Any,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        low_rank = {"update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type, **low_rank_options}
        super().__init__(params, defaults, low_rank, seed=seed, stochastic_rounding=stochastic_rounding)


class GaLorePlusAdamW(GaLoreAdamW):
    """GaLoreAdamW with the GaLore+ defaults (arXiv 2412.19820; DESIGN.md, "Options").

    Every low-rank group uses randomized subspace iteration (``svd="randomized"``) unless it says
    otherwise. Cross-head projection and the sparse residual are per-group (``num_heads``,
    ``residual_ratio``): build the paper's groups with ``galore_plus_param_groups``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *args: Any, **kwargs: Any):
        kwargs.setdefault("svd", RECIPES["galore+"]["svd"])
        super().__init__(params, *args, **kwargs)
