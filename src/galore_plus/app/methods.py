"""The optimizer (and adapters) of each ``--method``: GaLore / GaLore+ through the library's spec,
AdamW, bitsandbytes' 8-bit AdamW, PEFT's LoRA/DoRA, Fira from its own package; and what a run asks of
the optimizer it built (whether backward feeds it projected gradients, the seconds its refreshes took)."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..layerwise import engine_of
from .config import FinetuneConfig, learning_rate, low_rank_spec, projected_backward
from .errors import ConfigError

#: the methods ``--target-modules`` chooses the matrices of (the others train every parameter)
TARGET_METHODS = ("galore+", "galore", "fira", "lora", "dora")

def build_method(config: FinetuneConfig, model: torch.nn.Module, total_steps: int | None = None):
    """``(model, optimizer)`` for ``config.method`` (LoRA/DoRA wrap the model with PEFT); ``total_steps``:
    the run's length (``--refreshes`` spaces the refreshes over it)."""
    if config.method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        patterns = target_patterns(config.target_modules)
        if patterns is not None:
            target_modules(model, config.target_modules, config.model)
        # one regular expression, which PEFT full-matches against each module's name as find_targets does
        targets = "all-linear" if patterns is None else "|".join(f"(?:{p})" for p in patterns)
        peft_config = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
                                 target_modules=targets, use_dora=config.method == "dora")
        model = get_peft_model(model, peft_config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, adamw(params, config)
    if config.method == "adamw":
        return model, adamw(model.parameters(), config)
    if config.method == "fira":
        return model, fira_optimizer(config, model)
    if config.method == "adamw8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(model.parameters(), lr=learning_rate(config),
                                          weight_decay=config.weight_decay)
    from ..integration import build_optimizer

    projected = projected_backward(config)
    # one backward per step, one process, step() mode: refreshing each projector inside backward is the
    # same refresh and keeps the targets' full gradients from piling up at a refresh step (layer-wise
    # mode does so anyway)
    refresh_in_backward = (projected and config.grad_accum == 1 and config.distributed == "none"
                           and not config.layerwise)
    layerwise = {"accumulation_steps": config.grad_accum} if config.layerwise else {}
    try:
        spec = low_rank_spec(config, total_steps)
    except ValueError as err:  # --refreshes above the length of a run by --epochs
        raise ConfigError(str(err)) from None
    patterns = target_patterns(config.target_modules)
    if patterns is not None:
        target_modules(model, config.target_modules, config.model)
    optimizer = build_optimizer(model, spec, lr=learning_rate(config), weight_decay=config.weight_decay,
                                patterns=patterns, layerwise=config.layerwise, seed=config.seed,
                                projected_backward=projected, refresh_in_backward=refresh_in_backward,
                                embeddings=config.embeddings,
                                stochastic_rounding=config.stochastic_rounding, **layerwise)
    return model, optimizer


def adamw(params, config: FinetuneConfig) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for float32 parameters. bf16/fp16 ones get the library's AdamW on a plain
    group instead (torch.optim.AdamW's update, tested equal): its moments and math in float32 and
    each weight written once per step, stochastically rounded (DESIGN.md, "Precision"). torch keeps
    the moments in the parameter's dtype, where fp16's ε = 1e-8 is 0 (step 2 NaN at every lr) and
    bf16's ``0.999·v`` rounds back to ``v`` (issue 25)."""
    params = list(params)
    if not any(p.dtype in (torch.float16, torch.bfloat16) for p in params):
        return torch.optim.AdamW(params, lr=learning_rate(config), weight_decay=config.weight_decay)
    from ..adamw import GaLoreAdamW

    return GaLoreAdamW(params, lr=learning_rate(config), weight_decay=config.weight_decay, seed=config.seed,
                       stochastic_rounding=config.stochastic_rounding)


def fira_optimizer(config: FinetuneConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fira (arXiv 2410.01623) from its own package, the published subspace peer (BENCHMARKS.md §9), on
    the matrices GaLore(+) trains low-rank (``integration.find_targets``) at ``--rank`` and
    ``--update-proj-gap``, α 1 (the package's default; Fira subtracts the unscaled projection from the
    gradient for its residual, so α ≠ 1 mis-sizes it): the groups the package's ``divide_params``
    makes (the others first, then the projected ones), without its matching of module-name substrings."""
    from fira import FiraAdamW  # checked by the config

    from ..integration import find_targets

    patterns = target_patterns(config.target_modules)
    if patterns is not None:
        target_modules(model, config.target_modules, config.model)
    targets = [t.param for t in find_targets(model, patterns)]
    ids = {id(p) for p in targets}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
              {"params": targets, "rank": config.rank, "update_proj_gap": config.update_proj_gap, "alpha": 1.0,
               "proj_type": "std"}]
    return FiraAdamW(groups, lr=learning_rate(config), weight_decay=config.weight_decay)


def uses_projected_backward(optimizer: torch.optim.Optimizer) -> bool:
    """Whether backward hands ``optimizer`` projected gradients (``build_optimizer(projected_backward=True)``
    installed it on at least one matrix)."""
    engine = engine_of(optimizer)
    return engine is not None and engine.projected_backward is not None


def refresh_seconds(optimizer: torch.optim.Optimizer) -> float:
    """Seconds the low-rank engine behind ``optimizer`` spent computing projectors (0 for others)."""
    engine = engine_of(optimizer)
    return float(engine.refresh_seconds) if engine is not None else 0.0


# ---------------------------------------------------------------------------------------------- --target-modules


def target_patterns(text: str | None) -> list[str] | None:
    """``--target-modules`` as the full-match regular expressions ``integration.find_targets`` takes (None:
    the method's default), one per item of :func:`target_items`: a plain name (letters, digits, ``_`` and
    ``.``) matches a module whose name is it or ends in ``.NAME``, as in PEFT's lists (``q_proj``,
    ``self_attn.o_proj``); anything else is a regular expression on the module's whole name
    (``.*layers\\.[01]\\..*_proj``). An invalid expression raises :class:`ConfigError`
    (DESIGN.md, "Target modules")."""
    if text is None:
        return None
    patterns = []
    for item in target_items(text):
        if re.fullmatch(r"[\w.]+", item):
            patterns.append(r"(?:.*\.)?" + re.escape(item))
            continue
        try:
            re.compile(item)
        except re.error as err:
            raise ConfigError(f"--target-modules: {item!r} is not a valid regular expression ({err})") from None
        patterns.append(item)
    return patterns


def target_items(text: str) -> list[str]:
    """``--target-modules``'s items: the text split at its top-level commas (not those inside ``()``, ``[]``
    or ``{}``, which belong to a regular expression), stripped; an empty item raises :class:`ConfigError`."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        depth += (char in "([{") - (char in ")]}")
        current += char
    items.append(current.strip())
    if not all(items):
        raise ConfigError(f"--target-modules {text!r} has an empty item; give names or regular expressions "
                          "separated by commas")
    return items


def target_modules(model: torch.nn.Module, text: str, model_name: str) -> list[str]:
    """The names of ``model``'s modules that ``--target-modules text`` chooses; an item that matches no
    module, or a module that is not a linear layer, raises :class:`ConfigError` naming it and listing
    the model's linear layers."""
    from ..integration import linear_module_names, modules_matching

    modules = dict(model.named_modules())
    linear = linear_module_names(modules)
    chosen = []
    for item, pattern in zip(target_items(text), target_patterns(text)):
        hits, not_linear = modules_matching(modules, pattern)
        if not hits:
            raise ConfigError(f"--target-modules {item!r} matches no module of --model {model_name}; its linear "
                              f"layers are {shortened(linear)}")
        if not_linear is not None:
            raise ConfigError(f"--target-modules {item!r} matches {not_linear} ({type(modules[not_linear]).__name__}), "
                              f"which is not a linear layer; the linear layers are {shortened(linear)}")
        chosen += [name for name in hits if name not in chosen]
    return chosen


def shortened(names: list[str], most: int = 24) -> str:
    """Module names with their layer numbers as ``*`` (``model.layers.*.self_attn.q_proj``), each once."""
    short = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name) for name in names))
    more = f", ... ({len(short) - most} more)" if len(short) > most else ""
    return ", ".join(short[:most]) + more


def check_target_modules(config: FinetuneConfig, shapes: Any) -> None:
    """``--target-modules`` matches linear layers of the model of configuration ``shapes``, checked on the
    ``meta`` device (no weights) before the model loads."""
    from transformers import AutoModelForCausalLM

    if config.target_modules is None:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shapes)
    target_modules(model, config.target_modules, config.model)
