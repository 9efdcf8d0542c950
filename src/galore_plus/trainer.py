"""``transformers.Trainer`` glue: our optimizers, and layer-wise mode, inside a Trainer (and TRL's
``SFTTrainer``, a Trainer).

Three ways in:

- ``Trainer(..., optimizers=make_optimizer(model, args, "galore+", 32))`` (the same for
  ``SFTTrainer``): the optimizer built for the model with ``integration.build_optimizer`` from the
  arguments' learning rate, weight decay, seed and gradient-accumulation steps, after the arguments that
  cannot work with it are refused; the scheduler is left to the Trainer (``None``: it builds the one
  ``args`` describe, as for its own optimizer). This is ``optimizers=``, the Trainer's documented way
  to pass an optimizer instance; ``optimizer_cls_and_kwargs`` cannot carry ours, which needs the model,
  not only its parameters.
- ``GaLoreTrainer(..., galore={"method": "galore+", "rank": 32, ...})``, a Trainer whose
  ``create_optimizer`` does the same;
- or an optimizer you built yourself, ``optimizers=(optimizer, None)``: ``GaLoreAdamW`` and friends are
  ``torch.optim.Optimizer`` s whose state loads with ``weights_only=True``, as the Trainer's checkpoints
  need, and so is a ``LayerwiseOptimizer``. Call ``check_trainer_arguments(args, optimizer)``: nothing
  else checks the arguments on this path.

Refused (one-line ``ValueError``, before the optimizer is built where the keywords tell):

- ``max_grad_norm > 0`` with the projected backward: the Trainer clips ``model.parameters()``' ``.grad``,
  which the target matrices do not have between projector refreshes (their projected gradients are the
  optimizer's), so it would clip the rest by a wrong, smaller norm. Set ``max_grad_norm=0`` and pass
  ``clip_grad_norm=`` to ``make_optimizer`` / ``GaLoreTrainer``: the optimizer then clips, before each
  step, every gradient it applies by their total norm (``projected.clip_grad_norm_``: a target's
  projected gradient counts with its own norm, the gradient's component in the subspace). ``fp16``
  with it too: the Trainer's loss scaler unscales ``.grad`` only. (DESIGN.md, "Trainer integration")
- Layer-wise mode (``"layerwise": True``): parameters step inside ``backward()``; the Trainer's
  ``optimizer.step()`` then closes the step (``LayerwiseOptimizer.step``), its scheduler steps once per
  optimizer step, and its checkpoints save the name-keyed state. The Trainer clips gradients *after*
  backward, when none are left, so ``max_grad_norm > 0`` is refused with what to use instead
  (``"clip": "parameter"`` or ``"previous_global"`` with ``"max_grad_norm"`` in ``galore``).
- DeepSpeed (a ``deepspeed`` config in the arguments, or ``accelerate launch --use_deepspeed``): ZeRO
  flattens the parameters into 1-D buffers, so no GaLore optimizer would see a matrix; the message
  points to FSDP2 (``galore_plus.distributed``, the command's ``--distributed fsdp``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .integration import build_optimizer
from .layerwise import LayerwiseOptimizer
from .layerwise import engine_of

__all__ = ["make_optimizer", "GaLoreTrainer", "check_trainer_arguments", "uses_deepspeed"]

#: ``build_optimizer`` keywords the Trainer's arguments give (``learning_rate``, ``weight_decay``, ``seed``,
#: ``gradient_accumulation_steps``)
FROM_ARGUMENTS = ("lr", "weight_decay", "seed", "accumulation_steps")


def uses_deepspeed(args: Any) -> bool:
    """Whether a Trainer with ``args`` runs under DeepSpeed: a ``deepspeed`` config in the arguments (or
    the plugin they made of it), or ``accelerate launch --use_deepspeed`` (``ACCELERATE_USE_DEEPSPEED``).
    DeepSpeed itself need not be installed to tell."""
    from accelerate.utils import parse_flag_from_env

    return (bool(getattr(args, "deepspeed", None)) or getattr(args, "deepspeed_plugin", None) is not None
            or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"))


def _refuse(args: Any, *, projected: bool, layerwise: bool) -> None:
    """The Trainer settings that cannot work with a galore_plus optimizer (the module docstring)."""
    if uses_deepspeed(args):
        raise ValueError(
            "DeepSpeed (TrainingArguments.deepspeed or ACCELERATE_USE_DEEPSPEED) with a galore_plus optimizer: ZeRO "
            "flattens the parameters into 1-D buffers, so no matrix is left to project; shard with FSDP2 instead "
            "(galore_plus.distributed, or galore-plus finetune --distributed fsdp) or train without DeepSpeed")
    norm = getattr(args, "max_grad_norm", None) or 0
    if projected and norm > 0:
        raise ValueError(
            f"max_grad_norm={norm} with the projected backward: the Trainer clips model.parameters() .grad, which the "
            "target matrices do not have between projector refreshes (their projected gradients are the "
            "optimizer's), so it would clip by a wrong norm; set max_grad_norm=0 and pass clip_grad_norm="
            f"{norm} to make_optimizer or GaLoreTrainer (the optimizer clips all it applies), or build without "
            "projected_backward")
    if projected and getattr(args, "fp16", False):
        raise ValueError("fp16=True with the projected backward: the Trainer's loss scaler unscales .grad only, not "
                         "the projected gradients the optimizer holds; use bf16=True, or build without "
                         "projected_backward")
    if layerwise and norm > 0:
        raise ValueError(
            f"max_grad_norm={norm}: in layer-wise mode the gradients are consumed inside "
            "backward(), so the Trainer's clipping would clip nothing; set max_grad_norm=0 and build the "
            "LayerwiseOptimizer with clip='parameter' or clip='previous_global' and max_grad_norm")


def check_trainer_arguments(args: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse Trainer settings that would silently do nothing, or the wrong thing, with ``optimizer``
    (any optimizer: only galore_plus ones are checked)."""
    engine = engine_of(optimizer)
    if engine is None:
        return
    _refuse(args, projected=engine.projected_backward is not None, layerwise=isinstance(optimizer, LayerwiseOptimizer))
    if isinstance(optimizer, LayerwiseOptimizer) and optimizer.accumulation_steps != args.gradient_accumulation_steps:
        raise ValueError(
            f"LayerwiseOptimizer(accumulation_steps={optimizer.accumulation_steps}) does not match "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}")


def make_optimizer(model: torch.nn.Module, args: Any, spec: Any = None, rank: Any = None, *,
                   clip_grad_norm: float | None = None, **options: Any) -> tuple[torch.optim.Optimizer, None]:
    """``(optimizer, None)`` for ``Trainer(..., optimizers=...)`` or TRL's ``SFTTrainer(..., optimizers=...)``:
    ``integration.build_optimizer(model, spec, rank, **options)`` with ``lr``, ``weight_decay``, ``seed``
    and (layer-wise) ``accumulation_steps`` from ``args`` (the ``TrainingArguments`` / ``SFTConfig`` the
    Trainer gets). ``None`` for the scheduler: the Trainer builds the one ``args`` describe
    (``lr_scheduler_type``, warm-up), as it does for its own optimizer. Build it after the model is on
    its device, as for any optimizer passed to a Trainer.

    ``clip_grad_norm``: clip, before each step, every gradient the optimizer applies (``.grad`` and the
    projected gradients) to this total norm (``projected.clip_grad_norm_``), with ``args.max_grad_norm=0``:
    the way to clip under the projected backward, whose gradients the Trainer's clipping misses. Settings
    that cannot work are refused before anything is built (module docstring)."""
    for key in FROM_ARGUMENTS:
        if key in options:
            raise ValueError(f"{key}={options[key]!r} is taken from the Trainer's arguments; remove it")
    layerwise = bool(options.get("layerwise"))
    _refuse(args, projected=bool(options.get("projected_backward")), layerwise=layerwise)
    if clip_grad_norm is not None:
        norm = getattr(args, "max_grad_norm", None) or 0
        if layerwise:
            raise ValueError("clip_grad_norm in layer-wise mode: nothing is left to clip at step(); pass "
                             "clip='parameter' or 'previous_global' with max_grad_norm instead")
        if norm > 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm} and max_grad_norm={norm} would both clip; set "
                             "max_grad_norm=0 in the Trainer's arguments")
        if not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm} must be a positive number")
    extra = {"accumulation_steps": args.gradient_accumulation_steps} if layerwise else {}
    optimizer = build_optimizer(model, spec, rank, lr=args.learning_rate, weight_decay=args.weight_decay,
                                seed=args.seed, **extra, **options)
    check_trainer_arguments(args, optimizer)
    if clip_grad_norm is not None:
        _clip_before_step(optimizer, float(clip_grad_norm))
    return optimizer, None


def _clip_before_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip every gradient ``optimizer`` applies to ``max_norm`` in a step pre-hook (after the projected
    backward's own pre-hook, which averages the targets' gradients under DDP)."""
    from .projected import clip_grad_norm_

    def clip(engine: Any, args: Any, kwargs: Any) -> None:
        clip_grad_norm_(engine, max_norm)

    engine_of(optimizer).register_step_pre_hook(clip)


class GaLoreTrainer(Trainer):
    """A ``Trainer`` whose optimizer is GaLore / GaLore+ (``galore`` = ``build_optimizer`` keywords).

    ``galore`` takes ``spec`` (a ``LowRankSpec``) or the older ``method`` (``"galore"`` or ``"galore+"``),
    ``rank`` and loose options, and any other keyword of ``integration.build_optimizer`` (``eightbit``,
    ``adafactor``, ``layerwise``, ``clip``, ``max_grad_norm``, ``update_proj_gap``, ``scale``, residual
    options...). ``lr``,
    ``weight_decay``, ``seed`` and, in layer-wise mode, ``accumulation_steps`` come from the
    ``TrainingArguments``. ``clip_grad_norm``: as for :func:`make_optimizer` (clipping under the
    projected backward).
    """

    def __init__(self, *args: Any, galore: dict[str, Any], clip_grad_norm: float | None = None, **kwargs: Any):
        for key in FROM_ARGUMENTS:
            if key in galore:
                raise ValueError(f"galore[{key!r}] is taken from the TrainingArguments; remove it")
        self.galore = dict(galore)
        self.clip_grad_norm = clip_grad_norm
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer, _ = make_optimizer(model if model is not None else self.model, self.args,
                                               clip_grad_norm=self.clip_grad_norm, **self.galore)
        check_trainer_arguments(self.args, self.optimizer)
        return self.optimizer
