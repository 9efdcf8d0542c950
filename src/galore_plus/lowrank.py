"""The low-rank engine: project → inner rule → project back, with tensor-only state.

``LowRankOptimizer`` is composed of parts it does not implement itself (DESIGN.md, "Shape of the
code"):

- an **inner rule** (``InnerRule``: AdamW in ``adamw.py``, 8-bit AdamW in ``adamw8bit.py``, Adafactor
  in ``adafactor.py``): its group keys, their checks, its state and the update it makes from a
  (projected or full) gradient;
- a **layout** per parameter, chosen from the parameter itself (``sharding.layout_of``): a plain
  tensor (one process, or DDP after its all-reduce) or an FSDP2 row shard, where the projection
  math talks to the other ranks;

plus a **refresh policy** per group (``REFRESH_POLICIES``: when a projector refreshes; ``interval``, every
``update_proj_gap`` updates, by default), a **sparse residual** (``residual.SparseResidual``, with GaLore+'s
``residual_ratio``), Fira's term for the gradient outside the subspace (``outside.FiraTerm``, with
``outside="fira"``) and a **refresher** (``LocalRefresh`` by default; ``distributed.distribute``
installs one that splits projector refreshes across DDP ranks). Inner rules and refresh policies are
found by name in :data:`RULES` and :data:`REFRESH_POLICIES`: a new one is one class and one
``register_rule`` / ``register_refresh_policy`` line (DESIGN.md, "Extending"). It owns everything
else once: validation, the refresh schedule and its bookkeeping, the fallbacks when an SVD fails,
the NaN check, loading and copying.

The per-parameter API (public; ``step()``, ``LayerwiseOptimizer`` and the projected backward all
drive the optimizer through it):

- ``is_low_rank(p)``, ``projector_due(p)``: whether ``p``'s next update needs a full gradient to
  refresh its projector;
- ``check_gradient(p, grad)``: raise on a gradient that must not be used, changing nothing;
- ``refresh_projector(p, grad)``: refresh from a full gradient if due;
- ``project(p, grad) -> LowRankGradient``, ``projector(p)``, ``residual_index(p)``;
- ``apply(p, grad)``: one update from a full gradient (plain parameter) or a ``LowRankGradient``;
- ``update(p, grad)``: the three above, as ``step()`` does them;
- ``add_projected_gradient(p, g)``: a projected gradient computed elsewhere (without the full
  one), consumed by the next ``step()`` like ``p.grad`` and cleared by ``zero_grad()``.

State of a low-rank parameter (tensors and Python numbers only, so it loads with
``torch.load(weights_only=True)``):

- ``step``: updates taken; ``refresh_count``: projector refreshes so far (seeds the randomness);
  ``last_refresh``: the ``step`` value at the last refresh.
- ``proj_side``: 0 left, 1 right, 2 full (``projection.py``); ``proj_left`` (``m×r``) and/or
  ``proj_right`` (``r×n``): the basis.
- the inner rule's low-rank moments.
- with a residual (``residual_ratio > 0``, after warm-up): ``residual_index`` (flat int32),
  ``residual_m``, ``residual_v`` (one value per index) and ``residual_start`` (``residual.py``).
- with a policy that reads the captured share (``refresh="capture"``): ``capture_share`` (a float)
  and ``capture_step`` (the update it was measured for, exactly from ``G`` or, on the projected
  backward, estimated from a sketch; DESIGN.md, "Refresh").
- ``moment_start``: the ``step`` at which ``moment_transport="reset"`` last dropped the moments
  (absent until then); the rule's bias correction counts from it (``moment_steps``).
- with ``outside="fira"``: ``outside_norm``, the norm of the last Fira term applied (a 0-d tensor;
  ``outside.py``).

Low-rank math runs in ``compute_dtype``: float32 for bf16/fp16 parameters, the parameter's own
dtype for float32/float64 ones; low-rank moments are stored in it, and so is the projector unless
the group's ``proj_dtype`` says otherwise (e.g. ``torch.bfloat16``, half the bytes).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import outside, projection, residual, transport
from .registry import REFRESH_POLICIES, RULES, refresh_policy, register_refresh_policy, register_rule  # noqa: F401
from .options import LOW_RANK_DEFAULTS, as_float, check_common, check_low_rank, check_matrix
from .rng import generator_for, rounding_generator, share_generator
from .rounding import LOW_PRECISION, stochastic_round
from .sharding import CommCounter, layout_of, local, local_offset

#: Keys torch itself or its LR schedulers put on groups; accepted and ignored.
_FOREIGN_KEYS = {"params", "param_names", "initial_lr"}
#: State keys of the engine itself (the inner rule adds its own).
ENGINE_STATE_KEYS = ("step", "refresh_count", "last_refresh", "proj_side", "proj_left", "proj_right",
                     "residual_index", "residual_m", "residual_v", "residual_start", "moment_start",
                     "capture_share", "capture_step",  # RefreshPolicy.reads_share
                     "outside_norm")
#: Marks a state dict as ours, with the inner rule that wrote it (``load_state_dict`` checks it).
STATE_DICT_KEY = "galore_plus"


def moment_steps(state: dict[str, Any]) -> int:
    """The updates the rule's moments have taken, for their bias correction: ``step``, less the step
    at which ``moment_transport="reset"`` last dropped them (DESIGN.md, "Moment transport")."""
    return state["step"] - state.get("moment_start", 0)


def compute_dtype(p: Tensor) -> torch.dtype:
    """float32 for low-precision parameters, their own dtype for float32/float64 (DESIGN.md, "Precision")."""
    return torch.promote_types(p.dtype, torch.float32)


#: The optimizer class that stands for a rule (``GaLoreAdamW`` for ``adamw``; filled by the aliases)
_ALIASES: dict[str, type[LowRankOptimizer]] = {}


class RefreshPolicy:
    """When a low-rank parameter's projector refreshes after its first one (which is always at its
    first update); asked before an update that has not refreshed yet (at most one refresh per
    update). Stateless: what it needs is in the parameter's state (tensors and numbers: ``step``,
    ``last_refresh``, ``refresh_count``) and its group's keys.

    ``reads_share``: the policy reads the captured share of the update's own full gradient. When the
    engine is asked with that gradient (``projector_due(p, grad)``: ``step()``, ``update``, layer-wise
    mode) it first measures ``‖low‖/‖G‖`` under the current projector, once per update, into the
    state: ``capture_share`` (a float) and ``capture_step`` (the update it was measured for). Asked
    without one (the projected backward, between refreshes), there is no measurement for this update
    (DESIGN.md, "Refresh"). ``requires``: group keys that must not be None when the policy is chosen."""

    reads_share = False
    requires: tuple[str, ...] = ()

    def due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        raise NotImplementedError


@register_refresh_policy("interval")
class IntervalRefresh(RefreshPolicy):
    """Every ``update_proj_gap`` updates: galore-torch's ``iter % T == 0`` with ``iter`` the updates taken."""

    def due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return state.get("step", 0) - state["last_refresh"] >= group["update_proj_gap"]


class InnerRule:
    """What the engine needs of an inner update rule (a small protocol; subclasses override).

    ``defaults``: the rule's own group keys and their defaults (``keys`` lists them); the aliases'
    constructors (``GaLoreAdamW``'s ``betas``, ``eps``) repeat them as their signatures.
    ``lr_may_be_none``: the rule computes its own step size (Adafactor's relative step).
    ``has_moments``: it keeps Adam moments ``(M, V)``, which the sparse residual needs.
    ``shards``: it works on FSDP2 row shards.
    ``moment_transports``: the ``moment_transport`` values it supports: ``keep`` always, ``reset``
    with ``reset_moments``, ``project`` with ``transport_moments`` (DESIGN.md, "Moment transport").
    """

    name = "rule"
    registry_name = ""
    defaults: dict[str, Any] = {}
    keys: tuple[str, ...] = ()
    lr_may_be_none = False
    has_moments = False
    shards = True
    shard_reason = ""
    moment_transports: tuple[str, ...] = ("keep",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "defaults" in cls.__dict__:
            cls.keys = tuple(cls.defaults)

    def check(self, group: dict[str, Any], where: str) -> None:
        """Raise ``ValueError`` naming a bad value of the rule's own keys."""

    def moment_decay(self, group: dict[str, Any]) -> tuple[float, float, float]:
        """``(β1, β2, ε)`` of the rule's Adam moments (only when ``has_moments``): the sparse residual
        keeps exact moments with the same constants."""
        raise NotImplementedError(f"the {self.name} rule has no moments")

    def step_lr(self, group: dict[str, Any], state: dict[str, Any], p: Tensor) -> float:
        """The learning rate of this update (the group's; relative-step rules compute their own)."""
        return as_float(group["lr"])

    def direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float) -> Tensor:
        """Update the rule's state from ``grad`` (creating it at the first call) and return the step
        (learning rate included): the parameter, or its projection, moves by minus this."""
        raise NotImplementedError

    def apply_full(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float,
                   write: ParameterWrite) -> None:
        """A group without ``rank``: move the parameter by the rule's step on its full gradient."""
        write.sub(self.direction(grad, state, group, lr))

    def fusable(self, target: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
        """Whether ``apply_full_fused`` takes this plain update (``target``: this process's part of the
        parameter). Rules without a fused kernel say no, and ``step()`` updates one parameter at a time."""
        return False

    def apply_full_fused(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                         group: dict[str, Any], lr: float) -> None:
        """``apply_full`` of several ``fusable`` plain parameters of one group at once (their ``step``
        counted and weight decay applied), bitwise what one ``apply_full`` each would give."""
        raise NotImplementedError(f"the {self.name} rule has no fused update")

    def moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(M, V)`` as stored or dequantized (only when ``has_moments``)."""
        raise NotImplementedError(f"the {self.name} rule has no moments")

    def reset_moments(self, state: dict[str, Any]) -> None:
        """``moment_transport="reset"``: drop the moments; the next ``direction`` creates them afresh and
        its bias correction counts from there (``moment_steps``; the engine records ``moment_start``)."""
        raise NotImplementedError(f"the {self.name} rule has no moments to reset")

    def transport_moments(self, state: dict[str, Any], group: dict[str, Any], rotation: transport.Rotation) -> None:
        """``moment_transport="project"``: carry the moments into the new basis, in place (their
        ``first``/``second`` maps are ``rotation``'s, on this process's part of each moment)."""
        raise NotImplementedError(f"the {self.name} rule has no moments to transport")

    def state_shapes(self, shape: tuple[int, ...], group: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
        """The layouts of the rule's state for a gradient of ``shape``: each a dict of key → shape
        (``load_state_dict`` accepts a saved state that matches one of them exactly)."""
        raise NotImplementedError

    def state_dtype(self, key: str, grad_dtype: torch.dtype) -> torch.dtype:
        """The dtype the rule keeps ``key`` in for a gradient of ``grad_dtype``."""
        return grad_dtype

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """Bytes of the rule's state for a gradient of ``shape`` in ``dtype``."""
        raise NotImplementedError


@dataclass
class LowRankGradient:
    """A low-rank parameter's gradient as the optimizer uses it: ``low``, the projected gradient
    (``Pᵀ G``, ``G Q`` or ``Pᵀ G Q``), ``residual``, the gradient's entries at the residual index
    set (``None`` without a residual), ``full``, ``G`` itself where it was formed and the group's
    ``outside`` term needs it (``None`` otherwise), and ``sketch``, ``G Ω`` or ``Ωᵀ G`` for the
    captured share's estimate on the projected backward (``LowRankOptimizer.share_sketch``; ``None``
    otherwise). Micro-batches add up (``full`` and ``sketch`` only when every one has them: a sum with
    a micro-batch without is without); clipping scales all four."""

    low: Tensor
    residual: Tensor | None = None
    full: Tensor | None = None
    sketch: Tensor | None = None

    def add_(self, other: LowRankGradient) -> LowRankGradient:
        self.low.add_(other.low)
        if self.residual is not None and other.residual is not None:
            self.residual.add_(other.residual)
        self.full = None if self.full is None or other.full is None else self.full.add_(other.full)
        self.sketch = None if self.sketch is None or other.sketch is None else self.sketch.add_(other.sketch)
        return self

    def mul_(self, factor: float) -> LowRankGradient:
        self.low.mul_(factor)
        for t in (self.residual, self.full, self.sketch):
            if t is not None:
                t.mul_(factor)
        return self


class ParameterWrite:
    """How a step reaches a parameter: ``p ← decay·p − alpha·step``, rounded once to ``p``'s dtype.

    float32/float64 parameters are updated in place as ``torch.optim.AdamW`` does (the decay was
    already applied by the engine). bf16/fp16 ones are computed in float32 and rounded once,
    stochastically by default (``stochastic_rounding``; one stream per (seed, parameter index, step,
    first element of this process's part), so runs reproduce and resume bitwise), else to nearest
    (DESIGN.md, "Precision"). ``start``/``end`` address a flat slice of this process's part of ``p``
    (chunked 8-bit updates, written in order from one stream: on CPU, where a generator's draws are
    sequential, the result does not depend on the chunk size).
    """

    def __init__(self, p: Tensor, decay: float, rounding_seed: tuple[int, int, int] | None):
        self.local = local(p)
        self.low_precision = p.dtype in LOW_PRECISION
        self.decay = decay
        self.rounding_seed = rounding_seed
        self._generator: torch.Generator | None = None
        self.offset = local_offset(p)  # an FSDP2 shard rounds with the stream of its first global element

    def sub_product(self, a: Tensor, b: Tensor, alpha: float, index: Tensor | None = None,
                    correction: Tensor | None = None, scaled: tuple[Tensor, Tensor] | None = None) -> None:
        """``p ← decay·p − alpha·(a @ b + correction at index + o·c)`` (this process's parts of ``a``,
        ``b`` and ``o``; ``scaled = (o, c)``, ``c`` a 0-d tensor: Fira's term; ``index`` flat into this
        process's part of ``p``): one ``addmm_`` in place for float32/float64 parameters (no ``m×n``
        temporary), one rounding for bf16/fp16 ones."""
        a, b = local(a), local(b)
        target = self.local
        if self.low_precision or not target.is_contiguous():
            update = a @ b
            if index is not None:
                update.view(-1).index_add_(0, index, correction)
            if scaled is not None:
                update.addcmul_(*scaled)
            self.sub(update, alpha)
            return
        target.addmm_(a.to(target.dtype), b.to(target.dtype), alpha=-alpha)
        if index is not None:
            target.view(-1).index_add_(0, index, correction.to(target.dtype), alpha=-alpha)
        if scaled is not None:
            target.addcmul_(scaled[0].to(target.dtype), scaled[1].to(target.dtype), value=-alpha)

    def sub(self, step: Tensor, alpha: float = 1.0, start: int | None = None, end: int | None = None) -> None:
        step = local(step)
        target = self.local if start is None else self.local.view(-1)[start:end]
        if not self.low_precision:
            target.add_(step.to(target.dtype), alpha=-alpha)
            return
        new = target.float()
        if self.decay != 1.0:
            new.mul_(self.decay)
        new.add_(step.reshape(new.shape).float(), alpha=-alpha)
        if self.rounding_seed is None:
            target.copy_(new)
            return
        if self._generator is None:
            self._generator = rounding_generator(*self.rounding_seed, self.offset, new.device)
        target.copy_(stochastic_round(new, target.dtype, self._generator))


class LocalRefresh:
    """Every rank (or the one process) computes every projector that is due itself."""

    def refresh(self, optimizer: LowRankOptimizer, due: list[tuple[Tensor, Tensor]]) -> None:
        for p, grad in due:
            optimizer.refresh_projector(p, grad)


class LowRankOptimizer(Optimizer):
    """Gradient low-rank projection around an inner update rule (see the module docstring).

    Subclasses set ``rule`` (an ``InnerRule``) and give their constructor's defaults; a parameter
    group is low-rank when it carries ``rank``, other groups run the rule on the full gradient.

    Args:
        params: parameters or parameter groups (dicts). A group with ``rank`` is low-rank.
        defaults: the optimizer-level defaults of every group (``lr``, ``weight_decay``, rule keys).
        low_rank_defaults: overrides of ``LOW_RANK_DEFAULTS``, filled into low-rank groups only.
        seed: seeds every random draw (DESIGN.md, "Randomness"); a group may override it.
        stochastic_rounding: write bf16/fp16 parameters with stochastic rounding (else to nearest);
            no effect on float32/float64 ones. A group may override it.
    """

    rule: InnerRule = InnerRule()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rule" in cls.__dict__ and cls.rule.registry_name:
            _ALIASES.setdefault(cls.rule.registry_name, cls)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        low_rank_defaults: dict[str, Any],
        seed: int = 0,
        stochastic_rounding: bool = True,
        *,
        rule: str | InnerRule | None = None,
    ):
        if rule is not None:  # an instance's own rule (``from_spec``); the aliases set theirs on the class
            if isinstance(rule, str):
                if rule not in RULES:
                    raise ValueError(f"rule={rule!r} is not one of {sorted(RULES)}")
                rule = RULES[rule]()
            self.rule = rule
            defaults = {**rule.defaults, **defaults}
        unknown = sorted(set(low_rank_defaults) - set(LOW_RANK_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; low-rank options are "
                            f"{sorted(LOW_RANK_DEFAULTS)}")
        self._low_rank_defaults = {**LOW_RANK_DEFAULTS, **low_rank_defaults}
        self._init_runtime()
        defaults = dict(defaults, seed=seed, stochastic_rounding=stochastic_rounding)
        self._check_common(defaults, where="optimizer defaults")
        super().__init__(params, defaults)

    @classmethod
    def from_spec(cls, params: Iterable[Tensor] | Iterable[dict[str, Any]], spec: Any, *, lr: float | Tensor | None,
                  weight_decay: float = 0.0, seed: int = 0, stochastic_rounding: bool = True) -> LowRankOptimizer:
        """The optimizer a ``spec.LowRankSpec`` describes: its inner rule (the rule's alias class, e.g.
        ``GaLoreAdamW`` for ``adamw``, where one exists) with the spec's rule options, and its group
        fields as the defaults of the low-rank groups among ``params``."""
        alias = cls if cls is not LowRankOptimizer else _ALIASES.get(spec.rule)
        options = dict(spec.rule_options, lr=lr, weight_decay=weight_decay, seed=seed,
                       stochastic_rounding=stochastic_rounding)
        low_rank = spec.group_options()
        if alias is not None:
            if alias.rule.registry_name != spec.rule:
                raise ValueError(f"{alias.__name__} runs the {alias.rule.registry_name} rule, not {spec.rule!r}")
            return alias(params, **options, **low_rank)
        defaults = {k: options.pop(k) for k in list(options) if k not in ("seed", "stochastic_rounding")}
        return LowRankOptimizer(params, defaults, low_rank, rule=spec.rule, **options)

    def _init_runtime(self) -> None:
        """What is not state: caches, diagnostics, the refresher (rebuilt after a copy)."""
        #: wall seconds spent computing projectors since construction (for progress reports; not state)
        self.refresh_seconds = 0.0
        #: bytes of the optimizer's own collectives (FSDP2 math, DDP split refresh), by phase and op
        self.comm = CommCounter()
        #: projectors this process computed itself (DDP with a split refresh: its share)
        self.projectors_computed = 0
        self.refresher: Any = LocalRefresh()
        self._projected_backward: Any = None  # see attach_projected_backward
        self._projected: dict[Tensor, LowRankGradient] = {}
        self._factored: dict[Tensor, projection.FactoredGradient] = {}  # see add_factored_gradient
        self._sketches: dict[Tensor, tuple[int, Tensor]] = {}  # see share_sketch: (update, Ω) per parameter
        self._where: dict[int, tuple[dict[str, Any], int, int]] = {}

    @property
    def comm_bytes(self) -> dict[str, dict[str, int]]:
        return self.comm.bytes

    # ------------------------------------------------------------------ copies (torch keeps only
    # defaults, state and param_groups; DESIGN.md, "torch.optim contract")
    def __getstate__(self) -> dict[str, Any]:
        extra = {"_low_rank_defaults": self._low_rank_defaults}
        if "rule" in self.__dict__:  # a rule given to this instance (subclasses set it on the class)
            extra["rule"] = self.rule
        return {**super().__getstate__(), **extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_where" not in self.__dict__:  # a copy (torch's load_state_dict also comes through here)
            self._init_runtime()

    # ------------------------------------------------------------------ validation
    @property
    def _allowed_keys(self) -> set[str]:
        return _FOREIGN_KEYS | {"lr", "weight_decay", "seed", "stochastic_rounding", "rank"} | set(self.rule.keys) | set(
            self._low_rank_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking all of it: a rejected group leaves the optimizer untouched."""
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
        try:
            self._check_group(self.param_groups[-1], f"parameter group {len(self.param_groups) - 1}")
        except BaseException:
            self.param_groups.pop()
            raise
        self._where.clear()

    def _check_common(self, group: dict[str, Any], where: str) -> None:
        check_common(group, where, self.rule.lr_may_be_none)
        self.rule.check(group, where)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        self._check_common(group, where)
        if "rank" in group:
            check_low_rank(group, where)
            if group["residual_ratio"] > 0 and not self.rule.has_moments:
                raise ValueError(f"{where}: residual_ratio={group['residual_ratio']} needs Adam moments; "
                                 f"{type(self).__name__} ({self.rule.name}) has none")
            if group["moment_transport"] not in self.rule.moment_transports:  # issue 29, moment transport
                raise ValueError(f"{where}: moment_transport={group['moment_transport']!r} is not supported by the "
                                 f"{self.rule.name} rule (it supports {self.rule.moment_transports})")
        for i, p in enumerate(group["params"]):
            name = _param_name(group, i)
            if p.is_complex():
                raise ValueError(f"{where}: {name} is complex ({p.dtype}); {type(self).__name__} supports real "
                                 "floating-point parameters only")
            if not p.is_floating_point():
                raise ValueError(f"{where}: {name} has dtype {p.dtype}; parameters must be floating point")
            layout_of(p, self.comm).check_parameter(p, name, where, self.rule)
            if "rank" in group:
                check_matrix(group, p, name, where)

    # ------------------------------------------------------------------ where a parameter is
    def _locate(self, p: Tensor) -> tuple[dict[str, Any], int, int]:
        """``(group, index in the group, index among all parameters)``; the last seeds randomness."""
        found = self._where.get(id(p))
        if found is None or found[1] >= len(found[0]["params"]) or found[0]["params"][found[1]] is not p:
            self._where = {id(q): (g, i, n) for n, (g, i, q) in enumerate(
                (g, i, q) for g in self.param_groups for i, q in enumerate(g["params"]))}
            if id(p) not in self._where:
                raise KeyError(f"a parameter of shape {tuple(p.shape)} is not in this optimizer")
            found = self._where[id(p)]
        return found

    def group_of(self, p: Tensor) -> dict[str, Any]:
        return self._locate(p)[0]

    def name_of(self, p: Tensor) -> str:
        group, i, _ = self._locate(p)
        return _param_name(group, i)

    # ------------------------------------------------------------------ the per-parameter API
    def is_low_rank(self, p: Tensor) -> bool:
        return "rank" in self.group_of(p)

    def projector_due(self, p: Tensor, grad: Tensor | None = None) -> bool:
        """Whether ``p``'s next update needs a full gradient: a low-rank parameter before its first
        update, then when its group's refresh policy says (``interval``: every ``update_proj_gap``
        updates, galore-torch's ``iter % T == 0`` with ``iter`` the updates taken so far). False for
        plain parameters (they always take a full gradient). ``grad``: this update's full gradient,
        for a policy that reads its captured share (``RefreshPolicy.reads_share``)."""
        group = self.group_of(p)
        if "rank" not in group:
            return False
        state = self.state.get(p, {})
        if "proj_side" not in state:
            return True
        if state["last_refresh"] == state.get("step", 0):  # refreshed for this very update: once is enough
            return False
        policy = refresh_policy(group["refresh"])
        # (a FactoredGradient is not measured); a refresh already due (the interval, or the projected
        # backward's estimate of the previous update: DESIGN.md, "Refresh") stays due, as backward saw it
        if isinstance(grad, Tensor) and policy.reads_share and not policy.due(state, group):
            self._measure_share(p, grad)
        return policy.due(state, group)

    def _measure_share(self, p: Tensor, grad: Tensor) -> None:
        """``capture_share = ‖low‖_F / ‖G‖_F`` of this update's full gradient under ``p``'s current
        projector (1 for a zero gradient), once per update (``capture_step``); a float, so the
        policy's decision is the same on every rank (DDP: the same averaged gradient) and resumes
        bitwise. Costs one projection and two norms (under FSDP2 one scalar all-reduce)."""
        state = self.state[p]
        step = state.get("step", 0) + 1
        if state.get("capture_step") == step:
            return
        layout, grad = layout_of(p, self.comm), grad.to(compute_dtype(p))
        low = layout.project(grad, *self.projector(p))
        captured, total = layout.squared_norms(low, grad)
        state["capture_share"] = math.sqrt(captured / total) if total > 0 else 1.0
        state["capture_step"] = step

    def share_sketch(self, p: Tensor) -> Tensor | None:
        """``Ω`` of the captured share's estimate for ``p``'s next update on the projected backward
        (DESIGN.md, "Refresh"): ``SHARE_SKETCH`` standard normal columns on the side the projector
        leaves whole (``n×k`` for a left projector, the backward forms ``G Ω = dyᵀ(x Ω)``; ``m×k`` for
        a right one, ``Ωᵀ G = (dy Ω)ᵀ x``), drawn from ``(seed, parameter index, update)``: the same on
        every micro-batch and rank, and after a resume. None where no estimate is taken: a group whose
        policy reads no share, before the first projector, or a two-sided projector."""
        from .refresh import SHARE_SKETCH

        group, _, index = self._locate(p)
        state = self.state.get(p, {})
        if "rank" not in group or "proj_side" not in state or not refresh_policy(group["refresh"]).reads_share:
            return None
        left, right = self.projector(p)
        if (left is None) == (right is None):
            return None
        update = state.get("step", 0) + 1
        held = self._sketches.get(p)
        if held is None or held[0] != update:
            rows = p.shape[1] if right is None else p.shape[0]
            omega = torch.randn(rows, SHARE_SKETCH, generator=share_generator(group["seed"], index, update),
                                dtype=torch.float64).to(device=local(p).device, dtype=compute_dtype(p))
            held = self._sketches[p] = (update, omega)
        return held[1]

    def _record_sketched_share(self, p: Tensor, grad: LowRankGradient) -> None:
        """The projected backward's estimate of this update's captured share, ``‖Pᵀ(G Ω)‖ / ‖G Ω‖``
        (``‖(Ωᵀ G) Q‖ / ‖Ωᵀ G‖`` for a right projector), from the summed sketch and ``low``, recorded
        as ``capture_share`` of this update (``capture_step``) before it is applied; the policy reads
        it at the next update (DESIGN.md, "Refresh")."""
        state = self.state[p]
        left, _ = self.projector(p)
        omega = self.share_sketch(p)
        low = grad.low @ omega if left is not None else omega.T @ grad.low
        captured = float(low.double().square().sum())
        total = float(grad.sketch.double().square().sum())
        state["capture_share"] = math.sqrt(captured / total) if total > 0 else 1.0
        state["capture_step"] = state.get("step", 0) + 1

    def check_gradient(self, p: Tensor, grad: Tensor, name: str | None = None) -> None:
        """Raise on a gradient that must not be used; changes nothing.

        A sparse gradient raises ``RuntimeError``; at a projector refresh a gradient with NaN/Inf
        raises ``FloatingPointError`` (no projector is ever computed from NaN/Inf; the check costs
        one reduction per refresh, and under FSDP2 one all-reduce so every rank agrees)."""
        name = name or self.name_of(p)
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name})")
        if self.projector_due(p, grad) and not layout_of(p, self.comm).all_finite(grad):
            raise FloatingPointError(
                f"the gradient of {name} (shape {tuple(p.shape)}) has NaN or Inf at a projector refresh "
                f"(step {self.state.get(p, {}).get('step', 0) + 1}); nothing was updated")

    def refresh_projector(self, p: Tensor, grad: Tensor) -> bool:
        """Refresh ``p``'s projector from its full gradient ``grad`` if due; True if it did.

        If the SVD falls over even in float64, the previous projector is kept until the next
        scheduled refresh; at the very first refresh, where there is none, a seeded random
        orthonormal basis is used instead. Either way training goes on, with a warning. Directions
        of the new basis along which the gradient is numerically zero are zeroed (DESIGN.md,
        "Projectors", rank above the gradient's rank). With the group's ``canonical_signs`` each basis
        vector's sign is then fixed (``projection.canonical_signs``)."""
        if not self.projector_due(p, grad):
            return False
        group, _, index = self._locate(p)
        state = self.state[p]
        layout = layout_of(p, self.comm)
        side = self.projection_side(p)
        gen = generator_for(group["seed"], index, state.get("refresh_count", 0))
        warm = self.projector(p) if group["warm_start"] and state.get("proj_side") == side else None
        _sync(p)
        start = time.perf_counter()
        grad = grad.to(compute_dtype(p))
        basis = layout.compute_projector(grad, group, side, gen, warm, index)
        if basis is not None:
            basis = layout.drop_null_directions(grad, *basis)
        _sync(p)
        self.refresh_seconds += time.perf_counter() - start
        self.projectors_computed += 1
        if basis is None:
            if "proj_side" in state:
                warnings.warn(f"projector refresh failed for {self.name_of(p)} (shape {tuple(p.shape)}) at step "
                              f"{state['step']}; keeping the previous projector", RuntimeWarning)
                basis = self.projector(p)
            else:
                warnings.warn(f"projector refresh failed for {self.name_of(p)} (shape {tuple(p.shape)}) at its "
                              "first step; using a seeded random orthonormal projector", RuntimeWarning)
                basis = layout.random_projector(p, projection.resolve_rank(group["rank"], p.shape), side, gen)
        if group["canonical_signs"]:  # issue 29 item 5: signs fixed, whatever computed the basis
            basis = layout.canonical_signs(*basis)  # (DESIGN.md, "Projectors", signs)
        self.store_projector(p, *basis)
        return True

    def projection_side(self, p: Tensor) -> int:
        """The side ``p``'s projector is on: right for cross-head groups (left for column head blocks),
        else by ``proj_type``."""
        group = self.group_of(p)
        if group["num_heads"] is not None:
            return projection.RIGHT
        if group.get("head_blocks") is not None:  # fused q/k/v cross-head
            return projection.cross_head_side(group["head_blocks"]["dim"])
        return projection.projection_side(p.shape, group["proj_type"])

    def store_projector(self, p: Tensor, left: Tensor | None, right: Tensor | None) -> None:
        """Make ``(left, right)`` ``p``'s projector, as a refresh does (its side, the refresh count
        and the step of the refresh are recorded; the moments follow ``moment_transport``). Used by
        refreshes computed elsewhere (DDP): every rank stores the same projector, so every rank
        carries its moments the same way."""
        group, state = self.group_of(p), self.state[p]
        carry = "proj_side" in state and group["moment_transport"] != "keep"  # issue 29, moment transport
        old = self.projector(p) if carry else None
        state["proj_side"] = (projection.FULL if left is not None and right is not None
                              else projection.LEFT if left is not None else projection.RIGHT)
        for key, tensor in (("proj_left", left), ("proj_right", right)):
            if tensor is None:
                state.pop(key, None)
            else:
                state[key] = tensor.to(device=p.device, dtype=group["proj_dtype"] or compute_dtype(p))
        state["last_refresh"] = state.get("step", 0)
        state["refresh_count"] = state.get("refresh_count", 0) + 1
        if old is not None:
            self._carry_moments(p, group, state, old)

    def _carry_moments(self, p: Tensor, group: dict[str, Any], state: dict[str, Any],
                       old: tuple[Tensor | None, Tensor | None]) -> None:
        """Issue 29, moment transport (DESIGN.md, "Moment transport"; ``transport.py``): after a refresh
        from ``old`` to the stored basis, drop the moments (``reset``) or carry them into the new basis
        (``project``). A refresh that left the basis as it was (bitwise; a failed SVD keeps the
        previous projector) changes nothing, and neither does one whose side changed."""
        new = self.projector(p)
        if any((a is None) != (b is None) for a, b in zip(old, new)):
            return
        layout = layout_of(p, self.comm)
        if layout.same_basis(old, new):
            return
        if group["moment_transport"] == "reset":
            self.rule.reset_moments(state)
            state["moment_start"] = state.get("step", 0)
        else:
            self.rule.transport_moments(state, group, transport.Rotation(*layout.change_of_basis(old, new)))

    def projector(self, p: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``p``'s ``(left, right)`` basis in its compute dtype (a copy only when stored in another
        dtype, see ``proj_dtype``); ``(None, None)`` before its first refresh."""
        state, dtype = self.state.get(p, {}), compute_dtype(p)
        return tuple(None if b is None else b.to(dtype) for b in (state.get("proj_left"), state.get("proj_right")))

    def residual_index(self, p: Tensor) -> Tensor | None:
        """The flat indices (into this process's part of ``p``) of the residual set, or None."""
        return self.state.get(p, {}).get("residual_index")

    def project(self, p: Tensor, grad: Tensor) -> LowRankGradient:
        """``p``'s full gradient as the optimizer uses it: projected, plus its residual entries (and
        ``grad`` itself when the group's ``outside`` term needs it: ``LowRankGradient.full``)."""
        layout = layout_of(p, self.comm)
        full = grad if self.group_of(p)["outside"] != "off" else None
        grad = grad.to(compute_dtype(p))
        left, right = self.projector(p)
        if left is None and right is None:
            raise RuntimeError(f"{self.name_of(p)} has no projector yet: call refresh_projector(p, grad) "
                               "with a full gradient first")
        index = self.residual_index(p)
        if isinstance(grad, projection.FactoredGradient):  # never formed (DESIGN.md, "Projected backward")
            return LowRankGradient(grad.project(left, right), None if index is None else grad.entries(index))
        entries = None if index is None else layout.flat_local(grad)[index.long()]
        return LowRankGradient(layout.project(grad, left, right), entries, full)

    def apply(self, p: Tensor, grad: Tensor | LowRankGradient) -> None:
        """One update of ``p``: from its full gradient (a plain parameter) or a ``LowRankGradient``
        (a low-rank one, projected with its current projector)."""
        group, state = self.group_of(p), self.state[p]
        if "rank" not in group:
            if isinstance(grad, LowRankGradient):
                raise TypeError(f"{self.name_of(p)} is not low-rank; apply() takes its full gradient")
            lr, write = self._begin_step(group, state, p)
            self.rule.apply_full(grad, state, group, lr, write)
            return
        if not isinstance(grad, LowRankGradient):
            raise TypeError(f"{self.name_of(p)} is low-rank; apply() takes a LowRankGradient (see project())")
        refreshed = state["last_refresh"] == state.get("step", 0)  # refreshed before this step
        lr, write = self._begin_step(group, state, p)
        left, right = self.projector(p)
        direction = self.rule.direction(grad.low, state, group, lr)
        index = correction = term = None
        if group["residual_ratio"] > 0:
            index, correction = residual.SparseResidual(self.rule).correction(
                state, group, grad.residual, grad.low, direction, left, right, p.shape[1], refreshed, lr,
                compute_dtype(p), layout_of(p, self.comm).select_residual, local)
        if group["outside"] == "fira" and grad.full is not None:  # only where G was formed (outside.py)
            term = outside.FiraTerm().term(state, group, grad.full, grad.low, direction, left, right, lr, index,
                                           local, lambda value: layout_of(p, self.comm).sum_parts(value, p))
        write.sub_product(*projection.back_factors(direction, left, right), alpha=group["scale"], index=index,
                          correction=correction, scaled=term)

    def update(self, p: Tensor, grad: Tensor) -> None:
        """One step of ``p`` from its full gradient (what ``step()`` does for each parameter)."""
        if self.is_low_rank(p):
            self.refresh_projector(p, grad)
            self.apply(p, self.project(p, grad))
        else:
            self.apply(p, grad)

    def add_projected_gradient(self, p: Tensor, grad: LowRankGradient) -> None:
        """Accumulate a projected gradient of ``p`` computed without its full gradient (the
        projected backward); the next ``step()`` uses it as it uses ``p.grad``."""
        if self.projector_due(p):
            raise RuntimeError(f"{self.name_of(p)} needs a full gradient at this step (its projector is due)")
        held = self._projected.get(p)
        self._projected[p] = grad if held is None else held.add_(grad)

    def projected_gradient(self, p: Tensor) -> LowRankGradient | None:
        return self._projected.get(p)

    # issue 26: a refresh without the full gradient (DESIGN.md, "Projected backward", refresh without G)
    def refreshes_from_factors(self, p: Tensor) -> bool:
        """Whether ``p``'s projector can be refreshed from its gradient's factors
        (``projection.FactoredGradient``) without forming ``G``: a low-rank matrix (whole, or FSDP2
        row shards: ``sharding.FactoredRows``) whose projector is cross-head on row blocks (its block
        is formed, small) or randomized (the
        range finder needs only products with ``G`` and ``Gᵀ``), whose group needs no ``G`` otherwise
        (``outside="off"``). Exact SVD of a whole matrix (plain GaLore, galore-torch parity) needs ``G``
        itself. (A captured-share policy refreshes from factors too: on this path its share is the
        sketched estimate of the previous update, DESIGN.md "Refresh".)"""
        group = self.group_of(p)
        if "rank" not in group or group["outside"] != "off":
            return False
        if group["num_heads"] is not None:
            return True
        blocks = group.get("head_blocks")
        if blocks is not None:
            return blocks["dim"] == 0
        return group["svd"] == "randomized"

    def add_factored_gradient(self, p: Tensor, grad: projection.FactoredGradient) -> None:
        """Hold a micro-batch's gradient of ``p`` as its factors at a step where ``p``'s projector is
        due (the projected backward keeps its ``x`` and ``dy``); ``step()`` (or ``settle_factored``)
        refreshes the projector from the sum of the step's micro-batches and applies it, as it would
        from ``p.grad``. Cleared by ``zero_grad()``."""
        if not self.projector_due(p) or not self.refreshes_from_factors(p):
            raise RuntimeError(f"{self.name_of(p)}: a factored gradient is only taken at a refresh that can use it")
        held = self._factored.get(p)
        self._factored[p] = grad if held is None else held.add_(grad)

    def factored_gradient(self, p: Tensor) -> projection.FactoredGradient | None:
        return self._factored.get(p)

    def pop_factored_gradient(self, p: Tensor) -> projection.FactoredGradient | None:
        """Stop holding ``p``'s factored gradient and return it (the projected backward folds factors
        that outgrow ``G`` into ``p.grad``: DESIGN.md, "Projected backward", the factors' cap)."""
        return self._factored.pop(p, None)

    @torch.no_grad()
    def settle_factored(self) -> None:
        """Refresh every projector held as factors and turn each into the projected gradient under its
        new projector (``step()`` does it first; ``projected.clip_grad_norm_`` too, to see them). The
        factors are checked first, all of them, before anything changes."""
        if not self._factored:
            return
        for p, grad in self._factored.items():
            if p.grad is not None or p in self._projected:
                raise RuntimeError(f"{self.name_of(p)} has both a factored and another gradient")
            self.check_gradient(p, grad)
        factored, self._factored = self._factored, {}
        self.refresher.refresh(self, list(factored.items()))
        for p, grad in factored.items():
            self._projected[p] = self.project(p, grad)
    def apply_plain(self, params: list[Tensor]) -> None:
        """One update of each of ``params`` (plain parameters of one group) from its ``p.grad``: those
        the rule's fused kernel takes (``InnerRule.fusable``: AdamW's float32/float64 tensors) in one
        call, the rest one ``apply`` each; bitwise the same as one ``apply`` each (DESIGN.md, "Plain
        parameters: one fused update"). The per-parameter work left is counting the step."""
        group = self.group_of(params[0])
        fused, states = [], []
        for p in params:
            state = self.state[p]
            if p.dtype in LOW_PRECISION or not self.rule.fusable(p, p.grad, state):
                self.apply(p, p.grad)
                continue
            state["step"] = state.get("step", 0) + 1
            fused.append(p)
            states.append(state)
        if not fused:
            return
        lr = self.rule.step_lr(group, states[0], fused[0])  # the group's (a fused rule's lr is per group)
        decay = 1 - lr * group["weight_decay"]
        if decay != 1:
            for p in fused:
                p.mul_(decay)  # as _begin_step does
        self.rule.apply_full_fused(fused, [p.grad for p in fused], states, group, lr)

    def _begin_step(self, group: dict[str, Any], state: dict[str, Any], p: Tensor) -> tuple[float, ParameterWrite]:
        """Count the step; return the lr and how to write ``p``. Decoupled weight decay (on the full
        weight) is applied here to float32/float64 parameters, folded into the one rounding of the
        update for bf16/fp16 ones."""
        state["step"] = state.get("step", 0) + 1
        lr = self.rule.step_lr(group, state, p)
        decay = 1 - lr * group["weight_decay"]
        if decay != 1 and p.dtype not in LOW_PRECISION:
            p.mul_(decay)
        seed = (group["seed"], self._locate(p)[2], state["step"]) if group.get("stochastic_rounding", True) else None
        return lr, ParameterWrite(p, decay, seed)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient (``p.grad``, or a projected one).

        Checks come first and change nothing (``check_gradient``), so after a ``FloatingPointError``
        at a refresh the caller may skip the batch. Between refreshes non-finite values are not
        checked (that would cost a device sync per parameter per step) and propagate as in
        ``torch.optim.AdamW``; use a ``GradScaler`` or clip for mixed precision.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):  # an LR scheduler may have written a bad lr
            self._check_common(group, f"parameter group {i}")
        full = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in full:
            self.check_gradient(p, p.grad)
            if p in self._projected:
                raise RuntimeError(f"{self.name_of(p)} has both a full and a projected gradient")
        self.settle_factored()
        due = [(p, p.grad) for p in full if self.projector_due(p, p.grad)]
        if due:
            self.refresher.refresh(self, due)
        plain: dict[int, list[Tensor]] = {}
        for p in full:
            group = self.group_of(p)
            if "rank" in group:
                self.update(p, p.grad)
            else:
                plain.setdefault(id(group), []).append(p)
        for params in plain.values():
            self.apply_plain(params)
        projected, self._projected = self._projected, {}
        for p, grad in projected.items():
            if grad.sketch is not None:  # the projected backward's captured share, under this projector
                self._record_sketched_share(p, grad)
            self.apply(p, grad)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._projected.clear()
        self._factored.clear()

    # ------------------------------------------------------------------ state loading
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, marked with the inner rule that wrote it (strings and numbers only)."""
        out = super().state_dict()
        out[STATE_DICT_KEY] = {"rule": self.rule.name, "version": 1}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, after checking the state dict fits this optimizer.

        Refused with ``ValueError`` (nothing changes): another inner rule's state (8-bit into
        32-bit, Adafactor into AdamW, ``torch.optim.AdamW``'s), groups that differ in being low-rank or
        in rank, or state tensors of other shapes. State tensors are then put in the dtype this
        optimizer keeps them in for the parameters as they are now (torch would cast our float32
        projectors to bf16 and our integer indices to floats): a float32 checkpoint loads into a
        bf16 model and back, like ``torch.optim.AdamW``'s. The groups and the state keep their
        identity (their contents are replaced), so a ``LayerwiseOptimizer`` sharing them stays valid.
        """
        self._check_loadable(state_dict)
        groups, state = self.param_groups, self.state
        super().load_state_dict(state_dict)
        for old, new in zip(groups, self.param_groups):
            old.clear()
            old.update(new)
            old.setdefault("stochastic_rounding", self.defaults["stochastic_rounding"])  # older checkpoints
            if "rank" in old:  # keys added since (``refresh``) take the values those runs had: the defaults
                for key, value in LOW_RANK_DEFAULTS.items():
                    old.setdefault(key, value)
        loaded, self.param_groups = self.state, groups
        state.clear()
        state.update(loaded)
        self.state = state
        self._where.clear()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self._restore_dtypes(p, state_dict["state"][saved_id])

    def _restore_dtypes(self, p: Tensor, saved: dict[str, Any]) -> None:
        """Put each loaded state tensor in the dtype this optimizer keeps it in, converted from the
        saved tensor itself (torch's cast to the parameter's dtype may have rounded it)."""
        entry = self.state[p]
        dtype = compute_dtype(p) if self.is_low_rank(p) else p.dtype
        proj_dtype = self.group_of(p).get("proj_dtype") or compute_dtype(p)
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                continue
            if key in ("proj_left", "proj_right"):
                want = proj_dtype
            elif key == "residual_index":
                want = torch.int32 if p.numel() < 2**31 else torch.int64
            elif key in ("residual_m", "residual_v", "outside_norm"):
                want = compute_dtype(p)
            else:
                want = self.rule.state_dtype(key, dtype)
            if entry[key].dtype != want or value.dtype != want:
                entry[key] = value.to(device=p.device, dtype=want, copy=True)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        ours = f"{type(self).__name__} ({self.rule.name} rule)"
        marker = state_dict.get(STATE_DICT_KEY)
        if marker is not None and marker.get("rule") != self.rule.name:
            raise ValueError(f"this state dict was written by an optimizer with the {marker.get('rule')} rule; it "
                             f"cannot be loaded into {ours}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} parameter groups, {ours} has "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            unknown = sorted(set(saved) - self._allowed_keys)
            if unknown:
                raise ValueError(f"parameter group {i} of the state dict has keys {unknown} that {ours} does not "
                                 "have: it was written by another optimizer")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"parameter group {i}: the state dict has {len(saved['params'])} parameters, "
                                 f"this optimizer {len(group['params'])}")
            if saved.get("rank") != group.get("rank"):
                raise ValueError(f"parameter group {i}: saved rank {saved.get('rank')!r}, here "
                                 f"{group.get('rank')!r} (None: a plain group); the state does not fit")
            for j, (k, p) in enumerate(zip(saved["params"], group["params"])):
                entry = state_dict["state"].get(k)
                if entry:
                    self._check_entry(entry, saved, p, f"parameter group {i}, {_param_name(group, j)}")

    def _check_entry(self, entry: dict[str, Any], saved_group: dict[str, Any], p: Tensor, where: str) -> None:
        rule_keys = {k: v for k, v in entry.items() if k not in ENGINE_STATE_KEYS}
        if not rule_keys:
            return
        shape = tuple(p.shape)
        if "rank" in saved_group:
            if "proj_side" not in entry:
                raise ValueError(f"{where}: low-rank state without a projector")
            r = projection.resolve_rank(saved_group["rank"], shape)  # "full" or a fraction: per matrix
            m, n = shape
            shape = {projection.LEFT: (r, n), projection.RIGHT: (m, r), projection.FULL: (r, r)}[entry["proj_side"]]
        if any(layout_of(v, None).sharded for v in rule_keys.values() if isinstance(v, Tensor)):
            return  # FSDP2 state goes through distributed.load_checkpoint, which checks its own layout
        got = {k: tuple(v.shape) for k, v in rule_keys.items() if isinstance(v, Tensor)}
        layouts = self.rule.state_shapes(shape, saved_group)
        if got not in layouts:
            raise ValueError(f"{where}: saved state {got} is not what the {self.rule.name} rule keeps for a "
                             f"{shape} gradient ({' or '.join(map(str, layouts))})")

    # ------------------------------------------------------------------ the projected backward's seam
    @property
    def projected_backward(self) -> Any:
        """The ``projected.ProjectedBackward`` feeding this optimizer, or None (read-only: it comes and
        goes through ``attach_projected_backward``)."""
        return self._projected_backward

    def use_refresher(self, refresher: Any) -> None:
        """Compute due projectors with ``refresher`` (an object with ``refresh(optimizer, due)``, ``due``
        a list of ``(parameter, gradient)``; ``LocalRefresh`` by default). ``distributed.distribute``
        hands it a ``SplitRefresh`` under DDP. Runtime, not state: a copy of the optimizer refreshes
        locally again."""
        if not callable(getattr(refresher, "refresh", None)):
            raise TypeError(f"use_refresher needs an object with refresh(optimizer, due), got {type(refresher).__name__}")
        self.refresher = refresher

    def attach_projected_backward(self, source: Any) -> None:
        """Record ``source`` (a ``projected.ProjectedBackward``; ``None`` detaches) as what computes
        this optimizer's projected gradients in backward. ``enable_projected_backward`` attaches,
        ``ProjectedBackward.remove()`` detaches; one at a time (``ValueError`` otherwise). The
        optimizer itself only records it: ``distributed``, the Trainer glue and the app read it."""
        if source is not None and self._projected_backward is not None and source is not self._projected_backward:
            raise ValueError(f"{type(self).__name__} already has a projected backward attached (projected backward "
                             "installed twice?); remove() the first one before installing another")
        self._projected_backward = source


def _sync(p: Tensor) -> None:
    """Wait for ``p``'s device (CUDA runs asynchronously), so ``refresh_seconds`` times the refresh."""
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


def _param_name(group: dict[str, Any], i: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    return f"parameter #{i}"
