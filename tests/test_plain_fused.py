"""The plain parameters' fused AdamW update (DESIGN.md, "Plain parameters: one fused update").

``step()`` updates a plain group's float32/float64 parameters with one call of torch's fused AdamW
kernel instead of the eight-pass unfused path, one parameter at a time. Checked here: it is the same
math (float64, against the unfused path and ``torch.optim.AdamW``), one call for many tensors is
bitwise one call per tensor (``update``, the layer-wise mode's path), it is actually taken, and
what it does not take (bf16 with stochastic rounding, 8-bit, a non-contiguous gradient) goes the
old way, bitwise as before.
"""

from __future__ import annotations

import io

import pytest
import torch

from galore_plus import GaLoreAdamW, GaLoreAdamW8bit
from galore_plus.adamw import AdamWRule
from galore_plus.adamw8bit import MIN_8BIT_SIZE

SHAPES = [(48, 16), (16,), (7, 3, 2), (5,)]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


def run(params, steps, per_parameter=False, **options):
    """``steps`` steps of a GaLoreAdamW whose one group is plain (plus a low-rank matrix in its own
    group, so the engine's two paths run side by side); ``per_parameter``: ``update(p, grad)`` one
    parameter at a time instead of ``step()``."""
    gen = torch.Generator().manual_seed(7)
    matrix = torch.nn.Parameter(torch.randn(12, 8, generator=gen, dtype=torch.float64).to(params[0].dtype))
    opt = GaLoreAdamW([{"params": params, **options.pop("plain", {})}, {"params": [matrix], "rank": 2}],
                      lr=1e-2, **options)
    for t in range(steps):
        grads = grads_for(params + [matrix], t)
        for p, g in zip(params + [matrix], grads):
            p.grad = g
        if per_parameter:
            with torch.no_grad():
                for p in params + [matrix]:
                    opt.update(p, p.grad)
        else:
            opt.step()
        opt.zero_grad()
    return opt, matrix


@pytest.fixture
def unfused(monkeypatch):
    """The unfused path: no parameter is fusable."""
    monkeypatch.setattr(AdamWRule, "fusable", lambda self, target, grad, state: False)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = AdamWRule.apply_full_fused

    def spy(self, params, *args, **kwargs):
        calls.append(len(params))
        return original(self, params, *args, **kwargs)

    monkeypatch.setattr(AdamWRule, "apply_full_fused", spy)
    return calls


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_is_the_unfused_math_in_float64(weight_decay, fused_calls):
    fused = make_params(torch.float64)
    opt, _ = run(fused, 6, weight_decay=weight_decay)
    assert fused_calls == [len(SHAPES)] * 6  # one call a step for the whole plain group
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AdamWRule, "fusable", lambda self, target, grad, state: False)
        plain = make_params(torch.float64)
        ref, _ = run(plain, 6, weight_decay=weight_decay)
    assert fused_calls == [len(SHAPES)] * 6
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=1e-14, atol=1e-18)
            assert opt.state[a][key].dtype == ref.state[b][key].dtype
        assert opt.state[a]["step"] == ref.state[b]["step"] == 6
        assert set(opt.state[a]) == set(ref.state[b])  # the same state layout


def test_fused_matches_torch_adamw_in_float64():
    ours = make_params(torch.float64)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    run(ours, 5, weight_decay=0.05)
    opt = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05, foreach=False)
    for t in range(5):
        for p, g in zip(theirs, grads_for(theirs + [theirs[0]], t)):  # the same draws as run()'s
            p.grad = g
        opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_call_for_many_is_bitwise_one_call_each(weight_decay):
    batched = make_params(torch.float32)
    one_each = make_params(torch.float32)
    a, ma = run(batched, 5, weight_decay=weight_decay)
    b, mb = run(one_each, 5, per_parameter=True, weight_decay=weight_decay)
    for p, q in zip(batched + [ma], one_each + [mb]):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a.state[p][key], b.state[q][key])


def test_resumed_from_a_state_dict_is_bitwise(tmp_path):
    whole = make_params(torch.float32)
    run(whole, 6)
    first = make_params(torch.float32)
    opt, matrix = run(first, 3)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in first + [matrix]]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params = [torch.nn.Parameter(t) for t in saved["params"][:-1]]
    matrix = torch.nn.Parameter(saved["params"][-1])
    resumed = GaLoreAdamW([{"params": params}, {"params": [matrix], "rank": 2}], lr=1e-2)
    resumed.load_state_dict(saved["opt"])
    for t in range(3, 6):
        for p, g in zip(params + [matrix], grads_for(params + [matrix], t)):
            p.grad = g
        resumed.step()
        resumed.zero_grad()
    for p, q in zip(whole, params):
        assert torch.equal(p, q)


def test_bf16_keeps_stochastic_rounding_and_the_old_path(fused_calls):
    fast = make_params(torch.bfloat16)
    run(fast, 3)
    assert fused_calls == []  # bf16 is written through ParameterWrite, rounded stochastically
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AdamWRule, "fusable", lambda self, target, grad, state: False)
        old = make_params(torch.bfloat16)
        run(old, 3)
    for p, q in zip(fast, old):
        assert torch.equal(p, q)


def test_what_the_kernel_does_not_take_goes_the_old_way(fused_calls):
    """A non-contiguous gradient updates on its own, as before; so does an 8-bit rule's quantized
    tensor (its small tensors keep 32-bit moments and take the kernel)."""
    params = make_params(torch.float32)
    opt = GaLoreAdamW(params, lr=1e-2)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    params[0].grad = params[0].grad.T.contiguous().T  # same values, transposed strides
    opt.step()
    assert fused_calls == [len(SHAPES) - 1]
    fused_calls.clear()
    eightbit = make_params(torch.float32) + [torch.nn.Parameter(torch.randn(MIN_8BIT_SIZE))]
    opt8 = GaLoreAdamW8bit(eightbit, lr=1e-2)
    for p, g in zip(eightbit, grads_for(eightbit, 0)):
        p.grad = g
    opt8.step()
    assert fused_calls == [len(SHAPES)]
    assert "exp_avg_q" in opt8.state[eightbit[-1]] and "exp_avg" not in opt8.state[eightbit[-1]]
    assert all("exp_avg" in opt8.state[p] for p in eightbit[:-1])
    assert all(opt8.state[p]["step"] == 1 for p in eightbit)
