"""The tiny random LLaMA that issue 29's mechanism tests train (capture refresh, moment transport, Fira's
term, the plain rate, canonical signs, rank per matrix): its configuration, its seeded construction, its
batches and the training loop, written once."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny(dtype=torch.float64, config=CONFIG) -> LlamaForCausalLM:
    """The model, seeded (the same weights at every call)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype)


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    """One batch of 2 sequences of 11 tokens a step."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 11), generator=gen) for _ in range(steps)]


def micro_batches(accumulation: int, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """``accumulation`` such batches a step."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 64, (2, 11), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def train(model, opt, data, scheduler=None):
    """A step per item of ``data``: a batch, or a list of micro-batches whose mean loss is backpropagated
    (each one's loss over their count); the scheduler stepped after each step. Returns the model."""
    for step in data:
        parts = [step] if torch.is_tensor(step) else step
        for ids in parts:
            loss = model(input_ids=ids, labels=ids).loss
            (loss if torch.is_tensor(step) else loss / len(parts)).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return model
