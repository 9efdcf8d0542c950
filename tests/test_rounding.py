"""Stochastic rounding of bf16/fp16 parameters: the rounding itself, and every optimizer writing
through it (plain and low-rank groups, 8-bit, Adafactor), reproducibly."""

from __future__ import annotations

import pytest
import torch

from galore_plus import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLorePlusAdamW, galore_plus_param_groups
from galore_plus.rounding import stochastic_round


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_and_picks_a_neighbour(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen).to(dtype)
    up = torch.nextafter(base, torch.full_like(base, float("inf")))
    frac = torch.rand(64, generator=gen)
    x = base.float() + frac * (up.float() - base.float())  # strictly between two neighbours
    draws = torch.stack([stochastic_round(x, dtype, gen) for _ in range(4000)])
    assert ((draws == base) | (draws == up)).all()
    p_up = (draws == up).float().mean(0)
    assert (p_up - frac).abs().max() < 0.04  # 4000 draws: binomial std ≤ 0.008
    assert (draws.float().mean(0) - x).abs().max() < 0.04 * (up.float() - base.float()).abs().max()


def test_stochastic_round_keeps_exact_and_special_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 3.0e38])
    for _ in range(20):
        out = stochastic_round(x, torch.bfloat16, gen)
        assert torch.equal(out[:5], x[:5].bfloat16()) and out[5].isnan() and out[6].isfinite()


# ---------------------------------------------------------------- the optimizers

def build(kind, params, **options):
    w, e, b = params
    if kind == "galore+":
        groups = galore_plus_param_groups([("w", w, 4)], rank=4, residual_ratio=0.05, residual_warmup=3,
                                          update_proj_gap=5, plain=[("e", e), ("b", b)])
        return GaLorePlusAdamW(groups, lr=1e-4, weight_decay=0.0, **options)
    groups = [{"params": [w], "rank": 4, "update_proj_gap": 5, "scale": 1.0}, {"params": [e, b]}]
    if kind == "adafactor":
        return GaLoreAdafactor(groups, lr=1e-4, relative_step=False, scale_parameter=False, **options)
    cls = GaLoreAdamW8bit if kind == "8bit" else GaLoreAdamW
    return cls(groups, lr=1e-4, weight_decay=0.0, **options)


def run(kind, dtype, steps=20, split=None, **options):
    """Random gradients independent of the weights: the direction sequence is the same in every dtype,
    so the float32 run is the reference for where the bf16 weights should drift."""
    init = torch.Generator().manual_seed(0)
    shapes = ((32, 64), (64, 80), (64,))  # 8-bit: the 5120-element plain matrix is quantized
    start = [torch.randn(*s, generator=init).mul(0.5).bfloat16().float() for s in shapes]  # bf16-exact
    params = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in start]
    opt = build(kind, params, **options)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        if t == split:  # a resume from a weights_only checkpoint, mid-run
            state = opt.state_dict()
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = build(kind, params, **options)
            opt.load_state_dict(state)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return start, [p.detach().float() for p in params]


@pytest.mark.parametrize("kind", ["adamw", "galore+", "8bit", "adafactor"])
def test_bf16_updates_accumulate_with_stochastic_rounding_and_vanish_without(kind):
    """Per-step updates (~1e-4) are far below half a bf16 ulp of the weights (~2e-3): round-to-nearest
    drops them, stochastic rounding keeps them in expectation. The drift of the bf16 weights,
    projected on the float32 run's drift, is ≈ 1 with stochastic rounding and ≈ 0 without."""
    start, reference = run(kind, torch.float32)
    for options, low, high in (({}, 0.8, 1.2), ({"stochastic_rounding": False}, -0.1, 0.2)):
        _, got = run(kind, torch.bfloat16, **options)
        drift32 = torch.cat([(r - s).flatten() for r, s in zip(reference, start)])
        drift16 = torch.cat([(g - s).flatten() for g, s in zip(got, start)])
        ratio = float(drift16 @ drift32 / (drift32 @ drift32))
        assert low < ratio < high, (options, ratio)


@pytest.mark.parametrize("kind", ["adamw", "galore+", "8bit"])
def test_stochastic_rounding_reproduces_and_resumes_bitwise(kind):
    _, a = run(kind, torch.bfloat16)
    _, b = run(kind, torch.bfloat16)
    _, c = run(kind, torch.bfloat16, split=8)
    _, other_seed = run(kind, torch.bfloat16, seed=1)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, other_seed))


def test_float32_parameters_are_untouched_by_the_option():
    _, a = run("galore+", torch.float32)
    _, b = run("galore+", torch.float32, stochastic_rounding=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_option_is_refused():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="stochastic_rounding='yes' must be a bool"):
        GaLoreAdamW([w], stochastic_rounding="yes")
