"""Issue 26: the projected backward refreshes without the full gradient (randomized range finder and
cross-head from ``x`` and ``dy``, ``projection.FactoredGradient``). The reference first: the factored
products and projectors against the dense ones in float64; then the optimizer against the
full-gradient refresh (float64, 1e-10 relative on projectors and steps), micro-batches, layer-wise
mode, 8-bit; then the target: no tensor the size of a target matrix in backward or ``step()`` at any
step, refresh steps included (a dispatch-mode watch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from galore_plus import build_optimizer, engine_of, projection, residual
from galore_plus.projected import clip_grad_norm_
from galore_plus.rng import generator_for

sys.path.insert(0, str(Path(__file__).parent))
from test_projected import GAP, batches, tiny  # noqa: E402  the same tiny LLaMA and batches


def optimizer_for(model, sketched=True, **options):
    opt = build_optimizer(model, "galore+", 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                          weight_decay=0.01, projected_backward=True, **options)
    engine_of(opt).projected_backward.sketched_refresh = sketched
    # 22 tokens a micro-batch exceed k/v's cap (16 tokens): these tests hold the factors whatever their
    # size; the cap, which folds them into G beyond it, is tested in tests/test_factor_cap.py
    engine_of(opt).projected_backward.cap_factors = False
    return opt


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------- the math


def factors(micro_batches=2, m=24, n=40, tokens=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(tokens, n, generator=gen, dtype=torch.float64),
              torch.randn(tokens, m, generator=gen, dtype=torch.float64)) for _ in range(micro_batches)]
    grad = projection.FactoredGradient.of(*pairs[0])
    for pair in pairs[1:]:
        grad.add_(projection.FactoredGradient.of(*pair))
    return grad, sum(dy.T @ x for x, dy in pairs)


def test_factored_products_equal_the_dense_ones():
    grad, G = factors()
    gen = torch.Generator().manual_seed(1)
    M, Y = torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randn(24, 5, generator=gen, dtype=torch.float64)
    assert grad.shape == G.shape and grad.T.shape == G.T.shape
    for got, want in ((grad @ M, G @ M), (grad.T @ Y, G.T @ Y), (Y.T @ grad, Y.T @ G), (M.T @ grad.T, M.T @ G.T),
                      (grad.row_block([3, 4, 20]).dense(), G[[3, 4, 20]]), (grad.dense(), G)):
        assert relative(got, want) < 1e-13
    P, Q = torch.linalg.qr(Y).Q, torch.linalg.qr(M).Q
    for left, right, want in ((P, None, P.T @ G), (None, Q.T, G @ Q), (P, Q.T, P.T @ G @ Q)):
        assert relative(grad.project(left, right), want) < 1e-13
    index = torch.tensor([0, 7, 41, 500, 959], dtype=torch.int32)
    assert relative(grad.entries(index), G.reshape(-1)[index.long()]) < 1e-13


@pytest.mark.parametrize("side", [projection.LEFT, projection.RIGHT, projection.FULL])
@pytest.mark.parametrize("warm", [False, True])
def test_randomized_projector_from_factors_equals_the_one_from_g(side, warm):
    """The same seeds, float64: the range finder with its power iterations on ``x``/``dy`` of two
    micro-batches gives the projector of the full gradient to 1e-10 (relative)."""
    grad, G = factors()
    previous = projection.randomized_projector(G, 6, side, generator_for(0, 3, 0), 4, 2) if warm else None
    want = projection.randomized_projector(G, 6, side, generator_for(0, 3, 1), 4, 2, previous)
    got = projection.randomized_projector(grad, 6, side, generator_for(0, 3, 1), 4, 2, previous)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if b is not None:
            assert relative(a, b) < 1e-10


@pytest.mark.parametrize("randomized,rank", [(False, 6), (True, 3)])
def test_cross_head_projector_from_factors_equals_the_one_from_g(randomized, rank):
    """Cross-head: the chosen heads' rows are ``dy``'s columns (the block is formed, |heads|·d_k × n,
    never the matrix); with ``m = 48`` rows of 4 heads a head holds 12 rows: rank 3 + oversample 2
    sketches the block, rank 6 takes its exact SVD."""
    grad, G = factors(m=48, n=40)
    want = projection.cross_head_projector(G, rank, 4, generator_for(0, 5, 2), randomized, 2, 2)
    got = projection.cross_head_projector(grad, rank, 4, generator_for(0, 5, 2), randomized, 2, 2)
    assert got[0] is None and relative(got[1], want[1]) < 1e-10


def test_residual_selection_by_row_blocks_is_the_top_rho_set():
    gen = torch.Generator().manual_seed(2)
    for m, n, r, ratio in ((48, 80, 8, 0.012), (200, 96, 8, 0.3), (7, 5, 2, 1.0), (1, 64, 3, 0.1)):
        a, b = torch.randn(m, r, generator=gen, dtype=torch.float64), torch.randn(r, n, generator=gen, dtype=torch.float64)
        want = residual.select_indices(a @ b, ratio)
        got = residual.select_top_product(a, b, ratio)
        assert got.dtype == want.dtype and torch.equal(got, want), (m, n, ratio)


# ----------------------------------------------------------------------------------- the optimizer


def train(model, opt, data, record=None):
    model.train()
    for step, micro_batches in enumerate(data):
        for ids in micro_batches:
            (model(input_ids=ids, labels=ids).loss / len(micro_batches)).backward()
        opt.step()
        if record is not None:
            record.append(snapshot(opt, model))
        opt.zero_grad()
    return model


def snapshot(opt, model):
    engine = engine_of(opt)
    weights = [p for g in engine.param_groups if "rank" in g for p in g["params"]]
    out = {}
    for i, w in enumerate(weights):
        state = engine.state[w]
        for key in ("proj_left", "proj_right"):
            if key in state:
                out[(i, key)] = state[key].clone()
        if "residual_index" in state:
            out[(i, "residual_index")] = state["residual_index"].clone()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def assert_close_runs(a, b, tol=1e-10):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert set(x) == set(y), step
        for key in x:
            if key == "params":
                for p, q in zip(x[key], y[key]):
                    assert relative(p, q) < tol, (step, "params")
            elif key[1] == "residual_index":
                assert torch.equal(x[key], y[key]), (step, key)
            else:
                assert relative(x[key], y[key]) < tol, (step, key)


@pytest.mark.parametrize("accumulation,options", [
    (1, {}), (2, {}), (1, {"refresh_in_backward": True}), (2, {"residual_reselect": True}),
    (1, {"warm_start": True}), (2, {"svd": "exact", "canonical_signs": True}),
])
def test_sketched_refresh_equals_the_full_gradient_refresh_in_float64(accumulation, options):
    """GaLore+ (randomized range finder, cross-head q/k, the residual from step 3), 12 steps with
    three refreshes: projectors, residual index sets and parameters after every step within 1e-10
    (relative) of the projected backward with the full-gradient refresh, and of the full path. With
    ``svd="exact"`` q/k (cross-head: the exact SVD of the head block, formed from ``x`` and ``dy``)
    refresh without ``G`` while the other matrices take theirs in the same step (canonical signs:
    LAPACK's signs of the two blocks' SVDs may differ by rounding, DESIGN.md "Projectors")."""
    data = batches(accumulation)
    runs = []
    for sketched in (True, False):
        model, record = tiny(), []
        train(model, optimizer_for(model, sketched, **options), data, record)
        runs.append(record)
    model, record = tiny(), []
    train(model, build_optimizer(model, "galore+", 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                                 weight_decay=0.01, **{k: v for k, v in options.items() if k != "refresh_in_backward"}),
          data, record)
    assert_close_runs(runs[0], runs[1])
    assert_close_runs(runs[0], record)
    assert any(key[1] == "residual_index" for key in runs[0][-1] if key != "params")


def test_layerwise_and_8bit_equal_the_full_gradient_refresh():
    data = batches(2)
    for options in ({"layerwise": True, "accumulation_steps": 2}, {"eightbit": True}):
        runs = []
        for sketched in (True, False):
            model = tiny()
            train(model, optimizer_for(model, sketched, **options), data)
            runs.append([p.detach().clone() for p in model.parameters()])
        for p, q in zip(*runs):
            assert relative(p, q) < 1e-10, options


def test_a_refresh_step_holds_factors_until_step_and_forms_no_gradient():
    model = tiny(torch.float32)
    opt = optimizer_for(model)
    weights = list(opt.projected_backward.targets.values())
    ids = batches(1, steps=1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(w.grad is None and opt.projected_gradient(w) is None for w in weights)
    assert all(opt.factored_gradient(w) is not None for w in weights)
    opt.step()
    assert all(opt.state[w]["refresh_count"] == 1 and opt.factored_gradient(w) is None for w in weights)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.zero_grad()  # nothing is left held after zero_grad
    assert all(opt.factored_gradient(w) is None and opt.projected_gradient(w) is None for w in weights)


def test_exact_svd_and_fira_keep_the_full_gradient_at_a_refresh():
    """Plain GaLore's exact SVD of the whole matrix needs G (documented), so does Fira's term."""
    ids = batches(1, steps=1)[0][0]
    for method, options in (("galore", {}), ("galore+", {"outside": "fira", "residual_ratio": 0.0})):
        model = tiny()
        opt = build_optimizer(model, method, 8, lr=1e-2, projected_backward=True, **options)
        model(input_ids=ids, labels=ids).loss.backward()
        weights = list(opt.projected_backward.targets.values())
        assert all(w.grad is not None and opt.factored_gradient(w) is None for w in weights), method
    model = tiny()  # GaLore+ with an exact SVD: q/k's head blocks come from x and dy, the others need G
    opt = build_optimizer(model, "galore+", 8, lr=1e-2, projected_backward=True, svd="exact")
    opt.projected_backward.cap_factors = False  # k's 22 tokens exceed its cap (tests/test_factor_cap.py)
    model(input_ids=ids, labels=ids).loss.backward()
    attention = model.model.layers[0].self_attn
    for linear, cross_head in ((attention.q_proj, True), (attention.k_proj, True), (attention.v_proj, False),
                               (model.model.layers[0].mlp.down_proj, False)):
        assert (opt.factored_gradient(linear.weight) is not None) == cross_head
        assert (linear.weight.grad is None) == cross_head
    opt.step()


def test_non_finite_factors_at_a_refresh_raise_before_anything_changes():
    model = tiny()
    opt = optimizer_for(model)
    ids = batches(1, steps=1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    weight = model.model.layers[1].mlp.up_proj.weight
    x, dy = opt.factored_gradient(weight).pairs[0]
    dy[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="up_proj"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not opt.state.get(w) for w in opt.projected_backward.targets.values())


def test_clip_grad_norm_at_a_refresh_step_counts_the_new_projection():
    """At a refresh step the factored gradients are refreshed and projected by ``clip_grad_norm_``,
    so it counts them as between refreshes (the component in the new subspace), and ``step()`` then
    applies the clipped projected gradients."""
    model = tiny()
    opt = optimizer_for(model)
    ids = batches(1, steps=1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    weights = list(opt.projected_backward.targets.values())
    total = clip_grad_norm_(opt, 1e-3)
    assert all(opt.projected_gradient(w) is not None and opt.factored_gradient(w) is None for w in weights)
    plain = [p.grad for p in model.parameters() if p.grad is not None]
    clipped = torch.sqrt(sum(g.square().sum() for g in plain)
                         + sum(opt.projected_gradient(w).low.square().sum() for w in weights))
    assert total > 1e-3 and float(clipped) == pytest.approx(1e-3, rel=1e-5)
    opt.step()
    assert all(opt.state[w]["step"] == 1 for w in weights)


# ----------------------------------------------------------------------------------- the target


class TargetSized(TorchDispatchMode):
    """Records every tensor an op returns whose shape is in ``shapes``, unless it is (a view of) one
    of ``weights`` (the update writes them in place, and ``F.linear`` views them transposed). Dense
    tensors only: a sparse one of a target's shape (the residual's sampled product,
    ``torch.sparse.sampled_addmm``) holds only the index set's values."""

    def __init__(self, shapes, weights):
        super().__init__()
        self.shapes, self.seen = shapes, set()
        self.weights = {w.untyped_storage().data_ptr() for w in weights}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in self.weights):
                self.seen.add((str(func), tuple(t.shape)))
        return out


def target_sized_per_step(model, opt, data, weights) -> list[set]:
    """Train on ``data`` (a list of steps, each a list of micro-batches of token ids) and return, per
    step, what :class:`TargetSized` saw in its backward and ``step()``: tensors of any of ``weights``'
    shapes (or their transposes), the weights themselves excepted."""
    targets = {tuple(w.shape) for w in weights} | {tuple(w.shape)[::-1] for w in weights}
    seen = []
    for micro_batches in data:
        watch = TargetSized(targets, weights)
        for ids in micro_batches:
            loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
            with watch:
                loss.backward()
        with watch:
            opt.step()
            opt.zero_grad()
        seen.append(watch.seen)
    return seen


@pytest.mark.parametrize("accumulation,options", [
    (1, {}), (2, {}), (1, {"refresh_in_backward": True}), (2, {"residual_reselect": True, "eightbit": True}),
    (2, {"layerwise": True, "accumulation_steps": 2}),
])
def test_no_target_sized_tensor_in_backward_or_step_at_any_step(accumulation, options):
    """GaLore+ (randomized, cross-head, residual from step 3; refreshes at 1, 5, 9): no op in backward
    or ``step()`` returns a tensor of a target matrix's shape (or its transpose) at any of 12 steps,
    the weights themselves excepted. The target shapes (48×48, 24×48, 80×48, 48×80) are no other
    tensor's here (22 tokens per micro-batch; the embedding and ``lm_head``, 64×48, are trained
    plainly). The control: the full-gradient refresh shows them at refresh steps (and only there)."""
    for sketched in (True, False):
        model = tiny(torch.float32)
        opt = optimizer_for(model, sketched, **options)
        weights = list(engine_of(opt).projected_backward.targets.values())
        seen = target_sized_per_step(model, opt, batches(accumulation), weights)
        assert all(opt.state[w]["refresh_count"] == 3 for w in weights)
        assert any("residual_index" in opt.state[w] for w in weights)
        if sketched:
            assert not any(seen), seen
        else:
            assert [i for i, s in enumerate(seen) if s] == [0, 4, 8], seen
