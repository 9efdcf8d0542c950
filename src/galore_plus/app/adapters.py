"""The LoRA/DoRA adapter of a run as PEFT saves it: ``OUTPUT/final/adapter/`` beside the merged model.

``final/`` holds the model with the adapter merged into its weights (``merge_and_unload``);
``final/adapter/`` holds the adapter alone (PEFT's ``save_pretrained``: ``adapter_config.json`` and
``adapter_model.safetensors``), a few MB instead of the whole model, which
``peft.PeftModel.from_pretrained(base, "OUTPUT/final/adapter")`` puts on a fresh base model.

The base it names (``adapter_config.json``'s ``base_model_name_or_path``, :func:`base_reference`) is
what this machine can load offline: the ``--model`` the run used, which
``galore_plus.app.models.load_model`` takes back (``smollm2``, ``tiny``, a ``.gguf`` file or a model
directory; files and directories by their absolute path). ``tiny`` is random: the same base needs the
run's ``--seed`` (and ``--dtype``), which ``run.json`` records. A model directory is a Hugging Face
one, so ``peft.AutoPeftModelForCausalLM.from_pretrained("OUTPUT/final/adapter")`` loads base and
adapter in one call; the built-in names and GGUF files are nothing ``from_pretrained`` can open alone
(README, "Adapters (LoRA/DoRA)"; DESIGN.md, "Trainer integration")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ADAPTER", "base_reference", "save_adapter"]

#: the adapter's directory inside ``final/``
ADAPTER = "adapter"


def base_reference(model: str) -> str:
    """What the adapter names as its base, for ``--model model``: a built-in name as it is, a file or
    directory by its absolute path (so it loads from anywhere on this machine)."""
    from .models import MODEL_CHOICES

    return model if model in MODEL_CHOICES else str(Path(model).resolve())


def save_adapter(model: Any, directory: Path, base_model: str) -> None:
    """Save the adapter of ``model`` (a ``peft.PeftModel``, before it is merged) into ``directory``
    with PEFT's ``save_pretrained``, naming ``base_reference(base_model)`` as its base."""
    configs = model.peft_config
    before = {name: config.base_model_name_or_path for name, config in configs.items()}
    try:
        for config in configs.values():
            config.base_model_name_or_path = base_reference(base_model)
        # the base's embeddings are not saved: the command never resizes the vocabulary (PEFT's "auto" would
        # look for the base's config.json, on a hub for a built-in name)
        model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    finally:
        for name, config in configs.items():
            config.base_model_name_or_path = before[name]
