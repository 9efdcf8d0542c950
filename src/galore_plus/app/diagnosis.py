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


def loss_message(config, dtype: torch.dtype, optimizer, step: int, loss: float, saved_step: int | None,
                 bad: int) -> tuple[str, str]:
    """``(what, advice)`` for a non-finite training loss at ``step``: whether the weights (``bad``
    non-finite entries over all ranks) were already non-finite, whether any update had been applied,
    whether the step before refreshed the projectors."""
    updated = step > 1  # step 1 runs on the model's own (checked) weights
    since = f"step {saved_step}" if saved_step is not None else "the start"
    if bad:
        what = (f"the training loss is {loss} because {bad} weight entries are already non-finite: an update "
                f"since {since} made them so")
    elif not updated:
        what = f"the training loss is {loss} on the model's weights before any update (the forward overflows)"
    else:
        what = f"the training loss is {loss} (the weights are finite: the forward overflowed on the updated ones)"
    previous = step - 1 if updated and refresh_step(optimizer, step - 1) else None
    advice = hints(config, dtype, updated=updated, refresh=previous is not None)
    if previous is not None:
        advice = advice.replace("the step refreshed", f"step {previous} refreshed")
    return f"{what}, so the run stopped before applying the step", advice


def update_message(config, dtype: torch.dtype, optimizer, step: int, saved_step: int | None, bad: int,
                   first: str | None) -> tuple[str, str]:
    """``(what, advice)`` for updates up to ``step`` that left ``bad`` parameter entries non-finite
    (found before a checkpoint is written)."""
    since = f"step {saved_step}" if saved_step is not None else "the start"
    refreshed = any(refresh_step(optimizer, s) for s in range((saved_step or 0) + 1, step + 1))
    what = (f"the updates since {since} left {bad} parameter entries non-finite"
            + (f" (in {first} among others)" if first else "") + ", so the run stopped without saving them")
    advice = hints(config, dtype, updated=True, refresh=refreshed).replace("the step refreshed",
                                                                            "a step among them refreshed")
    return what, advice
