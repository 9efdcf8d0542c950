"""Layer-wise updates: each parameter steps inside the backward pass, so full gradients never pile up.

``LayerwiseOptimizer`` is a container around one ``LowRankOptimizer`` (torchtitan's
``OptimizersInBackwardContainer`` is the model): it registers a ``register_post_accumulate_grad_hook``
on every parameter, and drives the optimizer through its public per-parameter API
(``lowrank.py``). When a parameter's gradient is complete, its hook

- at the first micro-batch of a step where the projector is due, refreshes the projector from
  **that micro-batch's full gradient** (the only full gradient that exists: the others are freed
  as they come);
- projects the gradient, adds it to a low-rank accumulator (plus its entries at the residual index
  set), and frees the full gradient (``p.grad = None``); groups without ``rank`` keep accumulating
  in ``p.grad`` as usual;
- at the last micro-batch (``accumulation_steps`` gradients received) applies the update.

So at most one full gradient of a low-rank matrix is alive at a time. Without accumulation the
result equals ``optimizer.step()`` exactly (tested); with it, it equals ``step()`` on the summed
gradient except that the projector of a refresh step comes from the first micro-batch's gradient.

What ``step()`` users rely on, and how it works here:

- ``step()`` closes an optimizer step (call it after the step's last ``backward()``): a parameter
  that received fewer than ``accumulation_steps`` gradients in this step (it took no part in some
  micro-batch) is updated now with what it received, as ``optimizer.step()`` would, so no gradient
  is carried into the next step; then the wrapped optimizer's own ``step()`` runs, a no-op on the
  consumed gradients that runs its step hooks and tells LR schedulers the step happened.
  ``zero_grad()`` does nothing: the hooks free every gradient they consume.
- ``param_groups`` and ``state`` *are* the wrapped optimizer's (the same objects), so an LR
  scheduler attached to either changes the learning rate the updates read, once per optimizer
  step; ``transformers.Trainer`` and accelerate drive it like any optimizer.
- **Gradient clipping** cannot see a global norm before the first parameter has already stepped.
  ``clip="parameter"`` clips each parameter's (accumulated, low-rank for low-rank groups) gradient
  to ``max_grad_norm``; ``clip="previous_global"`` scales every gradient of a step by
  ``min(1, max_grad_norm / N)`` with ``N`` the global norm of the previous step's gradients (the first
  step is not clipped; ``step()`` closes each step, and forgetting it raises).
  ``torch.nn.utils.clip_grad_norm_`` after ``backward()`` would see no gradients and silently do
  nothing: ``LayerwiseOptimizer.clip_grad_norm_`` raises to say so.
- **Checkpoints**: ``state_dict()`` is one dict keyed by parameter names (optimizer state, group
  hyper-parameters, the gradients of an unfinished step — low-rank accumulators, the full ``G`` a
  group with ``outside="fira"`` accumulates, and the plain parameters' ``.grad`` —, clipping norm); ``load_state_dict`` is strict: missing and unexpected
  names raise.
- Non-finite gradients at a refresh raise ``FloatingPointError`` from inside ``backward()``; other
  parameters of that backward may already have stepped.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .lowrank import LowRankGradient, LowRankOptimizer
from .options import is_int

CLIP_MODES = (None, "parameter", "previous_global")


def layerwise_unsupported_reason() -> str:
    """Why layer-wise mode is refused under DDP and FSDP2."""
    return ("layer-wise updates (LayerwiseOptimizer) cannot run under DDP or FSDP2: the per-parameter hooks "
            "fire inside backward() on this rank's own gradient, before DDP's bucketed all-reduce has averaged "
            "it (DDP writes the averaged gradient back only when backward ends), and FSDP2 assigns the "
            "reduce-scattered sharded gradient only after those hooks; ranks would step on different "
            "gradients. Use optimizer.step() (with galore_plus.distributed.distribute(optimizer) under DDP)")


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
        if not is_int(accumulation_steps) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an int ≥ 1")
        if clip not in CLIP_MODES:
            raise ValueError(f"clip={clip!r} is not one of {CLIP_MODES}")
        if clip is not None and (max_grad_norm is None or not max_grad_norm > 0):
            raise ValueError(f"clip={clip!r} needs max_grad_norm > 0, got {max_grad_norm!r}")
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise ValueError(layerwise_unsupported_reason())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in the optimizer's groups; each must be there once (its hook "
                             "would update it twice)")
        names: dict[int, str] = {}
        owner: dict[str, int] = {}
        for name, p in named_parameters:  # one name per parameter, one parameter per name (issue 25)
            if names.get(id(p), name) != name:
                raise ValueError(f"named_parameters names one parameter twice ({names[id(p)]!r} and {name!r}); give "
                                 "each parameter once, as model.named_parameters() does")
            if owner.get(name, id(p)) != id(p):
                raise ValueError(f"named_parameters gives two parameters the name {name!r}; names must be unique "
                                 "(the state dict is keyed by them)")
            names[id(p)], owner[name] = name, id(p)
        missing = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"named_parameters does not name {len(missing)} parameter(s) of the optimizer "
                             f"(in groups {sorted(set(missing))})")
        super().__init__(params, dict(optimizer.defaults))  # torch's bookkeeping: hooks, flags
        self.optimizer = optimizer
        # the wrapped optimizer's groups and state, shared (it keeps their identity when it loads)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.accumulation_steps = accumulation_steps
        self.clip, self.max_grad_norm = clip, max_grad_norm
        self._names = {id(p): names[id(p)] for p in params}
        self._params: dict[str, Tensor] = {names[id(p)]: p for p in params}
        self._received: dict[str, int] = {name: 0 for name in self._params}
        self._low: dict[str, LowRankGradient] = {}
        self._sq_norm = 0.0           # Σ‖g‖² of the step being accumulated (previous_global)
        self._previous_norm: float | None = None
        self._applied_since_end: set[str] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params.values()]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" in self.__dict__:
            raise RuntimeError("add the group to the wrapped optimizer before wrapping it in LayerwiseOptimizer "
                               "(the hooks are registered at construction)")
        super().add_param_group(param_group)  # torch.optim.Optimizer.__init__'s own groups

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a LayerwiseOptimizer holds hooks on the model's parameters and cannot be copied or "
                        "pickled; save its state_dict() and load it into a new one")

    # ------------------------------------------------------------------ the hook
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p.grad is None:  # the projected backward delivered this micro-batch (add_projected_gradient)
            return
        name = self._names[id(p)]
        opt = self.optimizer
        first = self._begin(name, p, p.grad)
        if not opt.is_low_rank(p):  # autograd keeps accumulating into p.grad until the last micro-batch
            self._received[name] += 1
            if self._received[name] == self.accumulation_steps:
                self._apply(name, p)
            return
        if first:
            opt.refresh_projector(p, p.grad)
        grad = opt.project(p, p.grad)
        p.grad = None  # the full gradient is freed here: this is the point of layer-wise mode
        self._receive(name, p, grad)

    @torch.no_grad()
    def add_projected_gradient(self, p: Tensor, grad: LowRankGradient) -> None:
        """A micro-batch's projected gradient of ``p`` computed without its full gradient (the
        projected backward, ``projected.py``): accumulated and applied like one from the hook."""
        name = self._names[id(p)]
        if self.optimizer.projector_due(p):
            raise RuntimeError(f"parameter {name!r} needs a full gradient at this step (its projector is due)")
        self._begin(name, p, None)
        self._receive(name, p, grad)

    def _begin(self, name: str, p: Tensor, grad: Tensor | None) -> bool:
        """Checks at a parameter's first micro-batch of a step; True if it is the first."""
        first = self._received[name] == 0
        if first and grad is not None:
            self.optimizer.check_gradient(p, grad, f"parameter {name!r}")
        if first and self.clip == "previous_global" and name in self._applied_since_end:
            raise RuntimeError("clip='previous_global' needs step() after each optimizer step's last "
                               "backward(); it was not called, so the clipping norm would be stale")
        return first

    def _receive(self, name: str, p: Tensor, grad: LowRankGradient) -> None:
        """Add a micro-batch's low-rank gradient; apply the sum at the last micro-batch."""
        self._received[name] += 1
        if name in self._low:
            grad = grad.add_(self._low.pop(name))
        self._low[name] = grad
        if self._received[name] == self.accumulation_steps:
            self._apply(name, p)

    def _apply(self, name: str, p: Tensor) -> None:
        """Update ``p`` from what it received in this step (clipped as configured)."""
        if self.optimizer.is_low_rank(p):
            grad = self._low.pop(name)
            factor = self._clip_factor(grad.low)
            self.optimizer.apply(p, grad if factor == 1.0 else grad.mul_(factor))
        else:
            grad = p.grad
            factor = self._clip_factor(grad)
            self.optimizer.apply(p, grad if factor == 1.0 else grad * factor)
            p.grad = None
        self._received[name] = 0
        self._applied_since_end.add(name)

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

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Close an optimizer step (call it after the step's last ``backward()``; see the module
        docstring): parameters still holding part of this step's gradient are updated with it, then
        the wrapped optimizer's ``step()`` runs (a no-op on consumed gradients: its hooks and LR
        schedulers see the step). With ``clip="previous_global"`` this step's global gradient norm
        becomes the next step's clipping norm (``last_global_norm``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, count in self._received.items():
            if count:
                self._apply(name, self._params[name])
        self.optimizer.step()
        self._applied_since_end.clear()
        if self.clip == "previous_global":
            self._previous_norm, self._sq_norm = math.sqrt(self._sq_norm), 0.0
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks free every gradient they consume (a plain parameter's ``.grad``
        accumulates across the step's micro-batches and is freed when it is applied)."""

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
        plain = {name: p.grad for name, p in self._params.items()
                 if self._received[name] and not self.optimizer.is_low_rank(p)}
        return {
            "state": {index_to_name[i]: s for i, s in inner["state"].items()},
            "param_groups": groups,
            "received": dict(self._received),
            "low_rank_accumulators": {n: g.low for n, g in self._low.items()},
            "residual_accumulators": {n: g.residual for n, g in self._low.items() if g.residual is not None},
            "full_accumulators": {n: g.full for n, g in self._low.items() if g.full is not None},  # Fira's G
            "plain_accumulators": plain,
            "clip_sq_norm": self._sq_norm,
            "clip_previous_norm": self._previous_norm,
        }

    def _check_loadable(self, state_dict: Any) -> None:
        """What :meth:`LayerwiseOptimizer.load_state_dict` reads after the inner optimizer has loaded,
        checked before anything is loaded: its keys, names, types and the plain accumulators' shapes."""
        required = ("state", "param_groups", "received", "low_rank_accumulators", "residual_accumulators",
                    "clip_sq_norm", "clip_previous_norm")
        if not isinstance(state_dict, dict) or any(k not in state_dict for k in required):
            missing = [k for k in required if not isinstance(state_dict, dict) or k not in state_dict]
            raise ValueError(f"layer-wise state_dict lacks {missing}: not a LayerwiseOptimizer's state")
        if not isinstance(state_dict["param_groups"], list) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in state_dict["param_groups"]):
            raise ValueError("layer-wise state_dict: param_groups must be a list of groups with a list of names")
        names = set(self._params)
        low = state_dict["low_rank_accumulators"]
        for key in ("state", "received", "low_rank_accumulators", "residual_accumulators", "full_accumulators",
                    "plain_accumulators"):
            entries = state_dict.get(key, {})
            if not isinstance(entries, dict):
                raise ValueError(f"layer-wise state_dict: {key} must be a dict keyed by parameter names")
            unknown = sorted(set(entries) - names)
            if unknown:
                raise ValueError(f"layer-wise state_dict: {key} names parameters this optimizer does not have: {unknown}")
            if key.endswith("accumulators") and not all(isinstance(t, torch.Tensor) for t in entries.values()):
                raise ValueError(f"layer-wise state_dict: {key} must hold tensors")
            if key in ("residual_accumulators", "full_accumulators") and not set(entries) <= set(low):
                raise ValueError(f"layer-wise state_dict: {key} names parameters without a low-rank accumulator")
        if not all(_is_number(v) for v in state_dict["received"].values()):
            raise ValueError("layer-wise state_dict: received must map names to counts")
        for name, grad in state_dict.get("plain_accumulators", {}).items():
            if tuple(grad.shape) != tuple(self._params[name].shape):
                raise ValueError(f"layer-wise state_dict: the plain accumulator of {name!r} has shape "
                                 f"{tuple(grad.shape)}, the parameter {tuple(self._params[name].shape)}")
        if not _is_number(state_dict["clip_sq_norm"]) or not (state_dict["clip_previous_norm"] is None
                                                               or _is_number(state_dict["clip_previous_norm"])):
            raise ValueError("layer-wise state_dict: clip_sq_norm and clip_previous_norm must be numbers")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Strict: every name of this optimizer must be in ``state_dict`` and nothing else. The whole
        state is checked before anything changes (issue 25): a state that does not fit raises
        ``KeyError`` or ``ValueError`` and leaves the optimizer as it was."""
        self._check_loadable(state_dict)
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
        residuals, fulls = state_dict["residual_accumulators"], state_dict.get("full_accumulators", {})
        self._low = {n: LowRankGradient(t.to(self._params[n].device),
                                        residuals[n].to(self._params[n].device) if n in residuals else None,
                                        fulls[n].to(self._params[n].device) if n in fulls else None)
                     for n, t in state_dict["low_rank_accumulators"].items()}
        for n, grad in state_dict.get("plain_accumulators", {}).items():
            p = self._params[n]
            p.grad = grad.to(device=p.device, dtype=p.dtype)
        self._sq_norm = float(state_dict["clip_sq_norm"])
        self._previous_norm = state_dict["clip_previous_norm"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def engine_of(optimizer: Any) -> LowRankOptimizer | None:
    """The low-rank engine behind ``optimizer``: itself for a ``LowRankOptimizer``, the one a
    ``LayerwiseOptimizer`` drives, None for any other optimizer. The one place that unwraps."""
    if isinstance(optimizer, LowRankOptimizer):
        return optimizer
    return optimizer.optimizer if isinstance(optimizer, LayerwiseOptimizer) else None
