"""Issue 26: a tied embedding/``lm_head`` (and an untied lookup) trained low-rank refreshes from factors
too: the ``lm_head`` half as the pair ``(h, dlogits)``, the lookup half as ``(dE, S)`` with ``S`` the
one-hot token matrix (``projection.TokenRows``, ``G_lookup = Sᵀ dE``), never the ``vocab×hidden``
gradient. The math against the dense ``G`` (float64); the optimizer against the full-gradient refresh
(float64, 1e-10 relative on projectors, residual sets and parameters after every step, three
refreshes, 1 and 2 micro-batches), the factors' cap, the dispatch-mode watch at every step, and a
bitwise resume across a refresh."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from galore_plus import build_optimizer, engine_of, projection
from galore_plus.rng import generator_for

sys.path.insert(0, str(Path(__file__).parent))
from test_projected import CONFIG, GAP  # noqa: E402
from test_sketched_refresh import assert_close_runs, target_sized_per_step, train  # noqa: E402  (train records snapshot())

TIED = {**CONFIG, "tie_word_embeddings": True}


def model_for(dtype=torch.float64, tie=True, **config):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TIED, "tie_word_embeddings": tie, **config})).to(dtype)


def optimizer_for(model, sketched=True, cap=False, **options):
    opt = build_optimizer(model, "galore+", 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                          weight_decay=0.01, embeddings="low_rank", projected_backward=True, **options)
    engine_of(opt).projected_backward.sketched_refresh = sketched
    engine_of(opt).projected_backward.cap_factors = cap
    return opt


def batches(accumulation, seq=11, steps=12, seed=1, rows=2):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 64, (rows, seq), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def relative(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------- the math


def mixed(padding=None):
    """A tied weight's gradient as factors: a dense pair (h, dlogits) plus two lookups with repeated
    ids, and the dense ``G`` they stand for (vocab 30 × hidden 12)."""
    gen = torch.Generator().manual_seed(0)
    vocab, n, tokens = 30, 12, 9
    h = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    dlogits = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
    grad = projection.FactoredGradient.of(h, dlogits)
    G = dlogits.T @ h
    for ids in (torch.tensor([3, 7, 3, 29, 0, 7, 3, 11]), torch.tensor([5, 5, 29, 2])):
        rows = torch.randn(ids.numel(), n, generator=gen, dtype=torch.float64)
        grad.add_(projection.FactoredGradient([(rows, projection.TokenRows(ids, vocab, rows.dtype))]))
        G = G + torch.zeros(vocab, n, dtype=torch.float64).index_add_(0, ids, rows)
    return grad, G


def test_lookup_factors_give_the_products_of_the_dense_gradient():
    grad, G = mixed()
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    Y = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    assert grad.shape == G.shape and grad.T.shape == G.T.shape
    for got, want in ((grad @ M, G @ M), (grad.T @ Y, G.T @ Y), (Y.T @ grad, Y.T @ G), (M.T @ grad.T, M.T @ G.T),
                      (grad.row_block([3, 4, 29]).dense(), G[[3, 4, 29]]), (grad.dense(), G),
                      (grad.T.dense(), G.T)):
        assert relative(got, want) < 1e-13
    P, Q = torch.linalg.qr(Y).Q, torch.linalg.qr(M).Q
    for left, right, want in ((P, None, P.T @ G), (None, Q.T, G @ Q), (P, Q.T, P.T @ G @ Q)):
        assert relative(grad.project(left, right), want) < 1e-13
    index = torch.tensor([0, 3 * 12 + 1, 7 * 12 + 2, 5 * 12, 29 * 12 + 11, 13 * 12 + 4], dtype=torch.int32)
    torch.testing.assert_close(grad.entries(index), G.reshape(-1)[index.long()], rtol=1e-13, atol=1e-14)
    assert grad.all_finite()


@pytest.mark.parametrize("side", [projection.LEFT, projection.RIGHT, projection.FULL])
def test_randomized_projector_from_lookup_factors_equals_the_one_from_g(side):
    grad, G = mixed()
    want = projection.randomized_projector(G, 4, side, generator_for(0, 3, 1), 4, 2)
    got = projection.randomized_projector(grad, 4, side, generator_for(0, 3, 1), 4, 2)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if b is not None:
            assert relative(a, b) < 1e-10


# ----------------------------------------------------------------------------------- the optimizer


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("accumulation,options", [
    (1, {}), (2, {}), (1, {"refresh_in_backward": True}), (2, {"residual_reselect": True}),
])
def test_tied_refresh_from_factors_equals_the_full_gradient_refresh(tie, accumulation, options):
    """12 steps, refreshes at 1, 5, 9, float64: the tied weight (or the untied embedding) held as
    factors at refresh steps, never as ``W.grad``; projectors, residual sets and parameters after
    every step within 1e-10 of the full-gradient refresh and of the full path."""
    data = batches(accumulation)
    runs = []
    for sketched in (True, False):
        model, record = model_for(tie=tie), []
        opt = optimizer_for(model, sketched, **options)
        embedding = model.model.embed_tokens.weight
        assert id(embedding) in engine_of(opt).projected_backward.weights
        if sketched:  # the first step holds the embedding's factors, lookup pairs among them
            ids = data[0][0]
            model(input_ids=ids, labels=ids).loss.backward()
            held = opt.factored_gradient(embedding)
            assert embedding.grad is None and held is not None
            assert any(isinstance(dy, projection.TokenRows) for _, dy in held.pairs)
            assert any(isinstance(dy, torch.Tensor) for _, dy in held.pairs) == tie
            opt.zero_grad()
        train(model, opt, data, record)
        runs.append(record)
    model, record = model_for(tie=tie), []
    train(model, build_optimizer(model, "galore+", 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                                 weight_decay=0.01, embeddings="low_rank",
                                 **{k: v for k, v in options.items() if k != "refresh_in_backward"}), data, record)
    assert_close_runs(runs[0], runs[1])
    assert_close_runs(runs[0], record)


@pytest.mark.parametrize("accumulation,seq,rows", [(1, 11, 2), (2, 9, 2), (2, 11, 1)])
def test_the_cap_folds_the_tied_factors_into_g_and_equals_the_full_path(accumulation, seq, rows):
    """The cap is ``vocab·hidden`` = 3072 elements; per token the lm_head half holds 64 + 48, the lookup
    half 48 + 1 (its ids). 1×22 tokens: the lookup half passes it (2464 + 1078); 2×18: the second
    micro-batch's lm_head half (2898 + 2016), and its lookup half returns its full gradient too;
    2×11: the second lookup half (3003 + 539). Folded equals the uncapped factored run to 1e-10
    (float64), and the folding happens exactly there."""
    data = batches(accumulation, seq, rows=rows)
    models = []
    for cap in (True, False):
        model = model_for()
        opt = optimizer_for(model, cap=cap)
        if cap:
            weight, tokens = model.lm_head.weight, rows * seq
            for i, ids in enumerate(data[0]):
                held_before = opt.factored_gradient(weight)
                model(input_ids=ids, labels=ids).loss.backward()
                folds = tokens * 161 * (i + 1) > weight.numel()
                assert (weight.grad is not None) == folds and (opt.factored_gradient(weight) is None) == folds
                assert held_before is None or folds or opt.factored_gradient(weight) is held_before
            assert weight.grad is not None
            opt.zero_grad()
        train(model, opt, data)
        models.append(model)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert relative(p, q) < 1e-10, name


@pytest.mark.parametrize("accumulation,seq,cap", [(1, 11, False), (2, 11, False), (1, 5, True), (2, 3, True)])
def test_no_target_sized_tensor_in_backward_or_step_at_any_step(accumulation, seq, cap):
    """The tied LLaMA (vocab 64 × hidden 48, no other tensor's shape): no op in backward or ``step()``
    returns a tensor of any target's shape (or its transpose) at any of 12 steps, refresh steps
    included, the weights themselves excepted; with the cap where the step's tokens are below it. The
    control: the full-gradient refresh shows the tied weight's at the refresh steps, only there."""
    for sketched in (True, False):
        model = model_for(torch.float32)
        opt = optimizer_for(model, sketched, cap=cap)
        weights = list({id(w): w for w in engine_of(opt).projected_backward.targets.values()}.values())
        assert any(w is model.lm_head.weight for w in weights)
        seen = target_sized_per_step(model, opt, batches(accumulation, seq), weights)
        assert all(opt.state[w]["refresh_count"] == 3 for w in weights)
        if sketched:
            assert not any(seen), seen
        else:
            assert [i for i, s in enumerate(seen) if s] == [0, 4, 8], seen
            assert all(any(shape == (64, 48) for _, shape in seen[i]) for i in (0, 4, 8))


def test_resume_across_a_refresh_is_bitwise_in_float32():
    """Saved after step 4, resumed (a new model and optimizer from the state dicts) for steps 5-12,
    which refresh from factors at 5 and 9: bitwise the uninterrupted run."""
    data = batches(2)

    def run(split=None):
        model = model_for(torch.float32)
        opt = optimizer_for(model, cap=True)
        for step, micro_batches in enumerate(data):
            if step == split:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                ckpt = torch.load(buf, weights_only=True)
                model = model_for(torch.float32)
                model.load_state_dict(ckpt["model"])
                opt = optimizer_for(model, cap=True)
                opt.load_state_dict(ckpt["opt"])
            for ids in micro_batches:
                (model(input_ids=ids, labels=ids).loss / len(micro_batches)).backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    a, opt = run()
    b, _ = run(split=4)
    assert opt.state[a.lm_head.weight]["refresh_count"] == 3
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_what_keeps_the_full_gradient_at_a_refresh():
    """An exact SVD of the whole matrix (plain GaLore) needs ``G`` itself, as ``sketched_refresh=False``
    does: both halves return their full gradients, autograd sums them in ``W.grad`` (float64, equal to
    the full path's), nothing is held as factors."""
    ids = batches(1, steps=1)[0][0]
    reference = model_for()
    reference(input_ids=ids, labels=ids).loss.backward()
    for method, sketched in (("galore", True), ("galore+", False)):
        model = model_for()
        opt = build_optimizer(model, method, 8, lr=1e-2, embeddings="low_rank", projected_backward=True)
        engine_of(opt).projected_backward.sketched_refresh = sketched
        weight = model.lm_head.weight
        assert id(weight) in engine_of(opt).projected_backward._tied
        model(input_ids=ids, labels=ids).loss.backward()
        assert opt.factored_gradient(weight) is None
        torch.testing.assert_close(weight.grad, reference.lm_head.weight.grad, rtol=1e-12, atol=1e-14)
        opt.step()


@pytest.mark.parametrize("accumulation,seq,rows,cap", [(2, 11, 1, True), (2, 9, 2, True), (2, 11, 2, False)])
def test_a_sparse_lookup_refreshes_the_same(accumulation, seq, rows, cap):
    """A lookup with ``sparse=True`` (``integration.sparse_tied_lookup``): held as factors, folded by the
    cap in either half, or returning sparse rows after a fold, the run equals the dense lookup's
    (float64, 1e-10)."""
    data = batches(accumulation, seq, rows=rows, steps=6)
    models = []
    for sparse in (True, False):
        model = model_for()
        model.model.embed_tokens.sparse = sparse
        train(model, optimizer_for(model, cap=cap), data)
        models.append(model)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert relative(p, q) < 1e-10, name


def test_a_non_finite_lookup_gradient_at_a_refresh_raises_before_anything_changes():
    model = model_for()
    opt = optimizer_for(model)
    ids = batches(1, steps=1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    held = opt.factored_gradient(model.lm_head.weight)
    rows = next(x for x, dy in held.pairs if isinstance(dy, projection.TokenRows))
    rows[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="embed_tokens|lm_head"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
