"""``--packing``: the encoded training examples concatenated into sequences of up to ``--max-length``
tokens (:func:`pack`), each example attending to itself only.

The sequences are made by transformers' ``DataCollatorWithFlattening``: the examples' tokens one
after another, ``position_ids`` restarting at 0 with each example, and each example's first label
-100 (a sequence's first token is predicted by nothing of its own). Given ``position_ids``, no
``attention_mask`` and no cache (``use_cache=False``: with a cache, transformers does not look for
packed sequences), transformers' LLaMA (``masking_utils``: ``find_packed_sequence_indices``) builds
a block-diagonal causal mask for eager and SDPA attention, on CPU too, and flash-attention takes the
same ``position_ids`` as its varlen boundaries: no token attends across an example's boundary, and an
example's logits are those it has alone (DESIGN.md, "Packing"). The loss is unchanged: the same
answer tokens, each once.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from typing import Sequence

__all__ = ["pack", "packed_groups"]


def packed_groups(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Which examples share a sequence: indices into ``lengths``, each once. The examples are taken in
    an order drawn by ``seed``, each into the sequence with the least room that still fits it (best
    fit), or a new one; each sequence holds its examples in the order they came. Deterministic given
    the seed."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, group), sorted
    for i in order:
        n = lengths[i]
        if not 0 < n <= max_length:
            raise ValueError(f"example {i} has {n} tokens; packing takes 1 to max_length={max_length}")
        j = bisect_left(rooms, (n, -1))
        if j < len(rooms):
            room, group = rooms.pop(j)
        else:
            room, group = max_length, len(groups)
            groups.append([])
        groups[group].append(i)
        if room > n:
            insort(rooms, (room - n, group))
    return groups


def pack(features: Sequence[dict], max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """``features`` (:func:`~galore_plus.app.encoding.encode`'s) packed into sequences of at most
    ``max_length`` tokens (:func:`packed_groups`), each with ``input_ids``, ``labels``,
    ``position_ids`` (restarting per example) and ``attention_mask`` (ones: which tokens are real once
    :func:`~galore_plus.app.encoding.collate` pads)."""
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_tensors="np")
    packed = []
    for group in packed_groups([len(f["input_ids"]) for f in features], max_length, seed):
        batch = flatten([{"input_ids": list(features[i]["input_ids"]), "labels": list(features[i]["labels"])}
                         for i in group])
        ids = batch["input_ids"][0].tolist()
        packed.append({"input_ids": ids, "labels": batch["labels"][0].tolist(),
                       "position_ids": batch["position_ids"][0].tolist(), "attention_mask": [1] * len(ids)})
    return packed
