"""The typed spec (``galore_plus.spec``) and the registries of ``lowrank``: defaults defined once, one
check, the old spellings converted by one function, and a new inner rule or refresh policy added by
one class and one registry line."""

from __future__ import annotations

import io
import math

import pytest
import torch

from galore_plus import GaLoreAdamW, GaLorePlusAdamW, build_optimizer
from galore_plus.lowrank import (REFRESH_POLICIES, RULES, InnerRule, LowRankOptimizer, RefreshPolicy,
                                 register_refresh_policy, register_rule)
from galore_plus.options import LOW_RANK_DEFAULTS
from galore_plus.spec import GROUP_DEFAULTS, PAPER_RESIDUAL_RATIO, LowRankSpec, spec_for


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def train(model, opt, steps=3):
    for step in range(steps):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------- the spec


def test_defaults_are_the_spec_fields_and_every_group_key_is_one():
    assert LOW_RANK_DEFAULTS is GROUP_DEFAULTS
    spec = LowRankSpec(rank=4)
    assert {k: v for k, v in spec.group().items() if k != "rank"} == LOW_RANK_DEFAULTS
    assert LowRankSpec.from_group(spec.group()) == spec


def test_unknown_fields_name_the_allowed_ones_and_bad_values_are_refused_at_construction():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\]; the options are .*'rank'"):
        LowRankSpec.from_options({"rnak": 4})
    with pytest.raises(TypeError):
        LowRankSpec(rank=4, rnak=2)
    for bad, message in (({"rank": 0}, "rank=0 must be an int"), ({"rank": 4, "scale": -1.0}, "scale=-1.0"),
                         ({"rank": 4, "svd": "fast"}, "svd='fast' is not one of"),
                         ({"rank": 4, "rule": "sgd"}, r"rule='sgd' is not one of \['adafactor', 'adamw'"),
                         ({"rank": 4, "refresh": "never"}, "refresh='never' is not one of"),
                         ({"rank": 4, "residual_warmup": 0}, "residual_warmup=0 must be an int ≥ 1")):
        with pytest.raises(ValueError, match=message):
            LowRankSpec.from_options(bad)
    assert LowRankSpec(rank=4, proj_dtype="bfloat16").proj_dtype is torch.bfloat16


def test_recipes_hold_the_methods_defaults():
    plus = LowRankSpec.recipe("galore+", 8)
    assert (plus.svd, plus.cross_head, plus.residual_ratio) == ("randomized", True, PAPER_RESIDUAL_RATIO)
    plain = LowRankSpec.recipe("galore", 8)
    assert (plain.svd, plain.cross_head, plain.residual_ratio) == ("exact", False, 0.0)
    with pytest.raises(ValueError, match=r"method='galore\+\+' is not one of"):
        LowRankSpec.recipe("galore++", 8)


def test_the_old_spellings_convert_to_the_same_spec_and_the_same_optimizer():
    old = spec_for("galore+", 8, eightbit=False, scale=2.0, update_proj_gap=10, betas=(0.8, 0.9))
    new = LowRankSpec.recipe("galore+", 8, scale=2.0, update_proj_gap=10, rule_options={"betas": (0.8, 0.9)})
    assert old == new
    assert spec_for("galore", 4, adafactor=True).rule == "adafactor"
    assert spec_for("galore", 4, eightbit=True).rule == "adamw8bit"
    assert spec_for(new) is new
    with pytest.raises(TypeError, match="already holds the rank"):
        spec_for(new, 8)
    a = build_optimizer(tiny_model(), "galore+", 8, lr=1e-3, scale=2.0, update_proj_gap=10, betas=(0.8, 0.9))
    b = build_optimizer(tiny_model(), new, lr=1e-3)
    c = build_optimizer(tiny_model(), method="galore+", rank=8, lr=1e-3, scale=2.0, update_proj_gap=10,
                        betas=(0.8, 0.9))
    assert type(a) is type(b) is type(c) is GaLorePlusAdamW
    strip = lambda opt: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # noqa: E731
    assert strip(a) == strip(b) == strip(c)
    assert type(build_optimizer(tiny_model(), LowRankSpec.recipe("galore", 8), lr=1e-3)) is GaLoreAdamW


def test_the_command_config_builds_its_spec_from_the_same_fields():
    from galore_plus.app.config import FinetuneConfig, low_rank_spec

    spec = low_rank_spec(FinetuneConfig(method="galore+", rank=16, scale=2.0))
    # the command's recipe adds Fira's term to the library's (DESIGN.md, "The command's GaLore+ recipe")
    assert spec == LowRankSpec.recipe("galore+", 16, scale=2.0, update_proj_gap=FinetuneConfig.update_proj_gap,
                                      outside="fira")
    assert FinetuneConfig.residual_warmup == GROUP_DEFAULTS["residual_warmup"]
    assert low_rank_spec(FinetuneConfig(method="galore", eightbit=True)).rule == "adamw8bit"


# ---------------------------------------------------------------------- a new inner rule: one class, one line


class SignMomentum(InnerRule):
    """sign(β·m + (1−β)·g): signSGD with momentum, written here as a newcomer would."""

    name = "sign momentum (test)"
    defaults = {"beta": 0.9}

    def direction(self, grad, state, group, lr):
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        state["momentum"].mul_(group["beta"]).add_(grad, alpha=1 - group["beta"])
        return state["momentum"].sign().mul_(lr)

    def state_shapes(self, shape, group):
        return [{"momentum": shape}]

    def state_bytes(self, shape, dtype, group):
        return math.prod(shape) * dtype.itemsize


register_rule("test_sign")(SignMomentum)  # the one registry line


def test_a_new_inner_rule_is_one_class_and_one_registry_line():
    assert RULES["test_sign"] is SignMomentum and SignMomentum.keys == ("beta",)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    spec = LowRankSpec(rank=3, scale=0.5, rule="test_sign", rule_options={"beta": 0.5})
    opt = LowRankOptimizer.from_spec([{"params": [w], "rank": 3}, {"params": [b]}], spec, lr=0.1)
    assert type(opt) is LowRankOptimizer and opt.param_groups[0]["beta"] == 0.5
    w0, b0 = w.detach().clone(), b.detach().clone()
    g, gb = torch.randn(12, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w.grad, b.grad = g.clone(), gb.clone()
    opt.step()
    # the reference, written plainly: a projector of the top-3 singular vectors (left, m ≥ n: galore-torch's
    # std side is the right one for a tall matrix), the momentum (1 − β)·PᵀG, its sign, scaled back
    left, right = opt.projector(w)
    if right is not None:
        u = torch.linalg.svd(g, full_matrices=False).Vh[:3]
        assert torch.allclose((right @ right.T), torch.eye(3, dtype=torch.float64))
        assert torch.allclose(right.abs(), u.abs())  # the top-3 right singular vectors, up to sign
        expected = w0 - 0.1 * 0.5 * ((1 - 0.5) * (g @ right.T)).sign() @ right
    else:
        expected = w0 - 0.1 * 0.5 * left @ ((1 - 0.5) * (left.T @ g)).sign()
    assert torch.allclose(w.detach(), expected)
    assert torch.allclose(b.detach(), b0 - 0.1 * ((1 - 0.5) * gb).sign())
    # the state is tensors and numbers, marked with the rule, and loads back
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["galore_plus"]["rule"] == "sign momentum (test)"
    again = LowRankOptimizer.from_spec([{"params": [w], "rank": 3}, {"params": [b]}], spec, lr=0.1)
    again.load_state_dict(saved)
    assert torch.equal(again.state[w]["momentum"], opt.state[w]["momentum"])
    # and through build_optimizer on a model
    model = tiny_model()
    train(model, build_optimizer(model, LowRankSpec.recipe("galore", 4, rule="test_sign"), lr=1e-3))
    with pytest.raises(ValueError, match="already registered"):
        register_rule("test_sign")(type("Other", (InnerRule,), {}))


# ---------------------------------------------------------------------- a new refresh policy: one class, one line


class EveryStep(RefreshPolicy):
    """Refresh at every update (GaLore with T = 1), whatever ``update_proj_gap`` says."""

    def due(self, state, group):
        return True


register_refresh_policy("test_every_step")(EveryStep)  # the one registry line


def test_a_new_refresh_policy_is_one_class_and_one_registry_line():
    assert REFRESH_POLICIES["test_every_step"] is EveryStep
    counts = {}
    for refresh in ("interval", "test_every_step"):
        model = tiny_model()
        opt = build_optimizer(model, LowRankSpec.recipe("galore", 4, update_proj_gap=100, refresh=refresh), lr=1e-3)
        train(model, opt, steps=3)
        counts[refresh] = {int(s["refresh_count"]) for s in opt.state.values() if "refresh_count" in s}
        assert all(g["refresh"] == refresh for g in opt.param_groups if "rank" in g)
    assert counts == {"interval": {1}, "test_every_step": {3}}
    # refreshing at every step is T = 1 of the interval policy: the same training, bitwise
    a, b = tiny_model(), tiny_model()
    oa = build_optimizer(a, LowRankSpec.recipe("galore", 4, update_proj_gap=100, refresh="test_every_step"), lr=1e-3)
    ob = build_optimizer(b, LowRankSpec.recipe("galore", 4, update_proj_gap=1), lr=1e-3)
    train(a, oa)
    train(b, ob)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
