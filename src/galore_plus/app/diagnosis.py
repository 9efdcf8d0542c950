"""What a run that has to stop on a non-finite number knows about why (issue 25): whether the weights
were non-finite before training or became so, at which step, whether a projector refresh was
involved, and which options can cause it (float16's range, weight decay, the learning rate). The
learning rate is suggested only where an update happened."""

from __future__ import annotations

import torch

from ..layerwise import engine_of
from ..sharding import local


def non_finite(model: torch.nn.Module) -> tuple[int, str | None]:
    """The number of non-finite entries among ``model``'s parameters (this process's part) and the
    name of the first parameter holding one."""
    count, first = 0, None
    for name, p in model.named_parameters():
        bad = int((~torch.isfinite(local(p.detach()))).sum())
        if bad and first is None:
            first = name
        count += bad
    return count, first


def refresh_step(optimizer: torch.optim.Optimizer, step: int) -> bool:
    """Whether ``step`` (1-based) refreshes the projectors at a fixed interval (GaLore's ``iter % T``)."""
    engine = engine_of(optimizer)
    if engine is None:
        return False
    gaps = {g["update_proj_gap"] for g in engine.param_groups if "rank" in g and g.get("update_proj_gap")}
    return any((step - 1) % gap == 0 for gap in gaps)


def hints(config, dtype: torch.dtype, *, updated: bool, refresh: bool = False) -> str:
    """What may have caused it, as a clause: ``dtype`` the weights'; ``updated`` whether an update was
    applied in this run; ``refresh`` whether the step refreshed the projectors."""
    out = []
    if refresh:
        out.append("the step refreshed the projectors (GaLore's SVD of the gradient)")
    if dtype == torch.float16:
        out.append("float16 overflows above 65504 and the run uses no loss scaling (DESIGN.md, 'Precision'): "
                   "--dtype bfloat16 has float32's range")
    if config.weight_decay and config.lr * config.weight_decay >= 0.01:
        out.append(f"--weight-decay {config.weight_decay:g} scales the weights by 1 − lr·λ = "
                   f"{1 - config.lr * config.weight_decay:g} per step at the peak --lr")
    if updated:
        out.append(f"a smaller --lr than {config.lr:g} (in a new run: a resumed one keeps its options)")
    return ("possible causes: " + "; ".join(out)) if out else ""
