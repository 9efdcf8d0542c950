"""The model's weights in a one-process checkpoint (``model.safetensors``): all of them, or for a
PEFT model (LoRA/DoRA) the trained tensors only, with the sha256 of the frozen
base they were trained on, checked on resume (DESIGN.md, "Interrupts and checkpoints": a LoRA
checkpoint of SmolLM2 is a few MB instead of the whole model)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def save_weights(model, path: Path) -> str | None:
    """Write ``model``'s weights to ``path``; returns :func:`frozen_sha256` (None: all were written)."""
    from safetensors.torch import save_file, save_model

    frozen = frozen_sha256(model) if hasattr(model, "peft_config") else None  # a PEFT model: LoRA/DoRA
    if frozen is None:
        save_model(model, str(path))
    else:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))
    return frozen


def frozen_sha256(model) -> str | None:
    """The sha256 of ``model``'s frozen parameters (names, dtypes, shapes, values), or None when it
    trains them all. A LoRA/DoRA checkpoint saves the trained tensors only and this digest of the
    base they were trained on (DESIGN.md, "Interrupts and checkpoints")."""
    digest, any_frozen = hashlib.sha256(), False
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        any_frozen = True
        data = p.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest() if any_frozen else None


def load_weights(path: Path, state: dict[str, Any], model) -> None:
    """The checkpoint's weights into ``model``: all of them, or (a LoRA/DoRA checkpoint) the trained
    ones onto a frozen base that must be the one they were trained on."""
    from safetensors.torch import load_model

    if "frozen_sha256" not in state:
        load_model(model, str(path))
        return
    if frozen_sha256(model) != state["frozen_sha256"]:
        raise CheckpointError(f"{path}: the frozen weights of --model {state['config'].get('model')} are not those "
                              "the checkpoint's adapters were trained on (their sha256 differs); resume with the "
                              "same base model")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = load_model(model, str(path), strict=False)
    if unexpected or trained & set(missing):
        raise CheckpointError(f"{path} does not fit this run's model: missing {sorted(trained & set(missing))[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
