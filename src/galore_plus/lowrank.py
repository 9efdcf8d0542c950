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
- with a residual (``residual_ratio > 0``, after warm-up): ``residual_index`` (flat int32),
  ``residual_m``, ``residual_v`` (one value per index) and ``residual_start`` (``residual.py``).

Low-rank math runs in ``compute_dtype``: float32 for bf16/fp16 parameters, the parameter's own
dtype for float32/float64 ones; low-rank moments are stored in it, and so is the projector unless
the group's ``proj_dtype`` says otherwise (e.g. ``torch.bfloat16``, half the bytes).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import projection, residual
from .options import LOW_RANK_DEFAULTS, as_float, check_common, check_low_rank, check_matrix, is_int, is_real
from .rng import generator_for

#: Keys torch itself or its LR schedulers put on groups; accepted and ignored.
_FOREIGN_KEYS = {"params", "param_names", "initial_lr"}


class LowRankOptimizer(Optimizer):
    """Base class: gradient low-rank projection around an inner update rule.

    Subclasses set ``inner_keys`` (their group keys, e.g. ``betas`` and ``eps``), validate them in
    ``_validate_inner``, and implement ``_inner_step(grad, state, group, lr) -> step`` (and
    ``_low_rank_moments`` if they support residuals, ``_step_lr`` for relative step sizes).

    Args:
        params: parameters or parameter groups (dicts). A group with ``rank`` is low-rank.
        defaults: the optimizer-level defaults of every group (``lr``, ``weight_decay``, inner keys).
        low_rank_defaults: overrides of ``LOW_RANK_DEFAULTS``, filled into low-rank groups only.
        seed: seeds every random draw (SPEC 2.1); a group may override it.
    """

    inner_keys: tuple[str, ...] = ()
    #: rules with a relative step size (Adafactor) accept ``lr=None``
    lr_may_be_none = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        low_rank_defaults: dict[str, Any],
        seed: int = 0,
    ):
        unknown = sorted(set(low_rank_defaults) - set(LOW_RANK_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; low-rank options are "
                            f"{sorted(LOW_RANK_DEFAULTS)}")
        self._low_rank_defaults = {**LOW_RANK_DEFAULTS, **low_rank_defaults}
        self._param_index: dict[int, int] = {}
        #: wall seconds spent computing projectors since construction (for progress reports; not state)
        self.refresh_seconds = 0.0
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
        check_common(group, where, self.lr_may_be_none)
        self._validate_inner(group, where)

    def _validate_inner(self, group: dict[str, Any], where: str) -> None:
        """Subclasses check their own keys here and raise ValueError naming the value."""

    def _validate_low_rank(self, group: dict[str, Any], where: str) -> None:
        check_low_rank(group, where)
        if group["residual_ratio"] > 0 and not {"betas", "eps"} <= set(group):
            raise ValueError(f"{where}: residual_ratio={group['residual_ratio']} needs Adam moments; "
                             f"{type(self).__name__} has none")
        for i, p in enumerate(group["params"]):
            check_matrix(group, p, _param_name(group, i, p), where)

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
        work = [(group, i, p) for group in self.param_groups for i, p in enumerate(group["params"])
                if p.grad is not None]
        for group, i, p in work:
            self._check_gradient(group, p, _param_name(group, i, p))
        for group, _, p in work:
            self._update(group, p, p.grad)
        return loss

    def _check_gradient(self, group: dict[str, Any], p: Tensor, name: str) -> None:
        """Sparse gradients raise ``RuntimeError``; at a projector refresh, a gradient with NaN/Inf
        raises ``FloatingPointError`` (the check costs one sync per refresh, not per step)."""
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name})")
        if "rank" in group and self._refresh_due(group, self.state.get(p, {})):
            if not _all_finite(p.grad):
                raise FloatingPointError(
                    f"the gradient of {name} (shape {tuple(p.shape)}) has NaN or Inf at a projector refresh "
                    f"(step {self.state.get(p, {}).get('step', 0) + 1}); nothing was updated")

    def _update(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        """One step of ``p`` from its full gradient (the ``step()`` path)."""
        if "rank" not in group:
            self._apply_full(group, p, grad)
            return
        self._refresh_if_due(group, p, grad)
        low, grad_s = self._project(p, grad)
        self._apply_low_rank(group, p, low, grad_s)

    # The three pieces below are also driven separately by ``layerwise.LayerwiseOptimizer``: refresh
    # from one micro-batch's full gradient, project every micro-batch and sum, then apply the sum.

    def _refresh_if_due(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> bool:
        """Refresh ``p``'s projector from ``grad`` if the schedule says so; True if it did."""
        state = self.state[p]
        if not self._refresh_due(group, state):
            return False
        self._refresh(group, p, grad, state, state.get("step", 0))
        return True

    def _project(self, p: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        """The low-rank gradient, and the gradient's entries at the residual index set (if any)."""
        state = self.state[p]
        grad = grad.to(compute_dtype(p))
        low = projection.project(grad, *_basis(state, p))
        grad_s = grad.reshape(-1)[state["residual_index"].long()] if "residual_index" in state else None
        return low, grad_s

    def _begin_step(self, group: dict[str, Any], p: Tensor) -> float:
        """Count the step, apply decoupled weight decay (on the full weight, SPEC 1), return the lr."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        lr = self._step_lr(group, state, p)
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        return lr

    def _apply_full(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        """A group without ``rank``: the inner rule on the full gradient."""
        lr = self._begin_step(group, p)
        p.sub_(self._inner_step(grad, self.state[p], group, lr))

    def _apply_low_rank(self, group: dict[str, Any], p: Tensor, low: Tensor, grad_s: Tensor | None) -> None:
        """The inner rule on the low-rank gradient, projected back, residual-corrected, times ``scale``."""
        state = self.state[p]
        refreshed = state["last_refresh"] == state.get("step", 0)  # refreshed before this step
        lr = self._begin_step(group, p)
        left, right = _basis(state, p)
        update = projection.project_back(self._inner_step(low, state, group, lr), left, right)
        if group["residual_ratio"] > 0:
            self._residual(group, state, low, grad_s, update, refreshed, lr)
        p.add_(update.to(p.dtype), alpha=-group["scale"])

    def _residual(
        self, group: dict[str, Any], state: dict[str, Any], low: Tensor, grad_s: Tensor | None, update: Tensor,
        refreshed: bool, lr: float,
    ) -> None:
        """Correct ``update`` (the projected-back step, in place) at the residual index set, and fix
        that set at the end of warm-up (and at each later refresh with ``residual_reselect``).

        The residual moments are kept in the compute dtype whatever the inner rule stores (they are
        ρ-sized); the low-rank moments come from ``_low_rank_moments`` (cast to the compute dtype: an
        8-bit rule dequantizes to float32, and float64 parameters compute in float64)."""
        step, (beta1, beta2), eps = state["step"], group["betas"], group["eps"]
        left, right = _basis(state, update)
        flat_update = self._flat_local(update)
        if "residual_index" in state:
            index = state["residual_index"].long()
            if group["residual_mode"] == "exact":
                since = step - state["residual_start"]
                flat_update[index] = residual.exact_residual(
                    grad_s, state["residual_m"], state["residual_v"], since, beta1, beta2, eps).mul_(lr)
            else:
                ghat_s = self._flat_local(projection.project_back(low, left, right))[index]
                back_v = projection.project_back(self._low_rank_moments(state)[1].to(update.dtype), left, right)
                back_v_s = self._flat_local(back_v)[index]
                delta = residual.paper_residual(
                    grad_s, ghat_s, back_v_s, state["residual_m"], state["residual_v"], step, beta1, beta2, eps)
                flat_update.index_add_(0, index, delta.mul_(lr))
        fix_now = ("residual_index" not in state and step >= group["residual_warmup"]) or (
            "residual_index" in state and refreshed and group["residual_reselect"])
        if fix_now:
            reconstructed = projection.project_back(self._low_rank_moments(state)[0].to(update.dtype), left, right)
            index = self._select_residual(reconstructed, group["residual_ratio"])
            state["residual_index"] = index
            state["residual_m"] = torch.zeros(index.numel(), dtype=flat_update.dtype, device=flat_update.device)
            state["residual_v"] = torch.zeros_like(state["residual_m"])
            state["residual_start"] = step

    @staticmethod
    def _flat_local(t: Tensor) -> Tensor:
        """``t`` flattened as a view: the residual's indices address it (the distributed optimizer
        overrides this with this rank's shard)."""
        return t.view(-1)

    def _select_residual(self, reconstructed: Tensor, ratio: float) -> Tensor:
        """The residual's flat index set: the top-ρ of ``|P M'|`` (distributed: this rank's part)."""
        return residual.select_indices(reconstructed, ratio)

    def _inner_step(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float) -> Tensor:
        """Update the inner rule's state from ``grad`` and return the step: the parameter (or, for a
        low-rank group, its projection) moves by minus this, before projection back and ``scale``."""
        raise NotImplementedError

    def _step_lr(self, group: dict[str, Any], state: dict[str, Any], p: Tensor) -> float:
        """The learning rate of this update (the group's; relative-step rules compute their own)."""
        return _as_float(group["lr"])

    def _low_rank_moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The first and second low-rank moments ``(M', V')`` in the compute dtype (for residuals)."""
        raise NotImplementedError(f"{type(self).__name__} has no moments for a sparse residual")

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
        side = projection.RIGHT if group["num_heads"] is not None else projection.projection_side(
            p.shape, group["proj_type"])
        start = time.perf_counter()
        basis = self._compute_projector(group, p, grad, state, side)
        self.refresh_seconds += time.perf_counter() - start
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
                state[key] = tensor.to(device=p.device, dtype=group["proj_dtype"] or compute_dtype(p))
        state["last_refresh"] = steps_before
        state["refresh_count"] = state.get("refresh_count", 0) + 1

    def _compute_projector(
        self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], side: int
    ) -> tuple[Tensor | None, Tensor | None] | None:
        """The new ``(left, right)`` basis, or None when it cannot be computed.

        Random draws (the heads of a cross-head projector, the sketch of a randomized one) come from
        a generator that is a pure function of (seed, parameter index, refresh count).
        """
        grad = grad.to(compute_dtype(p))
        rank = group["rank"]
        randomized = group["svd"] == "randomized"
        gen = generator_for(group["seed"], self._param_index[id(p)], state.get("refresh_count", 0))
        warm = None
        if group["warm_start"] and state.get("proj_side") == side:
            warm = _basis(state, p)
        try:
            if group["num_heads"] is not None:
                return projection.cross_head_projector(
                    grad, rank, group["num_heads"], gen, randomized, group["oversample"], group["power_iters"],
                    warm=warm[1] if warm is not None else None)
            if randomized:
                return projection.randomized_projector(
                    grad, rank, side, gen, group["oversample"], group["power_iters"], warm)
        except torch.linalg.LinAlgError:
            return None
        return projection.svd_projector(grad, rank, side)

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


def _basis(state: dict[str, Any], like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The stored ``(left, right)`` projector in the compute dtype of ``like`` (a copy only when it
    is stored in another dtype, see ``proj_dtype``)."""
    dtype = compute_dtype(like)
    return tuple(None if b is None else b.to(dtype) for b in (state.get("proj_left"), state.get("proj_right")))


def _all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN/Inf: one reduction (a NaN/Inf makes the sum non-finite); the
    elementwise check runs only when the sum is not finite (it may have overflowed)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def compute_dtype(p: Tensor) -> torch.dtype:
    """float32 for low-precision parameters, their own dtype for float32/float64 (SPEC 2.1)."""
    return torch.promote_types(p.dtype, torch.float32)


_is_int, _is_real, _as_float = is_int, is_real, as_float


def _param_name(group: dict[str, Any], i: int, p: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    return f"parameter #{i}"
