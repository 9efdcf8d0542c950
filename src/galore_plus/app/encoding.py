"""Examples as training tensors: :func:`encode` turns an example into token ids with the loss on
its responses only (:data:`IGNORE_INDEX` elsewhere), cut to ``max_length``; :func:`collate` pads a
batch of them."""

from __future__ import annotations

from typing import Sequence

import torch

from .examples import Example
from .templates import _segments

__all__ = ["IGNORE_INDEX", "encode", "collate"]

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (prompt tokens and padding)."""


def encode(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = the example's context and responses (:func:`_segments`; one turn: ``prompt +
    answer + [EOS]``); ``labels`` are −100 outside the responses, so the loss covers the responses
    (and their EOS) only; ``attention_mask`` is all ones.

    Longer than ``max_length``: tokens go from the left (the question's start, earlier turns; the end
    of the chat template stays), the last answer is never cut — unless it and its EOS alone do not
    fit in ``max_length - 1``: then one token before it is kept (the last of the generation prompt),
    the answer is cut on the right to the remaining ``max_length - 1`` tokens and the EOS is dropped
    (the answer did not end there).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    pieces = _segments(tokenizer, example)
    last = max(i for i, (_, response) in enumerate(pieces) if response)
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if response else IGNORE_INDEX for piece, response in pieces for t in piece]
    start = sum(len(piece) for piece, _ in pieces[:last])  # where the last answer begins
    final = len(ids) - start  # the last answer and anything after it
    if len(ids) > max_length:
        if final <= max_length - 1:
            ids, labels = ids[-max_length:], labels[-max_length:]
        else:
            keep = max(start - 1, 0)  # one context token, to predict the answer's first
            ids = ids[keep:keep + max_length]
            labels = [IGNORE_INDEX] * (start - keep) + labels[start:keep + max_length]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def collate(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: ``input_ids`` with ``pad_id``, ``labels`` with −100,
    ``attention_mask`` with 0. Features hold lists or 1-D tensors; returns int64 tensors."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_id is None:
        raise ValueError("pad_id is None; use the tokenizer's pad or EOS id")
    length = max(len(f["input_ids"]) for f in features)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        value = fill.get(key, 0)
        rows = []
        for f in features:
            row = torch.as_tensor(f[key], dtype=torch.long)
            rows.append(torch.cat([row, row.new_full((length - row.numel(),), value)]))
        batch[key] = torch.stack(rows)
    return batch


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy (float32) of the answer tokens: ``logits[:, t]`` predicts
    ``labels[:, t + 1]``, and positions labelled −100 (prompt, padding) count nothing. The training
    step and the evaluation both score with it."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
