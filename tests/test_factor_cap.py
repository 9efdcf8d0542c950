"""The factors' cap (issue 26; DESIGN.md, "Projected backward", refresh without G): at a refresh step
held until ``step()``, a target's ``x`` and ``dy`` are kept only while their ``Σ tokens·(m+n)``
elements are at most the ``m×n`` of its gradient; beyond that they are folded into the full gradient
(``W.grad``), and the step's later micro-batches add theirs to it. The folded path is the same
optimizer as the factored one (float64, 1e-10), and below the cap no target-sized tensor is formed.

Target shapes of the tiny LLaMA (hidden 48, 4 heads, 2 KV heads, intermediate 80) and the token
counts where the factors reach ``m·n``: q/o 48×48 at 24, k/v 24×48 at 16, gate/up/down 80×48 at 30."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from galore_plus import build_optimizer, engine_of

sys.path.insert(0, str(Path(__file__).parent))
from test_projected import tiny  # noqa: E402  the tiny LLaMA of the projected backward's tests
from test_sketched_refresh import target_sized_per_step  # noqa: E402  the target-sized-tensor watch

STEPS, GAP = 9, 4  # refreshes at steps 1, 5, 9


def batches(accumulation, seq, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randint(0, 64, (1, seq), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def optimizer_for(model, cap=True, **options):
    opt = build_optimizer(model, "galore+", 8, lr=1e-2, update_proj_gap=GAP, residual_warmup=3, scale=1.0,
                          weight_decay=0.01, projected_backward=True, **options)
    engine_of(opt).projected_backward.cap_factors = cap
    return opt


def relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def train(model, opt, data):
    """Train; return, per refresh step, which targets were folded (``W.grad`` after backward)."""
    weights = list(opt.projected_backward.targets.values())
    folded = []
    for step, micro_batches in enumerate(data):
        for ids in micro_batches:
            (model(input_ids=ids, labels=ids).loss / len(micro_batches)).backward()
        if step % GAP == 0:
            folded.append({i for i, w in enumerate(weights) if w.grad is not None})
            assert all((w.grad is None) == (opt.factored_gradient(w) is not None) for w in weights)
        opt.step()
        opt.zero_grad()
    return folded


@pytest.mark.parametrize("accumulation,seq,options", [
    (2, 11, {}),  # 22 tokens a micro-batch: k/v fold at the first, every target at the second
    (1, 20, {}),  # one micro-batch: k/v (16) fold, q/o (24) and the MLP (30) keep their factors
    (3, 9, {"eightbit": True, "residual_reselect": True}),
])
def test_folded_factors_equal_the_factored_refresh_in_float64(accumulation, seq, options):
    data = batches(accumulation, seq)
    models, folds = [], []
    for cap in (True, False):
        model = tiny()
        folds.append(train(model, optimizer_for(model, cap, **options), data))
        models.append(model)
    capped, uncapped = models
    weights = list(engine_of(optimizer_for(tiny(), **options)).projected_backward.targets)
    shapes = [tuple(m.weight.shape) for m in weights]
    expected = {i for i, (m, n) in enumerate(shapes) if accumulation * seq * (m + n) > m * n}
    assert folds[0] == [expected] * 3 and expected  # the cap did fold, exactly where the factors outgrow G
    assert folds[1] == [set()] * 3  # uncapped: factors held everywhere
    for (name, p), q in zip(capped.named_parameters(), uncapped.parameters()):
        assert relative(p, q) < 1e-10, name


@pytest.mark.parametrize("seq,below", [(7, True), (11, False)])
def test_below_the_cap_no_target_sized_tensor_is_formed(seq, below):
    """Two micro-batches of ``seq`` tokens: 14 tokens are below every target's cap (16 for k/v), so
    no op in backward or ``step()`` returns a target-sized tensor at any step; 22 tokens exceed k/v's
    (and at 44 every target's), and the folded gradients appear at the refresh steps, only there."""
    model = tiny(torch.float32)
    opt = optimizer_for(model)
    weights = list(opt.projected_backward.targets.values())
    seen = target_sized_per_step(model, opt, batches(2, seq), weights)
    assert all(opt.state[w]["refresh_count"] == 3 for w in weights)
    if below:
        assert not any(seen), seen
    else:
        assert [i for i, s in enumerate(seen) if s] == [0, 4, 8], seen


@pytest.mark.parametrize("accumulation,rows,seq", [(1, 2, 5), (2, 2, 3), (2, 1, 5)])
def test_factors_of_several_rows_refresh_as_the_full_gradient_does(accumulation, rows, seq):
    """Batches of several sequences (``rows``), below every cap: the refresh from ``x`` and ``dy`` equals
    the full-gradient refresh's run (float64, 1e-10) with canonical signs. Without them the two
    computations of the randomized SVD may return a basis vector with opposite signs where the
    gradient's singular values are (nearly) repeated — seen at the first refresh of layer 1's v_proj
    in these batches — and the moments GaLore keeps across a refresh then take the two runs apart
    (DESIGN.md, "Refresh without the full gradient"; issue 29's canonical signs)."""
    gen = torch.Generator().manual_seed(1)
    data = [[torch.randint(0, 64, (rows, seq), generator=gen) for _ in range(accumulation)] for _ in range(STEPS)]
    runs = []
    for sketched in (True, False):
        model = tiny()
        opt = optimizer_for(model, cap=False, canonical_signs=True)
        opt.projected_backward.sketched_refresh = sketched
        held = train(model, opt, data)
        runs.append((model, held))
    (sketched, held), (full, full_held) = runs
    assert held == [set()] * 3 and full_held != held  # factors at every refresh, against W.grad
    for (name, p), q in zip(sketched.named_parameters(), full.parameters()):
        assert relative(p, q) < 1e-10, name
