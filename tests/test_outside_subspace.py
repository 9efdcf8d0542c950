"""Issue 29, mechanism 4: the gradient outside the subspace, added as Fira does (``LowRankSpec.outside
= "fira"``; ``outside.py``; DESIGN.md, "Outside the subspace").

A float64 reference step written plainly (and a second one where the norm-growth limiter acts), parity
with the fira package itself, the term's ψ taken from each inner rule's own step (AdamW, 8-bit AdamW,
Adafactor), the sparse residual's entries left to the residual, the projected backward equal to the
full path at refresh steps and to the plain projected backward between them, bitwise resume across a
refresh (``step()`` and layer-wise mid-step), DDP and FSDP2 on two ranks against one process, and the
errors. With the option off the term's code is never reached and no state is added.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from _tiny_llama import batches, tiny
from _ranks import full_params, run_ranks

from galore_plus import GaLoreAdafactor, GaLoreAdamW, LowRankSpec, build_optimizer, outside
from galore_plus.memory import estimate_state_bytes, state_bytes

LR, ALPHA, WD, GAP = 1e-2, 2.0, 0.1, 3
BETAS, EPS = (0.9, 0.999), 1e-8


# ---------------------------------------------------------------------- the formula, written plainly


def svd_basis(g, r, left):
    """The exact projector as GaLore (and the engine) computes it: U[:, :r] or Vh[:r]."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :r] if left else vh[:r]


def fira_s(g, basis, psi, left):
    """S = φ ⊙ (G − P PᵀG), φ per column (left) or per row (right), before the limiter."""
    if left:
        low = basis.T @ g
        residual = g - basis @ low
        phi = torch.stack([psi[:, j].norm() / low[:, j].norm() for j in range(g.shape[1])])
        return residual * phi[None, :]
    low = g @ basis.T
    residual = g - low @ basis
    phi = torch.stack([psi[i, :].norm() / low[i, :].norm() for i in range(g.shape[0])])
    return residual * phi[:, None]


@pytest.mark.parametrize("shape", [(10, 24), (24, 10)], ids=["left", "right"])
def test_two_steps_equal_the_formula_written_plainly_float64(shape):
    """Step 1: W ← W(1 − lr·λ) − α·lr·(P ψ + S). Step 2 adds energy outside the subspace, so ‖S₂‖ > γ‖S₁‖
    and the limiter scales S₂ to γ‖S₁‖."""
    left = shape[0] < shape[1]
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    g1 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    r = 3
    basis = svd_basis(g1, r, left)
    away = torch.randn(*shape, generator=gen, dtype=torch.float64)  # its part outside the subspace
    away = away - (basis @ (basis.T @ away) if left else (away @ basis.T) @ basis)
    g2 = g1 + 4 * away

    w = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([{"params": [w], "rank": r, "outside": "fira"}], lr=LR, weight_decay=WD, scale=ALPHA,
                      update_proj_gap=10)
    m = v = 0
    expected = w0.clone()
    previous = None
    for t, g in enumerate((g1, g2), start=1):
        w.grad = g.clone()
        opt.step()
        low = basis.T @ g if left else g @ basis.T
        m = BETAS[0] * m + (1 - BETAS[0]) * low
        v = BETAS[1] * v + (1 - BETAS[1]) * low**2
        psi = (m / (1 - BETAS[0]**t)) / ((v / (1 - BETAS[1]**t)).sqrt() + EPS)
        s = fira_s(g, basis, psi, left)
        if previous is not None:
            assert s.norm() > 1.01 * previous  # the limiter acts at step 2 (else this test shows nothing)
            s = s * (1.01 * previous / s.norm())
        previous = s.norm()
        back = basis @ psi if left else psi @ basis
        expected = expected * (1 - LR * WD) - ALPHA * LR * (back + s)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12, msg=f"step {t}")
        torch.testing.assert_close(opt.state[w]["outside_norm"], previous, rtol=1e-12, atol=0)


def test_off_never_reaches_the_term_and_adds_no_state(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Fira term was computed with outside='off'")

    monkeypatch.setattr(outside.FiraTerm, "term", fail)
    w = torch.nn.Parameter(torch.randn(10, 24, dtype=torch.float64))
    opt = GaLoreAdamW([{"params": [w], "rank": 3}], lr=LR)
    assert opt.param_groups[0]["outside"] == "off" and opt.param_groups[0]["outside_limiter"] == 1.01
    for _ in range(4):
        w.grad = torch.randn(10, 24, dtype=torch.float64)
        opt.step()
    assert "outside_norm" not in opt.state[w]
    assert opt.project(w, w.grad).full is None


# ---------------------------------------------------------------------- the fira package itself


def structured_gradients(shape, steps, r, growth, scale, seed=0):
    """``G_t = scale · U C_t Vᵀ + growth^t · (I − UUᵀ) E_t (I − VVᵀ)``: a rank-r signal larger than the
    rest, whose row and column spaces the rest avoids, so the exact top-r projector spans U (left) or V
    (right) exactly and ``G − P PᵀG`` is the second term, its size scaled by ``growth`` each step."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    away_u, away_v = torch.eye(m, dtype=torch.float64) - u @ u.T, torch.eye(n, dtype=torch.float64) - v @ v.T
    out = []
    for t in range(steps):
        c = torch.diag(torch.linspace(3, 1, r, dtype=torch.float64)) + 0.3 * torch.randn(r, r, generator=gen,
                                                                                         dtype=torch.float64)
        e = torch.randn(m, n, generator=gen, dtype=torch.float64)
        out.append(scale * u @ c @ v.T + growth**t * away_u @ e @ away_v)
    return out


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)], ids=["left", "right"])
@pytest.mark.parametrize("betas,growth,limited", [((0.9, 0.999), 0.3, False), ((0.0, 0.0), 1.5, True)],
                         ids=["adam-limiter-idle", "no-bias-correction-limiter-acting"])
def test_parity_with_the_fira_package(monkeypatch, shape, betas, growth, limited):
    """α = 1, ε = 0, no weight decay (the package decays after the step), and the package's projector
    computed by the same float64 SVD (it would take a float32 one of a float64 gradient). The
    package's limiter measures S before Adam's bias correction, ours after (the paper's ψ); with
    β = (0, 0) there is no bias correction and the limiter acts in both (the part outside grows 1.5× a
    step), with Adam's betas that part shrinks so that it acts in neither (asserted: each case is what
    it says)."""
    fira = pytest.importorskip("fira")
    from fira.gradient_projection import GradientProjector

    def float64_svd(self, weights, rank, type):
        return svd_basis(weights, rank, type == "left")

    monkeypatch.setattr(GradientProjector, "get_orthogonal_matrix", float64_svd)
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    theirs = fira.FiraAdamW([{"params": [a], "rank": 4, "update_proj_gap": GAP, "alpha": 1.0, "proj_type": "std"}],
                            lr=LR, betas=betas, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)
    ours = GaLoreAdamW([{"params": [b], "rank": 4, "outside": "fira"}], lr=LR, betas=betas, eps=0.0, weight_decay=0.0,
                       update_proj_gap=GAP, scale=1.0)
    acted = []
    for g in structured_gradients(shape, 7, 4, growth, scale=1000.0):  # refreshes at steps 1, 4, 7
        before = ours.state[b].get("outside_norm")
        a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        if before is not None:
            acted.append(bool(torch.isclose(ours.state[b]["outside_norm"], 1.01 * before, rtol=1e-9)))
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-9)
    assert sum(acted) >= 5 if limited else not any(acted)  # of the 6 steps with a previous norm
    assert not torch.allclose(b.detach(), w0, atol=1e-3)


# ---------------------------------------------------------------------- every inner rule, the residual


def one_matrix_run(optimizer_cls, grads, **options):
    """Parameters after each step of one 16×1024 matrix (left projection, rank 8: an 8×1024 projected
    gradient, large enough for 8-bit moments) fed the given gradients; and the projector."""
    w = torch.nn.Parameter(torch.zeros(16, 1024))
    opt = optimizer_cls([{"params": [w], "rank": 8}], update_proj_gap=10, scale=ALPHA, **options)
    out = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().clone())
    return out, opt.projector(w)[0], opt.state[w]


def rule_optimizer(rule):
    if rule == "adamw8bit":
        pytest.importorskip("bitsandbytes")
        from galore_plus import GaLoreAdamW8bit

        return GaLoreAdamW8bit, {"lr": LR, "weight_decay": 0.0}
    if rule == "adafactor":  # a fixed lr, not scaled by the weight's RMS (which differs between the runs)
        return GaLoreAdafactor, {"lr": LR, "relative_step": False, "scale_parameter": False}
    return GaLoreAdamW, {"lr": LR, "weight_decay": 0.0}


@pytest.mark.parametrize("rule", ["adamw", "adamw8bit", "adafactor"])
def test_each_rule_gets_the_term_from_its_own_step(rule):
    """The low-rank part does not depend on the weight, so with the same gradients the runs with and
    without the term differ by exactly −α·lr·S, S built from the rule's own ψ: read off the run
    without it, ψ = −Pᵀ ΔW / (α·lr). Two steps, the part outside shrinking (the limiter idle, asserted)."""
    cls, options = rule_optimizer(rule)
    grads = [g.float() for g in structured_gradients((16, 1024), 2, 8, 0.3, scale=100.0, seed=2)]
    off, basis, _ = one_matrix_run(cls, grads, **options)
    on, _, state = one_matrix_run(cls, grads, outside="fira", **options)
    previous_off = previous_on = torch.zeros(16, 1024)
    norms = []
    for g, w_off, w_on in zip(grads, off, on):
        psi = -basis.T @ (w_off - previous_off) / (ALPHA * LR)
        s = fira_s(g, basis, psi, left=True)
        norms.append(s.norm())
        difference = (w_on - previous_on) - (w_off - previous_off)
        torch.testing.assert_close(difference, -ALPHA * LR * s, rtol=1e-3, atol=1e-7)
        previous_off, previous_on = w_off, w_on
    assert norms[1] < 1.01 * norms[0]
    torch.testing.assert_close(state["outside_norm"], norms[1], rtol=1e-4, atol=0)


def test_the_sparse_residual_keeps_its_entries():
    """At the residual's entries the update is already exact Adam's: Fira's term is 0 there (else the
    part of G outside the subspace would be counted twice), and present everywhere else."""
    grads = structured_gradients((16, 64), 4, 2, 1.0, scale=100.0, seed=3)

    def run(mode):
        w = torch.nn.Parameter(torch.zeros(16, 64, dtype=torch.float64))
        opt = GaLoreAdamW([{"params": [w], "rank": 2, "residual_ratio": 0.1, "residual_warmup": 2,
                            "outside": mode}], lr=LR, weight_decay=0.0, update_proj_gap=10)
        steps = []
        for g in grads:
            before = w.detach().clone()
            w.grad = g.clone()
            opt.step()
            steps.append(w.detach() - before)
        return steps, opt.residual_index(w).long()

    off, index = run("off")
    on, index_on = run("fira")
    assert torch.equal(index, index_on)
    for t in (2, 3):  # steps 3 and 4 use the index set fixed at the end of step 2
        torch.testing.assert_close(on[t].view(-1)[index], off[t].view(-1)[index], rtol=0, atol=1e-15)
        elsewhere = torch.ones(16 * 64, dtype=torch.bool)
        elsewhere[index] = False
        assert ((on[t] - off[t]).view(-1)[elsewhere].abs() > 1e-8).float().mean() > 0.9
    assert (on[1] - off[1]).abs().min() > 0  # before the set is fixed the term covers every entry


def test_bf16_weights_get_the_term_in_their_one_rounding():
    """A bf16 weight is written once (round to nearest here): the float32 update with the term, rounded."""
    grads = [g.float() for g in structured_gradients((16, 64), 1, 2, 1.0, scale=10.0, seed=4)]

    def run(dtype, mode):
        w = torch.nn.Parameter(torch.randn(16, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
                               .to(dtype))
        opt = GaLoreAdamW([{"params": [w], "rank": 2, "outside": mode}], lr=LR, weight_decay=WD, scale=ALPHA,
                          stochastic_rounding=False)
        for g in grads:
            w.grad = g.to(torch.bfloat16).to(dtype)
            opt.step()
        return w.detach().float()

    bf16, f32, off = run(torch.bfloat16, "fira"), run(torch.float32, "fira"), run(torch.bfloat16, "off")
    torch.testing.assert_close(bf16, f32.to(torch.bfloat16).float(), rtol=2**-7, atol=0)  # at most 1 ulp
    assert (bf16 == f32.to(torch.bfloat16).float()).float().mean() > 0.95
    assert (bf16 - off).abs().max() > 10 * (bf16 - f32).abs().max()


def test_the_cost_benchmark_runs(monkeypatch, capsys):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import outside_cost

    monkeypatch.setattr(sys, "argv", ["outside_cost.py", "--shape", "32", "48", "--rank", "4", "--rounds", "2",
                                      "--number", "2"])
    outside_cost.main()
    assert "ratio fira / off" in capsys.readouterr().out


# ---------------------------------------------------------------------- the projected backward, resume



def spec(mode="fira", **options):
    return LowRankSpec.recipe("galore+", 8, update_proj_gap=GAP, residual_warmup=2, scale=ALPHA, outside=mode,
                              **options)


def copied(model, opt, projected, dtype=torch.float64, mode="fira"):
    """A new model and optimizer loaded from ``model``/``opt`` (through bytes: no tensor shared)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    new = tiny(dtype)
    new.load_state_dict(saved["model"])
    new_opt = build_optimizer(new, spec(mode), lr=LR, projected_backward=projected)
    new_opt.load_state_dict(saved["opt"])
    for group in new_opt.param_groups:  # the loaded groups are the saved ones
        if "rank" in group:
            group["outside"] = mode
    return new, new_opt


def step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def max_difference(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_projected_backward_has_the_term_at_refresh_steps_only():
    """From the same state, one step of the projected backward with the term equals the full path's at
    a refresh step (both form G) and the projected backward's without the term between refreshes (G is
    never formed there). Each comparison is paired with the one it must not equal."""
    model = tiny()
    opt = build_optimizer(model, spec(), lr=LR, projected_backward=True)
    for k, ids in enumerate(batches(7), start=1):  # refreshes at steps 1, 4, 7; the residual from step 3
        full, full_opt = copied(model, opt, projected=False)
        plain, plain_opt = copied(model, opt, projected=True, mode="off")
        for m, o in ((model, opt), (full, full_opt), (plain, plain_opt)):
            step(m, o, ids)
        same, other = (full, plain) if k % GAP == 1 else (plain, full)
        assert max_difference(model, same) < 1e-9, k
        assert max_difference(model, other) > 1e-6, k


def test_resume_across_a_refresh_is_bitwise():
    data = batches(6)

    def run(split=None):
        model = tiny(torch.float32)
        opt = build_optimizer(model, spec(), lr=LR)
        for k, ids in enumerate(data):
            if k == split:  # save at step 3, before the refresh of step 4
                model, opt = copied(model, opt, projected=False, dtype=torch.float32)
            step(model, opt, ids)
        return model, opt

    (a, opt_a), (b, _) = run(), run(split=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    norms = [s["outside_norm"] for s in opt_a.state.values() if "outside_norm" in s]
    assert len(norms) == 14 and all(n.dtype == torch.float32 and n.dim() == 0 for n in norms)
    assert state_bytes(opt_a) == estimate_state_bytes(opt_a)


def test_layerwise_resume_in_the_middle_of_a_step_keeps_the_gradient():
    """With accumulation, the layer-wise accumulator holds the step's G for the term; a checkpoint
    between micro-batches carries it (``full_accumulators``)."""
    data = batches(8)

    def run(split=None):
        model = tiny()
        opt = build_optimizer(model, spec(), lr=LR, layerwise=True, accumulation_steps=2)
        for k, ids in enumerate(data):
            if k == split:  # after the first micro-batch of step 3
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                assert saved["opt"]["full_accumulators"]
                opt.remove()
                model = tiny()
                model.load_state_dict(saved["model"])
                opt = build_optimizer(model, spec(), lr=LR, layerwise=True, accumulation_steps=2)
                opt.load_state_dict(saved["opt"])
            model(input_ids=ids, labels=ids).loss.backward()
            if k % 2:
                opt.step()
        return model

    a, b = run(), run(split=5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------- DDP and FSDP2, two ranks

WORLD, STEPS, DIST_GAP = 2, 8, 3


class Tiny(torch.nn.Module):
    """``up`` (48×16: right projection, row shards local) and ``down`` (16×48: left, R all-reduced)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.up = torch.nn.Linear(16, 48)
        self.down = torch.nn.Linear(48, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def dist_data(k, rank):
    gen = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(16, 16, generator=gen, dtype=torch.float64), torch.randn(16, 16, generator=gen,
                                                                                dtype=torch.float64)
    return (x, y) if rank is None else (x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])


def dist_run(kind, rank, steps, model=None, opt=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if model is None:
        torch.manual_seed(0)
        model = Tiny().double()
        if kind == "fsdp":
            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        elif kind == "ddp":
            model = DistributedDataParallel(model)
        named = {n.removeprefix("module."): p for n, p in model.named_parameters()}
        matrices = [named["up.weight"], named["down.weight"]]
        others = [p for n, p in named.items() if n not in ("up.weight", "down.weight")]
        opt = GaLoreAdamW([{"params": matrices, "rank": 4, "outside": "fira", "residual_ratio": 0.05,
                            "residual_warmup": 2}, {"params": others}], lr=LR, update_proj_gap=DIST_GAP, scale=1.0)
    for k in steps:
        x, y = dist_data(k, None if kind == "single" else rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _dist_scenarios(rank, out_dir):
    from galore_plus.distributed import load_checkpoint, save_checkpoint

    results = {}
    results["single"] = full_params(dist_run("single", rank, range(STEPS))[0])
    for kind in ("ddp", "fsdp"):
        model, opt = dist_run(kind, rank, range(STEPS))
        results[kind] = full_params(model)
        results[(kind, "comm")] = {phase: dict(ops) for phase, ops in opt.comm_bytes.items()}
    model, opt = dist_run("fsdp", rank, range(STEPS // 2))  # save on 2 ranks, resume, continue
    path = os.path.join(out_dir, "fsdp-fira")
    save_checkpoint(path, model, opt)
    fresh, fresh_opt = dist_run("fsdp", rank, range(0))
    load_checkpoint(path, fresh, fresh_opt)
    results["fsdp-resumed"] = full_params(dist_run("fsdp", rank, range(STEPS // 2, STEPS), fresh, fresh_opt)[0])
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fira-distributed")
    return run_ranks(_dist_scenarios, WORLD, out, deadline_s=300, out_dir=str(out))


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(two_ranks, kind):
    reference = two_ranks[0]["single"]
    for res in two_ranks:
        for name, value in reference.items():
            torch.testing.assert_close(res[kind][name], value, rtol=1e-9, atol=1e-11, msg=f"{kind} {name}")
    torch.manual_seed(0)
    assert not torch.allclose(reference["down.weight"], Tiny().double().down.weight, atol=1e-3)


def test_fsdp_sends_one_number_per_matrix_for_the_term_and_resumes_bitwise(two_ranks):
    # per step: the left projection's 4×48 float64 all-reduce, plus one 0-d norm per matrix (‖S‖)
    assert two_ranks[0][("fsdp", "comm")]["step"] == {"all_reduce": STEPS * (4 * 48 + 2) * 8}
    for res in two_ranks:
        for name, value in res["fsdp"].items():
            assert torch.equal(res["fsdp-resumed"][name], value), name


# ---------------------------------------------------------------------- bad values, the command


@pytest.mark.parametrize("options,message", [
    ({"outside": "galore"}, r"outside='galore' is not one of \('off', 'fira'\)"),
    ({"outside_limiter": 0.5}, r"outside_limiter=0.5 must be a number ≥ 1"),
    ({"outside": "fira", "proj_type": "full"}, r"outside='fira' with proj_type='full'"),
])
def test_bad_values_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        LowRankSpec(rank=4, **options)
    w = torch.nn.Parameter(torch.zeros(6, 8))
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([{"params": [w], "rank": 2, **options}])
    assert math.isinf(LowRankSpec(rank=4, outside_limiter=math.inf).outside_limiter)


def test_the_command():
    from galore_plus.app.config import LEGACY_VALUES, FinetuneConfig, low_rank_spec, outside_term, projected_backward
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError

    assert LEGACY_VALUES["outside"] == "off" and FinetuneConfig.outside is None  # runs before it: off
    config = FinetuneConfig(outside="fira")
    assert low_rank_spec(config).outside == "fira"
    assert not projected_backward(config) and projected_backward(FinetuneConfig(outside="off"))
    # the command's GaLore+ recipe (DESIGN.md, "The command's GaLore+ recipe"): Fira's term unless a choice
    # it would undo was given; off for every other method; as given when given; resolved and recorded
    assert outside_term(FinetuneConfig()) == "fira" and not projected_backward(FinetuneConfig())
    for options in ({"method": "galore"}, {"method": "lora"}, {"method": "adamw"}, {"projected_backward": True},
                    {"layerwise": True}, {"proj_type": "full"}, {"outside": "off"}):
        assert outside_term(FinetuneConfig(**options)) == "off", options
    assert outside_term(FinetuneConfig(method="galore", outside="fira")) == "fira"
    assert outside_term(FinetuneConfig(refresh_policy="capture", eightbit=True)) == "fira"
    tiny = dict(model="tiny")  # (validated() checks that a named model is installed)
    assert validated(FinetuneConfig(**tiny)).outside == "fira"
    assert validated(FinetuneConfig(**tiny, method="lora")).outside == "off"
    assert low_rank_spec(FinetuneConfig()).outside == "fira"
    assert validated(FinetuneConfig(**tiny, projected_backward=True)).outside == "off"  # no clash with the flag
    with pytest.raises(ConfigError, match="--outside fira with --projected-backward"):
        validated(FinetuneConfig(outside="fira", projected_backward=True))
    with pytest.raises(ConfigError, match="--outside fira needs --method galore or galore"):
        validated(FinetuneConfig(method="lora", outside="fira"))
    with pytest.raises(ConfigError, match="outside='bogus' is not one of"):
        validated(FinetuneConfig(outside="bogus"))


def test_a_run_from_before_the_recipe_resumes_as_it_ran(tmp_path, monkeypatch):
    """A run recorded with ``--outside off`` (every GaLore+ run of the command before its recipe took Fira's
    term), resumed from Python with the option left out, continues without the term, bitwise the
    uninterrupted run; a new run with it left out takes the term and records it, and trains differently."""
    import json

    from test_cli import TINY, assert_same_weights, crash_at

    from galore_plus.app import finetune as finetune_module
    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.finetune import finetune

    quick = dict(TINY, max_steps=6, eval_before=False, generate=False)
    full, run, new = tmp_path / "full", tmp_path / "interrupted", tmp_path / "new"
    finetune(FinetuneConfig(**quick, outside="off", output_dir=str(full)))
    assert json.loads((full / "run.json").read_text())["config"]["outside"] == "off"
    real = crash_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(**quick, outside="off", save_every=3, output_dir=str(run)))
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    finetune(FinetuneConfig(**quick, save_every=3, output_dir=str(run)), resume=str(run))  # outside left out
    assert json.loads((run / "run.json").read_text())["config"]["outside"] == "off"
    assert_same_weights(full, run)
    metrics = finetune(FinetuneConfig(**quick, output_dir=str(new)))
    assert json.loads((new / "run.json").read_text())["config"]["outside"] == "fira"
    assert metrics["projected_backward"] is False
    losses = [[json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for d in (full, new)]
    assert losses[0][0] == losses[1][0] and losses[0][-1] != losses[1][-1]  # same start, the term changes the run
