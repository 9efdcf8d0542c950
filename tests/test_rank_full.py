"""Issue 29, mechanism 6: rank per matrix (``LowRankSpec.rank``: an int, ``"full"`` or a fraction of
``min(m, n)``; ``projection.resolve_rank``; DESIGN.md, "Options", rank). Resolution per matrix on a
tiny LLaMA whose ``k_proj`` is narrower than ``q_proj``, a float64 reference written plainly (at
``rank = min(m, n)`` one-sided GaLore is AdamW in the gradient's singular basis), the projected
backward equals the full path, 8-bit states, a bitwise resume across a refresh, loading, the command
line, and DDP / FSDP2 (resolved from the whole matrix's shape, not a shard's)."""

from __future__ import annotations

import io

import pytest
import torch
from _tiny_llama import CONFIG, micro_batches, tiny, train
from _ranks import full_params, mse_steps, per_method, run_ranks, whole
from torch import nn

from galore_plus import GaLoreAdamW, GaLorePlusAdamW, LowRankSpec, build_optimizer, projection

STEPS, GAP = 12, 4  # refreshes at steps 1, 5, 9


def batches(accumulation, steps=STEPS, seed=1):
    return micro_batches(accumulation, steps, seed)


def max_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------- resolution


def test_resolve_rank():
    assert projection.resolve_rank("full", (192, 576)) == 192  # SmolLM2's k_proj
    assert projection.resolve_rank("full", (576, 576)) == 576
    assert projection.resolve_rank(0.5, (5, 9)) == 3  # 2.5 rounds half up
    assert projection.resolve_rank(0.3, (24, 48)) == 7 and projection.resolve_rank(0.3, (48, 48)) == 14
    assert projection.resolve_rank(0.001, (24, 48)) == 1  # at least 1
    assert projection.resolve_rank(1.0, (24, 48)) == 24 and projection.resolve_rank(7, (24, 48)) == 7


@pytest.mark.parametrize("method", ["galore", "galore+"])
def test_rank_resolves_per_matrix_on_a_tiny_llama(method):
    """q_proj 48×48, k_proj and v_proj 24×48 (2 key/value heads of 12), MLP 80×48 and 48×80: "full"
    gives each its own min(m, n), 0.3 rounds 0.3·min(m, n) half up; GaLore+'s cross-head k_proj
    reaches its 24 with both its heads. One int cannot do this: 30 fits q_proj and not k_proj."""
    widths = {"q_proj": 48, "k_proj": 24, "v_proj": 24, "o_proj": 48, "gate_proj": 48, "up_proj": 48, "down_proj": 48}
    for rank, want in (("full", widths), (0.3, {k: round(0.3 * v) for k, v in widths.items()})):
        model = tiny(torch.float32)
        opt = build_optimizer(model, method, rank, lr=1e-3)
        ids = batches(1, steps=1)[0][0]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        for name, p in model.named_parameters():
            if opt.is_low_rank(p):
                state, r = opt.state[p], want[name.split(".")[-2]]
                left, right = state.get("proj_left"), state.get("proj_right")
                got = left.shape[1] if left is not None else right.shape[0]
                assert got == r, (rank, name, got, r)
                m, n = p.shape
                low = state["exp_avg"].shape
                assert low == ((r, n) if left is not None else (m, r)), (name, low)
    with pytest.raises(ValueError, match=r"rank=30 is larger than parameter 'model.layers.0.self_attn.k_proj.weight' "
                                         r"\(shape \(24, 48\)\) allows \(at most min\(m, n\) = 24\)"):
        build_optimizer(tiny(), method, 30, lr=1e-3)


def test_bad_ranks_are_refused_in_one_line():
    for bad in (0, -1, "Full", "half", 1.5, 0.0, 2.0, True, None):
        with pytest.raises(ValueError, match=r"rank=.* must be an int ≥ 1, 'full' or a fraction in \(0, 1\]"):
            LowRankSpec(rank=bad)
    with pytest.raises(ValueError, match=r"parameter group 0: rank='max' must be an int ≥ 1, 'full'"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": "max"}])
    # a cross-head matrix whose eligible heads cannot reach its min(m, n): named with what "full" gave
    p = nn.Parameter(torch.zeros(36, 24))
    with pytest.raises(ValueError, match=r"rank='full' \(here 24\) is more than the 1 eligible head blocks"):
        GaLoreAdamW([{"params": [p], "rank": "full", "head_blocks": {"count": 3, "eligible": [0], "dim": 0}}])


# ---------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_float64_reference_full_rank_galore_is_adamw_in_the_gradients_singular_basis(shape):
    """``rank="full"``, ``proj_type="std"``, α = 1: the smaller side's basis ``B`` (``k×k``, ``k =
    min(m, n)``) is orthogonal, ``B Bᵀ = I``, so nothing of the gradient is lost and the update is
    AdamW on the rotated gradient ``R = G B`` (or ``Bᵀ G``), rotated back. ``B`` is the gradient's
    singular basis at each refresh (steps 1, 4, 7) and the moments are kept across it, as GaLore
    keeps them. Written plainly below; and it is not plain AdamW (Adam is not rotation invariant)."""
    m, n = shape
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(7)]
    lr, wd, (b1, b2), eps, gap = 1e-2, 0.1, (0.9, 0.999), 1e-8, 3
    W = nn.Parameter(w0.clone())
    opt = GaLoreAdamW([{"params": [W], "rank": "full", "update_proj_gap": gap, "scale": 1.0}], lr=lr,
                      weight_decay=wd)
    for g in grads:
        W.grad = g.clone()
        opt.step()

    right = m >= n  # std: the smaller side
    w, M, V = w0.clone(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            B = Vh.T if right else U  # k×k, orthogonal
            torch.testing.assert_close(B @ B.T, torch.eye(min(m, n), dtype=torch.float64), rtol=0, atol=1e-12)
        R = g @ B if right else B.T @ g
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        N = (M / (1 - b1 ** t)) / ((V / (1 - b2 ** t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * (N @ B.T if right else B @ N)
    torch.testing.assert_close(W.detach(), w, rtol=0, atol=1e-12)

    plain = nn.Parameter(w0.clone())
    adamw = torch.optim.AdamW([plain], lr=lr, weight_decay=wd)
    for g in grads:
        plain.grad = g.clone()
        adamw.step()
    assert (plain - W).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method,rank", [("galore", "full"), ("galore+", "full"), ("galore+", 0.5)])
def test_projected_backward_equals_the_full_path(method, rank):
    """Over the first refresh window, as tests/test_projected.py compares exact-SVD GaLore (singular
    vectors' signs part the paths at a later refresh; with canonical signs, the next test, they do not)."""
    data = batches(2, steps=GAP)
    models = []
    for projected in (False, True):
        model = tiny()
        train(model, build_optimizer(model, method, rank, lr=1e-2, update_proj_gap=GAP, residual_warmup=2, scale=1.0,
                                     weight_decay=0.01, projected_backward=projected), data)
        models.append(model)
    assert max_difference(*models) < 1e-9
    assert not torch.allclose(models[0].model.layers[0].self_attn.k_proj.weight,
                              tiny().model.layers[0].self_attn.k_proj.weight)


def test_full_rank_with_canonical_signs_projected_equals_full_over_three_refreshes():
    """The two mechanisms compose: at full rank with canonical signs, 12 steps and 3 refreshes agree."""
    data = batches(2)
    models = []
    for projected in (False, True):
        model = tiny()
        train(model, build_optimizer(model, "galore", "full", lr=1e-2, update_proj_gap=GAP, scale=1.0,
                                     canonical_signs=True, projected_backward=projected), data)
        models.append(model)
    assert max_difference(*models) < 1e-9


def test_8bit_states_at_full_rank():
    """160×64 MLP matrices at full rank: 160×64 low-rank moments (10240 elements), quantized; the
    projected backward equals the full path over the first window."""
    pytest.importorskip("bitsandbytes")
    config = {**CONFIG, "hidden_size": 64, "intermediate_size": 160}
    models = []
    for projected in (False, True):
        model = tiny(config=config)
        opt = build_optimizer(model, "galore", "full", lr=1e-2, update_proj_gap=GAP, scale=1.0, eightbit=True,
                              projected_backward=projected)
        train(model, opt, batches(2, steps=GAP))
        state = opt.state[model.model.layers[0].mlp.up_proj.weight]
        assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_q"].shape == (160, 64)
        models.append(model)
    assert max_difference(*models) < 1e-9


@pytest.mark.parametrize("rank", ["full", 0.5])
def test_resume_across_a_refresh_is_bitwise(rank):
    data = batches(1, steps=7)

    def build(model):
        return build_optimizer(model, "galore+", rank, lr=1e-2, update_proj_gap=GAP, residual_warmup=2,
                               projected_backward=True)

    def run(split=None):
        model = tiny(torch.float32)
        opt = build(model)
        for step, parts in enumerate(data):
            if step == split:  # save before the refresh of step 5; load into fresh objects
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                assert {g["rank"] for g in saved["opt"]["param_groups"] if "rank" in g} == {rank}
                model = tiny(torch.float32)
                model.load_state_dict(saved["model"])
                opt = build(model)
                opt.load_state_dict(saved["opt"])
            train(model, opt, [parts])
        return model

    a, b = run(), run(split=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_a_state_saved_at_one_rank_is_refused_at_another():
    model = tiny(torch.float32)
    opt = build_optimizer(model, "galore", "full", lr=1e-3)
    ids = batches(1, steps=1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    saved = opt.state_dict()
    build_optimizer(tiny(torch.float32), "galore", "full", lr=1e-3).load_state_dict(saved)  # the same: loads
    with pytest.raises(ValueError, match=r"parameter group 0: saved rank 'full', here 0.5"):
        build_optimizer(tiny(torch.float32), "galore", 0.5, lr=1e-3).load_state_dict(saved)


def test_the_command_line_takes_full_and_fractions():
    from galore_plus.app.cli import parse_config
    from galore_plus.app.config import FinetuneConfig, low_rank_spec
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError
    from galore_plus.app.preflight import check_fits

    for text, value in (("full", "full"), ("0.25", 0.25), ("16", 16)):
        config, _ = parse_config(["finetune", "--model", "tiny", "--rank", text])
        assert config.rank == value and type(config.rank) is type(value)
        assert low_rank_spec(config).rank == value
        check_fits(config)  # builds the optimizer for the tiny model's shapes
    with pytest.raises(ConfigError, match=r"argument --rank: invalid int value: 'most'"):
        parse_config(["finetune", "--model", "tiny", "--rank", "most"])
    with pytest.raises(ConfigError, match=r"rank=1.5 must be an int ≥ 1, 'full' or a fraction"):
        parse_config(["finetune", "--model", "tiny", "--rank", "1.5"])
    for method in ("lora", "dora"):
        with pytest.raises(ConfigError, match=rf"--rank full with --method {method}: its adapter rank is one int"):
            validated(FinetuneConfig(model="tiny", method=method, rank="full"))
    with pytest.raises(ConfigError, match=r"rank=\[8\] must be an int or a float or 'full'"):
        validated(FinetuneConfig(model="tiny", rank=[8]))
    with pytest.raises(ConfigError, match=r"rank='half' must be an int or a float or 'full'"):
        validated(FinetuneConfig(model="tiny", rank="half"))


# ---------------------------------------------------------------------------------------------- DDP, FSDP2

WORLD = 2
D_STEPS = 4  # one refresh, at step 1 (the resolution is what is tested)


class Net(nn.Module):
    """``a`` 32×24 (right basis) and ``b`` 24×32 (left basis): under FSDP2 a rank holds 16×24 and
    12×32, so a rank resolved from a shard's shape (16, 12) would not be the matrix's (24)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.a = nn.Linear(24, 32)
        self.b = nn.Linear(32, 24)

    def forward(self, x):
        return self.b(torch.tanh(self.a(self.norm(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


METHODS = {
    "full exact": {"rank": "full"},
    "full randomized": {"rank": "full", "svd": "randomized"},
    "half, cross-head": {"rank": 0.5, "num_heads": 2},  # a: 2 heads of 16 rows, b: plain
}


def net_optimizer(model, method):
    by_name = {n.removeprefix("module."): p for n, p in model.named_parameters()}
    options = dict(METHODS[method])
    heads = options.pop("num_heads", None)
    groups = [{"params": [by_name["a.weight"]], **options, "num_heads": heads},
              {"params": [by_name["b.weight"]], **options},
              {"params": [p for n, p in by_name.items() if n not in ("a.weight", "b.weight")]}]
    return GaLorePlusAdamW(groups, lr=1e-2, update_proj_gap=100, scale=1.0, seed=3, svd="exact")


def net_data(step):
    g = torch.Generator().manual_seed(200 + step)  # 64 rows: full-rank gradients
    return torch.randn(64, 24, generator=g, dtype=torch.float64), torch.randn(64, 24, generator=g, dtype=torch.float64)


def run_net(model, optimizer, rank):
    mse_steps(model, optimizer, net_data, D_STEPS, rank, WORLD)
    shapes = {n.removeprefix("module."): {k: tuple(whole(v).shape) for k, v in optimizer.state[p].items()
                                          if k.startswith("proj_") and torch.is_tensor(v) and v.dim() == 2}
              for n, p in model.named_parameters() if n.endswith(("a.weight", "b.weight"))}
    return full_params(model), shapes


def _scenarios(rank):
    return per_method(METHODS, make_net, net_optimizer, run_net, rank, WORLD)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("rank"), deadline_s=300)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", list(METHODS))
def test_distributed_resolves_from_the_whole_matrix_and_equals_one_process(ranks, kind, method):
    params, shapes = ranks[0]["single", method]
    want = {"full exact": 24, "full randomized": 24, "half, cross-head": 12}[method]
    assert shapes == {"a.weight": {"proj_right": (want, 24)}, "b.weight": {"proj_left": (24, want)}}
    for res in ranks:
        got_params, got_shapes = res[kind, method]
        assert got_shapes == shapes
        for name in params:
            torch.testing.assert_close(got_params[name], params[name], rtol=1e-9, atol=1e-11, msg=name)
