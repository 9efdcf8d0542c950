"""Issue 29, mechanism 1: the plainly trained parameters' learning rate as a multiple of ``lr``
(``LowRankSpec.plain_lr_ratio``): a float64 reference step written plainly, LR schedulers keep the
ratio, the projected backward equals the full path with it, 8-bit states take it, and a resume across
a refresh is bitwise."""

from __future__ import annotations


import pytest
import torch
from _tiny_llama import batches, tiny, train
from _saving import train_across_a_resume

from galore_plus import LowRankSpec, build_optimizer

LR, RATIO, GAP = 1e-2, 4.0, 3


def spec(**options):
    return LowRankSpec.recipe("galore+", 8, update_proj_gap=GAP, residual_warmup=2, scale=1.0,
                              plain_lr_ratio=RATIO, **options)


def test_the_plain_group_steps_at_lr_times_the_ratio_float64_reference():
    model = tiny()
    opt = build_optimizer(model, spec(), lr=LR, weight_decay=0.1)
    plain = [g for g in opt.param_groups if "rank" not in g]
    assert len(plain) == 1 and plain[0]["lr"] == LR * RATIO
    assert all(g["lr"] == LR for g in opt.param_groups if "rank" in g)
    norm = model.model.norm.weight
    before = norm.detach().clone()
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    g = norm.grad.detach().clone()
    opt.step()
    # AdamW's first step, written plainly: decay, then m̂ = g, v̂ = g², so the step is lr·g/(|g| + ε)
    lr = LR * RATIO
    expected = before * (1 - lr * 0.1) - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(norm.detach(), expected, rtol=1e-12, atol=1e-12)


def test_schedulers_keep_the_ratio():
    model = tiny()
    opt = build_optimizer(model, spec(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train(model, opt, batches(2), scheduler)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([LR * 0.25, LR * RATIO * 0.25])


def test_projected_backward_equals_the_full_path_with_the_ratio():
    data = batches(7)  # refreshes at steps 1, 4, 7; the residual from step 2
    full, projected = tiny(), tiny()
    train(full, build_optimizer(full, spec(), lr=LR), data)
    train(projected, build_optimizer(projected, spec(), lr=LR, projected_backward=True), data)
    for (name, p), q in zip(full.named_parameters(), projected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)
    untouched = tiny()
    assert not torch.allclose(full.model.norm.weight, untouched.model.norm.weight)


def test_8bit_states_take_the_ratio():
    pytest.importorskip("bitsandbytes")
    model = tiny(torch.float32)
    opt = build_optimizer(model, spec(rule="adamw8bit"), lr=LR)
    train(model, opt, batches(2))
    assert sorted({g["lr"] for g in opt.param_groups}) == [LR, LR * RATIO]


def test_resume_across_a_refresh_is_bitwise():
    data = batches(6)

    def run(split=None):  # split 3: saved before the refresh of step 4, loaded into fresh objects
        return train_across_a_resume(lambda: tiny(torch.float32),
                                     lambda m: build_optimizer(m, spec(), lr=LR, projected_backward=True), data, split)[0]

    a, b = run(), run(split=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_bad_ratios_and_the_command():
    with pytest.raises(ValueError, match=r"plain_lr_ratio=0 must be a finite number > 0"):
        LowRankSpec.recipe("galore", 8, plain_lr_ratio=0)
    with pytest.raises(ValueError, match="needs a learning rate"):
        build_optimizer(tiny(), "galore", 8, lr=None, adafactor=True, plain_lr_ratio=2.0)
    from galore_plus.app.config import FinetuneConfig, low_rank_spec
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError

    assert low_rank_spec(FinetuneConfig(plain_lr_ratio=4.0)).plain_lr_ratio == 4.0
    with pytest.raises(ConfigError, match="--plain-lr-ratio needs --method galore or galore"):
        validated(FinetuneConfig(method="lora", plain_lr_ratio=4.0))
