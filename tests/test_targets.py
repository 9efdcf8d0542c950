"""Targets for any model: find_targets on plain modules, GPT-2's Conv1D, and fused q/k/v layouts
(GPT-NeoX, Bloom, Phi-3, GPT-2) whose cross-head projector is drawn from the q/k head blocks only."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from galore_plus import GaLoreAdamW, GaLorePlusAdamW, build_optimizer, find_targets, optimizer_summary
from galore_plus.groups import galore_plus_param_groups
from galore_plus.rng import generator_for

# ---------------------------------------------------------------------- any nn.Module


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.up = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(16)


class Custom(nn.Module):
    """Embedding, blocks, an output head tied to the embedding, an untied ``lm_head`` and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.tied = nn.Linear(16, 40, bias=False)
        self.tied.weight = self.emb.weight
        self.lm_head = nn.Linear(16, 40)
        self.classifier = nn.Linear(16, 3)


def test_plain_sequential_default_is_every_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    targets = find_targets(model)
    assert [(t.name, t.kind, t.num_heads, t.head_blocks, t.shape) for t in targets] == [
        ("0.weight", "other", None, None, (16, 8)),
        ("2.weight", "other", None, None, (16, 16)),
        ("4.weight", "other", None, None, (4, 16)),
    ]
    params = dict(model.named_parameters())
    assert all(t.param is params[t.name] for t in targets)


def test_custom_module_default_leaves_out_the_output_head_and_embeddings_only():
    model = Custom()
    names = [t.name for t in find_targets(model)]
    # the tied head (shares the embedding's weight) and lm_head are out; the classifier is in
    assert names == ["blocks.0.q_proj.weight", "blocks.0.up.weight", "blocks.1.q_proj.weight",
                     "blocks.1.up.weight", "classifier.weight"]
    # no config: no head counts even for a module named q_proj
    assert all(t.num_heads is None and t.head_blocks is None for t in find_targets(model))
    # get_output_embeddings() names the head where a model has it
    model.get_output_embeddings = lambda: model.classifier
    assert "classifier.weight" not in [t.name for t in find_targets(model)]
    # a bare linear is its own target
    (target,) = find_targets(nn.Linear(4, 6))
    assert (target.name, target.kind, target.shape) == ("weight", "other", (6, 4))


def test_custom_module_with_patterns():
    model = Custom()
    targets = find_targets(model, [r"blocks\.\d+\.q_proj", "lm_head"])
    assert [(t.name, t.kind, t.num_heads) for t in targets] == [
        ("blocks.0.q_proj.weight", "q", None), ("blocks.1.q_proj.weight", "q", None), ("lm_head.weight", "other", None)]
    with pytest.raises(ValueError, match=r"pattern 'blocks\\\\.9\\\\..\*' matched no module of Custom"):
        find_targets(model, [r"blocks\.0\.up", r"blocks\.9\..*"])
    with pytest.raises(ValueError, match=r"matched module 'blocks.0.norm' \(LayerNorm\), which is not a linear layer"):
        find_targets(model, [r".*\.norm"])


def test_a_module_without_linear_layers_raises():
    with pytest.raises(ValueError, match="Sequential has no linear layer .* pass patterns"):
        find_targets(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)))


def test_hf_style_config_without_a_layer_stack_still_raises():
    model = Custom()
    model.config = SimpleNamespace(num_hidden_layers=5)
    with pytest.raises(ValueError, match="no nn.ModuleList of config.num_hidden_layers=5"):
        find_targets(model)


class Conv1DLike(nn.Module):
    """GPT-2's Conv1D without transformers: ``y = x W + b``, ``W`` is ``in × out``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_conv1d_is_recognised_by_its_shape():
    model = nn.Sequential(Conv1DLike(24, 8), nn.ReLU(), nn.Linear(24, 8))
    assert [(t.name, t.shape) for t in find_targets(model)] == [("0.weight", (8, 24)), ("2.weight", (8, 24))]
    assert [t.name for t in find_targets(model, [r"0"])] == ["0.weight"]
    model[0].nf = 7  # not the weight's column count: not a Conv1D
    assert [t.name for t in find_targets(model)] == ["2.weight"]


# ---------------------------------------------------------------------- Hugging Face layouts

transformers = pytest.importorskip("transformers")
from transformers import BloomConfig, GPT2Config, GPTNeoXConfig, Phi3Config  # noqa: E402

NEOX_ELIGIBLE = [0, 1, 3, 4, 6, 7, 9, 10]  # 4 heads, rows [q_i; k_i; v_i]


def tiny(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, **overrides)
    elif kind == "neox":
        config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               vocab_size=128, max_position_embeddings=64, **overrides)
    elif kind == "bloom":
        config = BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128, **overrides)
    else:
        config = Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                            **overrides)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()  # eval: no dropout


def test_gpt2_conv1d_targets_and_column_head_blocks():
    model = tiny("gpt2")
    targets = find_targets(model)
    layer0 = [(t.name, t.kind, t.num_heads, t.head_blocks, t.shape) for t in targets if ".h.0." in t.name]
    blocks = {"count": 12, "eligible": list(range(8)), "dim": 1}  # columns [Q | K | V], 4 heads of 16
    assert layer0 == [
        ("transformer.h.0.attn.c_attn.weight", "qkv", None, blocks, (64, 192)),
        ("transformer.h.0.attn.c_proj.weight", "o", None, None, (64, 64)),
        ("transformer.h.0.mlp.c_fc.weight", "mlp", None, None, (64, 256)),
        ("transformer.h.0.mlp.c_proj.weight", "mlp", None, None, (256, 64)),
    ]
    assert len(targets) == 8 and not any("wte" in t.name or "lm_head" in t.name for t in targets)


def test_gpt2_cross_attention_c_attn_is_key_value_columns():
    model = tiny("gpt2", add_cross_attention=True)
    kinds = {t.name.removeprefix("transformer.h.0.").removesuffix(".weight"): (t.kind, t.head_blocks)
             for t in find_targets(model) if ".h.0." in t.name}
    assert kinds["crossattention.c_attn"] == ("qkv", {"count": 8, "eligible": [0, 1, 2, 3], "dim": 1})
    assert kinds["crossattention.q_attn"] == ("other", None)
    assert kinds["crossattention.c_proj"] == ("o", None)


@pytest.mark.parametrize("kind, leaf, blocks, shape", [
    ("neox", "attention.query_key_value", {"count": 12, "eligible": NEOX_ELIGIBLE, "dim": 0}, (192, 64)),
    ("bloom", "self_attention.query_key_value", {"count": 12, "eligible": NEOX_ELIGIBLE, "dim": 0}, (192, 64)),
    # rows [Q (4 heads); K (2); V (2)] of 16
    ("phi3", "self_attn.qkv_proj", {"count": 8, "eligible": [0, 1, 2, 3, 4, 5], "dim": 0}, (128, 64)),
])
def test_fused_row_layouts(kind, leaf, blocks, shape):
    targets = find_targets(tiny(kind))
    fused = [t for t in targets if t.kind == "qkv"]
    assert len(fused) == 2 and all(t.name.endswith(f".{leaf}.weight") for t in fused)
    assert all((t.head_blocks, t.num_heads, t.shape) == (blocks, None, shape) for t in fused)
    assert all(t.head_blocks is None for t in targets if t.kind != "qkv")
    if kind == "bloom":
        assert [t.kind for t in targets if ".0." in t.name] == ["qkv", "o", "mlp", "mlp"]


def test_fused_layout_that_disagrees_with_the_config_raises_naming_the_matrix():
    model = tiny("phi3")
    model.config.num_key_value_heads = 4  # qkv_proj has (4 + 2·2) × 16 rows
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.qkv_proj\.weight has 128 rows .* 12 head blocks"):
        find_targets(model)


def test_fused_matrix_of_an_unknown_layout_gets_no_head_blocks():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_key_value = nn.Linear(16, 48)

    model = nn.Module()
    model.layers = nn.ModuleList([Attention()])
    model.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, model_type="falcon")
    (target,) = find_targets(model)
    assert (target.kind, target.num_heads, target.head_blocks) == ("qkv", None, None)


def test_groups_take_head_blocks_without_the_residual():
    a, b, c, d = (nn.Parameter(torch.zeros(48, 8)) for _ in range(4))
    blocks = {"count": 6, "eligible": [0, 1, 2, 3], "dim": 0}
    groups = galore_plus_param_groups([("a", a, blocks), ("b", b, 4), ("c", c, dict(blocks)), ("d", d, None)], 4,
                                      svd="randomized")
    assert [g["param_names"] for g in groups] == [["a", "c"], ["b"], ["d"]]
    assert groups[0]["head_blocks"] == blocks and groups[0]["head_blocks"] is not blocks
    assert "residual_ratio" not in groups[0] and groups[1]["residual_ratio"] == 0.012
    assert all(g["svd"] == "randomized" for g in groups)


# ---------------------------------------------------------------------- the projector, by hand


def by_hand(G: torch.Tensor, rank: int, blocks: dict, seed: int, index: int = 0, refresh: int = 0):
    """The fused cross-head projector computed plainly: draw ⌈r/d⌉ of the eligible blocks with the
    refresh's generator, put them together, take the top-r singular vectors on the other side."""
    dim, count, eligible = blocks["dim"], blocks["count"], blocks["eligible"]
    d = G.shape[dim] // count
    generator = generator_for(seed, index, refresh)
    drawn = torch.randperm(len(eligible), generator=generator)[:math.ceil(rank / d)].tolist()
    chosen = sorted(eligible[i] for i in drawn)
    if dim == 0:
        block = torch.cat([G[i * d:(i + 1) * d, :] for i in chosen], dim=0)
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        basis = Vh[:rank].T  # n × r, the right projector
    else:
        block = torch.cat([G[:, i * d:(i + 1) * d] for i in chosen], dim=1)
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        basis = U[:, :rank]  # m × r, the left projector
    return chosen, basis


LAYOUTS = {
    "per_head rows (NeoX)": ((48, 20), {"count": 12, "eligible": [0, 1, 3, 4, 6, 7, 9, 10], "dim": 0}),
    "stacked rows (Phi-3)": ((32, 20), {"count": 8, "eligible": [0, 1, 2, 3, 4, 5], "dim": 0}),
    "stacked columns (GPT-2)": ((20, 48), {"count": 12, "eligible": list(range(8)), "dim": 1}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("rank", [3, 6])  # one block of 4, or two stacked
def test_fused_cross_head_projector_equals_the_one_by_hand(layout, rank):
    shape, blocks = LAYOUTS[layout]
    dim, d = blocks["dim"], shape[blocks["dim"]] // blocks["count"]
    v_blocks = [i for i in range(blocks["count"]) if i not in blocks["eligible"]]
    seen = set()
    for seed in range(12):
        G = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
        W = nn.Parameter(torch.zeros(*shape, dtype=torch.float64))
        opt = GaLorePlusAdamW([{"params": [W], "rank": rank, "head_blocks": blocks}], lr=0.1, seed=seed,
                              svd="exact")
        W.grad = G.clone()
        opt.step()
        state = opt.state[W]
        chosen, expected = by_hand(G, rank, blocks, seed)
        assert not set(chosen) & set(v_blocks)
        seen.update(chosen)
        if dim == 0:
            assert state["proj_side"] == 1 and "proj_left" not in state
            got = state["proj_right"].T  # stored r × n
        else:
            assert state["proj_side"] == 0 and "proj_right" not in state
            got = state["proj_left"]
        assert got.shape == expected.shape == (shape[1 - dim], rank)
        # the same subspace (singular vectors are defined up to sign)
        torch.testing.assert_close(got @ got.T, expected @ expected.T, rtol=0, atol=1e-12)
        # the value blocks never enter: changing them changes nothing
        W2 = nn.Parameter(torch.zeros(*shape, dtype=torch.float64))
        opt2 = GaLorePlusAdamW([{"params": [W2], "rank": rank, "head_blocks": blocks}], lr=0.1, seed=seed,
                               svd="exact")
        G2 = G.clone()
        for i in v_blocks:
            G2.narrow(dim, i * d, d).mul_(1e3).add_(7.0)
        W2.grad = G2
        opt2.step()
        key = "proj_right" if dim == 0 else "proj_left"
        assert torch.equal(opt2.state[W2][key], state[key])
    assert seen == set(blocks["eligible"])  # every q/k block is drawn sometimes


def test_randomized_sketch_of_column_blocks_is_a_left_basis_of_the_chosen_columns():
    # rank + oversample ≤ half the block: the head block is sketched (randomized subspace iteration)
    blocks = {"count": 4, "eligible": [0, 1, 2], "dim": 1}
    G = torch.randn(64, 4, dtype=torch.float64) @ torch.randn(4, 256, dtype=torch.float64)  # rank 4
    W = nn.Parameter(torch.zeros(64, 256, dtype=torch.float64))
    opt = GaLorePlusAdamW([{"params": [W], "rank": 4, "head_blocks": blocks, "oversample": 4}], lr=0.1, seed=1)
    W.grad = G
    opt.step()
    chosen, expected = by_hand(G, 4, blocks, seed=1)
    P = opt.state[W]["proj_left"]
    torch.testing.assert_close(P @ P.T, expected @ expected.T, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("value", [
    {"count": 0, "eligible": [0], "dim": 0},
    {"count": 4, "eligible": [], "dim": 0},
    {"count": 4, "eligible": [1, 0], "dim": 0},
    {"count": 4, "eligible": [0, 0], "dim": 0},
    {"count": 4, "eligible": [0, 4], "dim": 0},
    {"count": 4, "eligible": [-1, 0], "dim": 0},
    {"count": 4, "eligible": [0, 1], "dim": 2},
    {"count": 4, "eligible": [0, 1], "dim": True},
    {"count": 4, "eligible": [0, 1.0], "dim": 0},
    {"count": 4, "eligible": [0, 1]},
    {"count": 4, "eligible": [0, 1], "dim": 0, "size": 4},
    [4, [0, 1], 0],
])
def test_bad_head_blocks_raise_naming_the_value(value):
    W = nn.Parameter(torch.zeros(16, 8))
    with pytest.raises(ValueError, match="head_blocks=") as err:
        GaLoreAdamW([{"params": [W], "rank": 2, "head_blocks": value}], lr=0.1)
    assert repr(value) in str(err.value) and "\n" not in str(err.value)


def test_head_blocks_that_do_not_fit_the_matrix_raise_naming_it():
    W = nn.Parameter(torch.zeros(16, 8))
    good = {"count": 4, "eligible": [0, 1], "dim": 0}
    with pytest.raises(ValueError, match="num_heads=4 and head_blocks=.* cannot both be set"):
        GaLoreAdamW([{"params": [W], "rank": 2, "head_blocks": good, "num_heads": 4}], lr=0.1)
    with pytest.raises(ValueError, match=r"count=4 does not divide the 10 rows of parameter 'w'"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(10, 8))], "param_names": ["w"], "rank": 2,
                      "head_blocks": good}], lr=0.1)
    with pytest.raises(ValueError, match=r"count=3 does not divide the 8 columns"):
        GaLoreAdamW([{"params": [W], "rank": 2, "head_blocks": {"count": 3, "eligible": [0], "dim": 1}}], lr=0.1)
    with pytest.raises(ValueError, match=r"rank=9 is more than the 2 eligible head blocks of 4 rows"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(16, 16))], "rank": 9, "head_blocks": good}], lr=0.1)


def test_build_optimizer_refuses_head_blocks_as_an_option():
    with pytest.raises(TypeError, match="head_blocks is not an option here"):
        build_optimizer(tiny("neox"), "galore+", 4, lr=1e-3, head_blocks={"count": 1, "eligible": [0], "dim": 0})


# ---------------------------------------------------------------------- training and resuming


def batches(vocab: int, steps: int):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(steps)]


def train(model, optimizer, data):
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_training_with_a_fused_target_resumes_bitwise(kind):
    data = batches(128, 8)
    options = dict(lr=1e-3, update_proj_gap=2, seed=5, residual_warmup=2)

    model = tiny(kind)
    optimizer = build_optimizer(model, "galore+", 8, **options)
    (fused,) = [g for g in optimizer.param_groups if g.get("head_blocks") is not None]
    train(model, optimizer, data)
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}
    key = "proj_left" if kind == "gpt2" else "proj_right"
    state = optimizer.state[fused["params"][0]]
    assert state[key].shape == ((64, 8) if kind == "gpt2" else (8, 64)) and state["refresh_count"] == 4
    assert "residual_index" not in state  # no residual on the fused matrix
    assert "cross-head (q/k: 8 of 12 " in optimizer_summary(optimizer)

    model = tiny(kind)
    optimizer = build_optimizer(model, "galore+", 8, **options)
    train(model, optimizer, data[:5])  # a save between refreshes (gap 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["head_blocks"] == fused["head_blocks"]

    resumed = tiny(kind, seed=123)
    resumed.load_state_dict(saved["model"])
    optimizer = build_optimizer(resumed, "galore+", 8, **options)
    optimizer.load_state_dict(saved["optimizer"])
    train(resumed, optimizer, data[5:])
    for n, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[n]), n


def test_projected_backward_with_a_fused_row_target_equals_the_full_path():
    data = batches(128, 5)
    params = []
    for projected in (False, True):
        model = tiny("neox").double()
        optimizer = build_optimizer(model, "galore+", 8, lr=1e-3, update_proj_gap=2, seed=5,
                                    projected_backward=projected)
        train(model, optimizer, data)
        params.append(dict(model.named_parameters()))
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, rtol=1e-9, atol=1e-12, msg=name)
