"""Memory features: 8-bit low-rank states, Adafactor, layer-wise updates, state-size estimates."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from galore_plus import (GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLorePlusAdamW, LayerwiseOptimizer,
                         estimate_state_bytes, galore_plus_param_groups, projection, state_bytes)


@pytest.fixture
def identity_projector(monkeypatch):
    def identity(grad, rank, side):
        m, n = grad.shape
        return (torch.eye(m, dtype=grad.dtype) if side in (projection.LEFT, projection.FULL) else None,
                torch.eye(n, dtype=grad.dtype) if side in (projection.RIGHT, projection.FULL) else None)

    monkeypatch.setattr(projection, "svd_projector", identity)


def run_pair(ours, theirs, params_ours, params_theirs, steps=40, seed=0):
    """Both optimizers see the same random gradient stream."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(params_ours, params_theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()


def run_one(opt, params, steps=40, seed=0):
    """The same gradient stream as ``run_pair``, for one optimizer."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a in params:
            a.grad = torch.randn(a.shape, generator=gen)
        opt.step()


# ---------------------------------------------------------------- 8-bit

def test_8bit_low_rank_states_match_bitsandbytes_adamw8bit_under_identity(identity_projector):
    import bitsandbytes as bnb

    w0, b0 = torch.randn(96, 64), torch.randn(5000)
    ours_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    bnb_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    full_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    hyper = dict(lr=1e-2, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.05)
    ours = GaLoreAdamW8bit([{"params": [ours_p[0]], "rank": 64, "scale": 1.0, "proj_type": "right"},
                            {"params": [ours_p[1]]}], **hyper)
    ref = bnb.optim.AdamW8bit(bnb_p, **hyper)
    run_pair(ours, ref, ours_p, bnb_p)
    run_one(torch.optim.AdamW(full_p, **hyper), full_p)
    assert ours.state[ours_p[0]]["exp_avg_q"].dtype == torch.uint8  # the low-rank moments really are 8-bit
    assert ours.state[ours_p[1]]["exp_avg_sq_q"].dtype == torch.uint8
    for a, b, c, x0 in zip(ours_p, bnb_p, full_p, (w0, b0)):
        moved = (c - x0).norm()
        quantizer_error = ((b - c).norm() / moved).item()  # bitsandbytes' own distance from 32-bit AdamW
        assert 1e-4 < quantizer_error < 0.1
        assert ((a - b).norm() / moved).item() < quantizer_error / 100  # we are the same quantizer


def test_8bit_small_tensors_stay_32bit_and_state_loads_weights_only_bitwise():
    def run(steps, split=None, dtype=torch.bfloat16):
        gen = torch.Generator().manual_seed(1)
        W = torch.nn.Parameter(torch.randn(128, 96, generator=gen).to(dtype))
        b = torch.nn.Parameter(torch.randn(96, generator=gen).to(dtype))
        groups = lambda: [{"params": [W], "rank": 40, "update_proj_gap": 4}, {"params": [b]}]
        opt = GaLoreAdamW8bit(groups(), lr=1e-2)
        for t in range(steps):
            if t == split:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = GaLoreAdamW8bit(groups(), lr=1e-2)
                opt.load_state_dict(torch.load(buf, weights_only=True))
            W.grad = torch.randn(W.shape, generator=gen).to(dtype)
            b.grad = torch.randn(b.shape, generator=gen).to(dtype)
            opt.step()
        return W, b, opt

    W1, b1, o1 = run(10)
    W2, b2, o2 = run(10, split=5)
    assert torch.equal(W1, W2) and torch.equal(b1, b2)
    assert o2.state[W2]["exp_avg_q"].dtype == torch.uint8  # survives load_state_dict's cast to bf16
    assert torch.equal(o1.state[W1]["exp_avg_q"], o2.state[W2]["exp_avg_q"])
    assert "exp_avg" in o2.state[b2] and "exp_avg_q" not in o2.state[b2]  # 96 < 4096 elements


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_chunked_update_is_the_whole_tensor_update(monkeypatch, dtype):
    """Chunks of whole quantization blocks change no bit: a plain 8-bit tensor (updated in place) and
    a low-rank one, both with a partial last block, against one chunk per tensor."""
    import galore_plus.adamw8bit as adamw8bit

    def run():
        gen = torch.Generator().manual_seed(4)
        W = torch.nn.Parameter(torch.randn(96, 70, generator=gen).to(dtype))  # low-rank: 96×40 moments
        E = torch.nn.Parameter(torch.randn(77, 61, generator=gen).to(dtype))  # 4697 elements, plain
        opt = GaLoreAdamW8bit([{"params": [W], "rank": 40, "update_proj_gap": 3}, {"params": [E]}], lr=1e-2)
        for _ in range(5):
            W.grad, E.grad = torch.randn(W.shape, generator=gen).to(dtype), torch.randn(E.shape, generator=gen).to(dtype)
            opt.step()
        return W.detach().clone(), E.detach().clone(), opt.state[W], opt.state[E]

    whole = run()
    monkeypatch.setattr(adamw8bit, "CHUNK_SIZE", 512)
    chunked = run()
    assert chunked[3]["exp_avg_q"].dtype == torch.uint8 and chunked[3]["exp_avg_q"].shape == (77, 61)
    for a, b in zip(whole[:2], chunked[:2]):
        assert torch.equal(a, b)
    for sa, sb in zip(whole[2:], chunked[2:]):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]) if torch.is_tensor(sa[key]) else sa[key] == sb[key], key


def test_8bit_with_every_galore_plus_option_runs_and_resumes():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.Parameter(torch.randn(8 * 32, 96, generator=gen))  # low-rank moments 256×24 ≥ 4096
    groups = lambda: galore_plus_param_groups([("q", q, 8)], rank=24, residual_ratio=0.05, residual_warmup=2,
                                              update_proj_gap=3)
    opt = GaLoreAdamW8bit(groups(), svd="randomized", lr=1e-2)
    for _ in range(6):
        q.grad = torch.randn(q.shape, generator=gen)
        opt.step()
    st = opt.state[q]
    assert st["exp_avg_q"].dtype == torch.uint8 and st["residual_index"].numel() == round(0.05 * q.numel())
    assert torch.isfinite(q).all()


# ---------------------------------------------------------------- Adafactor

@pytest.mark.parametrize("options", [
    {},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9, "weight_decay": 0.1},
])
def test_adafactor_under_identity_equals_transformers_adafactor(identity_projector, options):
    from transformers.optimization import Adafactor

    gen = torch.Generator().manual_seed(0)  # not the global RNG: the test must not depend on the ones before
    w0, b0 = torch.randn(48, 32, generator=gen), torch.randn(32, generator=gen)
    ours_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    ref_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    ours = GaLoreAdafactor([{"params": [ours_p[0]], "rank": 32, "scale": 1.0, "proj_type": "right"},
                            {"params": [ours_p[1]]}], **options)
    ref = Adafactor(ref_p, **options)
    run_pair(ours, ref, ours_p, ref_p, steps=30)
    for a, b, x0 in zip(ours_p, ref_p, (w0, b0)):
        assert ((a - b).norm() / (b - x0).norm()).item() < 1e-5
    assert ours.state[ours_p[0]]["exp_avg_sq_row"].shape == (48,)  # factored on the low-rank (48×32) gradient


def test_adafactor_low_rank_state_is_factored_and_small():
    W = torch.nn.Parameter(torch.randn(256, 128))
    opt = GaLoreAdafactor([{"params": [W], "rank": 8}])
    W.grad = torch.randn_like(W)
    opt.step()
    st = opt.state[W]
    assert st["exp_avg_sq_row"].shape == (256,) and st["exp_avg_sq_col"].shape == (8,)
    assert state_bytes(opt) == estimate_state_bytes(opt)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": 1e-3}, "cannot be combined with relative_step=True"),
    ({"relative_step": False}, "lr=None needs relative_step=True"),
    ({"lr": 1e-3, "relative_step": False, "warmup_init": True}, "warmup_init=True requires relative_step=True"),
    ({"decay_rate": 0.5}, "decay_rate=0.5"),
    ({"beta1": 1.0}, "beta1=1.0"),
])
def test_adafactor_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdafactor([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_residual_needs_adam_moments():
    with pytest.raises(ValueError, match="needs Adam moments"):
        GaLoreAdafactor([{"params": [torch.nn.Parameter(torch.randn(8, 8))], "rank": 2, "residual_ratio": 0.1}])


# ---------------------------------------------------------------- layer-wise

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q = torch.nn.Linear(16, 32)
        self.mlp = torch.nn.Linear(32, 24)
        self.out = torch.nn.Linear(24, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, x):
        return self.out(torch.tanh(self.mlp(torch.tanh(self.q(x)))))


def make_optimizer(kind, model):
    if kind == "adamw":
        groups = [{"params": [model.q.weight, model.mlp.weight], "rank": 4, "update_proj_gap": 3},
                  {"params": [model.q.bias, model.mlp.bias, model.out.weight, model.out.bias]}]
        return GaLoreAdamW(groups, lr=1e-2)
    if kind == "galore+":
        groups = galore_plus_param_groups(
            [("q.weight", model.q.weight, 4), ("mlp.weight", model.mlp.weight, None)], rank=4, residual_ratio=0.1,
            residual_warmup=2, update_proj_gap=3,
            plain=[(n, p) for n, p in model.named_parameters() if n not in ("q.weight", "mlp.weight")])
        return GaLorePlusAdamW(groups, lr=1e-2)
    if kind == "8bit":
        groups = [{"params": [model.q.weight, model.mlp.weight], "rank": 4, "update_proj_gap": 3},
                  {"params": [model.q.bias, model.mlp.bias, model.out.weight, model.out.bias]}]
        return GaLoreAdamW8bit(groups, lr=1e-2)
    groups = [{"params": [model.q.weight, model.mlp.weight], "rank": 4, "update_proj_gap": 3},
              {"params": [model.q.bias, model.mlp.bias, model.out.weight, model.out.bias]}]
    return GaLoreAdafactor(groups)


def batches(steps, accumulation, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(accumulation)]
            for _ in range(steps)]


def loss_of(model, x, y, accumulation):
    return ((model(x) - y) ** 2).mean() / accumulation


def train_step_driven(kind, data, accumulation, first_microbatch_refresh=False):
    """The reference: step() on the summed gradient. With ``first_microbatch_refresh`` the projector
    at a refresh step is computed from the first micro-batch's gradient, as layer-wise mode does."""
    model = TinyNet()
    opt = make_optimizer(kind, model)
    for micro_batches in data:
        for i, (x, y) in enumerate(micro_batches):
            loss_of(model, x, y, accumulation).backward()
            if i == 0 and first_microbatch_refresh:  # refresh now, from this gradient (public API)
                with torch.no_grad():
                    for p in model.parameters():
                        opt.refresh_projector(p, p.grad)
        opt.step()
        opt.zero_grad()
    return model, opt


def train_layerwise(kind, data, accumulation, split_at=None, **layerwise_options):
    model = TinyNet()
    opt = make_optimizer(kind, model)
    lw = LayerwiseOptimizer(opt, model.named_parameters(), accumulation_steps=accumulation, **layerwise_options)
    for step, micro_batches in enumerate(data):
        if step == split_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "lw": lw.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            lw.remove()
            model = TinyNet()
            model.load_state_dict(ckpt["model"])
            opt = make_optimizer(kind, model)
            lw = LayerwiseOptimizer(opt, model.named_parameters(), accumulation_steps=accumulation,
                                    **layerwise_options)
            lw.load_state_dict(ckpt["lw"])
        for x, y in micro_batches:
            loss_of(model, x, y, accumulation).backward()
        lw.step()
        assert all(p.grad is None for p in model.parameters())
    return model, lw


@pytest.mark.parametrize("kind", ["adamw", "galore+", "8bit", "adafactor"])
def test_layerwise_equals_step_driven_without_accumulation(kind):
    data = batches(8, 1)
    ref, _ = train_step_driven(kind, data, 1)
    lw_model, _ = train_layerwise(kind, data, 1)
    for (name, a), b in zip(ref.named_parameters(), lw_model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["adamw", "galore+"])
def test_layerwise_accumulates_in_low_rank_space_like_step_driven(kind):
    data = batches(7, 3)
    ref, _ = train_step_driven(kind, data, 3, first_microbatch_refresh=True)
    lw_model, _ = train_layerwise(kind, data, 3)
    for (name, a), b in zip(ref.named_parameters(), lw_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and the refresh really used only the first micro-batch: the plain summed-gradient run differs
    plain, _ = train_step_driven(kind, data, 3)
    assert not torch.allclose(plain.q.weight, lw_model.q.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["adamw", "galore+", "8bit", "adafactor"])
def test_layerwise_resume_is_bitwise(kind):
    data = batches(8, 2)
    a, _ = train_layerwise(kind, data, 2)
    b, _ = train_layerwise(kind, data, 2, split_at=5)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_layerwise_checkpoint_in_the_middle_of_accumulation_keeps_the_accumulators():
    model = TinyNet()
    lw = LayerwiseOptimizer(make_optimizer("adamw", model), model.named_parameters(), accumulation_steps=2)
    x, y = batches(1, 1)[0][0]
    loss_of(model, x, y, 2).backward()
    sd = lw.state_dict()
    assert set(sd["low_rank_accumulators"]) == {"q.weight", "mlp.weight"} and sd["received"]["q.weight"] == 1


class Branchy(torch.nn.Module):
    """TinyNet's shape plus a branch (``extra``: a low-rank weight and a plain bias) that a micro-batch
    may skip, so some parameters get no gradient from it. float64: the comparisons are tight."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q = torch.nn.Linear(16, 32)
        self.extra = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3

    def forward(self, x, branch):
        h = self.q(x) + (self.extra(x) if branch else 0)
        return self.out(torch.tanh(h))


def branchy_optimizer(model):
    groups = [{"params": [model.q.weight, model.extra.weight], "rank": 4, "update_proj_gap": 3},
              {"params": [model.q.bias, model.extra.bias, model.out.weight, model.out.bias]}]
    return GaLoreAdamW(groups, lr=1e-2)


BRANCHES = [(True, False), (False, True), (False, False), (True, True), (False, True), (True, False), (True, True)]


def branchy_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(8, 16, generator=gen, dtype=torch.float64), torch.randn(8, 4, generator=gen,
             dtype=torch.float64), branch) for branch in step] for step in BRANCHES]


def test_layerwise_parameter_missing_from_a_micro_batch_steps_with_its_own_step():
    """``extra`` takes part in only some micro-batches of a step (none in step 3). It must step with
    the gradient of *its* step, as step() does on the summed gradient (its projector, at a refresh,
    from the first micro-batch it took part in): the count it received must not carry over and mix
    two steps' gradients."""
    data = branchy_data()
    ref = Branchy()
    opt = branchy_optimizer(ref)
    for micro_batches in data:
        for x, y, branch in micro_batches:
            ((ref(x, branch) - y) ** 2).mean().backward()
            with torch.no_grad():  # layer-wise refreshes from the first gradient a matrix receives
                for p in (ref.q.weight, ref.extra.weight):
                    if p.grad is not None:
                        opt.refresh_projector(p, p.grad)
        opt.step()
        opt.zero_grad()
    model = Branchy()
    lw = LayerwiseOptimizer(branchy_optimizer(model), model.named_parameters(), accumulation_steps=2)
    for micro_batches in data:
        for x, y, branch in micro_batches:
            ((model(x, branch) - y) ** 2).mean().backward()
        lw.step()
        assert all(p.grad is None for p in model.parameters())
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert lw.optimizer.state[model.extra.weight]["step"] == 6  # every step but the one without the branch


def test_layerwise_resume_in_the_middle_of_accumulation_is_bitwise():
    """A checkpoint between two micro-batches keeps both the low-rank accumulators and the plain
    parameters' partial ``.grad`` (they were dropped: biases then differed by 1e-2)."""
    data = branchy_data(seed=1)

    def run(split=None):
        model = Branchy()
        lw = LayerwiseOptimizer(branchy_optimizer(model), model.named_parameters(), accumulation_steps=2)
        for step, micro_batches in enumerate(data):
            for i, (x, y, branch) in enumerate(micro_batches):
                if (step, i) == split:
                    buf = io.BytesIO()
                    torch.save({"model": model.state_dict(), "lw": lw.state_dict()}, buf)
                    buf.seek(0)
                    ckpt = torch.load(buf, weights_only=True)
                    lw.remove()
                    model = Branchy()
                    model.load_state_dict(ckpt["model"])
                    lw = LayerwiseOptimizer(branchy_optimizer(model), model.named_parameters(), accumulation_steps=2)
                    lw.load_state_dict(ckpt["lw"])
                ((model(x, branch) - y) ** 2).mean().backward()
            lw.step()
        return model

    whole = run()
    for split in ((3, 1), (5, 1)):  # after a micro-batch with the branch, and one without it
        resumed = run(split)
        for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), (split, name)


def test_layerwise_load_is_strict():
    model = TinyNet()
    lw = LayerwiseOptimizer(make_optimizer("adamw", model), model.named_parameters())
    x, y = batches(1, 1)[0][0]
    loss_of(model, x, y, 1).backward()
    sd = lw.state_dict()
    renamed = {**sd, "param_groups": [dict(g, params=[n.replace("q.", "query.") for n in g["params"]])
                                      for g in sd["param_groups"]]}
    fresh = TinyNet()
    lw2 = LayerwiseOptimizer(make_optimizer("adamw", fresh), fresh.named_parameters())
    with pytest.raises(KeyError, match=r"missing \['q.bias', 'q.weight'\], unexpected \['query.bias', 'query.weight'\]"):
        lw2.load_state_dict(renamed)
    dropped = {**sd, "param_groups": [dict(g, params=[n for n in g["params"] if n != "out.bias"])
                                      for g in sd["param_groups"]]}
    with pytest.raises(KeyError, match=r"missing \['out.bias'\], unexpected \[\]"):
        lw2.load_state_dict(dropped)


@pytest.mark.parametrize("attach_to", ["inner", "layerwise"])
def test_layerwise_scheduler_steps_once_per_optimizer_step(attach_to):
    model = TinyNet()
    opt = make_optimizer("adamw", model)
    lw = LayerwiseOptimizer(opt, model.named_parameters(), accumulation_steps=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt if attach_to == "inner" else lw, lambda s: 1.0 / (s + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for micro_batches in batches(4, 3):
            for x, y in micro_batches:
                loss_of(model, x, y, 3).backward()
            lw.step()
            sched.step()
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    assert all(s["step"] == 4 for s in opt.state.values())


def test_layerwise_clipping():
    data = batches(5, 1)
    # per-parameter clipping equals step-driven training with each gradient clipped on its own
    lw_model, _ = train_layerwise("adamw", data, 1, clip="parameter", max_grad_norm=0.05)
    ref = TinyNet()
    opt = make_optimizer("adamw", ref)
    for (x, y), in data:
        loss_of(ref, x, y, 1).backward()
        with torch.no_grad():
            for p in ref.parameters():
                if opt.is_low_rank(p):  # low-rank groups clip the projected gradient
                    opt.refresh_projector(p, p.grad)
                    grad = opt.project(p, p.grad)
                    opt.apply(p, grad.mul_(min(1.0, 0.05 / (grad.low.norm().item() + 1e-6))))
                else:
                    opt.apply(p, p.grad * min(1.0, 0.05 / (p.grad.norm().item() + 1e-6)))
        opt.zero_grad()
    for a, b in zip(ref.parameters(), lw_model.parameters()):
        assert torch.equal(a, b)
    # clipping actually changed the result
    unclipped, _ = train_layerwise("adamw", data, 1)
    assert not torch.equal(unclipped.q.weight, lw_model.q.weight)


def test_layerwise_clipping_errors():
    model = TinyNet()
    opt = make_optimizer("adamw", model)
    with pytest.raises(ValueError, match="needs max_grad_norm"):
        LayerwiseOptimizer(opt, model.named_parameters(), clip="parameter")
    with pytest.raises(ValueError, match="clip='global'"):
        LayerwiseOptimizer(opt, model.named_parameters(), clip="global", max_grad_norm=1.0)
    lw = LayerwiseOptimizer(opt, model.named_parameters(), clip="previous_global", max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="no gradients left to clip"):
        lw.clip_grad_norm_(1.0)
    (x, y), = batches(1, 1)[0]
    loss_of(model, x, y, 1).backward()
    with pytest.raises(RuntimeError, match=r"needs step\(\)"):
        loss_of(model, x, y, 1).backward()


def test_layerwise_previous_global_clipping_uses_last_steps_norm():
    model = TinyNet()
    lw = LayerwiseOptimizer(make_optimizer("adamw", model), model.named_parameters(), clip="previous_global",
                            max_grad_norm=0.01)
    norms = []
    for (x, y), in batches(3, 1):
        loss_of(model, x, y, 1).backward()
        lw.step()
        norms.append(lw.last_global_norm)
    assert all(n is not None and n > 0.01 for n in norms)


def test_layerwise_needs_every_parameter_named():
    model = TinyNet()
    opt = make_optimizer("adamw", model)
    with pytest.raises(ValueError, match="does not name 1 parameter"):
        LayerwiseOptimizer(opt, [(n, p) for n, p in model.named_parameters() if n != "out.bias"])


# ---------------------------------------------------------------- state-size estimate

@pytest.mark.parametrize("kind", ["adamw", "galore+", "8bit", "adafactor"])
def test_estimated_state_bytes_match_allocated(kind):
    model = TinyNet()
    opt = make_optimizer(kind, model)
    estimate = estimate_state_bytes(opt)
    for (x, y), in batches(4, 1):
        loss_of(model, x, y, 1).backward()
        opt.step()
        opt.zero_grad()
    assert state_bytes(opt) == estimate


@pytest.mark.parametrize("rank", ["full", 0.5])
@pytest.mark.parametrize("kind", ["adamw", "galore+", "8bit", "adafactor"])
def test_estimated_state_bytes_match_allocated_at_a_rank_per_matrix(kind, rank):
    """Issue 29 item 6: ``rank="full"`` or a fraction resolves per matrix (q 32×16: 16 or 8; mlp
    24×32: 24 or 12) in the estimate as in the allocated state."""
    model = TinyNet()
    low = [("q.weight", model.q.weight, 4 if kind == "galore+" else None), ("mlp.weight", model.mlp.weight, None)]
    groups = galore_plus_param_groups(low, rank=rank, residual_ratio=0.1, residual_warmup=2, update_proj_gap=3,
                                      plain=[(n, p) for n, p in model.named_parameters()
                                             if n not in ("q.weight", "mlp.weight")])
    cls = {"adamw": GaLoreAdamW, "galore+": GaLorePlusAdamW, "8bit": GaLoreAdamW8bit, "adafactor": GaLoreAdafactor}
    if kind != "galore+":
        groups = [{k: v for k, v in g.items() if k != "residual_ratio"} for g in groups]
    opt = cls[kind](groups) if kind == "adafactor" else cls[kind](groups, lr=1e-2)
    estimate = estimate_state_bytes(opt)
    for (x, y), in batches(4, 1):
        loss_of(model, x, y, 1).backward()
        opt.step()
        opt.zero_grad()
    q, mlp = opt.state[model.q.weight], opt.state[model.mlp.weight]
    assert q["proj_right"].shape[0] == (16 if rank == "full" else 8)
    assert mlp["proj_left"].shape[1] == (24 if rank == "full" else 12)
    assert state_bytes(opt) == estimate


def test_estimated_state_bytes_with_bf16_projectors():
    model = TinyNet()
    groups = galore_plus_param_groups(
        [("q.weight", model.q.weight, 4), ("mlp.weight", model.mlp.weight, None)], rank=4, residual_ratio=0.1,
        residual_warmup=2, proj_dtype=torch.bfloat16,
        plain=[(n, p) for n, p in model.named_parameters() if n not in ("q.weight", "mlp.weight")])
    opt = GaLorePlusAdamW(groups, lr=1e-2)
    estimate = estimate_state_bytes(opt)
    for (x, y), in batches(4, 1):
        loss_of(model, x, y, 1).backward()
        opt.step()
        opt.zero_grad()
    assert opt.state[model.q.weight]["proj_right"].dtype == torch.bfloat16
    assert state_bytes(opt) == estimate


def test_estimate_on_a_llama_shaped_layer():
    """4096×4096 q at rank 128 with the residual: projector 128·4096·4 + moments 2·4096·128·4 + residual."""
    q = torch.nn.Parameter(torch.empty(4096, 4096, device="meta"))
    opt = GaLorePlusAdamW(galore_plus_param_groups([("q", q, 32)], rank=128))
    k = round(0.012 * 4096 * 4096)
    assert estimate_state_bytes(opt) == 128 * 4096 * 4 + 2 * 4096 * 128 * 4 + k * 12


def test_layerwise_nonfinite_gradient_at_refresh_raises_from_backward():
    model = TinyNet()
    LayerwiseOptimizer(make_optimizer("adamw", model), model.named_parameters())
    x, y = batches(1, 1)[0][0]
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'(q|mlp)\.weight'.*NaN or Inf at a projector refresh"):
        loss_of(model, x, y, 1).backward()
