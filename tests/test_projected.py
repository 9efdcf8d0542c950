"""Projected backward against the full-gradient path: float64 trajectories, micro-batches, layer-wise
mode, 8-bit and Adafactor, gradient checkpointing, resume, clipping, and no m×n weight gradient of a
target between refreshes (allocations recorded)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from galore_plus import build_optimizer
from galore_plus.projected import clip_grad_norm_, enable_projected_backward, projected_weight_gradient

CONFIG = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
STEPS, GAP = 12, 4  # refreshes at steps 1, 5, 9


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).to(dtype)


def batches(accumulation, steps=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 64, (2, 11), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def optimizer_for(model, kind="galore+", **options):
    extra = {"eightbit": True} if kind == "8bit" else {"adafactor": True, "residual_ratio": 0.0} if kind == "adafactor" else {}
    if kind == "galore randomized":
        extra = {"svd": "randomized"}
    method = "galore" if kind.startswith("galore ") or kind == "galore" else "galore+"
    return build_optimizer(model, method, 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                           weight_decay=0.01, **extra, **options)


def train(model, opt, data, layerwise=False, checkpointing=False, split=None, rebuild=None):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for step, micro_batches in enumerate(data):
        if step == split:
            model, opt = rebuild(model, opt)
        for ids in micro_batches:
            (model(input_ids=ids, labels=ids).loss / len(micro_batches)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("kind,accumulation", [("galore+", 1), ("galore+", 2), ("galore randomized", 2),
                                               ("adafactor", 2), ("galore", 2)])
def test_trajectory_equals_the_full_path_in_float64(kind, accumulation):
    """12 steps, 3 refreshes, the residual from step 3 on (GaLore+), 1 or 2 micro-batches. Plain
    GaLore's exact SVD is compared over its first refresh window only: LAPACK flips the signs of
    singular vectors under a 1e-16 change of the gradient (seen at the second refresh: 6 of 8
    vectors), and GaLore's kept moments follow the signs, so two correct paths part there whatever
    computes the gradient (DESIGN.md, "Projectors"); the randomized SVD has no such flips."""
    data = batches(accumulation, steps=GAP if kind == "galore" else STEPS)
    model_full = tiny()
    train(model_full, optimizer_for(model_full, kind), data)
    model_proj = tiny()
    train(model_proj, optimizer_for(model_proj, kind, projected_backward=True), data)
    assert_same(model_full, model_proj, 1e-9)
    assert not torch.allclose(model_full.model.layers[0].self_attn.q_proj.weight, tiny().model.layers[0].self_attn.q_proj.weight)


def test_8bit_projected_equals_the_full_path():
    """Wider MLP matrices (160×64 at rank 32: 5120-element low-rank moments, quantized), float64 for
    the projection math; the 8-bit moments see the same projected gradients on both paths. Over the
    first refresh window: at the second refresh of these matrices the small SVD of the randomized
    range finder flips singular-vector signs under a 1e-16 change (as in the exact-SVD case above)."""
    from galore_plus import GaLoreAdamW8bit

    config = {**CONFIG, "hidden_size": 64, "intermediate_size": 160}
    models = []
    for projected in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config)).double()
        opt = build_optimizer(model, "galore+", 32, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                              eightbit=True, projected_backward=projected)
        assert isinstance(opt, GaLoreAdamW8bit)
        train(model, opt, batches(2, steps=GAP))
        assert "exp_avg_q" in opt.state[model.model.layers[0].mlp.up_proj.weight]
        models.append(model)
    assert_same(*models, 1e-9)


def test_layerwise_mode_equals_the_full_path_in_float64():
    data = batches(2)
    results = []
    for projected in (False, True):
        model = tiny()
        opt = optimizer_for(model, layerwise=True, accumulation_steps=2, projected_backward=projected)
        train(model, opt, data)
        results.append(model)
    assert_same(*results, 1e-9)


def test_gradient_checkpointing_equals_without():
    data = batches(2)
    a, b = tiny(), tiny()
    train(a, optimizer_for(a, projected_backward=True), data)
    train(b, optimizer_for(b, projected_backward=True), data, checkpointing=True)
    assert_same(a, b, 1e-12)


def test_resume_within_the_projected_path_is_bitwise_in_float32():
    data = batches(2)

    def rebuild(model, opt):
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        fresh = tiny(torch.float32)
        fresh.load_state_dict(ckpt["model"])
        new = optimizer_for(fresh, projected_backward=True)
        new.load_state_dict(ckpt["opt"])
        return fresh, new

    a = tiny(torch.float32)
    train(a, optimizer_for(a, projected_backward=True), data)
    b = tiny(torch.float32)
    b, _ = train(b, optimizer_for(b, projected_backward=True), data, split=6, rebuild=rebuild)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


class Allocations(TorchDispatchMode):
    """Shapes of every dense tensor an op returns while active (a sparse one of a target's shape, the
    residual's sampled product ``torch.sparse.sampled_addmm``, holds only the index set's values)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.shapes.append(tuple(t.shape))
        return out


def test_no_weight_gradient_of_a_target_is_allocated_between_refreshes():
    """Target shapes here (48×48, 24×48, 80×48, 48×80) are no other tensor's in backward (tokens 22):
    no op may return one between refreshes, while at a refresh step of the full-gradient refresh
    (``sketched_refresh=False``) they are there (without it, at no step: test_sketched_refresh.py)."""
    model = tiny(torch.float32)
    opt = optimizer_for(model, projected_backward=True)
    opt.projected_backward.sketched_refresh = False
    targets = {tuple(w.shape) for w in opt.projected_backward.targets.values()}
    seen = []
    for step, (ids,) in enumerate(batches(1, steps=6)):
        loss = model(input_ids=ids, labels=ids).loss
        with Allocations() as record:
            loss.backward()
        seen.append(targets & set(record.shapes))
        weights = list(opt.projected_backward.targets.values())
        if step % GAP == 0:
            assert all(w.grad is not None for w in weights)   # the refresh needs the full gradient
        else:
            assert all(w.grad is None for w in weights)       # what users see between refreshes
            assert all(opt.projected_gradient(w) is not None for w in weights)
        opt.step()
        opt.zero_grad()
    assert seen[0] == targets and seen[4] == targets
    assert all(not s for i, s in enumerate(seen) if i % GAP), seen


def test_projected_weight_gradient_is_the_projection_of_the_full_one():
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(30, 12, generator=gen, dtype=torch.float64), torch.randn(30, 20, generator=gen, dtype=torch.float64)
    G = dy.T @ x
    P = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=torch.float64)).Q
    index = torch.tensor([0, 5, 77, 239], dtype=torch.int32)
    for left, right, want in ((P, None, P.T @ G), (None, Q.T, G @ Q), (P, Q.T, P.T @ G @ Q)):
        got = projected_weight_gradient(x, dy, left, right, index, 12)
        torch.testing.assert_close(got.low, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.residual, G.reshape(-1)[index.long()], rtol=1e-12, atol=1e-12)


def test_clip_grad_norm_counts_projected_gradients():
    model = tiny()
    opt = optimizer_for(model, projected_backward=True)
    data = batches(1, steps=2)
    train(model, opt, data[:1])  # the refresh step
    ids = data[1][0]
    model(input_ids=ids, labels=ids).loss.backward()
    plain = [p.grad for p in model.parameters() if p.grad is not None]
    projected = [opt.projected_gradient(w) for w in opt.projected_backward.targets.values()]
    expected = torch.sqrt(sum(g.square().sum() for g in plain) + sum(g.low.square().sum() for g in projected))
    before = [g.low.clone() for g in projected]
    total = clip_grad_norm_(opt, 0.5 * float(expected))
    assert total == pytest.approx(float(expected), rel=1e-12)
    for g, b in zip(projected, before):
        torch.testing.assert_close(g.low, b * (0.5 * float(expected) / (float(expected) + 1e-6)))


def test_remove_restores_the_full_path():
    model = tiny()
    opt = optimizer_for(model, projected_backward=True)
    handle = opt.projected_backward
    handle.remove()
    assert opt.projected_backward is None and "forward" not in model.model.layers[0].self_attn.q_proj.__dict__
    data = batches(1, steps=2)
    train(model, opt, data[:1])
    ids = data[1][0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_installing_twice_or_on_nothing_is_refused():
    model = tiny()
    opt = optimizer_for(model, projected_backward=True)
    with pytest.raises(ValueError, match="installed twice"):
        enable_projected_backward(model, opt)
    other = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="needs a galore_plus optimizer"):
        enable_projected_backward(model, other)


def test_embedding_choices():
    """frozen: like LoRA (requires_grad off, not in the optimizer); low_rank: a low-rank group, projected
    tied or not (a tied one's lookup half too since issue 26: tests/test_projected_tied.py)."""
    for tied in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "tie_word_embeddings": tied})).double()
        frozen = build_optimizer(copy.deepcopy(model), "galore+", 8, lr=1e-2, embeddings="frozen")
        names = [n for g in frozen.param_groups for n in g["param_names"]]
        assert not any("embed" in n or "lm_head" in n for n in names)
        low = build_optimizer(model, "galore+", 8, lr=1e-2, embeddings="low_rank", projected_backward=True)
        low_rank = {n for g in low.param_groups if "rank" in g for n in g["param_names"]}
        assert "model.embed_tokens.weight" in low_rank and (tied or "lm_head.weight" in low_rank)
        projected = {id(w) for w in low.projected_backward.targets.values()}
        assert id(model.lm_head.weight) in projected
        train(model, low, batches(1, steps=3))
        assert torch.isfinite(model.lm_head.weight).all()


def test_refresh_in_backward_equals_the_step_refresh_with_one_backward_per_step():
    data = batches(1)
    a, b = tiny(), tiny()
    train(a, optimizer_for(a, projected_backward=True), data)
    train(b, optimizer_for(b, projected_backward=True, refresh_in_backward=True), data)
    assert_same(a, b, 1e-12)


def test_refresh_in_backward_leaves_no_full_target_gradient():
    """At a refresh step each target's m×n gradient is made, used for its projector and dropped in
    its own backward: none is left in ``.grad``, every projector is refreshed, and the projected
    gradients wait for ``step()``."""
    model = tiny(torch.float32)
    opt = optimizer_for(model, projected_backward=True, refresh_in_backward=True)
    weights = list(opt.projected_backward.targets.values())
    ids = batches(1, steps=1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(w.grad is None for w in weights)
    assert all(opt.projected_gradient(w) is not None for w in weights)
    assert all(opt.state[w]["refresh_count"] == 1 for w in weights)
    opt.step()
    with pytest.raises(ValueError, match="option of the projected backward"):
        optimizer_for(tiny(), refresh_in_backward=True)


def snapshot(module):
    """A module's ``__dict__`` with its dict values copied (hook tables are mutated in place)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_installing_leaves_the_model_as_it_is_and_remove_restores_it_exactly():
    """Forward pre-hooks, not a patched ``forward``: while installed the modules keep their class,
    ``forward``, attributes, parameter names and ``state_dict`` keys; after ``remove()`` every
    module's ``__dict__`` is what it was, and loss and gradients equal an untouched copy's bitwise."""
    model = tiny()
    untouched = copy.deepcopy(model)
    before = {name: snapshot(m) for name, m in model.named_modules()}
    types = {name: type(m) for name, m in model.named_modules()}
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    opt = optimizer_for(model, projected_backward=True)
    handle = opt.projected_backward
    handle.sketched_refresh = False  # the refresh step from G as the untouched copy's: bitwise comparable
    assert len(handle.targets) == 14  # 7 per layer (the embeddings stay full)
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    for name, m in model.named_modules():
        assert set(m.__dict__) == set(before[name]) and "forward" not in m.__dict__, name
    data = batches(1, steps=2)
    train(model, opt, data[:1])  # the refresh step
    train(untouched, optimizer_for(untouched), data[:1])
    ids = data[1][0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(w.grad is None for w in handle.targets.values())  # the projected path ran
    opt.zero_grad()
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert opt.projected_backward is None
    for name, m in model.named_modules():
        assert snapshot(m) == before[name], name
    loss, grads = loss_and_grads(model, ids)
    loss_ref, grads_ref = loss_and_grads(untouched, ids)
    assert torch.equal(loss, loss_ref)
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


def test_the_optimizer_holds_the_projected_backward_through_its_accessor():
    from galore_plus import engine_of

    model = tiny()
    opt = optimizer_for(model, layerwise=True, projected_backward=True)
    handle = engine_of(opt).projected_backward
    assert handle is not None and handle.sink is opt and handle.engine is engine_of(opt)
    with pytest.raises(AttributeError):
        engine_of(opt).projected_backward = None  # read-only: attach_projected_backward is the way in
    with pytest.raises(ValueError, match="installed twice"):
        engine_of(opt).attach_projected_backward(object())
    handle.remove()
    assert engine_of(opt).projected_backward is None
    again = enable_projected_backward(model, opt)  # installs again after remove()
    assert engine_of(opt).projected_backward is again and again.process_group is None


def test_a_bare_linear_called_with_a_keyword_input():
    """Hooks work on the model's root module and on ``linear(input=x)``; bias and input gradients
    are the full path's."""
    from galore_plus import GaLoreAdamW

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    results = []
    for projected in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 5).double()
        opt = GaLoreAdamW([{"params": [lin.weight], "rank": 2, "update_proj_gap": 4}, {"params": [lin.bias]}], lr=1e-2)
        if projected:
            enable_projected_backward(lin, opt)
        seen = []
        for x in xs:
            x.grad = None
            lin(input=x).square().sum().backward()
            seen.append((lin.weight.grad is None, x.grad.clone(), lin.bias.grad.clone()))
            opt.step()
            opt.zero_grad()
        results.append((lin.weight.detach().clone(), seen))
    (w_full, full), (w_proj, proj) = results
    assert [s[0] for s in full] == [False, False] and [s[0] for s in proj] == [False, True]
    for (_, dx, db), (_, dx2, db2) in zip(full, proj):
        torch.testing.assert_close(dx, dx2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db, db2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_full, w_proj, rtol=1e-12, atol=1e-12)
