"""Layer-wise updates: each parameter steps inside the backward pass, so full gradients never pile up.

``LayerwiseOptimizer`` registers a ``register_post_accumulate_grad_hook`` on every parameter of a
``LowRankOptimizer``. When a parameter's gradient is complete, its hook

- at the first micro-batch of a step where the projector is due, refreshes the projector from
  **that micro-batch's full gradient** (the only full gradient that exists: the others are freed
  as they come);
- projects the gradient, adds it to a low-rank accumulator (plus its entries at the residual index
  set), and frees the full gradient (``p.grad = None``); groups without ``rank`` keep accumulating
  in ``p.grad`` as usual;
- at the last micro-batch (``accumulation_steps`` gradients received) applies the optimizer's
  update to the accumulated gradient.

So at most one full gradient of a low-rank matrix is alive at a time. Without accumulation the
result equals ``optimizer.step()`` exactly (tested); with it, it equals ``step()`` on the summed
gradient except that the projector of a refresh step comes from the first micro-batch's gradient.

What ``step()`` users rely on, and how it works here:

- ``LayerwiseOptimizer`` is itself a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state``
  are the wrapped optimizer's: call ``step()`` once per optimizer step as usual (after the last
  micro-batch's ``backward()``; it closes the step, the updates already happened), so
  ``transformers.Trainer``, accelerate and **LR schedulers** drive it like any optimizer. A
  scheduler steps once per optimizer step (each parameter steps exactly once per
  ``accumulation_steps`` backward passes: no doubled counts).
- **Gradient clipping** cannot see a global norm before the first parameter has already stepped.
  ``clip="parameter"`` clips each parameter's (accumulated, low-rank for low-rank groups) gradient
  to ``max_grad_norm``; ``clip="previous_global"`` scales every gradient of a step by
  ``min(1, max_grad_norm / N)`` with ``N`` the global norm of the previous step's gradients (the first
  step is not clipped; ``step()`` closes each step, and forgetting it raises).
  ``torch.nn.utils.clip_grad_norm_`` after ``backward()`` would see no gradients
  and silently do nothing: ``LayerwiseOptimizer.clip_grad_norm_`` raises to say so.
- **Checkpoints**: ``state_dict()`` is one dict keyed by parameter names (optimizer state, group
  hyper-parameters, accumulators of an unfinished step, clipping norm); ``load_state_dict`` is
  strict: missing and unexpected names raise.
- Non-finite gradients at a refresh raise ``FloatingPointError`` from inside ``backward()``; other
  parameters of that backward may already have stepped.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .lowrank import LowRankOptimizer, _is_int

CLIP_MODES = (None, "parameter", "previous_global")


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Drive ``optimizer``'s per-parameter updates from post-accumulate-grad hooks.

    Args:
        optimizer: a ``LowRankOptimizer`` (``GaLoreAdamW``, ``GaLoreAdamW8bit``, ``GaLoreAdafactor``).
        named_parameters: ``(name, parameter)`` pairs naming every parameter of ``optimizer``
            (``model.named_parameters()``); names key the combined ``state_dict``.
        accumulation_steps: backward passes per optimizer step.
        clip: None, ``"parameter"`` or ``"previous_global"`` (see the module docstring).
        max_grad_norm: the clipping threshold (required with ``clip``).
    """

    def __init__(
        self,
        optimizer: LowRankOptimizer,
        named_parameters: Iterable[tuple[str, Tensor]],
        accumulation_steps: int = 1,
        clip: str | None = None,
        max_grad_norm: float | None = None,
    ):
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"LayerwiseOptimizer needs a galore_plus LowRankOptimizer, got {type(optimizer).__name__}")
        if not _is_int(accumulation_steps) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an int ≥ 1")
        if clip not in CLIP_MODES:
            raise ValueError(f"clip={clip!r} is not one of {CLIP_MODES}")
        if clip is not None and (max_grad_norm is None or not max_grad_norm > 0):
            raise ValueError(f"clip={clip!r} needs max_grad_norm > 0, got {max_grad_norm!r}")
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            from .distributed import layerwise_unsupported_reason

            raise ValueError(layerwise_unsupported_reason())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, dict(optimizer.defaults))
        self.optimizer = optimizer  # from here on param_groups and state are the wrapped optimizer's
        self.accumulation_steps = accumulation_steps
        self.clip, self.max_grad_norm = clip, max_grad_norm
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._group_of = group_of
        self._names: dict[int, str] = {}
        self._params: dict[str, Tensor] = {}
        for name, p in named_parameters:
            if id(p) in group_of:
                self._names[id(p)] = name
                self._params[name] = p
        missing = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in self._names]
        if missing:
            raise ValueError(f"named_parameters does not name {len(missing)} parameter(s) of the optimizer "
                             f"(in groups {sorted(set(missing))})")
        self._received: dict[str, int] = {name: 0 for name in self._params}
        self._low: dict[str, Tensor] = {}
        self._grad_s: dict[str, Tensor] = {}
        self._sq_norm = 0.0           # Σ‖g‖² of the step being accumulated (previous_global)
        self._previous_norm: float | None = None
        self._applied_since_end: set[str] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params.values()]

    # The wrapped optimizer's groups and state, live: its load_state_dict replaces both objects, and an
    # LR scheduler attached to this wrapper must change the groups the updates actually read.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        inner = self.__dict__.get("optimizer")
        return inner.param_groups if inner is not None else self.__dict__["_initial_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:  # torch.optim.Optimizer.__init__ sets it before the wrapped optimizer is known
            self.__dict__["_initial_groups"] = value
        else:
            inner.param_groups = value

    @property
    def state(self) -> Any:
        inner = self.__dict__.get("optimizer")
        return inner.state if inner is not None else self.__dict__["_initial_state"]

    @state.setter
    def state(self, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__["_initial_state"] = value
        else:
            inner.state = value

    def _group_for(self, p: Tensor) -> dict[str, Any]:
        group = self._group_of[id(p)]
        if not any(g is group for g in self.optimizer.param_groups):  # replaced by a load_state_dict
            self._group_of = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
            group = self._group_of[id(p)]
        return group

    # ------------------------------------------------------------------ the hook
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        name = self._names[id(p)]
        group = self._group_for(p)
        opt = self.optimizer
        first = self._received[name] == 0
        if first:
            opt._check_gradient(group, p, f"parameter {name!r}")
        if first and self.clip == "previous_global" and name in self._applied_since_end:
            raise RuntimeError("clip='previous_global' needs step() after each optimizer step's last "
                               "backward(); it was not called, so the clipping norm would be stale")
        self._received[name] += 1
        last = self._received[name] == self.accumulation_steps
        if "rank" in group:
            if first:
                opt._refresh_if_due(group, p, p.grad)
            low, grad_s = opt._project(p, p.grad)
            p.grad = None  # the full gradient is freed here: this is the point of layer-wise mode
            if not first:
                low = low.add_(self._low.pop(name))
                if grad_s is not None:
                    grad_s = grad_s.add_(self._grad_s.pop(name))
            if not last:
                self._low[name] = low
                if grad_s is not None:
                    self._grad_s[name] = grad_s
                return
            factor = self._clip_factor(low)
            if factor != 1.0:
                low.mul_(factor)
                if grad_s is not None:
                    grad_s.mul_(factor)
            opt._apply_low_rank(group, p, low, grad_s)
        else:
            if not last:
                return  # autograd keeps accumulating into p.grad
            grad = p.grad
            factor = self._clip_factor(grad)
            if factor != 1.0:
                grad = grad * factor
            opt._apply_full(group, p, grad)
            p.grad = None
        self._received[name] = 0
        self._applied_since_end.add(name)
        # torch's LR schedulers warn when optimizer.step() was never called; here the step ran in hooks
        opt._opt_called = True  # type: ignore[attr-defined]

    def _clip_factor(self, grad: Tensor) -> float:
        if self.clip is None:
            return 1.0
        norm = grad.float().norm().item()
        if self.clip == "parameter":
            return min(1.0, self.max_grad_norm / (norm + 1e-6))
        self._sq_norm += norm**2
        if self._previous_norm is None:
            return 1.0
        return min(1.0, self.max_grad_norm / (self._previous_norm + 1e-6))

    def step(self, closure: Any = None) -> Any:
        """Close an optimizer step (call it after the last micro-batch's ``backward()``): the
        parameters were already updated by the hooks. With ``clip="previous_global"`` this step's
        global gradient norm becomes the next step's clipping norm (``last_global_norm``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._applied_since_end.clear()
        if self.clip == "previous_global":
            self._previous_norm, self._sq_norm = math.sqrt(self._sq_norm), 0.0
        return loss

    @property
    def last_global_norm(self) -> float | None:
        """The global norm of the last closed step's gradients (``clip="previous_global"`` only)."""
        return self._previous_norm

    def clip_grad_norm_(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "in layer-wise mode each parameter steps inside backward(), so there are no gradients left to "
            "clip afterwards (torch.nn.utils.clip_grad_norm_ would silently clip nothing); construct "
            "LayerwiseOptimizer with clip='parameter' or clip='previous_global' and max_grad_norm instead")

    def remove(self) -> None:
        """Remove the hooks (the optimizer can then be driven by ``step()`` again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """One dict keyed by parameter names: loads with ``torch.load(weights_only=True)``."""
        inner = self.optimizer.state_dict()
        index_to_name = {}
        groups = []
        for saved, group in zip(inner["param_groups"], self.optimizer.param_groups):
            names = [self._names[id(p)] for p in group["params"]]
            index_to_name.update(zip(saved["params"], names))
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": names})
        return {
            "state": {index_to_name[i]: s for i, s in inner["state"].items()},
            "param_groups": groups,
            "received": dict(self._received),
            "low_rank_accumulators": dict(self._low),
            "residual_accumulators": dict(self._grad_s),
            "clip_sq_norm": self._sq_norm,
            "clip_previous_norm": self._previous_norm,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Strict: every name of this optimizer must be in ``state_dict`` and nothing else."""
        saved_names = [n for g in state_dict["param_groups"] for n in g["params"]]
        ours = [self._names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        missing = sorted(set(ours) - set(saved_names))
        unexpected = sorted(set(saved_names) - set(ours))
        if missing or unexpected:
            raise KeyError(f"layer-wise state_dict does not match the parameters: missing {missing}, "
                           f"unexpected {unexpected}")
        for saved, group in zip(state_dict["param_groups"], self.optimizer.param_groups):
            names = [self._names[id(p)] for p in group["params"]]
            if list(saved["params"]) != names:
                raise KeyError(f"parameter groups differ: saved {list(saved['params'])}, here {names}")
        position = {name: i for i, name in enumerate(ours)}
        self.optimizer.load_state_dict({
            "state": {position[n]: s for n, s in state_dict["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state_dict["param_groups"]],
        })
        self._received = {name: int(state_dict["received"].get(name, 0)) for name in self._params}
        self._low = {n: t.to(self._params[n].device) for n, t in state_dict["low_rank_accumulators"].items()}
        self._grad_s = {n: t.to(self._params[n].device) for n, t in state_dict["residual_accumulators"].items()}
        self._sq_norm = float(state_dict["clip_sq_norm"])
        self._previous_norm = state_dict["clip_previous_norm"]
