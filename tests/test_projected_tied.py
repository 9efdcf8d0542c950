"""Issue 26: the projected backward of a tied embedding/``lm_head`` trained low-rank
(``build_optimizer(embeddings="low_rank")``): the ``lm_head`` half ``dlogitsᵀ(h Q)`` / ``(dlogits P)ᵀ h``
plus the lookup's rows times the projector, never the ``vocab×hidden`` gradient between refreshes.
Against the full path in float64: the projected gradient itself (1e-12), the trajectory over three
refreshes (1e-9; their refresh from factors: tests/test_tied_sketched_refresh.py), padding rows, every projection side and the residual's entries of the lookup half;
an untied lookup's gradient alone; and what stays on the full path (layer-wise, ``max_norm``,
``torch.distributed``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from galore_plus import build_optimizer, engine_of
from galore_plus.lowrank import LowRankGradient
from galore_plus.projected import is_projected, lookup_projected_gradient

sys.path.insert(0, str(Path(__file__).parent))
from test_projected import CONFIG, GAP, assert_same, batches, train  # noqa: E402
from test_sketched_refresh import TargetSized  # noqa: E402

TIED = {**CONFIG, "tie_word_embeddings": True}


def tied(dtype=torch.float64, **config):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TIED, **config})).to(dtype)


def optimizer_for(model, **options):
    return build_optimizer(model, "galore+", 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                           weight_decay=0.01, embeddings="low_rank", **options)


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("accumulation,refresh_in_backward", [(1, False), (2, False), (1, True)])
def test_tied_low_rank_embedding_trajectory_equals_the_full_path(accumulation, refresh_in_backward):
    """12 steps, refreshes at 1, 5, 9 (22 tokens pass the tied weight's factors' cap: its full gradient
    at those, folded; below the cap tests/test_tied_sketched_refresh.py; refreshed at step()
    even with ``refresh_in_backward``, which refreshes the other targets in backward: the same refresh
    with one micro-batch), 1 or 2 micro-batches, float64."""
    data = batches(accumulation)
    full = tied()
    train(full, optimizer_for(full), data)
    proj = tied()
    opt = optimizer_for(proj, projected_backward=True, refresh_in_backward=refresh_in_backward)
    assert is_projected(proj.lm_head) and is_projected(proj.model.embed_tokens)
    train(proj, opt, data)
    assert_same(full, proj, 1e-9)
    assert not torch.allclose(proj.lm_head.weight, tied().lm_head.weight)


def test_projected_gradient_of_the_tied_weight_equals_the_full_one_projected():
    """Between refreshes ``W.grad`` stays None and the optimizer holds ``(G_lm_head + G_lookup) Q``, equal
    to the full path's ``W.grad`` projected (float64, 1e-12); at a refresh step ``W.grad`` is the full sum."""
    data = batches(1, steps=3)
    full, proj = tied(), tied()
    opt_full, opt_proj = optimizer_for(full), optimizer_for(proj, projected_backward=True)
    weight = proj.lm_head.weight
    for step, (ids,) in enumerate(data):
        for model in (full, proj):
            model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:  # the first refresh: 22 tokens pass the factors' cap, folded into W.grad
            torch.testing.assert_close(weight.grad, full.lm_head.weight.grad.to_dense(), rtol=1e-12, atol=1e-14)
        else:
            assert weight.grad is None
            want = engine_of(opt_full).project(full.lm_head.weight, full.lm_head.weight.grad.to_dense()).low
            got = opt_proj.projected_gradient(weight).low
            assert got.shape == (TIED["vocab_size"], 8)
            assert relative(got, want) < 1e-12
        for opt in (opt_full, opt_proj):
            opt.step()
            opt.zero_grad()
    assert_same(full, proj, 1e-12)


def test_no_vocab_by_hidden_tensor_between_refreshes():
    """vocab 64 × hidden 48 (and its transpose) is no other tensor's shape here: between refreshes no op
    in backward or ``step()`` returns one (the weight itself excepted: the update writes it in place);
    at a refresh step the full gradient is there (22 tokens pass the factors' cap; below it
    tests/test_tied_sketched_refresh.py watches refresh steps too)."""
    model = tied(torch.float32)
    opt = optimizer_for(model, projected_backward=True)
    shape = (TIED["vocab_size"], TIED["hidden_size"])
    seen = []
    for (ids,) in batches(1, steps=GAP + 1):
        loss = model(input_ids=ids, labels=ids).loss
        with TargetSized({shape, shape[::-1]}, [model.lm_head.weight]) as record:
            loss.backward()
            opt.step()
        opt.zero_grad()
        seen.append(record.seen)
    assert seen[0] and seen[GAP]  # refresh steps 1 and 5
    assert not any(seen[1:GAP]), seen


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_lookup_half_equals_the_dense_lookup_gradient(side):
    """``onehot(ids)ᵀ dE`` projected on each side, with repeated ids and a padding row (no gradient, as
    ``F.embedding``'s), and its residual entries at rows present, absent and padding, float64."""
    gen = torch.Generator().manual_seed(0)
    vocab, n, r, padding = 30, 12, 4, 7
    ids = torch.tensor([3, 7, 3, 29, 0, 7, 3, 11])
    grad_rows = torch.randn(ids.numel(), n, generator=gen, dtype=torch.float64)
    weight = torch.zeros(vocab, n, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.embedding(ids, weight, padding).backward(grad_rows)
    G = weight.grad
    P = torch.linalg.qr(torch.randn(vocab, r, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    left, right = (P if side != "right" else None), (Q.T if side != "left" else None)
    want = (P.T @ G if left is not None else G) @ (Q if right is not None else torch.eye(n, dtype=torch.float64))
    index = torch.tensor([3 * n + 1, 7 * n + 2, 5 * n, 29 * n + 11, 0, 11 * n + 5], dtype=torch.int32)
    got = lookup_projected_gradient(ids, grad_rows, left, right, index, vocab, padding)
    assert relative(got.low, want) < 1e-13
    torch.testing.assert_close(got.residual, G.reshape(-1)[index.long()], rtol=1e-13, atol=1e-15)
    # added to another half (the tied lm_head's): in place for G Q without entries, else summed
    base = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for entries in (None, index):
        into = LowRankGradient(base.clone(), None if entries is None else torch.zeros(entries.numel(), dtype=torch.float64))
        with TargetSized({tuple(want.shape)}, [into.low]) as watch:
            out = lookup_projected_gradient(ids, grad_rows, left, right, entries, vocab, padding, into)
        assert out is into and relative(out.low, base + want) < 1e-13
        if side == "right" and entries is None:  # no vocab×r buffer: the rows went into ``into.low``
            assert not watch.seen, watch.seen
        else:  # the control: the summed path forms its own buffer, and the watch sees it
            assert watch.seen


def test_padding_rows_get_no_gradient_on_the_projected_path():
    """A lookup with ``padding_idx``: the trajectory equals the full path's (the padding row unchanged by
    the lookup half on both)."""
    data = batches(1, steps=GAP + 2)
    models = []
    for projected in (False, True):
        model = tied(pad_token_id=5)
        assert model.model.embed_tokens.padding_idx == 5
        train(model, optimizer_for(model, projected_backward=projected), data)
        models.append(model)
    assert_same(*models, 1e-9)


def test_what_stays_on_the_full_path():
    """Layer-wise mode and a lookup with ``max_norm`` leave the embedding to the full path, as before."""
    model = tied()
    optimizer_for(model, projected_backward=True, layerwise=True)
    assert not is_projected(model.lm_head) and not is_projected(model.model.embed_tokens)
    model = tied()
    model.model.embed_tokens.max_norm = 1.0
    optimizer_for(model, projected_backward=True)
    assert not is_projected(model.lm_head) and not is_projected(model.model.embed_tokens)
    assert isinstance(model.model.embed_tokens, nn.Embedding)


def test_remove_leaves_both_modules_as_they_were():
    model = tied()
    before = {name: dict(vars(m)) for name, m in (("lm_head", model.lm_head), ("embed", model.model.embed_tokens))}
    opt = optimizer_for(model, projected_backward=True)
    engine_of(opt).projected_backward.remove()
    assert not is_projected(model.lm_head) and not is_projected(model.model.embed_tokens)
    for name, m in (("lm_head", model.lm_head), ("embed", model.model.embed_tokens)):
        after = {k: v for k, v in vars(m).items() if k != "sparse"}
        assert after.keys() == {k for k in before[name] if k != "sparse"}


def test_under_torch_distributed_the_tied_weight_stays_on_the_full_path():
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29800 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tied()
        optimizer_for(model, projected_backward=True)
        assert not is_projected(model.lm_head) and not is_projected(model.model.embed_tokens)
        assert is_projected(model.model.layers[0].self_attn.q_proj)
    finally:
        dist.destroy_process_group()


def test_an_untied_low_rank_embedding_is_projected_too():
    """Untied (``lm_head`` its own target already): the lookup's gradient alone is projected; the
    trajectory equals the full path's (float64, three refreshes, 2 micro-batches)."""
    data = batches(2)
    models = []
    for projected in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).double()
        opt = optimizer_for(model, projected_backward=projected)
        if projected:
            assert is_projected(model.lm_head) and is_projected(model.model.embed_tokens)
            assert engine_of(opt).projected_backward._tied == set()
        train(model, opt, data)
        models.append(model)
    assert_same(*models, 1e-9)
    assert not torch.allclose(models[1].model.embed_tokens.weight, tied(tie_word_embeddings=False).model.embed_tokens.weight)
