"""GaLore+ (DESIGN.md, "Projectors" and "Residual"): randomized subspace iteration, cross-head projection, sparsely coded residuals."""

from __future__ import annotations

import io
import math

import pytest
import torch

from galore_plus import GaLoreAdamW, GaLorePlusAdamW, galore_plus_param_groups, projection, residual
from galore_plus.rng import generator_for


def known_spectrum(m, n, singular_values, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=dtype)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=dtype)).Q
    return (U * singular_values.to(dtype)) @ V.T, V


# ---------------------------------------------------------------- randomized subspace iteration

@pytest.mark.parametrize("decay", ["geometric", "power"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_projector_captures_energy_of_exact_top_r(shape, decay):
    m, n = shape
    k = min(m, n)
    i = torch.arange(k, dtype=torch.float64)
    sv = 0.97**i if decay == "geometric" else (i + 1) ** -1.0
    G, _ = known_spectrum(m, n, sv)
    G = G.float()
    rank = 16
    side = projection.projection_side(G.shape, "std")
    exact_l, exact_r = projection.svd_projector(G, rank, side)
    rand_l, rand_r = projection.randomized_projector(G, rank, side, generator_for(0, 0, 0))
    energy = lambda l, r: projection.project(G, l, r).norm()
    ratio = (energy(rand_l, rand_r) / energy(exact_l, exact_r)).item()
    assert 0.99 <= ratio <= 1.0 + 1e-5, ratio
    # principal angles between the subspaces: cosines are the singular values of A_exactᵀ A_rand
    basis = lambda l, r: l if l is not None else r.T
    cosines = torch.linalg.svdvals(basis(exact_l, exact_r).T @ basis(rand_l, rand_r))  # descending
    # the leading directions agree closely; the last ones sit where the spectrum has no gap
    # (0.97^16 vs 0.97^17) and are only loosely determined, for any method short of the exact SVD
    assert cosines[: rank // 2].min() > 0.999 and cosines.mean() > 0.95, cosines
    assert torch.allclose(basis(rand_l, rand_r).T @ basis(rand_l, rand_r), torch.eye(rank), atol=1e-5)


@pytest.mark.parametrize("condition", [1e1, 1e3, 1e8])
def test_orthonormalize_spans_the_columns_and_is_orthonormal(condition):
    """CholeskyQR2 where it is accurate, Householder QR where the Gram matrix is not positive definite."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(500, 40, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64)).Q
    Y = ((U * torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 40, dtype=torch.float64)) @ V.T).float()
    Q = projection.orthonormalize(Y)
    torch.testing.assert_close(Q.T @ Q, torch.eye(40), atol=1e-4, rtol=0)
    residual = (Y - Q @ (Q.T @ Y)).norm() / Y.norm()
    assert residual < 1e-5


def test_randomized_projector_is_a_function_of_the_seed():
    G = torch.randn(64, 48)
    one = projection.randomized_projector(G, 8, projection.RIGHT, generator_for(3, 1, 2))[1]
    same = projection.randomized_projector(G, 8, projection.RIGHT, generator_for(3, 1, 2))[1]
    other = projection.randomized_projector(G, 8, projection.RIGHT, generator_for(3, 1, 3))[1]
    assert torch.equal(one, same) and not torch.equal(one, other)


def test_more_power_iterations_capture_more_energy():
    G, V = known_spectrum(256, 256, (torch.arange(256, dtype=torch.float64) + 1) ** -0.5)
    G = G.float()
    exact = (G @ V[:, :16].float()).norm()
    ratios = [((G @ projection.randomized_projector(G, 16, projection.RIGHT, generator_for(0, 0, 0), 8, q)[1].T)
               .norm() / exact).item() for q in (0, 1, 3)]
    assert ratios[0] < ratios[1] < ratios[2] <= 1.0 + 1e-5, ratios


def test_warm_start_from_the_true_subspace_is_exact_without_power_iterations():
    G, V = known_spectrum(120, 80, torch.linspace(10, 1, 10))  # rank 10 exactly
    G = G.float()
    start = (None, V[:, :10].T.float())
    _, Q = projection.randomized_projector(G, 10, projection.RIGHT, generator_for(0, 0, 0), 0, 0, warm=start)
    assert (G @ Q.T).norm() / G.norm() > 1 - 1e-6


# ---------------------------------------------------------------- cross-head projection

def test_cross_head_projector_is_the_chosen_heads_exact_top_r_float64():
    heads, d_k, d_model, rank = 6, 16, 48, 10
    G = torch.randn(heads * d_k, d_model, dtype=torch.float64)
    W = torch.nn.Parameter(torch.zeros_like(G))
    opt = GaLoreAdamW([{"params": [W], "rank": rank, "num_heads": heads}], seed=5)
    W.grad = G.clone()
    opt.step()
    Q = opt.state[W]["proj_right"]
    assert Q.dtype == torch.float64 and Q.shape == (rank, d_model)
    (h,) = projection.choose_heads(heads, rank, d_k, generator_for(5, 0, 0))
    Vh = torch.linalg.svd(G[h * d_k:(h + 1) * d_k], full_matrices=False).Vh[:rank]
    torch.testing.assert_close(Q.T @ Q, Vh.T @ Vh, rtol=0, atol=1e-12)  # same subspace
    torch.testing.assert_close(Q.abs(), Vh.abs(), rtol=0, atol=1e-12)  # same vectors up to sign


def test_rank_above_head_dim_stacks_distinct_heads():
    gen = generator_for(0, 0, 0)
    chosen = projection.choose_heads(9, 100, 64, gen)
    assert len(chosen) == 2 and len(set(chosen)) == 2
    G = torch.randn(9 * 64, 576)
    _, Q = projection.cross_head_projector(G, 100, 9, generator_for(0, 0, 0))
    block = projection.head_rows(G, 9, chosen)
    Vh = torch.linalg.svd(block, full_matrices=False).Vh[:100]
    torch.testing.assert_close(Q.T @ Q, Vh.T @ Vh, rtol=0, atol=1e-4)


def test_cross_head_equals_full_galore_when_all_heads_are_identical():
    head = torch.randn(8, 40, dtype=torch.float64)
    G = head.repeat(5, 1)  # 5 identical heads of 8 rows: G's right singular vectors are the head's
    results = []
    for extra in ({"num_heads": 5}, {"proj_type": "right"}):
        W = torch.nn.Parameter(torch.zeros_like(G))
        opt = GaLoreAdamW([{"params": [W], "rank": 6, **extra}], lr=0.1, weight_decay=0.0)
        for _ in range(3):
            W.grad = G.clone()
            opt.step()
        results.append(W.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [32, 64, 128])
def test_gqa_key_projection_shapes(rank):
    k_proj = torch.nn.Parameter(torch.zeros(3 * 64, 576))
    opt = GaLorePlusAdamW([{"params": [k_proj], "rank": rank, "num_heads": 3}])
    k_proj.grad = torch.randn(3 * 64, 576)
    opt.step()
    Q = opt.state[k_proj]["proj_right"]
    assert Q.shape == (rank, 576) and opt.state[k_proj]["exp_avg"].shape == (192, rank)
    torch.testing.assert_close(Q @ Q.T, torch.eye(rank), atol=1e-4, rtol=0)


def test_head_choice_is_uniform_over_refreshes():
    counts = torch.zeros(9)
    for refresh in range(900):
        counts[projection.choose_heads(9, 32, 64, generator_for(0, 0, refresh))] += 1
    assert counts.min() > 60 and counts.max() < 140  # 100 expected each


# ---------------------------------------------------------------- residual: references in float64

def residual_reference(grads, rank, warm, ratio, mode, lr, scale, betas, eps):
    """GaLore (exact SVD, one projector for the run, left side) + sparse residual, plainly, float64."""
    b1, b2 = betas
    W = torch.zeros_like(grads[0])
    m, n = W.shape
    P = torch.linalg.svd(grads[0], full_matrices=False).U[:, :rank]
    Ml = torch.zeros(rank, n, dtype=W.dtype); Vl = torch.zeros_like(Ml)
    A = torch.zeros_like(W); B = torch.zeros_like(W)
    S = None; t0 = None
    for t, G in enumerate(grads, start=1):
        R = P.T @ G
        Ml = b1 * Ml + (1 - b1) * R
        Vl = b2 * Vl + (1 - b2) * R * R
        upd = P @ ((Ml / (1 - b1**t)) / ((Vl / (1 - b2**t)).sqrt() + eps))
        if S is not None:
            if mode == "exact":
                A = torch.where(S, b1 * A + (1 - b1) * G, A)
                B = torch.where(S, b2 * B + (1 - b2) * G * G, B)
                k = t - t0
                upd = torch.where(S, (A / (1 - b1**k)) / ((B / (1 - b2**k)).sqrt() + eps), upd)
            else:
                Gh = P @ (P.T @ G)
                dG = (G - Gh) * S
                A = b1 * A + (1 - b1) * dG
                B = b2 * B + 2 * (1 - b2) * Gh * dG
                den = ((P @ Vl) / (1 - b2**t) + B / (1 - b2**t)).clamp_min(0).sqrt() + eps
                delta = (A / (1 - b1**t)) / den
                bound = 1 / math.sqrt(1 - b2)
                upd = upd + torch.where(S, delta.clamp(-bound, bound), torch.zeros_like(delta))
        if S is None and t >= warm:
            k = max(1, round(ratio * m * n))
            S = torch.zeros(m * n, dtype=torch.bool)
            S[(P @ Ml).abs().flatten().topk(k).indices] = True
            S = S.view(m, n); t0 = t
        W = W - lr * scale * upd
    return W


def low_rank_plus_noise(m=24, n=40, steps=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(m, 6, generator=gen, dtype=torch.float64)).Q
    return [basis @ torch.randn(6, n, generator=gen, dtype=torch.float64) * 2
            + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("mode", ["exact", "paper"])
@pytest.mark.parametrize("ratio", [0.05, 0.5])
def test_residual_matches_float64_reference(mode, ratio):
    grads = low_rank_plus_noise()
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    W = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = GaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": 1000, "scale": 0.5,
                        "residual_ratio": ratio, "residual_warmup": 5, "residual_mode": mode}],
                      weight_decay=0.0, **hyper)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    ref = residual_reference(grads, 4, 5, ratio, mode, scale=0.5, **hyper)
    torch.testing.assert_close(W.detach(), ref, rtol=1e-9, atol=1e-11)
    state = opt.state[W]
    assert state["residual_index"].dtype == torch.int32
    assert state["residual_index"].numel() == round(ratio * W.numel())


def test_exact_residual_at_full_ratio_is_adamw_after_warmup():
    """ρ = 100%, α = 1: after warm-up every entry follows AdamW started at the end of warm-up."""
    grads = low_rank_plus_noise(steps=25)
    W = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = GaLoreAdamW([{"params": [W], "rank": 3, "scale": 1.0, "residual_ratio": 1.0, "residual_warmup": 6}],
                      lr=1e-2, weight_decay=0.0)
    for G in grads[:6]:
        W.grad = G.clone()
        opt.step()
    ref = torch.nn.Parameter(W.detach().clone())
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0, foreach=False)
    for G in grads[6:]:
        W.grad, ref.grad = G.clone(), G.clone()
        opt.step()
        adamw.step()
    torch.testing.assert_close(W.detach(), ref.detach(), rtol=1e-12, atol=1e-14)


def test_paper_guard_is_the_identity_where_algorithm_2_is_finite_and_bounded():
    gen = torch.Generator().manual_seed(0)
    k = 1000
    grad_s, ghat_s = torch.randn(k, generator=gen, dtype=torch.float64), torch.randn(k, generator=gen, dtype=torch.float64)
    back_v = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    dm, dv = torch.randn(k, generator=gen, dtype=torch.float64) * 0.1, torch.zeros(k, dtype=torch.float64)
    dm_ref, dv_ref = dm.clone(), dv.clone()
    delta = residual.paper_residual(grad_s, ghat_s, back_v, dm, dv, 10, 0.9, 0.999, 1e-8)
    dG = grad_s - ghat_s
    dm_ref = 0.9 * dm_ref + 0.1 * dG
    dv_ref = 0.999 * dv_ref + 2 * 0.001 * ghat_s * dG
    literal = (dm_ref / (1 - 0.9**10)) / ((back_v / (1 - 0.999**10) + dv_ref / (1 - 0.999**10)).sqrt() + 1e-8)
    finite = torch.isfinite(literal) & (literal.abs() <= 1 / math.sqrt(0.001))
    assert finite.sum() > 900
    torch.testing.assert_close(delta[finite], literal[finite], rtol=1e-12, atol=0)


def test_paper_mode_is_unstable_as_measured_but_never_non_finite():
    """DESIGN.md, "Residual": the literal residual's error against AdamW explodes; the exact one's does not."""
    grads = low_rank_plus_noise(m=32, n=48, steps=40, seed=1)

    def relative_error_to_adamw(mode):
        W = torch.nn.Parameter(torch.zeros_like(grads[0]))
        ref = torch.nn.Parameter(torch.zeros_like(grads[0]))
        opt = GaLoreAdamW([{"params": [W], "rank": 4, "scale": 1.0, "update_proj_gap": 10, "residual_ratio": 0.5,
                            "residual_warmup": 5, "residual_mode": mode}], lr=1e-3, weight_decay=0.0, eps=1e-12)
        adamw = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0, eps=1e-12)
        for G in grads:
            W.grad, ref.grad = G.clone(), G.clone()
            opt.step()
            adamw.step()
        assert torch.isfinite(W).all()
        return ((W - ref).norm() / ref.norm()).item()

    exact, paper = relative_error_to_adamw("exact"), relative_error_to_adamw("paper")
    assert exact < 1.0 and paper > 3 * exact, (exact, paper)


def test_residual_state_memory_is_what_spec_says():
    W = torch.nn.Parameter(torch.zeros(64, 96))
    opt = GaLoreAdamW([{"params": [W], "rank": 4, "residual_ratio": 0.012, "residual_warmup": 2}])
    for _ in range(3):
        W.grad = torch.randn_like(W)
        opt.step()
    state = opt.state[W]
    k = round(0.012 * 64 * 96)
    nbytes = sum(state[key].numel() * state[key].element_size() for key in ("residual_index", "residual_m", "residual_v"))
    assert nbytes == k * (4 + 2 * 4)


def test_residual_reselect_changes_the_index_set_at_refresh():
    grads = low_rank_plus_noise(steps=20)
    W = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 8, "residual_ratio": 0.1, "residual_warmup": 3,
                        "residual_reselect": True}])
    seen = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        seen.append((opt.state[W]["step"], opt.state[W].get("residual_start")))
    assert [s for t, s in seen if t in (3, 8, 9, 17)] == [3, 3, 9, 17]


# ---------------------------------------------------------------- resume, presets, bad input

def galore_plus_run(steps, split_at=None, dtype=torch.float32, mode="exact", proj_dtype=None):
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (6 * 8, 32), "k": (2 * 8, 32), "v": (16, 32), "norm": (32,)}
    init = {k: torch.randn(*s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads = [{k: torch.randn(*s, generator=gen).to(dtype) for k, s in shapes.items()} for _ in range(steps)]

    def build(values):
        params = {k: torch.nn.Parameter(v.clone()) for k, v in values.items()}
        groups = galore_plus_param_groups(
            [("q", params["q"], 6), ("k", params["k"], 2), ("v", params["v"], None)], rank=4,
            plain=[("norm", params["norm"])], update_proj_gap=5, residual_warmup=3, residual_mode=mode,
            residual_ratio=0.2, warm_start=True, residual_reselect=True, proj_dtype=proj_dtype)
        return params, GaLorePlusAdamW(groups, lr=1e-2, seed=11)

    params, opt = build(init)
    for t in range(steps):
        if t == split_at:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "params": {k: p.detach() for k, p in params.items()}}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            params, opt = build(ckpt["params"])
            opt.load_state_dict(ckpt["opt"])
        for k, p in params.items():
            p.grad = grads[t][k].clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("mode", ["exact", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_galore_plus_resume_is_bitwise(dtype, mode):
    p1, o1 = galore_plus_run(17, dtype=dtype, mode=mode)
    p2, o2 = galore_plus_run(17, split_at=7, dtype=dtype, mode=mode)
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
        s1, s2 = o1.state[p1[k]], o2.state[p2[k]]
        assert s1.keys() == s2.keys()
        for key in s1:
            if torch.is_tensor(s1[key]):
                assert s1[key].dtype == s2[key].dtype and torch.equal(s1[key], s2[key]), (k, key)
            else:
                assert s1[key] == s2[key]
    assert o2.state[p2["q"]]["residual_index"].dtype == torch.int32  # survives the load cast


def test_bf16_projector_storage_resumes_bitwise():
    p1, o1 = galore_plus_run(17, proj_dtype=torch.bfloat16)
    p2, o2 = galore_plus_run(17, split_at=7, proj_dtype="bfloat16")
    assert o2.state[p2["q"]]["proj_right"].dtype == torch.bfloat16
    assert o2.param_groups[0]["proj_dtype"] is torch.bfloat16  # the name is normalised, survives weights_only
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k


@pytest.mark.parametrize("side_shape", [(24, 16), (16, 24)])
def test_bf16_projector_is_the_rounded_basis_used_in_the_compute_dtype(side_shape):
    """Storing the projector in bf16 = computing with the float32 basis rounded to bf16: the float32
    run below rounds each new basis (refreshed through the public API first) and must agree bitwise."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(*side_shape, generator=gen)
    grads = [torch.randn(*side_shape, generator=gen) for _ in range(7)]
    runs = []
    for proj_dtype in (torch.bfloat16, None):
        w = torch.nn.Parameter(init.clone())
        opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 3, "proj_dtype": proj_dtype}], lr=1e-2)
        for g in grads:
            w.grad = g.clone()
            if proj_dtype is None and opt.refresh_projector(w, w.grad):
                state = opt.state[w]
                for key in ("proj_left", "proj_right"):
                    if key in state:
                        state[key] = state[key].bfloat16().float()
            opt.step()
        state = opt.state[w]
        assert state["refresh_count"] == 3
        key = "proj_right" if "proj_right" in state else "proj_left"
        assert state[key].dtype == (proj_dtype or torch.float32)
        runs.append(w.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_preset_groups():
    q, k, v, n = (torch.nn.Parameter(torch.zeros(s)) for s in [(18, 12), (6, 12), (6, 12), (12,)])
    groups = galore_plus_param_groups([("q", q, 3), ("k", k, 1), ("v", v, None)], rank=4, plain=[("n", n)])
    opt = GaLorePlusAdamW(groups)
    by_name = {g["param_names"][0]: g for g in opt.param_groups}
    assert by_name["q"]["num_heads"] == 3 and by_name["q"]["residual_ratio"] == 0.012
    assert by_name["k"]["num_heads"] == 1 and by_name["v"]["num_heads"] is None
    assert by_name["v"]["residual_ratio"] == 0.0 and by_name["v"]["svd"] == "randomized"
    assert "rank" not in by_name["n"]
    assert GaLoreAdamW([{"params": [v], "rank": 2}]).param_groups[0]["svd"] == "exact"


def _g(**kw):
    return [{"params": [torch.nn.Parameter(torch.randn(24, 16))], "rank": 4, **kw}]


@pytest.mark.parametrize("groups,options,error,message", [
    (_g(num_heads=5), {}, ValueError, r"num_heads=5 does not divide the 24 rows"),
    (_g(num_heads=0), {}, ValueError, r"num_heads=0"),
    (_g(svd="fast"), {}, ValueError, r"svd='fast' is not one of"),
    (_g(power_iters=-1), {}, ValueError, r"power_iters=-1"),
    (_g(residual_ratio=1.5), {}, ValueError, r"residual_ratio=1.5"),
    (_g(residual_mode="literal"), {}, ValueError, r"residual_mode='literal'"),
    (_g(residual_warmup=0), {}, ValueError, r"residual_warmup=0"),
    (_g(proj_dtype="int8"), {}, ValueError, r"proj_dtype=.*int8.* must be None or one of"),
    (_g(proj_dtype="half precision"), {}, ValueError, r"proj_dtype='half precision'"),
    (_g(), {"residual": 0.01}, TypeError, r"unknown option\(s\) \['residual'\]"),
    (_g(oversampling=4), {}, TypeError, r"unknown parameter-group key\(s\) \['oversampling'\]"),
])
def test_galore_plus_bad_input(groups, options, error, message):
    with pytest.raises(error, match=message):
        GaLorePlusAdamW(groups, **options)
