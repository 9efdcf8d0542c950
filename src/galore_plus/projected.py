"""Projected backward: the low-rank gradient of a linear layer without its full weight gradient.

Between projector refreshes the projector of a low-rank matrix is fixed, so its projected gradient
can be computed from the layer's input ``x`` and output gradient ``dy`` directly. For ``y = x Wᵀ``
(``W`` is ``m×n``, tokens along the rows), ``G = dyᵀ x`` and

- a left projection needs ``Pᵀ G = (dy P)ᵀ x`` (``r×n``), a right one ``G Q = dyᵀ (x Q)`` (``m×r``),
  a full one ``(dy P)ᵀ (x Q)``: ``tokens·r·(m+n)`` multiply-adds instead of ``tokens·m·n``, and an
  ``r``-sized result instead of ``m×n``;
- the sparse residual needs ``G`` at its index set only: ``G[i, j] = Σ_t dy[t, i]·x[t, j]``, computed
  in chunks of indices, never the whole ``G``.

It is the same GaLore/GaLore+ in exact arithmetic (tested in float64 against the full path). At a
step where the projector is due, the layer returns the full gradient to autograd as usual (``W.grad``,
refreshes need it); at the others it hands a ``LowRankGradient`` to the optimizer
(``add_projected_gradient``: the engine's, consumed by the next ``step()``, or a
``LayerwiseOptimizer``'s, applied in backward) and ``W.grad`` stays ``None``.

``enable_projected_backward(model, optimizer)`` installs it on every ``nn.Linear`` whose weight is a
low-rank parameter of ``optimizer`` (an FSDP2 ``DTensor`` weight keeps the full path); ``remove()``
undoes it. What users see:

- ``W.grad`` of a target matrix is ``None`` between refreshes (full at refresh steps);
  ``optimizer.projected_gradient(W)`` holds what the next ``step()`` applies.
- ``torch.nn.utils.clip_grad_norm_(model.parameters())`` would miss the projected gradients: use
  ``clip_grad_norm_(optimizer, max_norm)`` below, which clips every gradient the optimizer holds
  (``p.grad``, and the projected gradient of a target between refreshes, whose norm is that of the
  gradient's component in the projector's subspace).
- Gradient accumulation adds projected gradients (``r``-sized buffers); layer-wise mode and
  non-reentrant gradient checkpointing work unchanged. At a refresh step the targets' full gradients
  exist until ``step()`` (the refresh needs them) unless ``refresh_in_backward`` refreshes each one
  as it comes (one backward per step; see ``enable_projected_backward``).
- DDP: the targets are left out of DDP's own all-reduce (``distributed.wrap_model`` does it) and
  ``distributed.distribute(optimizer)`` makes each step all-reduce their projected gradients (and
  their full ones at refresh steps) instead: ``r``-sized traffic per target matrix.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lowrank import LowRankGradient, LowRankOptimizer, compute_dtype
from .sharding import is_dtensor

#: at most this many ``tokens × indices`` products at a time when computing residual entries
RESIDUAL_CHUNK_ELEMENTS = 2**22


def projected_weight_gradient(x: Tensor, dy: Tensor, left: Tensor | None, right: Tensor | None,
                              index: Tensor | None, n: int) -> LowRankGradient:
    """``LowRankGradient`` of ``G = dyᵀ x`` (``x``: ``tokens×n``, ``dy``: ``tokens×m``, both in the
    compute dtype) for the projector ``(left, right)`` and the residual's flat ``index`` into ``G``."""
    a = dy if left is None else dy @ left           # tokens×m  or  tokens×r
    b = x if right is None else x @ right.T         # tokens×n  or  tokens×r
    low = a.T @ b
    entries = None
    if index is not None:
        # G[i, j] = dyᵀ[i] · xᵀ[j]: gathering whole rows of the transposes is 2-4x faster than
        # gathering columns (measured, tokens 128-1536, 576×576); chunks bound the gathered copies
        index = index.long()
        rows, cols = index // n, index % n
        dy_t, x_t = dy.T.contiguous(), x.T.contiguous()
        chunk = max(1, RESIDUAL_CHUNK_ELEMENTS // max(1, x.shape[0]))
        entries = torch.cat([torch.einsum("kt,kt->k", dy_t.index_select(0, rows[k:k + chunk]),
                                          x_t.index_select(0, cols[k:k + chunk]))
                             for k in range(0, index.numel(), chunk)])
    return LowRankGradient(low, entries)


class _ProjectedLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is the projected one between refreshes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, route: ProjectedBackward) -> Tensor:
        ctx.save_for_backward(x)
        # the Parameter itself, not a saved copy: the optimizer knows it by identity, and under
        # non-reentrant checkpointing saved tensors come back as other objects
        ctx.weight, ctx.route, ctx.has_bias = weight, route, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (x,), weight = ctx.saved_tensors, ctx.weight
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dw = ctx.route.weight_gradient(weight, x2, dy2) if ctx.needs_input_grad[1] else None
        return dx, dw, db, None


class ProjectedBackward:
    """The projected backward installed on a model's target linears for one optimizer (see the
    module docstring). ``targets`` maps each patched module to its weight; ``remove()`` restores the
    modules' own ``forward``."""

    def __init__(self, model: nn.Module, optimizer: Any, refresh_in_backward: bool = False):
        import torch.distributed as dist

        from .layerwise import LayerwiseOptimizer

        engine = optimizer.optimizer if isinstance(optimizer, LayerwiseOptimizer) else optimizer
        if not isinstance(engine, LowRankOptimizer):
            raise TypeError(f"projected backward needs a galore_plus optimizer, got {type(optimizer).__name__}")
        if refresh_in_backward and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("refresh_in_backward=True under DDP would refresh each rank from its own, not yet "
                             "averaged, gradient (different projectors on each rank); refresh at step() there")
        self.engine, self.sink = engine, optimizer
        self.refresh_in_backward = refresh_in_backward
        self.reduce_group: Any = None
        low_rank = {id(p) for g in engine.param_groups if "rank" in g for p in g["params"]}
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        self.targets: dict[nn.Module, Tensor] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            # a weight shared with another module (a tied embedding) gets gradient from both: full path;
            # an FSDP2 DTensor weight keeps the full path too (DESIGN.md, "Projected backward")
            if (isinstance(module, nn.Linear) and weight is not None and id(weight) in low_rank
                    and uses[id(weight)] == 1 and not is_dtensor(weight)):
                if "forward" in module.__dict__:
                    raise ValueError(f"{type(module).__name__} {module} already has its forward replaced "
                                     "(projected backward installed twice?)")
                module.forward = types.MethodType(_projected_forward, module)
                module._galore_route = self
                self.targets[module] = weight
        if not self.targets:
            raise ValueError("no nn.Linear of the model has a low-rank weight in this optimizer: nothing to project")
        self.weights = {id(w) for w in self.targets.values()}
        self.handle = engine.register_step_pre_hook(self._before_step)
        engine.projected_backward = self

    def remove(self) -> None:
        """Give every patched module its own ``forward`` back and detach from the optimizer."""
        for module in self.targets:
            del module.forward
            del module._galore_route
        self.targets.clear()
        self.handle.remove()
        self.engine.projected_backward = None

    @torch.no_grad()
    def weight_gradient(self, weight: Tensor, x: Tensor, dy: Tensor) -> Tensor | None:
        """Backward of one target: the full ``dyᵀ x`` when the projector is due (autograd puts it in
        ``weight.grad``; with ``refresh_in_backward`` the projector is refreshed from it here, and it is
        projected and freed at once), else the projected gradient handed to the optimizer (and
        ``None``)."""
        engine = self.engine
        if engine.projector_due(weight):
            full = (dy.T @ x.to(dy.dtype)).to(weight.dtype)
            if not self.refresh_in_backward:
                return full
            engine.check_gradient(weight, full)
            engine.refresh_projector(weight, full)
            self.sink.add_projected_gradient(weight, engine.project(weight, full))
            return None
        dtype = compute_dtype(weight)
        left, right = engine.projector(weight)
        grad = projected_weight_gradient(x.to(dtype), dy.to(dtype), left, right, engine.residual_index(weight),
                                         weight.shape[1])
        self.sink.add_projected_gradient(weight, grad)
        return None

    # ---------------------------------------------------------------- DDP
    def reduce_over(self, group: Any) -> None:
        """Average the targets' gradients over ``group`` before each step (DDP, whose own all-reduce
        leaves the targets out: ``distributed.wrap_model``)."""
        self.reduce_group = group

    @torch.no_grad()
    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        import torch.distributed as dist

        if self.reduce_group is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    "projected backward under DDP: the target matrices' gradients are not averaged; wrap the model "
                    "with galore_plus.distributed.wrap_model(model, 'ddp', device) (it leaves the targets out of "
                    "DDP's all-reduce) and call galore_plus.distributed.distribute(optimizer)")
            return
        world = dist.get_world_size(self.reduce_group)
        for weight in self.targets.values():
            projected = self.engine.projected_gradient(weight)
            tensors = [weight.grad] if weight.grad is not None else (
                [t for t in (projected.low, projected.residual) if t is not None] if projected is not None else [])
            for t in tensors:
                self.engine.comm.add("all_reduce", t)
                dist.all_reduce(t, group=self.reduce_group)
                t.div_(world)


def is_projected(module: nn.Module) -> bool:
    """Whether ``module``'s weight gradient comes from the projected backward."""
    return isinstance(getattr(module, "_galore_route", None), ProjectedBackward)


def _projected_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return _ProjectedLinear.apply(x, self.weight, self.bias, self._galore_route)


def enable_projected_backward(model: nn.Module, optimizer: Any, refresh_in_backward: bool = False) -> ProjectedBackward:
    """Install the projected backward on ``model``'s linears whose weights are low-rank in
    ``optimizer`` (a ``LowRankOptimizer`` or a ``LayerwiseOptimizer``); returns the handle (also
    ``optimizer.projected_backward``). For models and groups you built yourself;
    ``build_optimizer(..., projected_backward=True)`` calls it.

    ``refresh_in_backward``: at a refresh step, refresh each projector inside backward from the
    gradient of the first micro-batch that reaches it, and project and free that gradient at once,
    so the targets' full gradients never all exist together (the refresh step's memory peak is the
    activations plus one ``m×n`` gradient). With one backward per step this is exactly the ``step()``
    refresh; with several micro-batches the projector comes from the first (as in layer-wise mode).
    Not under DDP (each rank would refresh from its own gradient). Layer-wise mode refreshes in
    backward anyway."""
    return ProjectedBackward(model, optimizer, refresh_in_backward)


def clip_grad_norm_(optimizer: Any, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over every gradient ``optimizer`` will apply: ``p.grad`` of
    its parameters and the projected gradients of targets between refreshes (their ``low`` part's
    norm counts; the residual entries are scaled with it). Returns the total norm before clipping."""
    from .layerwise import LayerwiseOptimizer

    if isinstance(optimizer, LayerwiseOptimizer):
        return optimizer.clip_grad_norm_(max_norm)  # raises: nothing is left to clip in layer-wise mode
    engine: LowRankOptimizer = optimizer
    grads = [p.grad for g in engine.param_groups for p in g["params"] if p.grad is not None]
    projected = [engine.projected_gradient(p) for g in engine.param_groups for p in g["params"]]
    projected = [g for g in projected if g is not None]
    def square(t: Tensor) -> Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32)).square().sum()

    squares = [square(t) for t in grads] + [square(g.low) for g in projected]
    if not squares:
        return 0.0
    total = float(torch.stack(squares).sum().sqrt())
    factor = max_norm / (total + 1e-6)
    if factor < 1.0:
        for t in grads:
            t.mul_(factor)
        for g in projected:
            g.mul_(factor)
    return total if math.isfinite(total) else float("nan")


__all__ = ["enable_projected_backward", "ProjectedBackward", "projected_weight_gradient", "clip_grad_norm_",
           "is_projected"]
