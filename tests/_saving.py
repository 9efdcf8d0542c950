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


def train_across_a_resume(make_model, make_optimizer, data, split=None):
    """A model from ``make_model()`` trained by ``make_optimizer(model)``, one update per batch of token
    ids in ``data`` (the model's own language-model loss); before update ``split`` (0-based) both are
    saved through disk and training goes on in fresh objects loaded from it, as a resumed run does.
    Returns the model, the optimizer's summed ``refresh_count`` after each update and what was saved
    (None without a split)."""
    model = make_model()
    opt = make_optimizer(model)
    counts, saved = [], None
    for step, ids in enumerate(data):
        if step == split:
            saved = through_disk({"model": model.state_dict(), "opt": opt.state_dict()})
            model = make_model()
            model.load_state_dict(saved["model"])
            opt = make_optimizer(model)
            opt.load_state_dict(saved["opt"])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        counts.append(sum(int(s["refresh_count"]) for s in opt.state.values() if "refresh_count" in s))
    return model, counts, saved
