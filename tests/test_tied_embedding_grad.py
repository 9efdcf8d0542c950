"""A tied embedding's lookup hands back a sparse gradient (DESIGN.md, "A tied embedding's gradient").

``build_optimizer`` sets ``nn.Embedding.sparse`` on a trained input embedding tied to ``lm_head``, so
the lookup's rows are added into ``lm_head``'s dense gradient in place instead of through a zero
``vocab×hidden`` tensor. Checked: the weight's gradient stays dense and equal (float64) to the dense
lookup's, training is the same, and it is left off where it would be wrong (untied, frozen, under
``torch.distributed``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from galore_plus import build_optimizer
from galore_plus.app.models import tiny_model
from galore_plus.integration import sparse_tied_lookup


def batch(seed, vocab=96):
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train(sparse, steps=3, layerwise=False, embeddings="full"):
    model = tiny_model(96, seed=0, dtype=torch.float64)
    optimizer = build_optimizer(model, "galore+", 4, lr=1e-2, embeddings=embeddings, update_proj_gap=2,
                                layerwise=layerwise)
    lookup = model.get_input_embeddings()
    assert lookup.sparse is (embeddings != "frozen")
    lookup.sparse = sparse
    grads = []
    for t in range(steps):
        model(**batch(t)).loss.backward()
        if not layerwise:
            grads.append(lookup.weight.grad.clone())
            optimizer.step()
            optimizer.zero_grad()
    return model, grads


@pytest.mark.parametrize("embeddings", ["full", "low_rank"])
def test_sparse_lookup_trains_as_the_dense_one(embeddings):
    sparse_model, sparse_grads = train(True, embeddings=embeddings)
    dense_model, dense_grads = train(False, embeddings=embeddings)
    for a, b in zip(sparse_grads, dense_grads):
        assert a.layout == torch.strided and not a.is_sparse  # lm_head's dense gradient, rows added in place
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for (name, p), q in zip(sparse_model.named_parameters(), dense_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


def test_layerwise_mode_sees_a_dense_gradient():
    sparse_model, _ = train(True, layerwise=True)
    dense_model, _ = train(False, layerwise=True)
    for p, q in zip(sparse_model.parameters(), dense_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_left_dense_where_it_would_be_wrong():
    frozen = tiny_model(96, seed=0)
    build_optimizer(frozen, "galore+", 4, lr=1e-3, embeddings="frozen")
    assert frozen.get_input_embeddings().sparse is False
    untied = tiny_model(96, seed=0)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    build_optimizer(untied, "galore+", 4, lr=1e-3)
    assert untied.get_input_embeddings().sparse is False  # its own gradient would be sparse: refused by step()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        tied = tiny_model(96, seed=0)
        assert sparse_tied_lookup(tied) is False  # DDP would expect a sparse gradient and get a dense one
        assert tied.get_input_embeddings().sparse is False
    finally:
        dist.destroy_process_group()
