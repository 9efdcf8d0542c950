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
low-rank parameter of ``optimizer`` (an FSDP2-sharded one too) and attaches it to
the optimizer (``LowRankOptimizer.attach_projected_backward``; ``optimizer.projected_backward`` reads
it); ``remove()`` undoes both. How it is installed (DESIGN.md, "Projected backward"): a forward
pre-hook on each target linear (its ``RemovableHandle`` kept) hands the linear's own ``forward`` its
input wrapped in a carrier tensor, whose ``F.linear`` runs this module's autograd function instead of
torch's. The user's modules keep their class, ``forward``, attributes, parameter names and
``state_dict`` keys; nothing is computed twice; ``remove()`` leaves each module's ``__dict__`` as it
was. What users see:

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
- Under ``torch.autocast`` the projected products run in autocast's dtype (``x`` is saved in it), as
  torch's linear forms ``dyᵀx`` in it; the optimizer gets float32 (DESIGN.md, "Projected backward").
- Factors held until ``step()`` at a refresh are capped at the size of the target's ``m×n``
  gradient: beyond ``m·n/(m+n)`` tokens a step they are folded into it (``cap_factors``).
- DDP: the targets are left out of DDP's own all-reduce (``distributed.wrap_model`` does it) and
  each step all-reduces their projected gradients (and their full ones at refresh steps where the
  refresh needs ``G``: exact SVD) over the projected backward's own process group instead: ``r``-sized
  traffic per target matrix. A randomized or cross-head refresh is sketched across the ranks, each
  product of the range finder all-reduced (``distributed_sketch``). The group
  is given to ``enable_projected_backward(process_group=...)`` or set by
  ``distributed.distribute(optimizer)`` (``reduce_over``); ``process_group`` reads it.
- FSDP2 (issue 26; DESIGN.md, "Distributed", FSDP2 with the projected backward): nothing to call.
  Each rank computes its micro-batches' projected gradient of the whole (all-gathered) matrix; the
  step pre-hook reduce-scatters ``G Q`` to the row shards and all-reduces ``Pᵀ G`` and the residual
  entries (``sharding.ProjectedRows``), so FSDP2 reduce-scatters only the other parameters. A
  randomized or cross-head refresh comes from the ranks' factors (``sharding.FactoredRows``); an
  exact-SVD one forms the full gradient, which FSDP2 reduce-scatters as before.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed_sketch import RankMeanGradient, is_rank_mean
from .layerwise import engine_of
from .lowrank import LowRankGradient, compute_dtype
from .projection import FULL, FactoredGradient, TokenRows, lookup_entries
from .registry import refresh_policy
from .sharding import FactoredRows, ProjectedRows, is_dtensor, layout_of


def projected_weight_gradient(x: Tensor, dy: Tensor, left: Tensor | None, right: Tensor | None,
                              index: Tensor | None, n: int) -> LowRankGradient:
    """``LowRankGradient`` of ``G = dyᵀ x`` (``x``: ``tokens×n``, ``dy``: ``tokens×m``, both in the
    compute dtype) for the projector ``(left, right)`` and the residual's flat ``index`` into ``G``
    (``FactoredGradient.project`` and ``.entries``: ``G`` at the index set only, never all of it)."""
    grad = FactoredGradient.of(x, dy)
    if grad.shape[1] != n:
        raise ValueError(f"x has {grad.shape[1]} features, the weight {n} columns")
    return LowRankGradient(grad.project(left, right), None if index is None else grad.entries(index))


def lookup_projected_gradient(ids: Tensor, grad_rows: Tensor, left: Tensor | None, right: Tensor | None,
                              index: Tensor | None, vocab: int, padding_idx: int | None = None,
                              into: LowRankGradient | None = None) -> LowRankGradient:
    """``LowRankGradient`` of an embedding lookup's weight gradient ``G = onehot(ids)ᵀ grad_rows``
    (``vocab×n``; ``ids``: ``tokens``, ``grad_rows``: ``tokens×n``, the lookup's output gradient),
    never formed: ``G Q`` is ``grad_rows Q`` added at the rows ``ids`` (``tokens·n·r``), ``Pᵀ G`` is
    ``P[ids]ᵀ grad_rows``; the residual's entries sum the rows of equal ids. Rows at ``padding_idx``
    get no gradient, as ``F.embedding``'s (DESIGN.md, "Projected backward", a tied embedding).

    ``into``: a projected gradient of the same weight to add it to (the tied ``lm_head`` half's); for
    ``G Q`` without residual entries the rows are added into ``into.low`` in place (no ``vocab×r``
    buffer), else the sum is formed; returns ``into`` then."""
    if padding_idx is not None:
        grad_rows = grad_rows * (ids != padding_idx).unsqueeze(1).to(grad_rows.dtype)
    if left is None and into is not None and index is None and into.residual is None:
        into.low.index_add_(0, ids, grad_rows @ right.T)
        return into
    if left is None:
        rows = grad_rows @ right.T
        low = rows.new_zeros(vocab, rows.shape[1]).index_add_(0, ids, rows)
    else:
        low = left.index_select(0, ids).T @ (grad_rows if right is None else grad_rows @ right.T)
    entries = None if index is None else lookup_entries(ids, grad_rows, index, grad_rows.shape[1])
    grad = LowRankGradient(low, entries)
    return grad if into is None else into.add_(grad)


class _ProjectedLookup(torch.autograd.Function):
    """``F.embedding`` (no ``max_norm``, no ``scale_grad_by_freq``) whose weight gradient is the
    projected one between refreshes: the lookup half of a tied embedding/``lm_head``."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None, sparse: bool,
                route: ProjectedBackward, target: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.sparse, ctx.route, ctx.target = padding_idx, sparse, route, target
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        dw = None
        if ctx.needs_input_grad[1]:
            dw = ctx.route.lookup_gradient(ctx.target, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]),
                                           ctx.padding_idx, ctx.sparse)
        return None, dw, None, None, None, None


class _ProjectedLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is the projected one between refreshes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, route: ProjectedBackward,
                target: Tensor) -> Tensor:
        # under torch.autocast the linear runs in autocast's dtype: x is saved in it, as torch's linear
        # saves its autocast copy, and backward's products run in it (DESIGN.md, "Projected backward",
        # autocast)
        ctx.lower = _autocast_dtype(x)
        if ctx.lower is not None:
            x = x.to(ctx.lower)
        ctx.save_for_backward(x)
        # the Parameter itself, not a saved copy: the optimizer knows it by identity, and under
        # non-reentrant checkpointing saved tensors come back as other objects. ``target`` is the
        # optimizer's parameter: ``weight`` itself, or under FSDP2 the sharded parameter whose
        # all-gathered (unsharded) form ``weight`` is
        ctx.weight, ctx.route, ctx.has_bias, ctx.target = weight, route, bias is not None, target
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (x,), weight = ctx.saved_tensors, ctx.weight
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dw = ctx.route.weight_gradient(ctx.target, x2, dy2, ctx.lower) if ctx.needs_input_grad[1] else None
        return dx, dw, db, None, None


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear in on ``x``'s device when it is enabled there, else None
    (None for float64 ``x`` too: autocast leaves float64 alone)."""
    device = x.device.type
    if device in ("cpu", "cuda") and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


class _Carrier(Tensor):
    """A target linear's input on its way from the pre-hook into the linear's own ``forward``.

    It only carries: ``source`` (the input itself), ``weight`` (the target's, as its module holds it
    now: under FSDP2 the all-gathered one), ``target`` (the optimizer's parameter) and ``route`` (the
    ``ProjectedBackward``). Every torch function called on it runs on ``source`` instead, so nothing
    computes with it and it never escapes; the one exception is ``F.linear`` with the target's
    weight (``nn.Linear.forward``), which becomes ``_ProjectedLinear`` on ``source``: the autograd
    graph and the numbers are those of calling ``_ProjectedLinear`` directly."""

    source: Tensor
    weight: Tensor
    target: Tensor
    route: ProjectedBackward

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        carriers: list[_Carrier] = []
        args, kwargs = _unwrap(args, carriers), _unwrap(kwargs or {}, carriers)
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            carrier = carriers[0]
            if weight is carrier.weight and x is carrier.source:
                return _ProjectedLinear.apply(x, weight, bias, carrier.route, carrier.target)
        if func is F.embedding:  # a tied embedding's lookup (its input is the token ids)
            ids, weight, padding_idx, max_norm, _, by_frequency, sparse = _embedding_arguments(*args, **kwargs)
            carrier = carriers[0]
            if weight is carrier.weight and ids is carrier.source and max_norm is None and not by_frequency:
                if padding_idx is not None and padding_idx < 0:
                    padding_idx += weight.shape[0]
                return _ProjectedLookup.apply(ids, weight, padding_idx, sparse, carrier.route, carrier.target)
        return func(*args, **kwargs)

    @staticmethod
    def wrap(x: Tensor, weight: Tensor, route: ProjectedBackward, target: Tensor) -> _Carrier:
        """A carrier of input ``x`` into the forward of the linear whose weight is ``weight`` (the
        optimizer's parameter ``target``, or under FSDP2 its all-gathered form)."""
        if type(x) is Tensor:
            carrier = Tensor._make_subclass(_Carrier, x, False)  # an alias outside autograd: it only carries
        else:
            with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
                carrier = x.as_subclass(_Carrier)
        carrier.source, carrier.weight, carrier.route, carrier.target = x, weight, route, target
        return carrier


def _unwrap(value: Any, carriers: list[_Carrier]) -> Any:
    """``value`` (a torch function's arguments) with every ``_Carrier`` replaced by its source,
    collected in ``carriers``; only the containers torch functions take are searched (measured:
    ``torch.utils._pytree`` costs 50 µs a call here, more than the linear itself)."""
    if isinstance(value, _Carrier):
        carriers.append(value)
        return value.source
    if type(value) in (tuple, list):
        return type(value)(_unwrap(v, carriers) for v in value)
    if type(value) is dict:
        return {k: _unwrap(v, carriers) for k, v in value.items()}
    return value


def _linear_arguments(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, ...]:
    """``F.linear``'s arguments by name, however they were passed."""
    return input, weight, bias


def _embedding_arguments(input: Tensor, weight: Tensor, padding_idx: int | None = None, max_norm: float | None = None,
                         norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> tuple:
    """``F.embedding``'s arguments by name, however they were passed."""
    return input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse


#: every module a projected backward is installed on, and which (weak: a module that is garbage
#: collected leaves); ``is_projected`` reads it, so nothing is stored on the user's modules
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, ProjectedBackward] = weakref.WeakKeyDictionary()


class ProjectedBackward:
    """The projected backward installed on a model's target linears for one optimizer (see the
    module docstring). ``targets`` maps each target module to its weight; ``remove()`` removes the
    hooks and detaches from the optimizer, leaving the modules exactly as they were.

    ``process_group``: the group the targets' gradients are averaged over before each step (DDP;
    ``reduce_over`` sets it later, as ``distributed.distribute`` does); None in one process."""

    def __init__(self, model: nn.Module, optimizer: Any, refresh_in_backward: bool = False,
                 process_group: Any = None, sketched_refresh: bool = True):
        engine = engine_of(optimizer)
        if engine is None:
            raise TypeError(f"projected backward needs a galore_plus optimizer, got {type(optimizer).__name__}")
        if refresh_in_backward and _world_size(process_group) > 1:
            raise ValueError("refresh_in_backward=True under DDP would refresh each rank from its own, not yet "
                             "averaged, gradient (different projectors on each rank); refresh at step() there")
        if engine.projected_backward is not None:
            raise ValueError(f"{type(engine).__name__} already has a projected backward attached (projected backward "
                             "installed twice?); remove() it first")
        self.engine, self.sink = engine, optimizer
        self.refresh_in_backward = refresh_in_backward
        #: refresh without the full gradient where the projector allows it (issue 26; see
        #: ``weight_gradient``); False forms every target's ``G`` at its refresh, as before
        self.sketched_refresh = sketched_refresh
        #: fold a target's held factors into its full gradient once they would be larger than it
        #: (DESIGN.md, "Projected backward", the factors' cap); False keeps them however large
        self.cap_factors = True
        self._group = process_group
        self._ddp_reduced: dict[int, Tensor] = {}  # DDP: the gradients averaged this step (_reduce_ddp)
        low_rank = {id(p) for g in engine.param_groups if "rank" in g for p in g["params"]}
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        self.targets: dict[nn.Module, Tensor] = {}
        #: ids of the weights shared by an ``lm_head`` linear and an embedding lookup, both projected
        #: (issue 26; DESIGN.md, "Projected backward", a tied embedding)
        self._tied: set[int] = set()
        #: tied weights whose lm_head half folded its factors in this micro-batch's backward (the
        #: factors' cap), so the lookup half returns its full gradient too (``_hold_or_fold``)
        self._folded: set[int] = set()
        lookups = {id(m.weight): m for m in model.modules() if type(m) is nn.Embedding and m.weight is not None}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            # a weight shared with another module gets gradient from both: full path, except a tied
            # embedding/lm_head (``_tied_lookup``). An FSDP2-sharded weight is projected too (issue 26;
            # DESIGN.md, "Distributed"): reduced in the step pre-hook (``_reduce_sharded``)
            if not (isinstance(module, nn.Linear) and weight is not None and id(weight) in low_rank):
                continue
            lookup = None
            if uses[id(weight)] != 1:
                lookup = self._tied_lookup(weight, lookups.get(id(weight)), uses[id(weight)], engine, optimizer)
                if lookup is None:
                    continue
            for held in (module, lookup):
                if held in _INSTALLED:
                    raise ValueError(f"{type(held).__name__} {held} already has a projected backward (projected "
                                     "backward installed twice?)")
            self.targets[module] = weight
            if lookup is not None:
                self.targets[lookup] = weight
                self._tied.add(id(weight))
        if self.targets:  # an untied embedding trained low-rank: its lookup's gradient projected alone
            for weight_id, lookup in lookups.items():
                if (weight_id in low_rank and uses[weight_id] == 1 and lookup not in _INSTALLED
                        and self._tied_lookup(lookup.weight, lookup, 2, engine, optimizer) is lookup):
                    self.targets[lookup] = lookup.weight
        if not self.targets:
            raise ValueError("no nn.Linear of the model has a low-rank weight in this optimizer: nothing to project")
        self.weights = {id(w) for w in self.targets.values()}
        #: FSDP2 targets (DTensor weights): the optimizer holds their projected gradients of this
        #: rank's micro-batches (plain tensors) until the step pre-hook reduces them over the ranks
        #: (``_reduce_sharded``); ``zero_grad()`` drops them as it drops any gradient
        self._sharded = {id(w) for w in self.targets.values() if layout_of(w, engine.comm).sharded}
        #: per FSDP2 target: what its backward needs of other ranks' projector and residual set,
        #: gathered once per refresh / reselection (``_whole_projector``)
        self._gathered: dict[int, tuple] = {}
        # nothing was changed until here: a refusal above leaves model and optimizer as they were
        self._hooks = [module.register_forward_pre_hook(self._carry_input, with_kwargs=True)
                       for module in self.targets]
        for module in self.targets:
            _INSTALLED[module] = self
        self.handle = engine.register_step_pre_hook(self._before_step)
        engine.attach_projected_backward(self)
        self._warn_unestimated(model)

    def _warn_unestimated(self, model: nn.Module) -> None:
        """Warn once for the targets whose captured-share policy (``refresh="capture"``) falls back to the
        interval here, where no estimate is taken (DESIGN.md, "Refresh"): layer-wise mode, FSDP2-sharded
        and tied weights, two-sided projectors."""
        names = {id(p): n for n, p in model.named_parameters()}
        unestimated = [names.get(id(weight), f"a {tuple(weight.shape)} weight")
                       for weight in dict.fromkeys(self.targets.values())
                       if refresh_policy(self.engine.group_of(weight)["refresh"]).reads_share
                       and (not self._estimates_share(weight) or self.engine.projection_side(weight) == FULL)]
        if unestimated:
            where = "layer-wise mode" if self.sink is not self.engine else "these targets"
            warnings.warn(f"refresh='capture' on the projected backward takes no share estimate in {where} "
                          f"({', '.join(unestimated[:3])}{', …' if len(unestimated) > 3 else ''}): they refresh "
                          "every update_proj_gap updates (the interval); the full backward measures the share "
                          "exactly", stacklevel=3)

    def _tied_lookup(self, weight: Tensor, lookup: nn.Embedding | None, uses: int, engine: Any,
                     optimizer: Any) -> nn.Embedding | None:
        """The ``nn.Embedding`` whose lookup shares ``weight`` with one linear (a tied embedding/
        ``lm_head`` trained low-rank: ``build_optimizer(embeddings="low_rank")``), when both halves of
        its gradient can be projected (the same rules for an untied lookup's gradient alone, called
        with ``uses`` 2): a plain parameter (not FSDP2), two uses, a lookup without
        ``max_norm`` or ``scale_grad_by_freq``, the engine itself as the sink (layer-wise mode applies
        a weight at its first gradient of a micro-batch, before the other half) and outside
        ``torch.distributed`` (the DDP glue leaves projected weights out by module and reduces each
        target's gradient once per module; as ``integration.sparse_tied_lookup``). Else None: the full
        path, as before."""
        import torch.distributed as dist

        if (lookup is None or uses != 2 or type(weight) is not nn.Parameter or lookup.max_norm is not None
                or lookup.scale_grad_by_freq or optimizer is not engine or self._group is not None
                or (dist.is_available() and dist.is_initialized())):
            return None
        return lookup

    def remove(self) -> None:
        """Remove the hooks from every target module (each is left exactly as it was) and detach from
        the optimizer. Removing twice does nothing."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module in self.targets:
            if _INSTALLED.get(module) is self:
                del _INSTALLED[module]
        self.targets.clear()
        self.weights = set()
        self._sharded, self._gathered = set(), {}
        self.handle.remove()
        if self.engine.projected_backward is self:
            self.engine.attach_projected_backward(None)

    def _carry_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of a target: hand its ``forward`` the input in a ``_Carrier`` (not when no
        graph is recorded, e.g. evaluation: the forward is the same ``F.linear`` either way)."""
        if not torch.is_grad_enabled():
            return None
        # the weight as the module holds it now: under FSDP2 the all-gathered (unsharded) parameter,
        # which the linear's forward passes to F.linear; the optimizer knows the sharded one
        target, weight = self.targets[module], module.weight
        if args and isinstance(args[0], Tensor):
            return (_Carrier.wrap(args[0], weight, self, target), *args[1:]), kwargs
        if isinstance(kwargs.get("input"), Tensor):
            return args, {**kwargs, "input": _Carrier.wrap(kwargs["input"], weight, self, target)}
        return None

    @torch.no_grad()
    def weight_gradient(self, weight: Tensor, x: Tensor, dy: Tensor, lower: torch.dtype | None = None) -> Tensor | None:
        """Backward of one target. Between refreshes: the projected gradient handed to the optimizer
        (and ``None``). When the projector is due:

        - **without the full gradient** (``sketched_refresh``, where ``engine.refreshes_from_factors``:
          randomized range finder or cross-head; under DDP and FSDP2 the ranks' mean, DESIGN.md
          "Distributed"; DESIGN.md, "Projected backward",
          refresh without G): ``G = dyᵀ x`` is kept as its factors (``FactoredGradient``). With
          ``refresh_in_backward`` or in layer-wise mode the projector is refreshed from them here, and
          the projected gradient under the new projector handed on (the range finder's products
          ``G Ω = dyᵀ(x Ω)``, ``Gᵀ Y = xᵀ(dy Y)`` and the power iterations all run now, while ``x``
          and ``dy`` are alive); otherwise the factors are held by the optimizer
          (``add_factored_gradient``: ``x`` and ``dy`` stay alive until ``step()``, which refreshes
          from the sum of the step's micro-batches);
        - else the full ``dyᵀ x`` (autograd puts it in ``weight.grad``; with ``refresh_in_backward``
          the projector is refreshed from it here, and it is projected and freed at once).

        ``lower``: the dtype the forward ran in under ``torch.autocast`` (None without): the projected
        products between refreshes run in it (as torch's linear forms ``dyᵀx`` in it), their result
        is handed on in the compute dtype; a refresh's factors are in the compute dtype (float32)."""
        engine = self.engine
        if engine.projector_due(weight):
            if id(weight) in self._tied:  # the lm_head half of a tied weight: (h, dlogits), held until step()
                if self._sketches(weight):
                    return self._hold_or_fold(weight, FactoredGradient.of(x.detach(), dy.detach()), lookup=False)
                return (dy.T @ x.to(dy.dtype)).to(weight.dtype)
            # weight.grad set at a refresh step: folded (the factors' cap), the step goes on in full
            if self._sketches(weight):
                # detached: a held x must not keep its graph alive until step()
                factored = FactoredGradient.of(x.detach(), dy.detach()).to(compute_dtype(weight))
                across = self._across_ranks(weight, factored)
                if across is not None:  # DDP, FSDP2: the ranks' mean, product by product at step() (DESIGN.md,
                    engine.add_factored_gradient(weight, across)  # "Distributed", sketched refresh across ranks)
                    if self.cap_factors:  # past the cap: folded into this rank's own G, held, never sent
                        engine.factored_gradient(weight).fold_beyond(weight.numel())
                    return None
                if self.refresh_in_backward or self.sink is not engine:  # layer-wise: refreshes in backward
                    engine.check_gradient(weight, factored)
                    engine.refresh_projector(weight, factored)
                    self.sink.add_projected_gradient(weight, engine.project(weight, factored))
                    return None
                return self._hold_or_fold(weight, factored, lookup=False)
            full = (dy.T @ x.to(dy.dtype)).to(weight.dtype)
            if not self.refresh_in_backward:
                return full
            engine.check_gradient(weight, full)
            engine.refresh_projector(weight, full)
            self.sink.add_projected_gradient(weight, engine.project(weight, full))
            return None
        dtype = compute_dtype(weight)
        work = dtype if lower is None else lower
        if id(weight) in self._sharded:  # FSDP2: this rank's batch over every row, reduced before step()
            left, right, index, _ = self._whole_projector(weight)  # (``_reduce_sharded``)
        else:
            (left, right), index = engine.projector(weight), engine.residual_index(weight)
        left, right = (None if b is None else b.to(work) for b in (left, right))
        x, dy = x.to(work), dy.to(work)
        grad = projected_weight_gradient(x, dy, left, right, index, weight.shape[1])
        sketch = self._share_sketch(weight, x, dy)
        if work != dtype:  # the optimizer's math stays in the compute dtype
            grad = LowRankGradient(grad.low.to(dtype), None if grad.residual is None else grad.residual.to(dtype))
        grad.sketch = None if sketch is None else sketch.to(dtype)
        self.sink.add_projected_gradient(weight, grad)
        return None

    def _share_sketch(self, weight: Tensor, x: Tensor, dy: Tensor) -> Tensor | None:
        """This micro-batch's sketch of ``G = dyᵀ x`` for the captured share's estimate (a
        ``refresh="capture"`` group; DESIGN.md, "Refresh"): ``dyᵀ (x Ω)`` for a left projector, ``(dy Ω)ᵀ
        x`` for a right one, ``Ω`` from ``engine.share_sketch``. None where no estimate is taken: layer-
        wise mode (it applies each micro-batch in backward), FSDP2-sharded and tied weights (their
        gradient has other parts), a two-sided projector, a policy that reads no share."""
        if not self._estimates_share(weight):
            return None
        omega = self.engine.share_sketch(weight)  # None for a two-sided projector or another policy
        if omega is None:
            return None
        omega = omega.to(x.dtype)
        if self.engine.projector(weight)[1] is None:  # a left projector: G Ω (m×k)
            return dy.T @ (x @ omega)
        return (dy @ omega).T @ x  # right: Ωᵀ G (k×n)

    def _estimates_share(self, weight: Tensor) -> bool:
        """Whether this backward can sketch ``weight``'s captured share (the engine decides the rest:
        ``share_sketch``): not in layer-wise mode (each micro-batch is applied in backward), and not for
        an FSDP2-sharded or a tied weight (their gradient has parts reduced or added elsewhere)."""
        return self.sink is self.engine and id(weight) not in self._sharded and id(weight) not in self._tied

    def _sketches(self, weight: Tensor) -> bool:
        """Whether ``weight``'s due refresh comes from factors (``sketched_refresh``, a projector that
        allows it, no ``W.grad`` yet this step: one there means the factors' cap folded them, and the
        step goes on in full; one process, or the ranks' factors under DDP/FSDP2)."""
        return (self.sketched_refresh and self.engine.refreshes_from_factors(weight) and weight.grad is None
                and (self._group is not None or id(weight) in self._sharded or not self._several_ranks()))

    def _hold_or_fold(self, weight: Tensor, factored: FactoredGradient, lookup: bool) -> Tensor | None:
        """A target's factors at a refresh from factors in one process (a linear's, or one half of a tied
        or an untied lookup's weight): held by the optimizer until ``step()``, which refreshes from the
        sum over the step's micro-batches (a lookup's backward runs after ``lm_head``'s, so a tied weight
        is never refreshed in backward, not with ``refresh_in_backward`` either). Past the factors' cap
        (``m·n`` held elements) the held factors and these are folded into ``G``, handed to autograd
        (``W.grad``), and the step's later micro-batches return theirs in full (``W.grad`` is set;
        DESIGN.md, "Projected backward", the factors' cap). A tied weight's lm_head half marks its fold
        (``_folded``), so the lookup half of the same micro-batch returns its full gradient too
        (autograd sums both). DESIGN.md, "Projected backward", a tied embedding."""
        engine = self.engine
        factored = factored.to(compute_dtype(weight))
        if lookup and id(weight) in self._folded:  # the lm_head half of this micro-batch folded
            self._folded.discard(id(weight))
            return factored.dense().to(weight.dtype)
        held = engine.factored_gradient(weight)
        if not self.cap_factors or _kept_elements(held, factored) <= weight.numel():
            engine.add_factored_gradient(weight, factored)
            return None
        engine.pop_factored_gradient(weight)
        if not lookup and id(weight) in self._tied:
            self._folded.add(id(weight))
        return (factored if held is None else held.add_(factored)).dense().to(weight.dtype)

    @torch.no_grad()
    def lookup_gradient(self, weight: Tensor, ids: Tensor, grad: Tensor, padding_idx: int | None,
                        sparse: bool) -> Tensor | None:
        """Backward of a tied embedding's lookup (``ids``: ``tokens``, ``grad``: ``tokens×n``). Between
        refreshes its projected gradient is handed to the optimizer, which adds it to the ``lm_head``
        half's (``lookup_projected_gradient``; ``None`` returned). At a refresh step from factors
        (``_sketches``) the pair ``(grad, TokenRows(ids))``, ``G = Sᵀ grad``, joins the ``lm_head``
        half's held factors (``_hold_or_fold``); else the lookup's full gradient as ``F.embedding``
        returns it (sparse rows if the lookup is ``sparse``), which autograd adds to ``lm_head``'s, and
        ``step()`` refreshes from the sum."""
        engine = self.engine
        if engine.projector_due(weight):
            if self._sketches(weight):
                if padding_idx is not None:  # no gradient at the padding row, as F.embedding's
                    grad = grad * (ids != padding_idx).unsqueeze(1).to(grad.dtype)
                rows = grad.detach().to(compute_dtype(weight))
                factored = FactoredGradient([(rows, TokenRows(ids.detach(), weight.shape[0], rows.dtype))])
                return self._hold_or_fold(weight, factored, lookup=True)
            self._folded.discard(id(weight))
            return torch.ops.aten.embedding_backward(grad, ids, weight.shape[0], -1 if padding_idx is None else padding_idx,
                                                     False, sparse)
        dtype = compute_dtype(weight)
        left, right = engine.projector(weight)
        index, held = engine.residual_index(weight), engine.projected_gradient(weight)
        if held is not None and self.sink is engine:  # the lm_head half (or an earlier micro-batch): add to it
            lookup_projected_gradient(ids, grad.to(dtype), left, right, index, weight.shape[0], padding_idx, held)
        else:
            self.sink.add_projected_gradient(weight, lookup_projected_gradient(
                ids, grad.to(dtype), left, right, index, weight.shape[0], padding_idx))
        return None

    # ---------------------------------------------------------------- FSDP2
    def _whole_projector(self, weight: Tensor) -> tuple:
        """An FSDP2 target's whole ``(P, Q)``, every rank's residual indices as flat indices into the
        whole matrix, and how many each rank has (``sharding.ProjectedRows``): gathered at the first
        backward after a refresh or a reselection (the same backward on every rank, since every rank
        holds the same projector state), reused until the stored tensors change."""
        state = self.engine.state[weight]
        stored = (state.get("proj_left"), state.get("proj_right"), state.get("residual_index"))
        cached = self._gathered.get(id(weight))
        if cached is None or any(a is not b for a, b in zip(cached[0], stored)):
            rows = ProjectedRows(weight, self.engine.comm)
            left, right = self.engine.projector(weight)
            whole_left, whole_right = rows.whole_basis(left, right)
            index, sizes = rows.global_index(self.engine.residual_index(weight))
            cached = (stored, (whole_left, whole_right, index, sizes))
            self._gathered[id(weight)] = cached  # holds ``stored``: their ids cannot be reused meanwhile
        return cached[1]

    def _reduce_sharded(self) -> None:
        """Turn every FSDP2 target's projected gradient the optimizer holds (this rank's micro-batches,
        over all rows) into the ranks' average, placed as the full path places it
        (``sharding.ProjectedRows.reduce``: ``G Q`` reduce-scattered to the row shards, ``Pᵀ G``
        all-reduced), in place, in the targets' order, which is the same on every rank. Idempotent
        (a reduced one is a DTensor), so ``clip_grad_norm_`` may run it before ``step()``. Every rank
        must have run the same backward (as FSDP2 itself requires): a target with a gradient on one
        rank and none on another would leave the others waiting on its collective (until the process
        group's timeout)."""
        for weight in self.targets.values():
            if id(weight) not in self._sharded:
                continue
            grad = self.engine.projected_gradient(weight)
            if grad is None or is_dtensor(grad.low):  # due this step (full path), no backward, or reduced
                continue
            sizes = self._whole_projector(weight)[3]
            left, _ = self.engine.projector(weight)
            grad.low, grad.residual = ProjectedRows(weight, self.engine.comm).reduce(
                grad.low, grad.residual, sizes, side_right=left is None)

    def _several_ranks(self) -> bool:
        """Several ranks: a refresh needs their mean gradient, from factors only with a DDP process group
        (``distributed_sketch``) or on FSDP2 row shards (``sharding.FactoredRows``), else the full path."""
        return _world_size(self._group) > 1 or (self._group is None and _world_size(None) > 1)

    def _across_ranks(self, weight: Tensor, factored: FactoredGradient) -> FactoredGradient | None:
        """This rank's factors of a due target as the ranks' mean gradient: FSDP2 row shards
        (``sharding.FactoredRows``), DDP (``distributed_sketch.RankMeanGradient``); None in one process."""
        if id(weight) in self._sharded:
            return FactoredRows(factored.pairs, weight, self.engine.comm)
        if self._group is not None and _world_size(self._group) > 1:
            return RankMeanGradient(factored.pairs, group=self._group, counter=self.engine.comm)
        return None

    # ---------------------------------------------------------------- DDP

    @property
    def process_group(self) -> Any:
        """The process group the targets' gradients are averaged over before each step, or None."""
        return self._group

    def reduce_over(self, group: Any) -> None:
        """Average the targets' gradients over ``group`` before each step (DDP, whose own all-reduce
        leaves the targets out: ``distributed.wrap_model``); ``distributed.distribute`` calls it."""
        if self.refresh_in_backward and _world_size(group) > 1:
            raise ValueError("refresh_in_backward=True cannot average over several ranks: each would refresh from "
                             "its own gradient in backward")
        if self._tied and _world_size(group) > 1:
            raise ValueError("the projected backward of a tied embedding/lm_head is for one process; build the optimizer "
                             "after torch.distributed is initialised (it then leaves that weight on the full path)")
        self._group = group

    @torch.no_grad()
    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        self._folded.clear()
        self._reduce_sharded()
        if self._group is None:
            if _world_size(None) > 1 and len(self._sharded) < len(self.targets):
                raise RuntimeError(
                    "projected backward under DDP: the target matrices' gradients are not averaged; wrap the model "
                    "with galore_plus.distributed.wrap_model(model, 'ddp', device) (it leaves the targets out of "
                    "DDP's all-reduce) and call galore_plus.distributed.distribute(optimizer) (or give "
                    "enable_projected_backward the process_group)")
            return
        self._reduce_ddp()
        self._ddp_reduced.clear()  # the next step's gradients are new tensors

    @torch.no_grad()
    def _reduce_ddp(self) -> None:
        """Under DDP, average every non-FSDP2 target's gradient this rank holds (its projected one, or
        ``W.grad`` at a full-path refresh) over the process group, in place, in the targets' order.
        Idempotent within a step (:attr:`_ddp_reduced` keeps what it averaged, until the step pre-hook
        clears it), so ``clip_grad_norm_`` runs it first and measures the ranks' mean, which every rank
        then clips by the same factor."""
        import torch.distributed as dist

        if self._group is None:
            return
        world = dist.get_world_size(self._group)
        for weight in self.targets.values():
            if id(weight) in self._sharded:  # FSDP2: _reduce_sharded
                continue
            projected = self.engine.projected_gradient(weight)
            if projected is not None and is_rank_mean(projected.low):  # settled from the ranks' mean already
                continue
            tensors = [weight.grad] if weight.grad is not None else (
                [t for t in (projected.low, projected.residual, projected.sketch) if t is not None]
                if projected is not None else [])
            for t in tensors:
                if id(t) in self._ddp_reduced:
                    continue
                self.engine.comm.add("all_reduce", t)
                dist.all_reduce(t, group=self._group)
                t.div_(world)
                self._ddp_reduced[id(t)] = t  # held: its id cannot be reused before the clear


def _kept_elements(held: FactoredGradient | None, new: FactoredGradient) -> int:
    """Elements of a target's factors held until ``step()`` if ``new`` joins ``held``: ``Σ tokens·(m+n)``
    over the step's micro-batches (an ``x`` shared by q/k/v counted for each)."""
    return new.held_elements() + (0 if held is None else held.held_elements())


def _world_size(group: Any) -> int:
    """Ranks in ``group`` (None: the default group); 1 without an initialised process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def is_projected(module: nn.Module) -> bool:
    """Whether ``module``'s weight gradient comes from the projected backward."""
    return module in _INSTALLED


def enable_projected_backward(model: nn.Module, optimizer: Any, refresh_in_backward: bool = False,
                              process_group: Any = None, sketched_refresh: bool = True) -> ProjectedBackward:
    """Install the projected backward on ``model``'s linears whose weights are low-rank in
    ``optimizer`` (a ``LowRankOptimizer`` or a ``LayerwiseOptimizer``); returns the handle (also
    ``optimizer.projected_backward``, for a ``LayerwiseOptimizer`` its engine's). For models and groups
    you built yourself; ``build_optimizer(..., projected_backward=True)`` calls it.

    ``refresh_in_backward``: at a refresh step, refresh each projector inside backward from the
    gradient of the first micro-batch that reaches it, and project and free that gradient at once,
    so the targets' full gradients never all exist together (the refresh step's memory peak is the
    activations plus one ``m×n`` gradient). With one backward per step this is exactly the ``step()``
    refresh; with several micro-batches the projector comes from the first (as in layer-wise mode).
    Not under DDP (each rank would refresh from its own gradient). Layer-wise mode refreshes in
    backward anyway.

    ``process_group``: under DDP, the group to average the targets' gradients over before each step
    (``distributed.distribute(optimizer)`` sets it too, whichever comes first).

    ``sketched_refresh`` (default True; issue 26): at a refresh step, targets whose projector needs
    only products with ``G`` (randomized range finder, cross-head; ``refreshes_from_factors``) never
    form ``G``: their projector comes from ``x`` and ``dy`` (``ProjectedBackward.weight_gradient``).
    Exact-SVD GaLore and Fira's term keep the full gradient there; under
    DDP and FSDP2 it is sketched across the ranks (``distributed_sketch``, ``sharding.FactoredRows``).
    With ``refresh="capture"`` the captured share is estimated from a sketch of ``G`` between refreshes
    and a refresh it calls for comes at the next update (DESIGN.md, "Refresh")."""
    return ProjectedBackward(model, optimizer, refresh_in_backward, process_group, sketched_refresh)


def clip_grad_norm_(optimizer: Any, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over every gradient ``optimizer`` will apply: ``p.grad`` of
    its parameters and the projected gradients of targets between refreshes (their ``low`` part's
    norm counts; the residual entries are scaled with it). Returns the total norm before clipping."""
    engine = engine_of(optimizer)
    if engine is None:
        raise TypeError(f"clip_grad_norm_ needs a galore_plus optimizer, got {type(optimizer).__name__}")
    if engine is not optimizer:
        return optimizer.clip_grad_norm_(max_norm)  # layer-wise: raises, nothing is left to clip after backward
    engine.settle_factored()  # a refresh step's factored gradients: refreshed and projected now, then counted
    if engine.projected_backward is not None:  # FSDP2 and DDP targets: reduced over the ranks now, then counted
        engine.projected_backward._reduce_sharded()
        engine.projected_backward._reduce_ddp()  # every rank measures the same mean, clips by one factor
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


__all__ = ["enable_projected_backward", "ProjectedBackward", "projected_weight_gradient", "lookup_projected_gradient",
           "clip_grad_norm_", "is_projected"]
