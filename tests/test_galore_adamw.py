"""GaLoreAdamW against references: a plain float64 GaLore, galore-torch 1.0, torch.optim.AdamW."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from galore_plus import GaLoreAdamW, projection

SHAPES = [(24, 12), (12, 24), (16, 16)]
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]


def noise_floor(proj_type, dtype):
    """Relative agreement two correct implementations can reach.

    With ``full`` the refresh step's low-rank gradient ``Pᵀ G Q`` is diagonal up to rounding
    (``P``, ``Q`` are ``G``'s own singular vectors), and Adam normalises those rounding-noise
    off-diagonal entries to ±1: any two implementations (or one in float32 and float64) then differ
    at ~1e-4 (float32) / ~1e-9 (float64). Measured: ours float32 vs ours float64 differ by 5e-4.
    """
    if proj_type == "full":
        return 1e-3 if dtype == torch.float32 else 1e-7
    return 1e-5 if dtype == torch.float32 else 1e-10


def make_problem(shape, seed=0, dtype=torch.float32):
    """A weight, a bias and a deterministic stream of regression batches (gradients of full rank)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    weight = torch.nn.Parameter(torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype))
    bias = torch.nn.Parameter(torch.randn(m, generator=gen, dtype=torch.float64).to(dtype))
    target = torch.randn(m, n, generator=gen, dtype=torch.float64)
    batches = [torch.randn(2 * n, n, generator=gen, dtype=torch.float64) for _ in range(40)]

    def set_grads(weight, bias, step):
        x = batches[step % len(batches)].to(weight.dtype)
        out = x @ weight.T + bias
        loss = ((out - x @ target.to(weight.dtype).T) ** 2).mean()
        weight.grad, bias.grad = torch.autograd.grad(loss, [weight, bias])
        return loss

    return weight, bias, set_grads


def clone_params(*params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ---------------------------------------------------------------- float64 reference

def reference_galore(weight, bias, set_grads, steps, rank, update_proj_gap, scale, proj_type, lr, betas, eps,
                     weight_decay,
                     align_to):
    """GaLore + AdamW written out plainly in float64 (DESIGN.md "GaLore": torch.optim.AdamW conventions).

    SVD signs are implementation-defined and GaLore's kept moments depend on them across refreshes,
    so each reference basis is sign-aligned to the optimizer's (``align_to(step)`` gives it).
    """
    W, b = weight.detach().clone().double().requires_grad_(), bias.detach().clone().double().requires_grad_()
    b1, b2 = betas
    M = V = None
    mb, vb = torch.zeros_like(b), torch.zeros_like(b)
    P = Q = None
    for t in range(1, steps + 1):
        set_grads(W, b, t - 1)
        G, gb = W.grad, b.grad
        with torch.no_grad():
            if (t - 1) % update_proj_gap == 0:
                U, _, Vh = torch.linalg.svd(G, full_matrices=False)
                side = projection.projection_side(G.shape, proj_type)
                ref_left, ref_right = align_to(t)
                P = U[:, :rank] if side in (projection.LEFT, projection.FULL) else None
                Q = Vh[:rank].T if side in (projection.RIGHT, projection.FULL) else None
                if P is not None:
                    P = P * torch.sign((P * ref_left).sum(0))
                if Q is not None:
                    Q = Q * torch.sign((Q * ref_right.T).sum(0))
            R = G
            if P is not None:
                R = P.T @ R
            if Q is not None:
                R = R @ Q
            if M is None:
                M, V = torch.zeros_like(R), torch.zeros_like(R)
            M = b1 * M + (1 - b1) * R
            V = b2 * V + (1 - b2) * R * R
            N = (M / (1 - b1**t)) / ((V / (1 - b2**t)).sqrt() + eps)
            if P is not None:
                N = P @ N
            if Q is not None:
                N = N @ Q.T
            W.mul_(1 - lr * weight_decay).sub_(lr * scale * N)
            mb = b1 * mb + (1 - b1) * gb
            vb = b2 * vb + (1 - b2) * gb * gb
            b.mul_(1 - lr * weight_decay).sub_(lr * (mb / (1 - b1**t)) / ((vb / (1 - b2**t)).sqrt() + eps))
    return W.detach(), b.detach()


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, proj_type):
    weight, bias, set_grads = make_problem(shape, dtype=torch.float64)
    kw = dict(rank=3, update_proj_gap=7, scale=0.5, proj_type=proj_type)
    hyper = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    W, b = clone_params(weight, bias)
    opt = GaLoreAdamW([{"params": [W], **kw}, {"params": [b]}], **hyper)
    bases = {}
    for t in range(1, 21):
        set_grads(W, b, t - 1)
        opt.step()
        if (t - 1) % kw["update_proj_gap"] == 0:
            st = opt.state[W]
            bases[t] = (st.get("proj_left"), st.get("proj_right"))
    assert opt.state[W]["refresh_count"] == 3
    ref_W, ref_b = reference_galore(weight, bias, set_grads, 20, align_to=bases.__getitem__, **kw, **hyper)
    tol = noise_floor(proj_type, torch.float64)
    torch.testing.assert_close(W.detach(), ref_W, rtol=tol, atol=tol / 100)
    torch.testing.assert_close(b.detach(), ref_b, rtol=1e-10, atol=1e-12)
    assert W.dtype == torch.float64 and opt.state[W]["exp_avg"].dtype == torch.float64


# ---------------------------------------------------------------- galore-torch parity

@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_galore_torch(shape, proj_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW as TheirGaLoreAdamW
    weight, bias, set_grads = make_problem(shape)
    kw = dict(rank=4, update_proj_gap=10, scale=0.25, proj_type=proj_type)
    ours_W, ours_b = clone_params(weight, bias)
    theirs_W, theirs_b = clone_params(weight, bias)
    ours = GaLoreAdamW([{"params": [ours_W], **kw}, {"params": [ours_b]}], lr=1e-2, eps=1e-10, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TheirGaLoreAdamW([{"params": [theirs_W], **kw}, {"params": [theirs_b]}], lr=1e-2, eps=1e-10,
                                  weight_decay=0.0, no_deprecation_warning=True)
    for t in range(30):  # refreshes at steps 0, 10, 20
        set_grads(ours_W, ours_b, t)
        set_grads(theirs_W, theirs_b, t)
        ours.step()
        theirs.step()
    assert ours.state[ours_W]["refresh_count"] == 3
    moved = (theirs_W.detach() - weight.detach()).norm()
    assert moved > 1e-2  # the parameters really moved, so agreement means something
    rel = ((ours_W - theirs_W).norm() / theirs_W.norm()).item()
    tol = noise_floor(proj_type, torch.float32)
    assert rel < tol, rel
    torch.testing.assert_close(ours_W.detach(), theirs_W.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ours_b.detach(), theirs_b.detach(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- identity projector == AdamW

@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_identity_projector_equals_torch_adamw(monkeypatch, proj_type):
    """Forcing the projector to the identity (full rank) must leave exactly torch.optim.AdamW."""

    def identity_projector(grad, rank, side):
        m, n = grad.shape
        left = torch.eye(m, dtype=grad.dtype) if side in (projection.LEFT, projection.FULL) else None
        right = torch.eye(n, dtype=grad.dtype) if side in (projection.RIGHT, projection.FULL) else None
        return left, right

    monkeypatch.setattr(projection, "svd_projector", identity_projector)
    weight, bias, set_grads = make_problem((16, 16))
    hyper = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ours_W, ours_b = clone_params(weight, bias)
    ref_W, ref_b = clone_params(weight, bias)
    ours = GaLoreAdamW([{"params": [ours_W], "rank": 16, "scale": 1.0, "proj_type": proj_type,
                         "update_proj_gap": 5}, {"params": [ours_b]}], **hyper)
    ref = torch.optim.AdamW([ref_W, ref_b], foreach=False, **hyper)
    for t in range(20):
        set_grads(ours_W, ours_b, t)
        set_grads(ref_W, ref_b, t)
        ours.step()
        ref.step()
    torch.testing.assert_close(ours_W.detach(), ref_W.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_b.detach(), ref_b.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- save, weights_only load, resume

def run_training(weight, bias, set_grads, steps, dtype, split_at=None):
    W, b = clone_params(weight, bias)
    groups = lambda W, b: [{"params": [W], "rank": 4, "update_proj_gap": 6, "proj_type": "std"},
                           {"params": [b]}]
    opt = GaLoreAdamW(groups(W, b), lr=1e-2)
    for t in range(steps):
        if t == split_at:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "W": W.detach(), "b": b.detach()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            W, b = torch.nn.Parameter(ckpt["W"].clone()), torch.nn.Parameter(ckpt["b"].clone())
            opt = GaLoreAdamW(groups(W, b), lr=1e-2)
            opt.load_state_dict(ckpt["opt"])
        set_grads(W, b, t)
        opt.step()
    return W, b, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bitwise(dtype):
    weight, bias, set_grads = make_problem((24, 12), dtype=dtype)
    W1, b1, opt1 = run_training(weight, bias, set_grads, 25, dtype)
    W2, b2, opt2 = run_training(weight, bias, set_grads, 25, dtype, split_at=9)
    assert torch.equal(W1, W2) and torch.equal(b1, b2)
    s1, s2 = opt1.state[W1], opt2.state[W2]
    assert s1.keys() == s2.keys()
    for key in s1:
        if torch.is_tensor(s1[key]):
            assert s1[key].dtype == s2[key].dtype and torch.equal(s1[key], s2[key]), key
        else:
            assert s1[key] == s2[key], key
    assert s2["proj_right"].dtype == torch.float32 and s2["exp_avg"].dtype == torch.float32
    # plain groups' moments are at least float32 (issue 25: bf16 moments stop decaying, fp16 ones lose ε)
    assert opt2.state[b2]["exp_avg"].dtype == torch.float32


def test_bf16_projector_dtype_survives_load_cast():
    """torch's load_state_dict would cast float32 state to the bf16 parameter dtype; ours restores it."""
    W = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [W], "rank": 2}])
    W.grad = torch.randn(16, 8, dtype=torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    fresh = GaLoreAdamW([{"params": [W], "rank": 2}])
    torch.optim.Optimizer.load_state_dict(fresh, sd)
    assert fresh.state[W]["proj_right"].dtype == torch.bfloat16  # the cast we guard against is real
    fresh = GaLoreAdamW([{"params": [W], "rank": 2}])
    fresh.load_state_dict(sd)
    for key in ("proj_right", "exp_avg", "exp_avg_sq"):
        assert fresh.state[W][key].dtype == torch.float32
        assert torch.equal(fresh.state[W][key], sd["state"][0][key])


def test_state_is_tensors_and_numbers_only():
    weight, bias, set_grads = make_problem((12, 24))
    _, _, opt = run_training(weight, bias, set_grads, 3, torch.float32)
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            assert isinstance(value, (torch.Tensor, int, float)), (key, type(value))


# ---------------------------------------------------------------- closure, sparse, non-finite, SVD failure

def test_step_with_closure_reenables_grad():
    weight, bias, set_grads = make_problem((12, 6))
    opt = GaLoreAdamW([{"params": [weight], "rank": 2}, {"params": [bias]}])
    before = weight.detach().clone()

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = (weight.sum() + bias.sum()) ** 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not torch.equal(weight.detach(), before)


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_huge_finite_gradient_whose_sum_overflows_is_not_called_non_finite():
    W = torch.nn.Parameter(torch.zeros(8, 6))
    opt = GaLoreAdamW([{"params": [W], "rank": 2}], lr=1e-3)
    W.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    W.grad[0, 0] = W.grad[1, 1] = 3e38  # finite, but its float32 sum is inf
    assert not torch.isfinite(W.grad.sum())
    opt.step()
    assert torch.isfinite(W).all() and opt.state[W]["step"] == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at_step", [0, 6])
def test_nonfinite_gradient_at_refresh_raises_and_changes_nothing(bad, at_step):
    weight, bias, set_grads = make_problem((24, 12))
    W, b = clone_params(weight, bias)
    opt = GaLoreAdamW([{"params": [b]}, {"params": [W], "rank": 3, "update_proj_gap": 6}], lr=1e-2)
    for t in range(at_step):
        set_grads(W, b, t)
        opt.step()
    set_grads(W, b, at_step)
    W.grad[3, 4] = bad
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    W_before, b_before = W.detach().clone(), b.detach().clone()
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at a projector refresh"):
        opt.step()
    assert torch.equal(W, W_before) and torch.equal(b, b_before)  # b's group comes first: untouched too
    saved.seek(0)
    old = torch.load(saved, weights_only=True)
    new = opt.state_dict()
    assert old["state"].keys() == new["state"].keys()
    for i in old["state"]:
        for key, value in old["state"][i].items():
            assert (torch.equal(value, new["state"][i][key]) if torch.is_tensor(value)
                    else value == new["state"][i][key])
    set_grads(W, b, at_step)  # the caller skips the batch and goes on
    opt.step()
    assert torch.isfinite(W).all()


def test_svd_failure_falls_back_and_training_goes_on(monkeypatch):
    weight, bias, set_grads = make_problem((24, 12))
    real_svd = torch.linalg.svd
    failing = {"on": True}

    def svd(A, *args, **kwargs):
        if failing["on"]:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    W, b = clone_params(weight, bias)
    opt = GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 4}, {"params": [b]}], lr=1e-2, seed=7)
    set_grads(W, b, 0)
    with pytest.warns(RuntimeWarning, match="random orthonormal"):
        opt.step()
    Q = opt.state[W]["proj_right"]
    torch.testing.assert_close(Q @ Q.T, torch.eye(3), atol=1e-5, rtol=0)  # a real orthonormal basis
    failing["on"] = False
    for t in range(1, 4):
        set_grads(W, b, t)
        opt.step()
    failing["on"] = True
    set_grads(W, b, 4)
    with pytest.warns(RuntimeWarning, match="keeping the previous projector"):
        opt.step()  # the refresh at step 4 fails: the old basis is kept
    assert torch.equal(opt.state[W]["proj_right"], Q)
    assert torch.isfinite(W).all()

    # the fallback basis is seeded: the same seed gives the same one, another seed another one
    def first_basis(seed):
        W2, b2 = clone_params(weight, bias)
        o = GaLoreAdamW([{"params": [W2], "rank": 3}], seed=seed)
        set_grads(W2, b2, 0)
        with pytest.warns(RuntimeWarning):
            o.step()
        return o.state[W2]["proj_right"]

    assert torch.equal(first_basis(7), Q) and not torch.equal(first_basis(8), Q)


def test_float32_svd_failure_retries_in_float64(monkeypatch):
    real_svd = torch.linalg.svd

    def svd(A, *args, **kwargs):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_svd(A, *args, **kwargs)

    G = torch.randn(20, 10)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    with pytest.warns(RuntimeWarning, match="retrying"):
        left, right = projection.svd_projector(G, 4, projection.RIGHT)
    assert left is None and right.dtype == torch.float32
    expected = real_svd(G.double(), full_matrices=False)[2][:4]
    torch.testing.assert_close(right.double().abs(), expected.abs(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input

def _groups(**low_rank):
    W = torch.nn.Parameter(torch.randn(8, 6))
    return [{"params": [W], **low_rank}]


BAD_INPUTS = [
    (dict(groups=_groups(rnak=4)), TypeError, r"unknown parameter-group key\(s\) \['rnak'\]"),
    (dict(groups=_groups(rank=0)), ValueError, r"rank=0 must be an int ≥ 1"),
    (dict(groups=_groups(rank=2.5)), ValueError, r"rank=2.5"),
    (dict(groups=_groups(rank=7)), ValueError, r"rank=7 is larger than parameter #0 \(shape \(8, 6\)\) allows \(at most min\(m, n\) = 6\)"),
    (dict(groups=[{"params": [torch.nn.Parameter(torch.randn(8))], "rank": 2}]), ValueError, r"shape \(8,\); a low-rank group takes 2-D"),
    (dict(groups=_groups(rank=2, update_proj_gap=0)), ValueError, r"update_proj_gap=0"),
    (dict(groups=_groups(rank=2, proj_type="diag")), ValueError, r"proj_type='diag' is not one of"),
    (dict(groups=_groups(rank=2, scale=0.0)), ValueError, r"scale=0.0"),
    (dict(groups=_groups(), lr=-1.0), ValueError, r"lr=-1.0"),
    (dict(groups=_groups(), betas=(1.0, 0.999)), ValueError, r"betas=\(1.0, 0.999\)"),
    (dict(groups=_groups(), betas=(0.9,)), ValueError, r"betas=\(0.9,\)"),
    (dict(groups=_groups(), eps=-1e-8), ValueError, r"eps=-1e-08"),
    (dict(groups=_groups(), weight_decay=-0.1), ValueError, r"weight_decay=-0.1"),
    (dict(groups=_groups(lr=float("nan"))), ValueError, r"lr=nan"),
    (dict(groups=_groups(), seed="0"), ValueError, r"seed='0'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_refused_with_a_named_error(kwargs, error, message):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        GaLoreAdamW(kwargs.pop("groups"), **kwargs)


def test_add_param_group_validates_too():
    opt = GaLoreAdamW(_groups(rank=2))
    with pytest.raises(TypeError, match="update_proj_gaps"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 2, "update_proj_gaps": 5})
    with pytest.raises(ValueError, match="rank=9 is larger"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 9})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 4})
    assert opt.param_groups[-1]["update_proj_gap"] == 200


def test_defaults_fill_low_rank_groups_only():
    W, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    opt = GaLoreAdamW([{"params": [W], "rank": 2}, {"params": [b]}], update_proj_gap=50)
    assert opt.param_groups[0]["update_proj_gap"] == 50 and opt.param_groups[0]["scale"] == 0.25
    assert "update_proj_gap" not in opt.param_groups[1] and "rank" not in opt.param_groups[1]


def test_named_parameters_appear_in_errors():
    model = torch.nn.Linear(6, 4)
    opt = GaLoreAdamW([{"params": [model.weight], "param_names": ["layer.weight"], "rank": 2}])
    model.weight.grad = torch.full_like(model.weight, math.inf)
    with pytest.raises(FloatingPointError, match="'layer.weight'"):
        opt.step()
