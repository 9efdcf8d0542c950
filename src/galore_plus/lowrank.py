"""The low-rank optimizer machinery: project → inner rule → project back, with tensor-only state.

``LowRankOptimizer`` owns validation, the projector state and its refresh schedule, the step loop
and state loading; a subclass supplies only the inner rule (a kernel from ``functional.py``) and
its group keys. A parameter group is low-rank when it carries ``rank``; other groups run the inner
rule on the full gradient inside the same optimizer.

State of a low-rank parameter (tensors and Python numbers only, so it loads with
``torch.load(weights_only=True)``):

- ``step``: updates taken; ``refresh_count``: projector refreshes so far (seeds the randomness);
  ``last_refresh``: the ``step`` value at the last refresh.
- ``proj_side``: 0 left, 1 right, 2 full (``projection.py``); ``proj_left`` (``m×r``) and/or
  ``proj_right`` (``r×n``): the basis.
- the inner rule's low-rank moments.

Low-rank math runs in ``compute_dtype``: float32 for bf16/fp16 parameters, the parameter's own
dtype for float32/float64 ones; projector and low-rank moments are stored in it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import projection
from .rng import generator_for

#: Low-rank group keys and their defaults, defined once. T=200 and α=0.25 are GaLore's pre-training
#: settings (galore-torch README); fine-tuning usually wants a larger α (the GaLore+ paper uses 16–128
#: at lr 1e-6).
LOW_RANK_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}

#: Keys torch itself or its LR schedulers put on groups; accepted and ignored.
_FOREIGN_KEYS = {"params", "param_names", "initial_lr"}


class LowRankOptimizer(Optimizer):
    """Base class: gradient low-rank projection around an inner update rule.

    Subclasses set ``inner_keys`` (their group keys, e.g. ``betas`` and ``eps``), validate them in
    ``_validate_inner``, and implement ``_inner_step(grad, state, group) -> (direction, factor)``.

    Args:
        params: parameters or parameter groups (dicts). A group with ``rank`` is low-rank.
        defaults: the optimizer-level defaults of every group (``lr``, ``weight_decay``, inner keys).
        low_rank_defaults: defaults filled into low-rank groups only.
        seed: seeds every random draw (SPEC 2.1); a group may override it.
    """

    inner_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        low_rank_defaults: dict[str, Any],
        seed: int = 0,
    ):
        self._low_rank_defaults = dict(low_rank_defaults)
        self._param_index: dict[int, int] = {}
        defaults = dict(defaults, seed=seed)
        self._validate_common(defaults, where="optimizer defaults")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    @property
    def _allowed_keys(self) -> set[str]:
        return _FOREIGN_KEYS | {"lr", "weight_decay", "seed", "rank"} | set(self.inner_keys) | set(
            self._low_rank_defaults
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = sorted(set(param_group) - self._allowed_keys)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown parameter-group key(s) {unknown}; "
                f"allowed keys are {sorted(self._allowed_keys - {'params'})}"
            )
        if "rank" in param_group:
            for key, value in self._low_rank_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"parameter group {len(self.param_groups) - 1}"
        self._validate_common(group, where)
        if "rank" in group:
            self._validate_low_rank(group, where)
        for p in group["params"]:
            self._param_index[id(p)] = len(self._param_index)

    def _validate_common(self, group: dict[str, Any], where: str) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}: lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
            lr = lr.item()
        if not _is_real(lr) or not lr >= 0.0:
            raise ValueError(f"{where}: invalid learning rate lr={group['lr']!r}; it must be a number ≥ 0")
        wd = group["weight_decay"]
        if not _is_real(wd) or not wd >= 0.0:
            raise ValueError(f"{where}: invalid weight_decay={wd!r}; it must be a number ≥ 0")
        if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
            raise ValueError(f"{where}: seed={group['seed']!r} must be an int")
        self._validate_inner(group, where)

    def _validate_inner(self, group: dict[str, Any], where: str) -> None:
        """Subclasses check their own keys here and raise ValueError naming the value."""

    def _validate_low_rank(self, group: dict[str, Any], where: str) -> None:
        rank = group["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{where}: rank={rank!r} must be an int ≥ 1")
        gap = group["update_proj_gap"]
        if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
            raise ValueError(f"{where}: update_proj_gap={gap!r} must be an int ≥ 1")
        scale = group["scale"]
        if not _is_real(scale) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{where}: scale={scale!r} must be a finite number > 0")
        if group["proj_type"] not in projection.PROJ_TYPES:
            raise ValueError(
                f"{where}: proj_type={group['proj_type']!r} is not one of {projection.PROJ_TYPES}"
            )
        for i, p in enumerate(group["params"]):
            name = _param_name(group, i, p)
            if p.dim() != 2:
                raise ValueError(
                    f"{where}: {name} has shape {tuple(p.shape)}; a low-rank group takes 2-D matrices "
                    "only (put biases, norms and other tensors in a group without 'rank')"
                )
            if rank > projection.max_rank(p.shape):
                raise ValueError(
                    f"{where}: rank={rank} is larger than {name} (shape {tuple(p.shape)}) allows "
                    f"(at most min(m, n) = {projection.max_rank(p.shape)})"
                )

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        Checks come first and change nothing: a sparse gradient raises ``RuntimeError``; a
        non-finite gradient of a low-rank parameter at a projector refresh raises
        ``FloatingPointError`` (no projector is ever computed from NaN/Inf), leaving parameters and
        state as they were, so the caller may skip the batch. Between refreshes non-finite values
        are not checked (that would cost a device sync per parameter per step) and propagate as in
        ``torch.optim.AdamW``; use a ``GradScaler`` or clip for mixed precision.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({_param_name(group, i, p)})")
                work.append((group, i, p))
        for group, i, p in work:
            if "rank" in group and self._refresh_due(group, self.state.get(p, {})):
                if not torch.isfinite(p.grad).all():
                    raise FloatingPointError(
                        f"the gradient of {_param_name(group, i, p)} (shape {tuple(p.shape)}) has NaN "
                        f"or Inf at a projector refresh (step {self.state.get(p, {}).get('step', 0) + 1}); "
                        "nothing was updated"
                    )
        for group, _, p in work:
            self._update(group, p, p.grad)
        return loss

    def _update(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        state = self.state[p]
        steps_before = state.get("step", 0)
        refresh = "rank" in group and self._refresh_due(group, state)
        state["step"] = steps_before + 1
        lr = _as_float(group["lr"])
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])  # decoupled, on the full weight (SPEC 1)
        if "rank" not in group:
            direction, factor = self._inner_step(grad, state, group)
            p.add_(direction, alpha=-lr * factor)
            return
        if refresh:
            self._refresh(group, p, grad, state, steps_before)
        left, right = state.get("proj_left"), state.get("proj_right")
        low = projection.project(grad.to(left.dtype if left is not None else right.dtype), left, right)
        direction, factor = self._inner_step(low, state, group)
        update = projection.project_back(direction, left, right)
        p.add_(update.to(p.dtype), alpha=-lr * factor * group["scale"])

    def _inner_step(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------ projector refresh
    @staticmethod
    def _refresh_due(group: dict[str, Any], state: dict[str, Any]) -> bool:
        """Before the first update, then every ``update_proj_gap`` updates (galore-torch's
        ``iter % T == 0`` with ``iter`` the updates taken so far)."""
        if "proj_side" not in state:
            return True
        return state.get("step", 0) - state["last_refresh"] >= group["update_proj_gap"]

    def _refresh(
        self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], steps_before: int
    ) -> None:
        """Recompute the projector from ``grad``.

        If the SVD falls over even in float64, the previous projector is kept until the next
        scheduled refresh; at the very first refresh, where there is none, a seeded random
        orthonormal basis is used instead. Either way training goes on, with a warning.
        """
        side = projection.projection_side(p.shape, group["proj_type"])
        basis = self._compute_projector(group, p, grad, state, side)
        if basis is None:
            if "proj_side" in state:
                warnings.warn(
                    f"projector refresh failed for a {tuple(p.shape)} parameter at step {state['step']}; "
                    "keeping the previous projector", RuntimeWarning)
                basis = (state.get("proj_left"), state.get("proj_right"))
                side = state["proj_side"]
            else:
                warnings.warn(
                    f"projector refresh failed for a {tuple(p.shape)} parameter at its first step; "
                    "using a seeded random orthonormal projector", RuntimeWarning)
                gen = generator_for(group["seed"], self._param_index[id(p)], state.get("refresh_count", 0))
                basis = projection.random_projector(p.shape, group["rank"], side, gen)
        left, right = basis
        state["proj_side"] = side
        for key, tensor in (("proj_left", left), ("proj_right", right)):
            if tensor is None:
                state.pop(key, None)
            else:
                state[key] = tensor.to(device=p.device, dtype=compute_dtype(p))
        state["last_refresh"] = steps_before
        state["refresh_count"] = state.get("refresh_count", 0) + 1

    def _compute_projector(
        self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], side: int
    ) -> tuple[Tensor | None, Tensor | None] | None:
        """The new ``(left, right)`` basis, or None when it cannot be computed."""
        return projection.svd_projector(grad.to(compute_dtype(p)), group["rank"], side)

    # ------------------------------------------------------------------ state loading
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, then restore the saved dtypes.

        torch casts every floating-point state tensor except ``step`` to its parameter's dtype
        (``_process_value_according_to_param_policy``): with bf16 parameters that would round our
        float32 projectors and low-rank moments (and any integer state) to bf16. Every tensor is
        put back in the dtype it was saved in, on the parameter's device.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)


def compute_dtype(p: Tensor) -> torch.dtype:
    """float32 for low-precision parameters, their own dtype for float32/float64 (SPEC 2.1)."""
    return torch.promote_types(p.dtype, torch.float32)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def _as_float(x: Any) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def _param_name(group: dict[str, Any], i: int, p: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    return f"parameter #{i}"
