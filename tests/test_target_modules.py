"""``--target-modules``: names (PEFT's list rule: the name or a ``.NAME`` suffix) or regular expressions on a
module's whole name choose the matrices GaLore(+) projects and the modules LoRA/DoRA adapt; without it
each method keeps what it did before; a pattern that matches nothing, or no linear layer, or is not a
regular expression is one line before the model loads."""

from __future__ import annotations

import re

import pytest
import torch

from galore_plus.app import models
from galore_plus.app.config import LEGACY_VALUES, FinetuneConfig
from galore_plus.app.validation import validated
from galore_plus.app.errors import ConfigError
from galore_plus.app.finetune import finetune
from galore_plus.app.methods import build_method, shortened, target_items, target_modules, target_patterns
from galore_plus.integration import find_targets
from test_cli import argv, run_main, tiny_config

LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model():
    return models.load_model("tiny", seed=0)[0]


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))


def test_items_and_patterns():
    assert target_items(" q_proj, self_attn.o_proj ,.*mlp\\.(up|down)_proj,x{1,2}") == [
        "q_proj", "self_attn.o_proj", ".*mlp\\.(up|down)_proj", "x{1,2}"]
    patterns = target_patterns("q_proj,self_attn.o_proj")
    assert re.fullmatch(patterns[0], "model.layers.0.self_attn.q_proj") and re.fullmatch(patterns[0], "q_proj")
    assert not re.fullmatch(patterns[0], "model.layers.0.self_attn.xq_proj")
    assert re.fullmatch(patterns[1], "model.layers.1.self_attn.o_proj")
    assert target_patterns(None) is None
    assert shortened(["model.layers.0.mlp.up_proj", "model.layers.11.mlp.up_proj", "lm_head"]) == \
        "model.layers.*.mlp.up_proj, lm_head"


def names_of(targets) -> set[str]:
    return {t.name.removesuffix(".weight") for t in targets}


@pytest.mark.parametrize("method", ["galore+", "galore"])
def test_galore_projects_the_chosen_matrices_only(method):
    model = tiny_model()
    config = FinetuneConfig(model="tiny", method=method, rank=4, target_modules="q_proj,.*layers\\.1\\.mlp\\..*_proj")
    _, optimizer = build_method(config, model, 10)
    projected = {id(p) for g in optimizer.param_groups if g.get("rank") is not None for p in g["params"]}
    names = {n.removesuffix(".weight") for n, p in model.named_parameters() if id(p) in projected}
    assert names == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    # every other parameter trains plainly
    plain = {id(p) for g in optimizer.param_groups if g.get("rank") is None for p in g["params"]}
    assert plain | projected == {id(p) for p in model.parameters()}


def test_without_it_each_method_keeps_its_modules():
    assert FinetuneConfig.target_modules is None and LEGACY_VALUES["target_modules"] is None
    model = tiny_model()
    _, optimizer = build_method(FinetuneConfig(model="tiny", rank=4), model, 10)
    projected = {id(p) for g in optimizer.param_groups if g.get("rank") is not None for p in g["params"]}
    assert projected == {id(t.param) for t in find_targets(model)}  # the library's default targets
    lora, _ = build_method(FinetuneConfig(model="tiny", method="lora", rank=4), tiny_model(), 10)
    adapted = {n.removesuffix(".lora_A") for n, _ in lora.named_modules() if n.endswith(".lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(LINEAR_KINDS) and len(adapted) == 2 * len(LINEAR_KINDS)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_adapt_the_chosen_modules(method):
    model, _ = build_method(FinetuneConfig(model="tiny", method=method, rank=4, target_modules="q_proj,v_proj"),
                            tiny_model(), 10)
    adapted = {n.removesuffix(".lora_A").removeprefix("base_model.model.") for n, _ in model.named_modules()
               if n.endswith(".lora_A")}
    assert adapted == {f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("q_proj" in n or "v_proj" in n for n in trainable)


def test_a_run_with_target_modules_trains_them_only(tmp_path):
    """End to end: GaLore+ on the q/v projections; the run writes the option in its config."""
    out = tmp_path / "run"
    finetune(tiny_config(tmp_path, target_modules="q_proj,v_proj", eval_before=False, generate=False))
    assert validated(tiny_config(tmp_path, target_modules="q_proj,v_proj")).target_modules == "q_proj,v_proj"
    assert (out / "metrics.json").exists()
    assert "target_modules: q_proj,v_proj" in (out / "config.yaml").read_text()


def test_no_match_names_the_pattern_and_lists_the_linear_layers():
    with pytest.raises(ConfigError) as err:
        target_modules(tiny_model(), "q_proj,qkv_proj", "tiny")
    assert str(err.value) == (
        "--target-modules 'qkv_proj' matches no module of --model tiny; its linear layers are "
        "model.layers.*.self_attn.q_proj, model.layers.*.self_attn.k_proj, model.layers.*.self_attn.v_proj, "
        "model.layers.*.self_attn.o_proj, model.layers.*.mlp.gate_proj, model.layers.*.mlp.up_proj, "
        "model.layers.*.mlp.down_proj, lm_head")


BAD = [
    (["--target-modules", "qkv_proj"], r"--target-modules 'qkv_proj' matches no module of --model tiny; its linear "
                                       r"layers are model.layers.\*.self_attn.q_proj, .*, lm_head"),
    (["--target-modules", "self_attn"], r"--target-modules 'self_attn' matches model.layers.0.self_attn "
                                        r"\(LlamaAttention\), which is not a linear layer; the linear layers are .*"),
    (["--target-modules", "q_proj[", "--method", "lora"], r"--target-modules: 'q_proj\[' is not a valid regular "
                                                          r"expression \(.*\)"),
    (["--target-modules", "q_proj,,v_proj"], r"--target-modules 'q_proj,,v_proj' has an empty item"),
    (["--target-modules", "q_proj", "--method", "adamw"], r"--target-modules applies to --method galore\+, galore, "
                                                          r"fira, lora, dora, not adamw"),
    (["--target-modules", "qkv_proj", "--method", "lora"], r"--target-modules 'qkv_proj' matches no module"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_target_is_one_line_before_the_model_loads(tmp_path, capsys, no_model_load, extra, message):
    code, err = run_main(capsys, ["finetune", *argv(model="tiny", rank=4), "--output-dir", str(tmp_path / "o"), *extra])
    assert code == 2 and re.fullmatch(rf"galore-plus: {message}.*\n", err), err
    assert not (tmp_path / "o").exists()


def test_the_meta_check_draws_no_random_numbers():
    from galore_plus.app.methods import check_target_modules

    torch.manual_seed(0)
    check_target_modules(FinetuneConfig(model="tiny", target_modules="q_proj"), models.shape_config("tiny"))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)
