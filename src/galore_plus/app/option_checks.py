"""The checks between ``galore-plus finetune``'s options (which options need which method, which
exclude each other, what the schedule and the target modules allow); :func:`~.validation.validated` calls
them after each value's own check."""

from __future__ import annotations

import dataclasses

from ..spec import is_int, is_real
from .config import LOW_RANK_METHODS, RESOLVED, FinetuneConfig, flag
from .errors import ConfigError


def check_method(c: FinetuneConfig) -> None:
    if c.method not in LOW_RANK_METHODS:
        used = [name for name in ("layerwise", "eightbit", "residual_ratio", "projected_backward", "canonical_signs")
                if getattr(c, name)]
        # an option that validated() resolved per method (config.RESOLVED) is unused at what it resolves to unset
        unset = {name: resolve(dataclasses.replace(c, **{name: None})) for name, resolve in RESOLVED.items()}
        used += [name for name in ("embeddings", "stochastic_rounding", "plain_lr_ratio", "refreshes",
                                   "refresh_policy", "capture_threshold", "moment_transport", "outside", "proj_type")
                 if getattr(c, name) not in (getattr(FinetuneConfig, name), unset.get(name))]  # moved from its default
        if used == ["eightbit"]:
            raise ConfigError("--8bit applies to galore and galore+; use --method adamw8bit for 8-bit AdamW")
        if used:
            name = used[0]
            given = flag(name) if getattr(c, name) is not False else flag(name).replace("--", "--no-", 1)
            if name in ("embeddings", "outside", "proj_type"):
                given += f" {getattr(c, name)}"
            raise ConfigError(f"{given} needs --method galore or galore+, not {c.method}")
    if c.refreshes is not None and c.update_proj_gap != FinetuneConfig.update_proj_gap:
        raise ConfigError(f"--refreshes {c.refreshes} sets T from the run's length; drop --update-proj-gap")
    if c.capture_threshold is not None and c.refresh_policy != "capture":
        raise ConfigError(f"--capture-threshold {c.capture_threshold} needs --refresh-policy capture")
    if c.refresh_policy == "capture" and c.projected_backward and (c.layerwise or c.distributed == "fsdp"):
        where = "--layerwise" if c.layerwise else "--distributed fsdp"  # DESIGN.md, "Refresh"
        raise ConfigError(f"--refresh-policy capture with --projected-backward and {where}: the projected backward "
                          "estimates the captured share in one process or under DDP only; drop --projected-backward "
                          "(the full backward measures it exactly)")
    if c.method in ("lora", "dora", "fira") and not is_int(c.rank):  # "full"/fractions: per-matrix projection ranks
        raise ConfigError(f"--rank {c.rank} with --method {c.method}: its adapter rank is one int for every matrix; "
                          "'full' and fractions are galore's and galore+'s")
    if c.method == "fira" and (c.save_checkpoint or c.distributed != "none"):
        raise ConfigError("--method fira (the fira package, a benchmark peer) keeps Python objects in its optimizer "
                          "state, which a checkpoint must not unpickle, and has no distributed path: run it with "
                          "--no-save-checkpoint and without --distributed")
    if c.method == "fira":
        import importlib.util

        if importlib.util.find_spec("fira") is None:
            raise ConfigError("--method fira needs the fira package: pip install --no-deps fira==1.0.2")
    if c.distributed != "none" and c.layerwise:
        from ..distributed import layerwise_unsupported_reason

        raise ConfigError(f"--layerwise with --distributed {c.distributed}: {layerwise_unsupported_reason()}")
    if c.outside != "off" and c.projected_backward:
        raise ConfigError(f"--outside {c.outside} with --projected-backward: the term needs the full gradient, which "
                          "the projected backward forms only at projector refreshes (1 step in --update-proj-gap); "
                          "drop --projected-backward (with --outside fira the full backward is the default)")
    if c.distributed == "fsdp" and c.method == "adamw8bit":
        raise ConfigError("--distributed fsdp runs galore and galore+ (with or without --8bit) and adamw; "
                          "--method adamw8bit is bitsandbytes' own AdamW8bit, whose kernels take plain tensors, not "
                          "FSDP2's DTensor parameters (use --method galore --8bit, or --distributed ddp)")
    if c.distributed == "fsdp" and c.method not in (*LOW_RANK_METHODS, "adamw"):
        raise ConfigError("--distributed fsdp runs galore, galore+ (with or without --8bit) and adamw; "
                          f"{c.method} keeps state that is not sharded with its parameter")


def check_schedule_and_targets(c: FinetuneConfig) -> None:
    """``--warmup-ratio``, ``--lr-scheduler constant``'s lack of warm-up, and ``--target-modules``'s
    method and patterns (whether they match the model's modules is set-up's check: ``preflight.check_fits``)."""
    if c.warmup_ratio is not None:
        if not (is_real(c.warmup_ratio) and 0 <= c.warmup_ratio <= 1):
            raise ConfigError(f"--warmup-ratio must be a share in [0, 1], got {c.warmup_ratio}")
        if c.warmup_steps != FinetuneConfig.warmup_steps:
            raise ConfigError(f"--warmup-ratio {c.warmup_ratio} sets the warm-up from the run's length; drop "
                              f"--warmup-steps {c.warmup_steps}")
    if c.lr_scheduler == "constant" and (c.warmup_ratio or c.warmup_steps not in (0, FinetuneConfig.warmup_steps)):
        given = f"--warmup-ratio {c.warmup_ratio}" if c.warmup_ratio else f"--warmup-steps {c.warmup_steps}"
        raise ConfigError(f"--lr-scheduler constant has no warm-up, so {given} would be ignored; use "
                          "--lr-scheduler constant_with_warmup")
    if c.target_modules is not None:
        from .methods import TARGET_METHODS, target_patterns

        if c.method not in TARGET_METHODS:
            raise ConfigError(f"--target-modules applies to --method {', '.join(TARGET_METHODS)}, not {c.method} "
                              "(it trains every parameter)")
        target_patterns(c.target_modules)  # each a valid regular expression
