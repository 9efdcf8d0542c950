"""Model integration: targets on the covered layouts, the optimizers ``build_optimizer`` makes, the summary."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from galore_plus import (  # noqa: E402
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLorePlusAdamW,
    LayerwiseOptimizer,
    estimate_state_bytes,
)
from galore_plus.integration import (  # noqa: E402
    KINDS,
    Target,
    _check_assignment,
    build_optimizer,
    find_targets,
    optimizer_summary,
)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, max_position_embeddings=64)
LLAMA_LIKE = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny_model(config_cls=LlamaConfig, seed=0, **overrides):
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).float()


def tiny_neox(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).float()


# ---------------------------------------------------------------------- find_targets

@pytest.mark.parametrize("family", sorted(LLAMA_LIKE))
def test_default_targets_are_the_decoder_linears_with_gqa_head_counts(family):
    model = tiny_model(LLAMA_LIKE[family])
    targets = find_targets(model)
    expected = [f"model.layers.{i}.{part}.{leaf}.weight" for i in range(2)
                for part, leaves in (("self_attn", ATTN), ("mlp", MLP)) for leaf in leaves]
    assert [t.name for t in targets] == expected
    params = dict(model.named_parameters())
    for t in targets:
        assert t.param is params[t.name] and t.param.dim() == 2
        leaf = t.name.split(".")[-2]
        assert t.kind == ATTN.get(leaf, "mlp")
        # q_proj: attention heads; k_proj: key/value heads (GQA); others none
        assert t.num_heads == {"q_proj": 4, "k_proj": 2}.get(leaf)
    # never the embeddings, lm_head, norms or (Qwen2's q/k/v) biases
    assert not any("embed" in t.name or "lm_head" in t.name or t.name.endswith("bias") for t in targets)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in params


def test_gpt_neox_fused_qkv_gets_its_q_and_k_row_blocks():
    targets = find_targets(tiny_neox())
    layer0 = [(t.name, t.kind, t.num_heads, t.shape) for t in targets if ".layers.0." in t.name]
    assert layer0 == [
        ("gpt_neox.layers.0.attention.query_key_value.weight", "qkv", None, (192, 64)),
        ("gpt_neox.layers.0.attention.dense.weight", "o", None, (64, 64)),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp", None, (128, 64)),
        ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "mlp", None, (64, 128)),
    ]
    assert len(targets) == 8
    assert {t.kind for t in targets} <= set(KINDS)
    # rows per head [q_i; k_i; v_i]: 12 blocks of 16 rows, the q and k ones eligible
    qkv = [t for t in targets if t.kind == "qkv"]
    assert len(qkv) == 2
    for t in qkv:
        assert t.head_blocks == {"count": 12, "eligible": [0, 1, 3, 4, 6, 7, 9, 10], "dim": 0}
        assert t.heads is t.head_blocks
    assert all(t.head_blocks is None for t in targets if t.kind != "qkv")


def test_head_dim_from_config_when_it_is_not_hidden_over_heads():
    model = tiny_model(head_dim=32)  # q_proj 128×64, k_proj 64×64
    heads = {t.name.split(".")[-2]: (t.num_heads, t.shape) for t in find_targets(model)}
    assert heads["q_proj"] == (4, (128, 64)) and heads["k_proj"] == (2, (64, 64))


def test_config_that_disagrees_with_the_weights_raises_naming_the_matrix():
    model = tiny_model()
    model.config.num_key_value_heads = 4  # k_proj has 2 × 16 rows
    with pytest.raises(ValueError, match=r"k_proj\.weight has 32 rows.*num_key_value_heads=4"):
        find_targets(model)


def test_patterns_full_match_module_names():
    model = tiny_model()
    targets = find_targets(model, [r".*\.(q_proj|v_proj)", r"model\.layers\.0\.self_attn\.q_proj"])
    assert [t.name for t in targets] == [f"model.layers.{i}.self_attn.{leaf}.weight"
                                         for i in range(2) for leaf in ("q_proj", "v_proj")]
    assert [t.num_heads for t in targets] == [4, None, 4, None]
    # lm_head may be chosen on purpose; its role is unknown
    (head,) = find_targets(model, ["lm_head"])
    assert (head.name, head.kind, head.num_heads) == ("lm_head.weight", "other", None)


@pytest.mark.parametrize("pattern", ["q_proj", r".*\.nothing_here", r"model\.layers\.7\..*"])
def test_pattern_that_matches_nothing_raises_naming_it(pattern):
    with pytest.raises(ValueError, match="matched no module") as err:
        find_targets(tiny_model(), [r".*\.k_proj", pattern])
    assert repr(pattern) in str(err.value)


@pytest.mark.parametrize("pattern, module", [
    (r"model\.embed_tokens", "model.embed_tokens"),
    (r".*\.input_layernorm", "model.layers.0.input_layernorm"),
    (r".*\.self_attn", "model.layers.0.self_attn"),
])
def test_pattern_matching_a_non_linear_module_raises_naming_it(pattern, module):
    with pytest.raises(ValueError, match="not a linear layer") as err:
        find_targets(tiny_model(), [pattern])
    assert repr(module) in str(err.value)


def test_bad_patterns_argument():
    with pytest.raises(TypeError, match="list of regular-expression strings"):
        find_targets(tiny_model(), r".*q_proj")
    with pytest.raises(ValueError, match=r"'\(' is not a valid regular expression"):
        find_targets(tiny_model(), ["("])


def test_target_is_frozen_and_does_not_compare_tensors():
    t = find_targets(tiny_model())[0]
    assert isinstance(t, Target) and t == Target(t.name, torch.zeros(1), t.kind, t.num_heads)
    with pytest.raises(AttributeError):
        t.kind = "v"  # type: ignore[misc]


# ---------------------------------------------------------------------- build_optimizer

def assigned(optimizer):
    return [(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])]


def check_groups(model, optimizer):
    """Every trainable parameter exactly once, under its own name; frozen ones nowhere."""
    pairs = assigned(optimizer)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for n, _ in pairs) == sorted(trainable)
    assert all(trainable[n] is p for n, p in pairs)
    assert all(len(g["param_names"]) == len(g["params"]) for g in optimizer.param_groups)


@pytest.mark.parametrize("family", sorted(LLAMA_LIKE))
def test_galore_groups(family):
    model = tiny_model(LLAMA_LIKE[family])
    opt = build_optimizer(model, "galore", 8, lr=1e-3, update_proj_gap=50, scale=0.5)
    assert type(opt) is GaLoreAdamW
    check_groups(model, opt)
    low, plain = opt.param_groups
    assert [n for n in low["param_names"]] == [t.name for t in find_targets(model)]
    assert (low["rank"], low["svd"], low["num_heads"], low["residual_ratio"]) == (8, "exact", None, 0.0)
    assert (low["update_proj_gap"], low["scale"]) == (50, 0.5)
    assert "rank" not in plain and "lm_head.weight" in plain["param_names"]
    if family == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in plain["param_names"]


def test_galore_plus_groups_give_k_proj_the_key_value_heads():
    model = tiny_model()
    opt = build_optimizer(model, "galore+", 8, lr=1e-3, residual_warmup=5)
    assert type(opt) is GaLorePlusAdamW
    check_groups(model, opt)
    by_heads = {g.get("num_heads"): g for g in opt.param_groups}
    assert set(by_heads) == {4, 2, None}
    assert all(n.endswith("q_proj.weight") for n in by_heads[4]["param_names"])
    assert all(n.endswith("k_proj.weight") for n in by_heads[2]["param_names"])
    for heads in (4, 2):
        g = by_heads[heads]
        assert (g["svd"], g["residual_ratio"], g["residual_warmup"]) == ("randomized", 0.012, 5)
    low_plain = [g for g in opt.param_groups if "rank" in g and g["num_heads"] is None]
    assert len(low_plain) == 1 and low_plain[0]["svd"] == "randomized" and low_plain[0]["residual_ratio"] == 0


def test_galore_plus_without_gqa_puts_q_and_k_in_one_cross_head_group():
    model = tiny_model(num_key_value_heads=4)
    opt = build_optimizer(model, "galore+", 8, lr=1e-3)
    (heads,) = [g for g in opt.param_groups if g.get("num_heads") is not None]
    assert heads["num_heads"] == 4 and len(heads["params"]) == 4


def test_galore_plus_on_gpt_neox_gives_the_fused_qkv_a_cross_head_group_without_residual():
    model = tiny_neox()
    opt = build_optimizer(model, "galore+", 8, lr=1e-3)
    check_groups(model, opt)
    fused, low, plain = opt.param_groups
    assert all(n.endswith("query_key_value.weight") for n in fused["param_names"]) and len(fused["params"]) == 2
    assert fused["head_blocks"] == {"count": 12, "eligible": [0, 1, 3, 4, 6, 7, 9, 10], "dim": 0}
    assert (fused["num_heads"], fused["residual_ratio"], fused["svd"]) == (None, 0, "randomized")
    assert (low["num_heads"], low["head_blocks"], low["residual_ratio"], low["svd"]) == (None, None, 0, "randomized")
    assert "rank" not in plain
    # plain GaLore: one low-rank group, no head blocks
    opt = build_optimizer(model, "galore", 8, lr=1e-3)
    assert [g.get("head_blocks") for g in opt.param_groups] == [None, None]


def test_frozen_parameters_are_left_out():
    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    for method in ("galore", "galore+"):
        opt = build_optimizer(model, method, 8, lr=1e-3)
        check_groups(model, opt)
        names = [n for n, _ in assigned(opt)]
        assert "model.embed_tokens.weight" not in names
        assert "model.layers.0.self_attn.q_proj.weight" not in names
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(model, "galore", 8, lr=1e-3)


def test_tied_embeddings_are_one_parameter_in_one_group():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = build_optimizer(model, "galore+", 8, lr=1e-3)
    check_groups(model, opt)


COMBOS = {
    "galore": (dict(method="galore"), GaLoreAdamW),
    "galore+": (dict(method="galore+"), GaLorePlusAdamW),
    "galore 8bit": (dict(method="galore", eightbit=True), GaLoreAdamW8bit),
    "galore+ 8bit": (dict(method="galore+", eightbit=True), GaLoreAdamW8bit),
    "galore adafactor": (dict(method="galore", adafactor=True), GaLoreAdafactor),
    "galore+ adafactor": (dict(method="galore+", adafactor=True, residual_ratio=0.0), GaLoreAdafactor),
    "galore layerwise": (dict(method="galore", layerwise=True), GaLoreAdamW),
    "galore+ 8bit layerwise accum clip": (
        dict(method="galore+", eightbit=True, layerwise=True, accumulation_steps=2, clip="parameter",
             max_grad_norm=1.0), GaLoreAdamW8bit),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_each_optimizer_trains(combo):
    kwargs, cls = COMBOS[combo]
    model = tiny_model()
    opt = build_optimizer(model, rank=8, lr=1e-2, update_proj_gap=3, residual_warmup=2, scale=1.0, **kwargs)
    layerwise = kwargs.get("layerwise", False)
    inner = opt.optimizer if layerwise else opt
    assert type(inner) is cls and isinstance(opt, LayerwiseOptimizer) == layerwise
    check_groups(model, inner)
    accumulation = kwargs.get("accumulation_steps", 1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(accumulation)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(6):
        total = 0.0
        for tokens in batches:
            loss = model(input_ids=tokens, labels=tokens).loss / accumulation
            loss.backward()
            total += loss.item()
        opt.step()  # layer-wise: closes the step (the hooks already updated)
        opt.zero_grad()
        losses.append(total)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "a parameter did not move"
    if kwargs["method"] == "galore+" and not kwargs.get("adafactor"):
        q = model.model.layers[0].self_attn.q_proj.weight
        assert "residual_index" in inner.state[q]  # the residual got past its warm-up


# ---------------------------------------------------------------------- errors

def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"method='galore\+\+' is not one of \('galore', 'galore\+'\)"):
        build_optimizer(tiny_model(), "galore++", 8, lr=1e-3)


def test_eightbit_adafactor_does_not_exist():
    with pytest.raises(ValueError, match="cannot be combined.*AdamW.*8-bit AdamW.*Adafactor"):
        build_optimizer(tiny_model(), "galore", 8, lr=1e-3, eightbit=True, adafactor=True)


def test_galore_plus_adafactor_needs_residual_off():
    with pytest.raises(ValueError, match="residual needs Adam moments.*residual_ratio=0"):
        build_optimizer(tiny_model(), "galore+", 8, lr=1e-3, adafactor=True)


@pytest.mark.parametrize("option", [dict(accumulation_steps=2), dict(clip="parameter", max_grad_norm=1.0)])
def test_layerwise_options_without_layerwise_raise(option):
    with pytest.raises(ValueError, match=f"{next(iter(option))}.*layerwise=True"):
        build_optimizer(tiny_model(), "galore", 8, lr=1e-3, **option)


def test_unknown_option_raises_type_error_and_optimizer_options_pass_through():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\]"):
        build_optimizer(tiny_model(), "galore", 8, lr=1e-3, rnak=4)
    opt = build_optimizer(tiny_model(), "galore", 8, lr=1e-3, betas=(0.8, 0.9), eps=1e-6)
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
    with pytest.raises(TypeError, match="unknown option"):
        build_optimizer(tiny_model(), "galore", 8, lr=1e-3, adafactor=True, betas=(0.8, 0.9))
    opt = build_optimizer(tiny_model(), "galore", 8, lr=1e-3, adafactor=True, beta1=0.9, clip_threshold=2.0)
    assert all(g["beta1"] == 0.9 and g["clip_threshold"] == 2.0 and not g["relative_step"] for g in opt.param_groups)
    with pytest.raises(TypeError, match="num_heads is not an option here"):
        build_optimizer(tiny_model(), "galore+", 8, lr=1e-3, num_heads=4)


@pytest.mark.parametrize("method", ["galore", "galore+"])
def test_rank_larger_than_a_matrix_names_it(method):
    """The optimizer's own check (LowRankOptimizer), reaching the user with the parameter's name."""
    # k_proj and v_proj are 32×64: rank 40 > min(m, n)
    with pytest.raises(ValueError, match=r"rank=40 is larger than parameter 'model\.layers\.0\.self_attn\.(k|v)_proj"):
        build_optimizer(tiny_model(), method, 40, lr=1e-3)


def test_unassigned_or_doubly_assigned_parameters_are_errors():
    model = tiny_model()
    trainable = list(model.named_parameters())
    params = [p for _, p in trainable]
    with pytest.raises(ValueError, match=r"left unassigned \['lm_head.weight'\]"):
        _check_assignment([{"params": params[:-1]}], trainable)
    with pytest.raises(ValueError, match=r"in more than one group \['model.embed_tokens.weight'\]"):
        _check_assignment([{"params": params}, {"params": params[:1]}], trainable)


# ---------------------------------------------------------------------- summary

def test_summary_galore():
    model = tiny_model()
    opt = build_optimizer(model, "galore", 8, lr=1e-3)
    text = optimizer_summary(opt)
    lines = text.splitlines()
    assert lines[0].split() == ["group", "tensors", "shapes", "rank", "mode", "elements"]
    row0 = lines[2]
    assert row0.startswith("0") and " 14 " in row0 and "4× 64×64, 4× 32×64, 4× 128×64, 2× 64×128" in row0
    assert "GaLore exact std" in row0 and "73,728" in row0
    row1 = lines[3]
    assert "2× 128×64, 5× 64" in row1 and "—" in row1 and "full AdamW" in row1
    total = sum(p.numel() for p in model.parameters())
    assert lines[4].startswith("all") and f"{total:,}" in lines[4]
    assert lines[-1].startswith("optimizer state: estimated")
    assert f"2 × 4 bytes × {total:,} trainable elements" in lines[-1]
    estimate = estimate_state_bytes(opt)
    assert f"({estimate / (8 * total):.1%})" in lines[-1]


def test_summary_galore_plus_8bit_layerwise():
    model = tiny_model()
    opt = build_optimizer(model, "galore+", 8, lr=1e-3, eightbit=True, layerwise=True)
    text = optimizer_summary(opt)
    assert "GaLore+ cross-head (4 heads) randomized + residual 1.2% exact" in text
    assert "GaLore+ cross-head (2 heads) randomized + residual 1.2% exact" in text
    assert "GaLore+ randomized std" in text and "full 8-bit AdamW" in text and "8-bit" in text
    assert len(text.splitlines()) == 2 + 4 + 1 + 1  # header, rule, 4 groups, total, state line


def test_summary_adafactor_and_bad_input():
    opt = build_optimizer(tiny_model(), "galore", 8, lr=1e-3, adafactor=True)
    text = optimizer_summary(opt)
    assert "GaLore exact std" in text and "Adafactor" in text and "full Adafactor" in text
    with pytest.raises(TypeError, match="needs a galore_plus optimizer, got AdamW"):
        optimizer_summary(torch.optim.AdamW(tiny_model().parameters()))
