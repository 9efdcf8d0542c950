"""``transformers.Trainer`` glue: our optimizers, and layer-wise mode, inside a Trainer.

Two ways in:

- pass an optimizer you built: ``Trainer(..., optimizers=(optimizer, None))`` works as it is for
  ``GaLoreAdamW`` and friends (they are ``torch.optim.Optimizer`` s whose state loads with
  ``weights_only=True``, as the Trainer's checkpoints need), and for a ``LayerwiseOptimizer``;
- or ``GaLoreTrainer(..., galore={"method": "galore+", "rank": 32, ...})``, which builds the optimizer
  for the model with ``integration.build_optimizer`` from the Trainer's own learning rate, weight
  decay, seed and gradient-accumulation steps, and checks the arguments that cannot work.

With ``"projected_backward": True`` the Trainer's gradient clipping would miss the targets' projected
gradients, so ``max_grad_norm > 0`` is refused with it. Layer-wise mode (``"layerwise": True``):
parameters step inside ``backward()``; the Trainer's
``optimizer.step()`` then closes the step (``LayerwiseOptimizer.step``), its scheduler steps once per
optimizer step, and its checkpoints save the name-keyed state. The Trainer clips gradients *after*
backward, when none are left, so ``max_grad_norm > 0`` is refused with what to use instead
(``"clip": "parameter"`` or ``"previous_global"`` with ``"max_grad_norm"`` in ``galore``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .integration import build_optimizer
from .layerwise import LayerwiseOptimizer
from .layerwise import engine_of


def check_trainer_arguments(args: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse Trainer settings that would silently do nothing with ``optimizer``."""
    engine = engine_of(optimizer)
    if engine is not None and engine.projected_backward is not None and args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(
            f"max_grad_norm={args.max_grad_norm} with the projected backward: the Trainer clips "
            "model.parameters() .grad, which the target matrices do not have between projector refreshes (their "
            "projected gradients are the optimizer's), so their share of the norm would be missed; set "
            "max_grad_norm=0, or build without projected_backward")
    if isinstance(optimizer, LayerwiseOptimizer):
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={args.max_grad_norm}: in layer-wise mode the gradients are consumed inside "
                "backward(), so the Trainer's clipping would clip nothing; set max_grad_norm=0 and build the "
                "LayerwiseOptimizer with clip='parameter' or clip='previous_global' and max_grad_norm")
        if optimizer.accumulation_steps != args.gradient_accumulation_steps:
            raise ValueError(
                f"LayerwiseOptimizer(accumulation_steps={optimizer.accumulation_steps}) does not match "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}")


class GaLoreTrainer(Trainer):
    """A ``Trainer`` whose optimizer is GaLore / GaLore+ (``galore`` = ``build_optimizer`` keywords).

    ``galore`` takes ``spec`` (a ``LowRankSpec``) or the older ``method`` (``"galore"`` or ``"galore+"``),
    ``rank`` and loose options, and any other keyword of ``integration.build_optimizer`` (``eightbit``, ``adafactor``, ``layerwise``, ``clip``,
    ``max_grad_norm``, ``update_proj_gap``, ``scale``, residual options...). ``lr``,
    ``weight_decay``, ``seed`` and, in layer-wise mode, ``accumulation_steps`` come from the
    ``TrainingArguments``.
    """

    def __init__(self, *args: Any, galore: dict[str, Any], **kwargs: Any):
        for key in ("lr", "weight_decay", "seed", "accumulation_steps"):
            if key in galore:
                raise ValueError(f"galore[{key!r}] is taken from the TrainingArguments; remove it")
        self.galore = dict(galore)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            layerwise = {"accumulation_steps": self.args.gradient_accumulation_steps} if self.galore.get("layerwise") else {}
            self.optimizer = build_optimizer(
                model if model is not None else self.model,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                seed=self.args.seed,
                **layerwise,
                **self.galore,
            )
        check_trainer_arguments(self.args, self.optimizer)
        return self.optimizer
