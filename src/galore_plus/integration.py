"""Model integration: which matrices of a model train low-rank, and the optimizer for them.

``find_targets`` picks the matrices of any ``nn.Module`` (by default: a Hugging Face model's
decoder-layer linears, or every linear layer of another module; or the modules named by full-match
patterns) and labels each with its role and, for attention projections whose layout is known, the
head blocks cross-head projection draws from. ``build_optimizer`` turns them into parameter groups
(plain GaLore, or the GaLore+ recipe of ``groups.galore_plus_param_groups``) and the optimizer.
``optimizer_summary`` prints what was built. This is the only library module that knows model
layouts. It reads a model's modules and ``config`` attributes without importing ``transformers``
(the optimizers need torch alone); GPT-2's ``Conv1D`` is recognised by its shape, not its class.

Head layouts (tested on tiny random configs): LLaMA, Mistral, Qwen2 (``q/k/v/o_proj``,
``gate/up/down_proj``; Qwen2's q/k/v biases go to the plain group, as every bias does); the fused
q/k/v matrices of GPT-NeoX and Bloom (``query_key_value``, rows per head ``[q_i; k_i; v_i]``), Phi-3
(``qkv_proj``, rows ``[Q; K; V]`` with grouped key/value heads) and GPT-2 (``Conv1D`` ``c_attn``,
columns ``[Q | K | V]``). Other models train through the same code with their matrices unlabelled
by heads (an ordinary low-rank matrix each).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .adamw import GaLorePlusAdamW
from .groups import galore_plus_param_groups
from .layerwise import LayerwiseOptimizer, engine_of
from .lowrank import RULES, LowRankOptimizer
from .memory import estimate_state_bytes
from .spec import METHODS, LowRankSpec, spec_for

__all__ = ["METHODS", "EMBEDDINGS", "KINDS", "Target", "find_targets", "build_optimizer", "optimizer_summary"]
#: how ``build_optimizer`` trains the input and output embeddings (``lm_head``)
EMBEDDINGS = ("full", "frozen", "low_rank")
KINDS = ("q", "k", "v", "o", "qkv", "mlp", "embedding", "other")

#: Module names (the last component) and their role. ``dense``/``c_proj`` are the attention output
#: only under an attention module (GPT-NeoX ``attention.dense``, GPT-2 ``attn.c_proj``); elsewhere
#: they are left to the parent rule below.
_KIND_OF_NAME = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "query_key_value": "qkv", "qkv_proj": "qkv", "c_attn": "qkv",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "gate_up_proj": "mlp",
    "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp", "fc1": "mlp", "fc2": "mlp",
}
_ATTENTION_OUTPUTS = ("dense", "c_proj")
_ATTENTION_PARENTS = ("attention", "self_attn", "attn", "self_attention", "crossattention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")

#: Fused q/k/v layouts, by ``(config.model_type, module name's tail)``: the roles of the head blocks
#: along the output features, in order (``_fused_roles``). A fused matrix of a model not listed here
#: is kind ``"qkv"`` without head blocks: an ordinary low-rank matrix (its layout is not guessed).
_FUSED_LAYOUTS = {
    ("gpt_neox", "query_key_value"): "per_head",       # [q_0; k_0; v_0; q_1; ...], 3·h blocks
    ("bloom", "query_key_value"): "per_head",
    ("phi3", "qkv_proj"): "stacked",                    # [Q (h blocks); K (kv); V (kv)]
    ("gpt2", "c_attn"): "stacked",                      # Conv1D: the same along the columns
    ("gpt2", "crossattention.c_attn"): "kv_stacked",    # cross-attention: [K | V] (h blocks each)
}


@dataclass(frozen=True)
class Target:
    """One matrix to train through a low-rank projection.

    ``name`` is the parameter's name in ``model.named_parameters()`` (e.g.
    ``"model.layers.0.self_attn.q_proj.weight"``); ``kind`` one of ``"q"``, ``"k"``, ``"v"``, ``"o"``,
    ``"qkv"`` (a fused query/key/value matrix), ``"mlp"``, ``"embedding"`` (the input embedding or
    ``lm_head``, with ``build_optimizer(embeddings="low_rank")``), or ``"other"`` (a linear whose role
    the name does not tell); ``num_heads`` the head count stacked along the rows, for ``"q"`` (attention
    heads) and ``"k"`` (key/value heads under grouped-query attention) ``nn.Linear`` weights, else None;
    ``head_blocks`` for a fused ``"qkv"`` matrix of a known layout, the low-rank group key of that name
    (``{"count": blocks, "eligible": [q and k block indices], "dim": 0 rows | 1 columns}``), else None.
    """

    name: str
    param: Tensor = field(repr=False, compare=False)
    kind: str
    num_heads: int | None = None
    head_blocks: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def heads(self) -> int | dict[str, Any] | None:
        """What ``galore_plus_param_groups`` takes as this matrix's heads: ``head_blocks``,
        ``num_heads`` or None."""
        return self.head_blocks if self.head_blocks is not None else self.num_heads


# ---------------------------------------------------------------------- targets

def modules_matching(modules: dict[str, nn.Module], pattern: str | re.Pattern) -> tuple[list[str], str | None]:
    """The names in ``modules`` (``dict(model.named_modules())``) that ``pattern`` matches whole, the root
    left out, and the first of them that is not a linear layer (None when every one is): the pattern
    rule of :func:`find_targets` and of the command's ``--target-modules``."""
    hits = [name for name in modules if name and re.fullmatch(pattern, name)]
    return hits, next((name for name in hits if not _is_linear(modules[name])), None)


def linear_module_names(modules: dict[str, nn.Module]) -> list[str]:
    """The names of the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) among ``modules``."""
    return [name for name, module in modules.items() if name and _is_linear(module)]


def find_targets(model: nn.Module, patterns: list[str] | None = None) -> list[Target]:
    """The matrices of ``model`` to train low-rank, in ``model.named_modules()`` order.

    A *linear layer* here is an ``nn.Linear`` (or subclass) or a GPT-2-style ``Conv1D`` (recognised
    without importing ``transformers``: a module with a 2-D ``weight`` whose class is named ``Conv1D``
    or whose integer ``nf`` is the weight's column count; its weight is ``in × out``, transposed
    relative to ``nn.Linear``'s, and the optimizer sees it as stored). Biases are never targets
    (they are 1-D; they train in the plain group).

    Without ``patterns``:

    - a model whose (text) ``config`` has ``num_hidden_layers`` (a Hugging Face transformer): the
      weight of every linear layer inside the layer stack (the ``nn.ModuleList`` of
      ``num_hidden_layers`` blocks), i.e. "all-linear" minus ``lm_head`` and the embeddings: the
      attention q/k/v/o (or fused qkv) and the MLP linears. No such stack raises ``ValueError``.
    - any other module (no ``config.num_hidden_layers``: a plain ``nn.Sequential``, your own model):
      every linear layer's weight except the output head, which is the module returned by
      ``model.get_output_embeddings()`` (if the model has that method), any module named ``lm_head``,
      and any linear whose weight is shared with an ``nn.Embedding`` (a tied output head). A
      classifier or an untied output layer of another name is a target too; pass patterns to leave
      it out. Weights that are not a linear layer's (``nn.MultiheadAttention``'s ``in_proj_weight``,
      convolutions, embeddings) are not. A module with no linear layer raises ``ValueError``.

    With ``patterns``: regular expressions that must match a module's whole name
    (``re.fullmatch``), e.g. ``[r".*\\.(q_proj|v_proj)"]``. A pattern that matches no module raises
    ``ValueError`` naming it, and so does a matched module that is not a linear layer with a 2-D
    weight (an embedding, a norm, an attention block); a module matched by several patterns is one target.

    Head counts come from the model's (text) config; a model without ``config`` has none (every
    target is an ordinary low-rank matrix: for cross-head projection give its groups ``num_heads`` or
    ``head_blocks`` yourself). From the config: ``num_attention_heads`` ``h``,
    ``num_key_value_heads`` ``kv`` (default ``h``) and ``head_dim`` ``d`` (default
    ``hidden_size // num_attention_heads``). ``q_proj`` gets ``num_heads=h``, ``k_proj``
    ``num_heads=kv``; ``num_heads · d`` must equal the matrix's rows, or ``ValueError`` says which
    matrix and which config values disagree.

    A fused q/k/v matrix (kind ``"qkv"``) of a layout in ``_FUSED_LAYOUTS`` gets ``head_blocks``: its
    output features (rows of an ``nn.Linear``, ``dim=0``; columns of a ``Conv1D``, ``dim=1``) cut into
    blocks of ``d``, the q and k blocks eligible. GPT-NeoX and Bloom ``query_key_value``: rows per head
    ``[q_i; k_i; v_i]`` (``3h`` blocks, eligible ``3i`` and ``3i+1``); Phi-3 ``qkv_proj``: rows
    ``[Q; K; V]`` (``h + 2·kv`` blocks, eligible the first ``h + kv``); GPT-2 ``c_attn``: columns
    ``[Q | K | V]`` (``3h`` blocks, eligible the first ``2h``; in cross-attention ``[K | V]``, eligible
    the first ``h``). GaLore+ then computes the matrix's cross-head projector from randomly drawn q/k
    blocks only (a value block never stands in for them) and uses it for the whole matrix: a right
    projector for row blocks, a left one for column blocks (``projection.cross_head_projector``). The
    block count times ``d`` must equal that side of the matrix, or ``ValueError`` names the matrix. A
    fused matrix of another model (Falcon, MPT, ...) gets no head blocks: an ordinary low-rank matrix.

    Frozen weights (``requires_grad=False``) are listed here too; ``build_optimizer`` leaves them out.
    """
    config = _text_config(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    if patterns is None:
        if getattr(config, "num_hidden_layers", None) is None:
            found = _all_linears(model)
        else:
            found = _decoder_layer_linears(model, config)
        chosen = [name for name in modules if name in found]
    else:
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"patterns must be a list of regular-expression strings, got {patterns!r}")
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as err:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err
        chosen = []
        for pattern, regex in zip(patterns, compiled):
            hits, not_linear = modules_matching(modules, regex)
            if not hits:
                raise ValueError(f"pattern {pattern!r} matched no module of {type(model).__name__} (patterns "
                                 f"must match a module's whole name, e.g. r'.*\\.q_proj')")
            if not_linear is not None:
                raise ValueError(f"pattern {pattern!r} matched module {not_linear!r} "
                                 f"({type(modules[not_linear]).__name__}), which is not a linear layer with a "
                                 "2-D weight (nn.Linear or GPT-2's Conv1D); only linear weights can be "
                                 "trained low-rank")
            chosen.extend(hits)
        order = {name: i for i, name in enumerate(modules)}
        chosen = sorted(set(chosen), key=order.__getitem__)
    targets, seen = [], set()
    for module_name in chosen:
        module = modules[module_name]
        weight = module.weight
        if id(weight) in seen:  # a tied weight reached through two modules
            continue
        seen.add(id(weight))
        kind = _kind(module_name)
        name = param_names.get(id(weight), f"{module_name}.weight" if module_name else "weight")
        transposed = _is_conv1d(module)
        heads = None if transposed or config is None else _num_heads(kind, name, weight, config)
        blocks = None if config is None else _head_blocks(kind, module_name, name, weight, transposed, config)
        targets.append(Target(name, weight, kind, heads, blocks))
    return targets


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _is_conv1d(module: nn.Module) -> bool:
    """A GPT-2-style ``Conv1D`` (``y = x W + b``, ``W`` is ``in × out``), duck-typed."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or isinstance(module, nn.Linear):
        return False
    nf = getattr(module, "nf", None)
    return type(module).__name__ == "Conv1D" or (isinstance(nf, int) and nf == weight.shape[1])


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` with a 2-D weight, or a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return isinstance(module.weight, Tensor) and module.weight.dim() == 2
    return _is_conv1d(module)


def _decoder_layer_linears(model: nn.Module, config: Any) -> set[str]:
    """The linear layers inside the ``nn.ModuleList`` (s) of ``config.num_hidden_layers`` blocks."""
    layers = config.num_hidden_layers
    stacks = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
    if not stacks:
        raise ValueError(f"found no nn.ModuleList of config.num_hidden_layers={layers} decoder layers in "
                         f"{type(model).__name__}; pass patterns (full-match regexes on module names)")
    found = {
        name for name, m in model.named_modules()
        if _is_linear(m) and any(name.startswith(stack + ".") for stack in stacks)
    }
    if not found:
        raise ValueError(f"the decoder layers of {type(model).__name__} ({', '.join(stacks)}) hold no nn.Linear; "
                         "pass patterns (full-match regexes on module names)")
    return found


def _all_linears(model: nn.Module) -> set[str]:
    """Every linear layer of a module without ``config.num_hidden_layers``, less its output head
    (``get_output_embeddings()``, a module named ``lm_head``, a linear tied to an ``nn.Embedding``)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = {
        name for name, m in model.named_modules()
        if _is_linear(m) and m is not head and name.split(".")[-1] != "lm_head" and id(m.weight) not in embedded
    }
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear layer (nn.Linear or Conv1D) besides its output head "
                         "and embeddings; pass patterns (full-match regexes on module names)")
    return found


def _kind(module_name: str) -> str:
    parts = module_name.split(".")
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf in _KIND_OF_NAME:
        return _KIND_OF_NAME[leaf]
    if leaf in _ATTENTION_OUTPUTS and parent in _ATTENTION_PARENTS:
        return "o"
    if parent in _MLP_PARENTS:
        return "mlp"
    return "other"


def _head_geometry(name: str, role: str, config: Any) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` from the config, for the matrix
    ``name`` (a ``role``, for the error)."""
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{name} is a {role}, but the model has no config.num_attention_heads (got {heads!r}) "
                         "to give its head count")
    kv = getattr(config, "num_key_value_heads", None)
    kv = heads if kv is None else kv
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(f"{name}: the config has neither head_dim nor hidden_size to give its head size")
        head_dim = hidden // heads
    return heads, kv, head_dim


def _num_heads(kind: str, name: str, weight: Tensor, config: Any) -> int | None:
    if kind not in ("q", "k"):
        return None
    heads, kv, head_dim = _head_geometry(name, "query projection" if kind == "q" else "key projection", config)
    heads = heads if kind == "q" else kv
    rows = weight.shape[0]
    if heads * head_dim != rows:
        key = "num_attention_heads" if kind == "q" else "num_key_value_heads"
        raise ValueError(f"{name} has {rows} rows (shape {tuple(weight.shape)}) but the config says "
                         f"{key}={heads} × head_dim={head_dim} = {heads * head_dim}; the config does not "
                         "describe this model")
    return heads


def _fused_roles(layout: str, heads: int, kv: int) -> list[str]:
    """The role (``"q"``, ``"k"``, ``"v"``) of each head block of a fused layout, in order."""
    if layout == "per_head":
        return ["q", "k", "v"] * heads
    if layout == "stacked":
        return ["q"] * heads + ["k"] * kv + ["v"] * kv
    if layout == "kv_stacked":
        return ["k"] * kv + ["v"] * kv
    raise ValueError(f"unknown fused layout {layout!r}")


def _head_blocks(kind: str, module_name: str, name: str, weight: Tensor, transposed: bool,
                 config: Any) -> dict[str, Any] | None:
    """A fused q/k/v matrix's ``head_blocks`` (see ``find_targets``), or None."""
    if kind != "qkv":
        return None
    model_type = getattr(config, "model_type", None)
    parts = module_name.split(".")
    layout = _FUSED_LAYOUTS.get((model_type, ".".join(parts[-2:]))) or _FUSED_LAYOUTS.get((model_type, parts[-1]))
    if layout is None:
        return None
    heads, kv, head_dim = _head_geometry(name, "fused query/key/value projection", config)
    roles = _fused_roles(layout, heads, kv)
    dim = 1 if transposed else 0
    size = weight.shape[dim]
    if len(roles) * head_dim != size:
        axis = "columns" if transposed else "rows"
        raise ValueError(f"{name} has {size} {axis} of output features (shape {tuple(weight.shape)}) but its "
                         f"{model_type} layout with num_attention_heads={heads}, num_key_value_heads={kv} and "
                         f"head_dim={head_dim} has {len(roles)} head blocks = {len(roles) * head_dim}; the "
                         "config does not describe this model")
    return {"count": len(roles), "eligible": [i for i, role in enumerate(roles) if role in ("q", "k")], "dim": dim}


# ---------------------------------------------------------------------- optimizer

def build_optimizer(
    model: nn.Module,
    spec: LowRankSpec | str | None = None,
    rank: int | float | str | None = None,
    *,
    lr: float | None,
    weight_decay: float = 0.0,
    patterns: list[str] | None = None,
    layerwise: bool = False,
    accumulation_steps: int = 1,
    clip: str | None = None,
    max_grad_norm: float | None = None,
    seed: int = 0,
    stochastic_rounding: bool = True,
    embeddings: str = "full",
    projected_backward: bool = False,
    refresh_in_backward: bool = False,
    method: str | None = None,
    eightbit: bool = False,
    adafactor: bool = False,
    **low_rank_options: Any,
) -> LowRankOptimizer | LayerwiseOptimizer:
    """A GaLore or GaLore+ optimizer for ``model``'s trainable parameters, as ``spec`` describes.

    ``spec`` is a :class:`~galore_plus.spec.LowRankSpec` (``LowRankSpec.recipe("galore+", 32, scale=1)``),
    or the older spelling: a method name (``"galore"``, ``"galore+"``; also as ``method=``), ``rank``,
    ``eightbit``/``adafactor`` for the inner rule and loose ``low_rank_options`` (keys of
    ``LOW_RANK_DEFAULTS`` such as ``update_proj_gap``, ``scale``, ``svd``, ``residual_ratio``, and the
    rule's own keys such as ``betas``), converted by ``spec.spec_for`` (unknown keys raise
    ``TypeError``, and so does ``num_heads``: each q/k matrix's head count comes from the config).

    ``find_targets(model, patterns)`` chooses the matrices trained through a rank-``rank``
    projection; every other trainable parameter (embeddings, ``lm_head``, norms, biases, untargeted
    matrices) is in one plain group (the inner rule on the full gradient). Parameters with
    ``requires_grad=False`` are left out. Every group carries ``param_names``, so the optimizer's
    errors name parameters.

    - plain GaLore (``cross_head=False``): all targets in one low-rank group with the spec's fields.
    - the GaLore+ recipe (``cross_head=True``; ``galore_plus_param_groups``): q/k matrices with a head
      count get cross-head projection and the sparse residual (the spec's ``residual_ratio``, ρ =
      ``PAPER_RESIDUAL_RATIO`` in the recipe), one group per head count; fused q/k/v matrices with
      ``head_blocks`` get cross-head projection from their q/k blocks, without the residual; the
      others neither.

    The optimizer is ``LowRankOptimizer.from_spec``: the rule's alias (``GaLoreAdamW`` /
    ``GaLorePlusAdamW`` for the GaLore+ recipe, ``GaLoreAdamW8bit``, ``GaLoreAdafactor``) or any rule
    registered in ``lowrank.RULES``. Adafactor gets ``relative_step`` and ``scale_parameter`` from
    ``lr`` (fixed ``lr``: off; ``lr=None``: Adafactor's relative step) unless the spec's rule options
    say. The sparse residual needs Adam moments, so GaLore+ with Adafactor needs ``residual_ratio=0``.
    ``weight_decay`` applies to every group.

    ``layerwise=True`` wraps it in ``LayerwiseOptimizer`` (updates inside ``backward()``), which is
    where ``accumulation_steps``, ``clip`` and ``max_grad_norm`` belong; without it they must stay at
    their defaults (accumulate and clip yourself around ``step()``).

    ``spec.plain_lr_ratio``: the plain group's learning rate is ``lr`` times it (its own ``lr`` key,
    which LR schedulers scale like any group's), while the projected update is ``α·lr``.

    ``embeddings``: the input embedding and ``lm_head`` (one matrix when tied) are trained with the
    plain rule (``"full"``, the published recipe), frozen like LoRA leaves them (``"frozen"``: this
    sets their ``requires_grad`` to False on the model), or low-rank like the other targets
    (``"low_rank"``: a plain GaLore group, no cross-head or residual; its gradient is the full one,
    since an embedding lookup is not a linear layer).

    ``projected_backward=True`` makes backward compute the targets' projected gradients directly
    between refreshes (``projected.enable_projected_backward``; ``W.grad`` of a target is then None
    between refreshes): the same optimizer, faster and without the ``m×n`` weight gradients.
    ``refresh_in_backward`` (with it) refreshes each projector inside backward at a refresh step, so
    the full gradients never pile up (one backward per step; not under DDP).
    ``stochastic_rounding`` is the optimizer's (bf16/fp16 parameters).

    ``rank`` is an int, ``"full"`` or a fraction in (0, 1], the last two per matrix (of its
    ``min(m, n)``; ``projection.resolve_rank``). A ``rank`` larger than a matrix allows (``min(m, n)``,
    or what a cross-head matrix's heads can reach) raises ``ValueError`` from the optimizer, naming the
    matrix.
    """
    if method is not None:
        if spec is not None:
            raise TypeError("give the method once: build_optimizer(model, spec) or build_optimizer(model, method=...)")
        spec = method
    spec = spec_for("galore+" if spec is None else spec, rank, eightbit=eightbit, adafactor=adafactor,
                    **low_rank_options)
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings={embeddings!r} is not one of {EMBEDDINGS}")
    if not layerwise:
        given = {"accumulation_steps": accumulation_steps, "clip": clip, "max_grad_norm": max_grad_norm}
        defaults = {"accumulation_steps": 1, "clip": None, "max_grad_norm": None}
        extra = {k: v for k, v in given.items() if v != defaults[k]}
        if extra:
            raise ValueError(f"{extra} are options of layer-wise mode (layerwise=True); with step() accumulate "
                             "gradients and clip (torch.nn.utils.clip_grad_norm_) around it yourself")
    if spec.residual_ratio > 0 and not RULES[spec.rule].has_moments:
        raise ValueError(f"the GaLore+ recipe with the {spec.rule} rule: GaLore+'s sparse residual needs Adam moments "
                         f"and the {spec.rule} rule has none; pass residual_ratio=0 (GaLore+ without the residual) "
                         "or use AdamW / 8-bit AdamW")

    embedding_targets = _embedding_targets(model) if embeddings != "full" else []
    if embeddings == "frozen":
        for target in embedding_targets:
            target.param.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    targets = [t for t in find_targets(model, patterns) if t.param.requires_grad]
    if embeddings == "low_rank":
        targets += [t for t in embedding_targets if id(t.param) not in {id(u.param) for u in targets}]
    if not targets:
        raise ValueError(f"every matrix chosen for low-rank training in {type(model).__name__} is frozen "
                         "(requires_grad=False): there is nothing to train low-rank")
    target_ids = {id(t.param) for t in targets}
    plain = [(n, p) for n, p in trainable if id(p) not in target_ids]

    options = spec.group_options()
    if spec.cross_head:  # the residual on the q/k groups only
        ratio = options.pop("residual_ratio")
        groups = galore_plus_param_groups(
            [(t.name, t.param, t.heads) for t in targets], spec.rank, plain=plain, residual_ratio=ratio, **options)
    else:
        groups: list[dict[str, Any]] = [
            {"params": [t.param for t in targets], "param_names": [t.name for t in targets], "rank": spec.rank,
             **options}]
        if plain:
            groups.append({"params": [p for _, p in plain], "param_names": [n for n, _ in plain]})
    if spec.plain_lr_ratio != 1:  # the plain group's own lr: schedulers scale each group's initial_lr
        if lr is None:
            raise ValueError(f"plain_lr_ratio={spec.plain_lr_ratio} needs a learning rate; lr=None (Adafactor's "
                             "relative step) computes its own")
        for group in groups:
            if "rank" not in group:
                group["lr"] = lr * spec.plain_lr_ratio
    _check_assignment(groups, trainable)

    if spec.rule == "adafactor":
        rule_options = {"relative_step": lr is None, "scale_parameter": lr is None, **spec.rule_options}
        spec = spec.replace(rule_options=rule_options)
    cls = GaLorePlusAdamW if spec.cross_head and spec.rule == "adamw" else LowRankOptimizer
    if spec.cross_head:  # the groups carry the residual where it applies; a group added later gets none
        spec = spec.replace(residual_ratio=0.0)
    optimizer = cls.from_spec(groups, spec, lr=lr, weight_decay=weight_decay, seed=seed,
                              stochastic_rounding=stochastic_rounding)
    if layerwise:
        optimizer = LayerwiseOptimizer(optimizer, model.named_parameters(), accumulation_steps=accumulation_steps,
                                       clip=clip, max_grad_norm=max_grad_norm)
    if embeddings != "frozen":
        sparse_tied_lookup(model)
    if projected_backward:
        from .projected import enable_projected_backward

        enable_projected_backward(model, optimizer, refresh_in_backward=refresh_in_backward)
    elif refresh_in_backward:
        raise ValueError("refresh_in_backward=True is an option of the projected backward (projected_backward=True)")
    return optimizer


def sparse_tied_lookup(model: nn.Module) -> bool:
    """Make the input embedding's lookup hand back a sparse gradient (``nn.Embedding.sparse``) when its
    weight is tied to the output embedding and trained, outside ``torch.distributed`` (DESIGN.md, "A
    tied embedding's gradient"); True if it did. The lookup's dense gradient is a zero ``vocab×hidden``
    tensor with the batch's rows added, then added to ``lm_head``'s: its sparse form is added straight
    into ``lm_head``'s gradient, in place (autograd's accumulation of a sparse into a dense gradient),
    so ``W.grad`` ends dense, with the same value up to the order of the sums. An untied embedding
    keeps its dense gradient (the optimizer refuses sparse ones), and so does DDP/FSDP (DDP expects a
    sparse gradient from a sparse embedding; an FSDP2 weight is sharded)."""
    import torch.distributed as dist

    lookup = getattr(model, "get_input_embeddings", lambda: None)()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(lookup, "weight", None)
    if (type(lookup) is not nn.Embedding or weight is None or not weight.requires_grad
            or getattr(output, "weight", None) is not weight or type(weight) is not nn.Parameter
            or (dist.is_available() and dist.is_initialized())):
        return False
    lookup.sparse = True
    return True


def _embedding_targets(model: nn.Module) -> list[Target]:
    """The input embedding and ``lm_head`` weights (once when tied), as low-rank targets."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: list[Target] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2 and id(weight) not in {id(t.param) for t in found}:
            found.append(Target(names.get(id(weight), getter), weight, "embedding"))
    if not found:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings()/get_output_embeddings() with a 2-D "
                         "weight; embeddings='full' trains whatever is not a target with the plain rule")
    return found


def _check_assignment(groups: list[dict[str, Any]], trainable: list[tuple[str, Tensor]]) -> None:
    """Every trainable parameter in exactly one group: unassigned or doubly assigned ones raise."""
    count = Counter(id(p) for g in groups for p in g["params"])
    unassigned = [n for n, p in trainable if count[id(p)] == 0]
    twice = [n for n, p in trainable if count[id(p)] > 1]
    if unassigned or twice:
        raise ValueError(f"parameter groups are inconsistent: left unassigned {unassigned}, "
                         f"in more than one group {twice}")


# ---------------------------------------------------------------------- summary

def optimizer_summary(optimizer: LowRankOptimizer | LayerwiseOptimizer) -> str:
    """A table of ``optimizer``'s groups (index, tensors, distinct shapes, rank, mode, elements) and
    its estimated state bytes (``estimate_state_bytes``) against full 32-bit AdamW's
    (2 moments × 4 bytes × trainable elements)."""
    engine = engine_of(optimizer)
    if engine is None:
        raise TypeError(f"optimizer_summary needs a galore_plus optimizer, got {type(optimizer).__name__}")
    optimizer = engine
    inner = optimizer.rule.name
    header = ("group", "tensors", "shapes", "rank", "mode", "elements")
    rows = []
    total = 0
    for i, group in enumerate(optimizer.param_groups):
        params = group["params"]
        numel = sum(p.numel() for p in params)
        total += numel
        rank = str(group["rank"]) if "rank" in group else "—"
        rows.append((str(i), str(len(params)), _shapes(params), rank, _mode(group, inner), f"{numel:,}"))
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    rows.append(("all", str(count), "", "", "", f"{total:,}"))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = {1, 5}
    fmt = lambda r: "  ".join(s.rjust(w) if c in right else s.ljust(w) for c, (s, w) in enumerate(zip(r, widths))).rstrip()
    lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    estimate, full = estimate_state_bytes(optimizer), 2 * 4 * total
    ratio = f" ({estimate / full:.1%})" if full else ""
    lines.append(f"optimizer state: estimated {_bytes(estimate)}{ratio} vs full AdamW {_bytes(full)} "
                 f"(2 × 4 bytes × {total:,} trainable elements)")
    return "\n".join(lines)


def _shapes(params: list[Tensor]) -> str:
    counts = Counter("×".join(map(str, p.shape)) or "scalar" for p in params)
    return ", ".join(f"{n}× {shape}" for shape, n in counts.items())


def _mode(group: dict[str, Any], inner: str) -> str:
    if "rank" not in group:
        return f"full {inner}"
    heads, ratio, blocks = group["num_heads"], group["residual_ratio"], group.get("head_blocks")
    plus = heads is not None or blocks is not None or ratio > 0 or group["svd"] == "randomized"
    parts = ["GaLore+" if plus else "GaLore"]
    parts.append(f"cross-head ({heads} heads)" if heads is not None else None)
    if blocks is not None:
        parts.append(f"cross-head (q/k: {len(blocks['eligible'])} of {blocks['count']} "
                     f"{'row' if blocks['dim'] == 0 else 'column'} blocks)")
    parts.append(group["svd"])
    parts.append(group["proj_type"] if heads is None and blocks is None else None)
    if ratio > 0:
        parts.append(f"+ residual {ratio:.1%} {group['residual_mode']}")
    if group.get("outside", "off") != "off":  # the gradient outside the subspace (outside.py)
        parts.append(f"+ {group['outside']} outside the subspace")
    mode = " ".join(p for p in parts if p)
    mode += f", T={group['update_proj_gap']} α={group['scale']:g}"
    return mode if inner == "AdamW" else f"{mode}, {inner}"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
