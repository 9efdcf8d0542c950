"""The typed spec of a low-rank method: every option with its default, defined once, checked once.

A :class:`LowRankSpec` says how the matrices of a low-rank group train (DESIGN.md, "Options"): the
rank (an int, ``"full"`` or a fraction of each matrix's ``min(m, n)``, resolved per matrix by
``projection.resolve_rank``) and the refresh (``update_proj_gap``, ``refresh``), the projector
(``proj_type``, ``svd`` and its sketch sizes, ``num_heads`` for cross-head projection,
``proj_dtype``, ``canonical_signs``), the update's scale α,
the sparse residual, the gradient outside the subspace (``outside``: Fira's term, ``outside.py``),
and at the method level the recipe (``cross_head``: GaLore+'s q/k treatment),
the plainly trained parameters' rate (``plain_lr_ratio``: their lr as a multiple of the projected
update's, a parameter group's own ``lr``, so LR schedulers keep the ratio; DESIGN.md, "Options") and
the inner rule with its hyper-parameters (``rule``, ``rule_options``: a name of the rule
registry, ``registry.RULES``). Constructing one checks every field and raises ``ValueError`` naming
the value and what is allowed; :meth:`LowRankSpec.from_options` rejects unknown names with
``TypeError`` listing the allowed ones.

Parameter groups carry a spec *flattened*: its group fields are the group's keys (``spec.group()``;
``LowRankSpec.from_group(group)`` reads one back). That keeps galore-torch's group keys working and
keeps optimizer state dicts strings and numbers, which ``torch.load(weights_only=True)`` needs
(torch saves ``param_groups`` in them). The old spellings — ``build_optimizer(model, "galore+", 32,
scale=..., eightbit=True)``, loose group keys — go through one conversion, :func:`spec_for`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from . import projection, residual, transport
from .outside import FIRA_LIMITER, OUTSIDE_MODES
from .registry import REFRESH_POLICIES, RULES

#: The paper's residual ratio ρ (1.2% in all its runs), applied by the GaLore+ recipe to q/k groups.
PAPER_RESIDUAL_RATIO = 0.012
#: projector storage dtypes accepted by ``proj_dtype`` (names are accepted too: "bfloat16")
PROJ_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SVD_METHODS = ("exact", "randomized")
#: the low-rank methods: plain GaLore, and the GaLore+ recipe (:meth:`LowRankSpec.recipe`)
METHODS = ("galore", "galore+")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """A real number that is not a bool and not NaN (infinities pass; callers bound them)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def _group(default: Any, doc: str) -> Any:
    """A field that is also a parameter-group key."""
    return field(default=default, metadata={"group": True, "doc": doc})


def _method(default: Any, doc: str, **kw: Any) -> Any:
    """A field of the method only (how groups are built, which optimizer), not a group key."""
    return field(default=default, metadata={"group": False, "doc": doc}, **kw)


@dataclass(frozen=True)
class LowRankSpec:
    """How a low-rank method trains its matrices (see the module docstring; DESIGN.md, "Options").

    Defaults are plain GaLore's pre-training settings (galore-torch README): T 200, α 0.25, exact
    SVD, no cross-head, no residual; :meth:`recipe` gives GaLore+'s.
    """

    rank: int | float | str = _group(None, "projection rank r per matrix: an int 1 ≤ r ≤ min(m, n) of every "
                                           "matrix, 'full' (each matrix's min(m, n)) or a fraction in (0, 1] of "
                                           "min(m, n), rounded half up, at least 1 (projection.resolve_rank)")
    update_proj_gap: int = _group(200, "T: refresh the projector at the first step and every T steps")
    scale: float = _group(0.25, "α: the projected-back update is multiplied by it")
    proj_type: str = _group("std", f"projection side, one of {projection.PROJ_TYPES}")
    svd: str = _group("exact", "exact (galore-torch's SVD) or randomized subspace iteration (DESIGN.md, "
                               "'Projectors')")
    oversample: int = _group(8, "randomized SVD: extra sketch columns")
    power_iters: int = _group(2, "randomized SVD: power iterations")
    warm_start: bool = _group(False, "randomized SVD: start the sketch from the previous projector")
    num_heads: int | None = _group(None, "heads stacked along the rows, for cross-head projection (q: attention "
                                         "heads, k: key/value heads); set per matrix by the recipe")
    head_blocks: dict | None = _group(None, "a fused q/k/v matrix: {'count': c, 'eligible': [i, ...], 'dim': 0 | 1}, "
                                            "its rows (0) or columns (1, GPT-2's Conv1D) cut into c head blocks, the "
                                            "cross-head projector drawn among the eligible (q and k) ones; set per "
                                            "matrix by the recipe (plain ints and lists: state dicts stay loadable)")
    residual_ratio: float = _group(0.0, "sparse residual ρ: fraction of entries with exact Adam moments (0: off)")
    residual_warmup: int = _group(20, "steps before the residual's entries are chosen")
    residual_mode: str = _group("exact", f"the residual's rule, one of {residual.RESIDUAL_MODES}")
    residual_reselect: bool = _group(False, "choose the residual's entries again at each refresh")
    proj_dtype: torch.dtype | None = _group(None, "the projector's storage dtype (None: the compute dtype)")
    refresh: str = _group("interval", "when projectors refresh: a name of registry.REFRESH_POLICIES")
    # issue 29, "when to refresh" (DESIGN.md, "Refresh"): read by refresh="capture" only
    capture_threshold: float | None = _group(None, "refresh='capture': also refresh when the captured share "
                                                   "‖PᵀG‖/‖G‖ of the step's full gradient is below it, in (0, 1]")
    # issue 29, moment transport (DESIGN.md, "Moment transport"; transport.py)
    moment_transport: str = _group("keep", "the Adam moments at a projector refresh: keep (GaLore's), reset (dropped, "
                                           "bias correction restarts) or project (carried into the new basis)")
    # issue 29 item 5 (DESIGN.md, "Projectors", signs): off keeps the SVD's signs (galore-torch parity)
    canonical_signs: bool = _group(False, "fix each basis vector's sign (its largest-magnitude entry positive), so "
                                          "a projector does not flip between refreshes or rounding paths")
    # issue 29, the gradient outside the subspace (DESIGN.md, "Outside the subspace"; outside.py)
    outside: str = _group("off", f"the gradient outside the subspace, G − P PᵀG, one of {OUTSIDE_MODES}: "
                                 "dropped (off, GaLore) or added with Fira's norm-based scaling and limiter (fira; "
                                 "where G is formed: not between refreshes of the projected backward)")
    outside_limiter: float = _group(FIRA_LIMITER, "fira: γ, the term's norm grows at most γ× per step (≥ 1; "
                                                  "inf: no limiter)")
    cross_head: bool = _method(False, "the GaLore+ recipe: q/k matrices with a head count get cross-head "
                                      "projection and the residual (the others neither)")
    rule: str = _method("adamw", "the inner rule: a name of registry.RULES (adamw, adamw8bit, adafactor, ...)")
    rule_options: Mapping[str, Any] = _method(None, "the inner rule's own hyper-parameters (AdamW: betas, eps)")
    plain_lr_ratio: float = _method(1.0, "the learning rate of the plainly trained parameters (embeddings, lm_head, "
                                         "norms, biases) as a multiple of lr; the projected update is α·lr")

    def __post_init__(self) -> None:
        if isinstance(self.proj_dtype, str):
            object.__setattr__(self, "proj_dtype", getattr(torch, self.proj_dtype, self.proj_dtype))
        object.__setattr__(self, "rule_options", dict(self.rule_options or {}))
        check_group_values(self.group(), "LowRankSpec")
        if not isinstance(self.cross_head, bool):
            raise ValueError(f"LowRankSpec: cross_head={self.cross_head!r} must be a bool")
        ratio = self.plain_lr_ratio
        if not is_real(ratio) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"LowRankSpec: plain_lr_ratio={ratio!r} must be a finite number > 0")
        if self.rule not in RULES:
            raise ValueError(f"LowRankSpec: rule={self.rule!r} is not one of {sorted(RULES)}")

    # ------------------------------------------------------------------ conversions
    def group(self) -> dict[str, Any]:
        """The group keys (every group field, including ``rank``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"]}

    def group_options(self) -> dict[str, Any]:
        """The group keys but ``rank``, ``num_heads`` and ``head_blocks`` (which the recipe sets per matrix)."""
        return {k: v for k, v in self.group().items() if k not in ("rank", "num_heads", "head_blocks")}

    def replace(self, **changes: Any) -> LowRankSpec:
        return LowRankSpec.from_options({**self.options(), **changes})

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "LowRankSpec") -> LowRankSpec:
        """A spec from a mapping of field names; unknown names raise ``TypeError`` listing the allowed."""
        unknown = sorted(set(options) - FIELDS)
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {unknown}; the options are {sorted(FIELDS)}")
        try:
            return cls(**options)
        except ValueError as err:  # the message names the caller's place
            raise ValueError(str(err).replace("LowRankSpec:", f"{where}:", 1)) from None

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> LowRankSpec:
        """The spec a low-rank parameter group carries (its group keys; missing ones take defaults)."""
        return cls(**{k: group[k] for k in GROUP_FIELDS if k in group})

    @classmethod
    def recipe(cls, method: str, rank: int | float | str, where: str = "LowRankSpec", **options: Any) -> LowRankSpec:
        """``"galore"``: GaLore as published (exact SVD, no cross-head, no residual). ``"galore+"``:
        the GaLore+ recipe: randomized SVD, cross-head projection and the residual (ρ =
        :data:`PAPER_RESIDUAL_RATIO`) on q/k. ``options`` override fields."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        base = RECIPES[method]
        return cls.from_options({**base, "rank": rank, **options}, where)

    @classmethod
    def preset(cls, name: str, where: str = "LowRankSpec", **options: Any) -> LowRankSpec:
        """The named preset (:data:`PRESETS`; DESIGN.md, "Presets"): its method's recipe with its fields;
        ``LowRankSpec.preset("quality")`` is ``LowRankSpec.recipe("galore", "full", scale=1.0)``.
        ``options`` override fields, the preset's too."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not one of {tuple(PRESETS)}")
        values = {**PRESETS[name], **options}
        return cls.recipe(values.pop("method"), where=where, **values)


#: every field name, the group fields, and the group fields' defaults (``LOW_RANK_DEFAULTS``)
FIELDS = frozenset(f.name for f in fields(LowRankSpec))
GROUP_FIELDS = tuple(f.name for f in fields(LowRankSpec) if f.metadata["group"])
GROUP_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LowRankSpec)
                                  if f.metadata["group"] and f.name != "rank"}
#: every field's default (the command's mirrors of method fields read theirs here)
SPEC_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LowRankSpec)}
#: the methods' own defaults, over the spec's (GaLore+: arXiv 2412.19820, Section 4)
RECIPES: dict[str, dict[str, Any]] = {
    "galore": {},
    "galore+": {"svd": "randomized", "cross_head": True, "residual_ratio": PAPER_RESIDUAL_RATIO},
}
#: named settings: a method (its recipe) and fields over it (DESIGN.md, "Presets"; provisional until
#: BENCHMARKS.md §9 measures them). "quality" (issue 29, mechanism 6): GaLore with every matrix at full
#: rank (its min(m, n)) and α 1, Adam in each gradient's singular basis with nothing of the gradient
#: lost: AdamW's state size plus a k×k projector per matrix. Not GaLore+: its cross-head projection of
#: q/k is lossy at full rank (a k_proj narrower than its input keeps k of its n columns' directions)
PRESETS: dict[str, dict[str, Any]] = {
    "quality": {"method": "galore", "rank": "full", "scale": 1.0},
}


def check_group_values(group: Mapping[str, Any], where: str) -> None:
    """Check the group keys present in ``group`` (``rank`` required); ``ValueError`` naming the bad
    value and what is allowed. The one check of the low-rank values (the spec's and the groups')."""
    rank = group["rank"]
    if not (is_int(rank) and rank >= 1 or rank == projection.FULL_RANK
            or isinstance(rank, float) and 0.0 < rank <= 1.0):  # per matrix: projection.resolve_rank
        raise ValueError(f"{where}: rank={rank!r} must be an int ≥ 1, {projection.FULL_RANK!r} or a fraction in "
                         "(0, 1] of each matrix's min(m, n)")
    gap = group.get("update_proj_gap", GROUP_DEFAULTS["update_proj_gap"])
    if not is_int(gap) or gap < 1:
        raise ValueError(f"{where}: update_proj_gap={gap!r} must be an int ≥ 1")
    scale = group.get("scale", GROUP_DEFAULTS["scale"])
    if not is_real(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: scale={scale!r} must be a finite number > 0")
    if group.get("proj_type", "std") not in projection.PROJ_TYPES:
        raise ValueError(f"{where}: proj_type={group['proj_type']!r} is not one of {projection.PROJ_TYPES}")
    if group.get("svd", "exact") not in SVD_METHODS:
        raise ValueError(f"{where}: svd={group['svd']!r} is not one of {SVD_METHODS}")
    for key in ("oversample", "power_iters"):
        if key in group and (not is_int(group[key]) or group[key] < 0):
            raise ValueError(f"{where}: {key}={group[key]!r} must be an int ≥ 0")
    for key in ("warm_start", "residual_reselect", "canonical_signs"):
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"{where}: {key}={group[key]!r} must be a bool")
    heads = group.get("num_heads")
    if heads is not None and (not is_int(heads) or heads < 1):
        raise ValueError(f"{where}: num_heads={heads!r} must be None or an int ≥ 1")
    check_head_blocks(group, where)
    ratio = group.get("residual_ratio", 0.0)
    if not is_real(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{where}: residual_ratio={ratio!r} must be a number in [0, 1]")
    warmup = group.get("residual_warmup", GROUP_DEFAULTS["residual_warmup"])
    if not is_int(warmup) or warmup < 1:
        raise ValueError(f"{where}: residual_warmup={warmup!r} must be an int ≥ 1")
    if group.get("residual_mode", "exact") not in residual.RESIDUAL_MODES:
        raise ValueError(f"{where}: residual_mode={group['residual_mode']!r} is not one of {residual.RESIDUAL_MODES}")
    proj_dtype = group.get("proj_dtype")
    if isinstance(proj_dtype, str):
        proj_dtype = getattr(torch, proj_dtype, proj_dtype)
    if proj_dtype is not None and proj_dtype not in PROJ_DTYPES:
        raise ValueError(f"{where}: proj_dtype={group['proj_dtype']!r} must be None or one of "
                         f"{[str(d).removeprefix('torch.') for d in PROJ_DTYPES]}")
    if group.get("moment_transport", "keep") not in transport.MOMENT_TRANSPORTS:  # issue 29, moment transport
        raise ValueError(f"{where}: moment_transport={group['moment_transport']!r} is not one of "
                         f"{transport.MOMENT_TRANSPORTS}")
    if "refresh" in group:
        if group["refresh"] not in REFRESH_POLICIES:
            raise ValueError(f"{where}: refresh={group['refresh']!r} is not one of {sorted(REFRESH_POLICIES)}")
        for key in getattr(REFRESH_POLICIES[group["refresh"]], "requires", ()):  # the keys the policy reads
            if group.get(key) is None:
                raise ValueError(f"{where}: refresh={group['refresh']!r} needs {key} (None given)")
    threshold = group.get("capture_threshold")
    if threshold is not None and (not is_real(threshold) or not 0.0 < threshold <= 1.0):
        raise ValueError(f"{where}: capture_threshold={threshold!r} must be None or a number in (0, 1]")
    check_outside(group, where)


def check_outside(group: Mapping[str, Any], where: str) -> None:
    """``outside`` in ``OUTSIDE_MODES``; ``outside_limiter`` a number ≥ 1 (γ; inf turns the limiter off);
    Fira scales per column or per row of a one-sided projection, so not with ``proj_type="full"``."""
    mode = group.get("outside", "off")
    if mode not in OUTSIDE_MODES:
        raise ValueError(f"{where}: outside={mode!r} is not one of {OUTSIDE_MODES}")
    gamma = group.get("outside_limiter", FIRA_LIMITER)
    if not is_real(gamma) or not gamma >= 1:
        raise ValueError(f"{where}: outside_limiter={gamma!r} must be a number ≥ 1 (inf: no limiter)")
    if mode == "fira" and group.get("proj_type", "std") == "full":
        raise ValueError(f"{where}: outside='fira' with proj_type='full': Fira scales G − P PᵀG per column (left "
                         "projection) or per row (right), and a two-sided projection has neither; use another "
                         "proj_type")


def check_head_blocks(group: dict[str, Any], where: str) -> None:
    """``head_blocks``: None, or ``{"count": int ≥ 1, "eligible": strictly increasing block indices in
    [0, count), at least one, "dim": 0 or 1}``; not together with ``num_heads``."""
    blocks = group.get("head_blocks")
    if blocks is None:
        return
    ok = isinstance(blocks, dict) and set(blocks) == {"count", "eligible", "dim"}
    if ok:
        count, eligible, dim = blocks["count"], blocks["eligible"], blocks["dim"]
        ok = (is_int(count) and count >= 1 and is_int(dim) and dim in (0, 1) and isinstance(eligible, (list, tuple))
              and len(eligible) >= 1 and all(map(is_int, eligible))
              and all(0 <= a < b for a, b in zip(eligible, [*eligible[1:], count])))
    if not ok:
        raise ValueError(f"{where}: head_blocks={blocks!r} must be None or {{'count': int ≥ 1, 'eligible': "
                         "strictly increasing block indices in [0, count), at least one, 'dim': 0 (row blocks) "
                         "or 1 (column blocks)}")
    if group.get("num_heads") is not None:
        raise ValueError(f"{where}: num_heads={group['num_heads']!r} and head_blocks={blocks!r} cannot both be set "
                         "(num_heads is head_blocks with every row block eligible)")


def spec_for(method: str | LowRankSpec, rank: int | float | str | None = None, *, eightbit: bool = False,
             adafactor: bool = False, **options: Any) -> LowRankSpec:
    """The one conversion from the old spellings to a spec: ``build_optimizer``'s ``method``, ``rank``,
    ``eightbit``/``adafactor`` and loose low-rank keys (``scale``, ``update_proj_gap``, ``svd``,
    ``residual_ratio``, ...) or the inner rule's own keys (``betas``, ``eps``, Adafactor's ...). A spec
    given as ``method`` is returned as it is (``rank`` and options must then be absent)."""
    if isinstance(method, LowRankSpec):
        if rank is not None or options or eightbit or adafactor:
            raise TypeError("a LowRankSpec already holds the rank and every option; change it with spec.replace(...)")
        return method
    if eightbit and adafactor:
        raise ValueError("eightbit=True and adafactor=True cannot be combined; the inner rules are AdamW (default), "
                         "8-bit AdamW (eightbit=True), Adafactor (adafactor=True)")
    rule = "adamw8bit" if eightbit else "adafactor" if adafactor else options.pop("rule", "adamw")
    rule_keys = set(RULES[rule].defaults) if rule in RULES else set()
    for key in ("num_heads", "head_blocks"):
        if key in options:
            raise TypeError(f"{key} is not an option here: each q/k (or fused qkv) matrix gets its own from the "
                            "model's config (find_targets), the other matrices none")
    rule_options = {k: options.pop(k) for k in list(options) if k in rule_keys}
    rule_options.update(options.pop("rule_options", None) or {})
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; low-rank options are {sorted(GROUP_DEFAULTS)} and the "
                        f"{rule} rule's own are {sorted(rule_keys)}")
    return LowRankSpec.recipe(method, rank, rule=rule, rule_options=rule_options, **options)


