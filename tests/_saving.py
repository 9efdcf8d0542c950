"""A checkpoint's round trip in memory, shared by the resume tests."""

from __future__ import annotations

import io

import torch


def through_disk(obj):
    """``obj`` saved with ``torch.save`` and loaded back with ``torch.load(weights_only=True)``: what a
    checkpoint written and resumed gives (tensors and numbers only, or the load refuses)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
