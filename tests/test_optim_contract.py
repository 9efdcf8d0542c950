"""The torch.optim contract: what users of torch's own optimizers rely on, checked on ours.

Copies (deepcopy, pickle, ``torch.save`` of the optimizer object), ``load_state_dict`` across dtypes
and from another optimizer, atomic ``add_param_group``, and checkpoints written before the core
redesign (the state layout did not change).
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

from galore_plus import GaLoreAdamW8bit, GaLorePlusAdamW, galore_plus_param_groups

DATA = Path(__file__).parent / "data"


def _old_layout_model():
    g = torch.Generator().manual_seed(0)
    return {"q": torch.nn.Parameter(torch.randn(32, 16, generator=g)),
            "up": torch.nn.Parameter(torch.randn(48, 16, generator=g)),
            "down": torch.nn.Parameter(torch.randn(16, 48, generator=g)),
            "b": torch.nn.Parameter(torch.randn(16, generator=g))}


def _old_layout_optimizer(ps, cls):
    groups = galore_plus_param_groups([("q", ps["q"], 4), ("up", ps["up"], None), ("down", ps["down"], None)],
                                      rank=4, residual_ratio=0.05, residual_warmup=2, update_proj_gap=3,
                                      plain=[("b", ps["b"])])
    return cls(groups, lr=1e-2, seed=1) if cls is GaLorePlusAdamW else cls(groups, lr=1e-2, seed=1, svd="randomized")


def _grads(ps, t):
    g = torch.Generator().manual_seed(100 + t)
    for p in ps.values():
        p.grad = torch.randn(p.shape, generator=g)


def test_checkpoint_written_before_the_redesign_resumes():
    """``tests/data/optimizer_state_237edf4.pt`` was written by galore-plus at 237edf4 (before the
    core redesign): 5 steps of GaLore+ (cross-head, residual, randomized SVD) and of its 8-bit
    variant, the state dict, and the parameters 4 steps later. Loading it here and taking the same
    4 steps gives those parameters (two projector refreshes included) to float32 rounding: the
    update is now added in one ``addmm_``, which rounds differently from the old ``P N`` then add."""
    saved = torch.load(DATA / "optimizer_state_237edf4.pt", weights_only=True)
    for name, cls in (("adamw", GaLorePlusAdamW), ("8bit", GaLoreAdamW8bit)):
        ps = {k: torch.nn.Parameter(v.clone()) for k, v in saved[name]["params"].items()}
        opt = _old_layout_optimizer(ps, cls)
        opt.load_state_dict(saved[name]["optimizer"])
        for t in range(5, 9):
            _grads(ps, t)
            opt.step()
        for k, p in ps.items():
            torch.testing.assert_close(p.detach(), saved[name]["after"][k], rtol=1e-5, atol=1e-6, msg=(name, k))


# ---------------------------------------------------------------- a small problem for every optimizer

KINDS = ["adamw", "galore+", "8bit", "adafactor"]


def _params(dtype=torch.float32, seed=0):
    """A 96×64 matrix (low-rank moments 96×8 = 768 elements), a 4096-element plain matrix (8-bit:
    quantized moments) and a bias."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))
            for shape in ((96, 64), (64, 64), (64,))]


def _optimizer(kind, params, **extra):
    from galore_plus import GaLoreAdafactor, GaLoreAdamW

    w, e, b = params
    if kind == "galore+":
        groups = galore_plus_param_groups([("w", w, 8)], rank=8, residual_ratio=0.05, residual_warmup=2,
                                          update_proj_gap=3, plain=[("e", e), ("b", b)])
        return GaLorePlusAdamW(groups, lr=1e-2, **extra)
    groups = [{"params": [w], "rank": 8, "update_proj_gap": 3}, {"params": [e, b]}]
    if kind == "adafactor":
        return GaLoreAdafactor(groups, lr=1e-2, relative_step=False, **extra)
    return (GaLoreAdamW8bit if kind == "8bit" else GaLoreAdamW)(groups, lr=1e-2, **extra)


def _step(opt, params, t):
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
    opt.step()


# ---------------------------------------------------------------- copies

@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_continues_exactly_as_the_original(kind, how):
    """torch copies only defaults, state and param_groups; the copy must step through refreshes (it
    failed with AttributeError: '_param_index') and stay bitwise equal to the original."""
    params = _params()
    opt = _optimizer(kind, params)
    for t in range(4):
        _step(opt, params, t)
    bundle = (params, opt)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy(bundle)
    elif how == "pickle":
        params2, opt2 = pickle.loads(pickle.dumps(bundle))
    else:
        buf = io.BytesIO()
        torch.save(bundle, buf)
        buf.seek(0)
        params2, opt2 = torch.load(buf, weights_only=False)
    assert type(opt2) is type(opt) and opt2.rule.name == opt.rule.name
    for t in range(4, 11):  # refreshes at steps 7 and 10
        _step(opt, params, t)
        _step(opt2, params2, t)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert opt2.state[params2[0]]["refresh_count"] == opt.state[params[0]]["refresh_count"] == 4


# ---------------------------------------------------------------- load_state_dict across dtypes

DTYPE_PAIRS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float64),
               (torch.float64, torch.float32)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("src,dst", DTYPE_PAIRS)
def test_state_loads_into_the_same_model_in_another_dtype(kind, src, dst):
    """A checkpoint of one dtype loads into the model in another and training goes on, with every
    state tensor in the dtype a fresh run in the new dtype keeps it in (as torch.optim.AdamW does)."""
    params = _params(src)
    opt = _optimizer(kind, params)
    for t in range(4):
        _step(opt, params, t)
    saved = opt.state_dict()
    moved = [torch.nn.Parameter(p.detach().to(dst)) for p in params]
    loaded = _optimizer(kind, moved)
    loaded.load_state_dict(saved)
    fresh_params = _params(dst)
    fresh = _optimizer(kind, fresh_params)
    for t in range(4):
        _step(fresh, fresh_params, t)
    for p, q in zip(moved, fresh_params):
        want = {k: v.dtype for k, v in fresh.state[q].items() if torch.is_tensor(v)}
        got = {k: v.dtype for k, v in loaded.state[p].items() if torch.is_tensor(v)}
        assert got == want
    for t in range(4, 8):  # through a refresh (step 7)
        _step(loaded, moved, t)
    assert all(torch.isfinite(p).all() for p in moved)
    # the float32 projector of a bf16 model was not rounded on the way in
    if src == torch.float32 and dst == torch.bfloat16:
        reloaded = _optimizer(kind, [torch.nn.Parameter(p.detach().to(dst)) for p in params])
        reloaded.load_state_dict(saved)
        key = "proj_right" if "proj_right" in saved["state"][0] else "proj_left"
        assert torch.equal(reloaded.state[reloaded.param_groups[0]["params"][0]][key], saved["state"][0][key])


# ---------------------------------------------------------------- add_param_group

def test_a_rejected_group_leaves_the_optimizer_untouched():
    from galore_plus import GaLoreAdamW

    w, e, b = _params()
    opt = GaLoreAdamW([{"params": [w], "rank": 8}], lr=1e-2)
    with pytest.raises(ValueError, match="rank=100 is larger than"):
        opt.add_param_group({"params": [e], "rank": 100})
    with pytest.raises(TypeError, match="unknown parameter-group key"):
        opt.add_param_group({"params": [e], "rnak": 4})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [e], "rank": 4})  # the corrected group: no "appear in more than one group"
    opt.add_param_group({"params": [b]})
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        for p in (w, e, b):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1] and opt.state[e]["step"] == 3


@pytest.mark.parametrize("low_rank", [True, False])
def test_complex_parameters_are_refused_by_name(low_rank):
    from galore_plus import GaLoreAdamW

    z = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    group = {"params": [z], "param_names": ["rotary"], **({"rank": 2} if low_rank else {})}
    with pytest.raises(ValueError, match="parameter 'rotary' is complex"):
        GaLoreAdamW([group])


# ---------------------------------------------------------------- rank above the gradient's rank

@pytest.mark.parametrize("shape", [(16, 32), (32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_update_stays_in_the_range_of_a_gradient_of_lower_rank(shape, dtype):
    """A rank-1 gradient ``u vᵀ`` with rank 2: the second singular vector carries round-off only, which
    Adam normalised into a full-size step (70% of the float32 update outside the gradient's range).
    On the projected side the update must lie in the gradient's space (``u`` for a left projection,
    ``v`` for a right one; the other side is Adam's elementwise normalisation), in float32 as in
    float64."""
    from galore_plus import GaLoreAdamW

    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(shape[0], generator=g, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(shape[1], generator=g, dtype=torch.float64), dim=0)
    W = torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))
    W0 = W.detach().clone().double()
    opt = GaLoreAdamW([{"params": [W], "rank": 2, "scale": 1.0, "update_proj_gap": 4}], lr=1e-2, weight_decay=0.0)
    for t in range(6):  # a refresh at steps 1 and 5; the gradient's scale changes, its range does not
        W.grad = ((1.0 + t) * torch.outer(u, v)).to(dtype)
        opt.step()
    delta = W.detach().double() - W0
    state = opt.state[W]
    outside = delta - torch.outer(u, u @ delta) if "proj_left" in state else delta - torch.outer(delta @ v, v)
    assert outside.norm() / delta.norm() < 1e-3, outside.norm() / delta.norm()
    basis = state.get("proj_left", state.get("proj_right"))
    assert (basis.norm(dim=0 if "proj_left" in state else 1) == 0).sum() == 1  # one direction zeroed


def test_a_full_rank_gradient_keeps_every_direction():
    from galore_plus import GaLoreAdamW

    W = _params()[0]
    opt = GaLoreAdamW([{"params": [W], "rank": 8}], lr=1e-2)
    W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert (opt.state[W]["proj_right"].norm(dim=1) > 0.99).all()


# ---------------------------------------------------------------- refused loads

def _trained(kind, steps=4):
    params = _params()
    opt = _optimizer(kind, params)
    for t in range(steps):
        _step(opt, params, t)
    return params, opt


@pytest.mark.parametrize("source,target,message", [
    ("8bit", "adamw", "8-bit AdamW rule"),
    ("adamw", "8bit", "AdamW rule"),
    ("adamw", "adafactor", "AdamW rule"),
    ("adafactor", "adamw", "Adafactor rule"),
])
def test_state_of_another_rule_is_refused(source, target, message):
    _, src = _trained(source)
    params, opt = _trained(target)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(src.state_dict())
    assert _same_state(opt.state_dict(), before)


def test_torch_adamw_state_is_refused():
    params, opt = _trained("adamw")
    ref = torch.optim.AdamW([{"params": [params[0]]}, {"params": params[1:]}], lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    ref.step()
    with pytest.raises(ValueError, match="keys .*amsgrad.* written by another optimizer"):
        opt.load_state_dict(ref.state_dict())


def test_old_state_without_the_marker_is_checked_by_its_shape():
    """A state dict of the 8-bit rule with its marker removed (as older checkpoints lack it) is still
    refused by a 32-bit optimizer: its quantized keys do not fit the AdamW rule."""
    _, src = _trained("8bit")
    saved = src.state_dict()
    del saved["galore_plus"]
    _, opt = _trained("adamw")
    with pytest.raises(ValueError, match="is not what the AdamW rule keeps"):
        opt.load_state_dict(saved)


def test_other_groups_or_ranks_are_refused():
    from galore_plus import GaLoreAdamW

    params, src = _trained("adamw")
    saved = src.state_dict()
    other_rank = GaLoreAdamW([{"params": [params[0]], "rank": 4}, {"params": params[1:]}], lr=1e-2)
    with pytest.raises(ValueError, match="saved rank 8, here 4"):
        other_rank.load_state_dict(saved)
    all_plain = GaLoreAdamW([{"params": [params[0]]}, {"params": params[1:]}], lr=1e-2)
    with pytest.raises(ValueError, match=r"saved rank 8, here None \(None: a plain group\)"):
        all_plain.load_state_dict(saved)
    with pytest.raises(ValueError, match="has 2 parameter groups"):
        GaLoreAdamW([{"params": params}], lr=1e-2).load_state_dict(saved)


def _same_state(a, b):
    if a.keys() != b.keys():
        return False
    for k in a["state"]:
        for key, v in a["state"][k].items():
            w = b["state"][k][key]
            if not (torch.equal(v, w) if torch.is_tensor(v) else v == w):
                return False
    return a["param_groups"] == b["param_groups"]


# ---------------------------------------------------------------- 8-bit and non-finite gradients

def test_8bit_contains_one_inf_to_one_element_like_adamw():
    """One Inf in a 4096-element plain tensor: AdamW makes one parameter element non-finite; so must
    the 8-bit optimizer, at that step and the next (the block's absmax must stay finite)."""
    from galore_plus import GaLoreAdamW

    counts = {}
    for cls in (GaLoreAdamW, GaLoreAdamW8bit):
        e = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        opt = cls([e], lr=1e-2)
        grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
        grad[3, 5] = float("inf")
        e.grad = grad
        opt.step()
        first = int((~torch.isfinite(e)).sum())
        e.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
        opt.step()
        counts[cls.__name__] = (first, int((~torch.isfinite(e)).sum()))
    assert counts == {"GaLoreAdamW": (1, 1), "GaLoreAdamW8bit": (1, 1)}


# ---------------------------------------------------------------- Adafactor

def test_adafactor_keeps_float64_statistics_for_float64_parameters():
    params = _params(torch.float64)
    opt = _optimizer("adafactor", params)
    for t in range(2):
        _step(opt, params, t)
    for p in params:
        assert all(v.dtype == torch.float64 for v in opt.state[p].values() if torch.is_tensor(v))


def test_relative_step_adafactor_under_a_scheduler_is_a_clear_error():
    from galore_plus import GaLoreAdafactor

    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdafactor([w])  # relative_step=True, lr=None
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    w.grad = torch.randn(8, 8)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="relative_step=True computes its own step size .* LR scheduler"):
        opt.step()
    assert torch.equal(w, before) and not opt.state


def test_a_scheduler_writing_a_non_finite_lr_fails_before_any_change():
    from galore_plus import GaLoreAdamW

    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    opt.param_groups[0]["lr"] = float("inf")
    w.grad = torch.randn(8, 8)
    with pytest.raises(ValueError, match="invalid learning rate lr=inf"):
        opt.step()
    assert not opt.state
