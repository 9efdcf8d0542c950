"""Issue 29, mechanism 3, when to refresh (``galore_plus.refresh``; DESIGN.md, "Refresh"): the
run-length schedule (``refresh_gap``, ``--refreshes``) and the captured-share policy
(``refresh="capture"``, ``capture_threshold``).

The share the engine measures equals ``‖PᵀG‖/‖G‖`` written plainly (float64); a constructed gradient
that leaves the subspace refreshes at exactly the step where its share falls below the threshold, one
that stays never refreshes before ``update_proj_gap``; ``K`` refreshes over ``S`` steps, and a resumed,
extended run keeps its gap; the projected backward refreshes on its estimate (tests/test_capture_projected.py)
and the full path equals the interval when nothing triggers; 8-bit states; a bitwise resume across a capture refresh;
DDP (split refresh) and FSDP2 against one process, the decision the same on every rank."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _tiny_llama import batches, tiny, train
from _ranks import run_ranks
from _saving import train_across_a_resume
from torch import nn

from galore_plus import GaLoreAdamW, LowRankSpec, build_optimizer, engine_of, refresh_gap
from galore_plus.refresh import refresh_steps

GAP, THRESHOLD = 10, 0.9


def refreshed_at(opt, p, steps):
    """The updates (from 1) at which ``p``'s projector was refreshed, given one update per call of
    ``steps`` (an iterable of callables that set ``p.grad`` and step)."""
    out = []
    for t, take in enumerate(steps, 1):
        before = opt.state[p].get("refresh_count", 0)
        take()
        if opt.state[p]["refresh_count"] > before:
            out.append(t)
    return out


def basis(n, seed):
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


# ---------------------------------------------------------------------------------------------- the share


@pytest.mark.parametrize("shape,proj_type", [((8, 12), "std"), ((12, 8), "std"), ((10, 10), "full")])
def test_the_measured_share_is_the_plain_one_float64_reference(shape, proj_type):
    """``capture_share`` = ‖PᵀG‖/‖G‖ (left), ‖G Q‖/‖G‖ (right), ‖PᵀG Q‖/‖G‖ (both), measured on the
    update's own gradient under the projector it had before the update."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "proj_type": proj_type, "refresh": "capture",
                        "capture_threshold": 1e-6}], lr=1e-2, update_proj_gap=100)
    for step in range(1, 5):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        left, right = opt.projector(w)
        w.grad = g.clone()
        opt.step()
        if step == 1:  # the first refresh: nothing measured (there was no projector)
            assert "capture_share" not in opt.state[w]
            continue
        low = g if left is None else left.T @ g
        low = low if right is None else low @ right.T
        plain = (torch.linalg.norm(low) / torch.linalg.norm(g)).item()
        assert opt.state[w]["capture_share"] == pytest.approx(plain, rel=1e-12, abs=0)
        assert opt.state[w]["capture_step"] == step and 0 < plain < 1
    w.grad = torch.zeros(shape, dtype=torch.float64)  # nothing to capture, nothing missed: 1, no refresh
    opt.step()
    assert opt.state[w]["capture_share"] == 1.0 and opt.state[w]["refresh_count"] == 1


# ---------------------------------------------------------------------------------------------- the trigger


def leaving(shares, m=8, n=12, seed=0):
    """Gradients of an ``m×n`` matrix (rank-2 left projection) whose captured share under the first
    step's projector is ``shares[t]`` exactly: ``G = a·(c·u₁ + s·u₃) v₁ᵀ + b·(c·u₂ + s·u₄) v₂ᵀ`` has
    ‖PᵀG‖/‖G‖ = c for ``P = [u₁, u₂]``; the first gradient (share 1) sets ``P``."""
    u, v = basis(m, seed), basis(n, seed + 1)
    out = []
    for t, c in enumerate(shares):
        s = math.sqrt(1 - c * c)
        a, b = 3.0 + 0.1 * t, 1.0 + 0.05 * t
        out.append(a * torch.outer(c * u[:, 0] + s * u[:, 2], v[:, 0]) + b * torch.outer(c * u[:, 1] + s * u[:, 3],
                                                                                        v[:, 1]))
    return out


def train_on(grads, rule="adamw", dtype=torch.float64, **group):
    """One matrix trained on ``grads``: the capture policy when a ``capture_threshold`` is given, else
    the interval; returns it, its optimizer and the steps it refreshed at."""
    w = nn.Parameter(torch.zeros(grads[0].shape, dtype=dtype))
    groups = [{"params": [w], "rank": 2, "refresh": "capture" if group else "interval", **group}]
    if rule == "adamw8bit":
        from galore_plus import GaLoreAdamW8bit

        opt = GaLoreAdamW8bit(groups, lr=1e-3, update_proj_gap=GAP)
    else:
        opt = GaLoreAdamW(groups, lr=1e-3, update_proj_gap=GAP)

    def take(g):
        def step():
            w.grad = g.to(dtype)
            opt.step()
        return step

    return w, opt, refreshed_at(opt, w, [take(g) for g in grads])


def test_a_subspace_change_refreshes_exactly_where_the_share_falls_below_the_threshold():
    shares = [1.0, 0.99, 0.95, 0.91, 0.89]  # the 5th step's share, 0.89, is the first below 0.9
    grads = leaving(shares)
    grads += [grads[-1] * (1 + 0.01 * t) for t in range(11)]  # then it stays in its new subspace
    w, opt, steps = train_on(grads, capture_threshold=THRESHOLD)
    assert steps == [1, 5, 15]  # the drop, then the interval from the refresh at step 5
    w, opt, steps = train_on(grads[:5], capture_threshold=THRESHOLD)
    share = opt.state[w]["capture_share"]  # the state says why it refreshed
    assert steps == [1, 5] and share == pytest.approx(0.89, rel=1e-12)
    # strictly below: a share at the threshold does not refresh, one an ulp below it does
    assert train_on(grads[:5], capture_threshold=share)[2] == [1]
    assert train_on(grads[:5], capture_threshold=math.nextafter(share, 1.0))[2] == [1, 5]


def test_a_steady_subspace_never_refreshes_before_the_gap_and_trains_as_the_interval():
    grads = [g * (1 + 0.3 * math.sin(t)) for t, g in enumerate(leaving([1.0] * 25))]
    w, opt, steps = train_on(grads, capture_threshold=THRESHOLD)
    assert steps == [1, 11, 21] == refresh_steps(25, GAP)
    v, _, interval = train_on(grads)
    assert interval == steps and torch.equal(w, v)  # the measurement changes nothing it does not trigger


def test_8bit_states_refresh_at_the_same_steps():
    pytest.importorskip("bitsandbytes")
    shares = [1.0, 0.99, 0.95, 0.91, 0.89]
    grads = leaving(shares, m=8, n=4096)  # a 2×4096 projected gradient: 8-bit moments (≥ 4096 elements)
    grads += [grads[-1]] * 11
    w, opt, steps = train_on(grads, rule="adamw8bit", dtype=torch.float32, capture_threshold=THRESHOLD)
    assert steps == [1, 5, 15]
    assert opt.state[w]["exp_avg_q"].dtype == torch.uint8


def test_bad_values_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^LowRankSpec: refresh='capture' needs capture_threshold \(None given\)$"):
        LowRankSpec(rank=4, refresh="capture")
    for bad in (0, 0.0, 1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"capture_threshold=.* must be None or a number in \(0, 1\]"):
            LowRankSpec(rank=4, refresh="capture", capture_threshold=bad)
    w = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"parameter group 0: refresh='capture' needs capture_threshold"):
        GaLoreAdamW([{"params": [w], "rank": 2, "refresh": "capture"}], lr=1e-3)
    assert LowRankSpec(rank=4, refresh="capture", capture_threshold=1).capture_threshold == 1
    with pytest.raises(ValueError, match=r"refreshes=5 is more than the run's 4 steps"):
        refresh_gap(4, 5)
    with pytest.raises(ValueError, match=r"refreshes=0 must be an int ≥ 1"):
        refresh_gap(4, 0)


# ---------------------------------------------------------------------------------------------- run length


def test_the_run_length_gap_gives_k_refreshes_whenever_a_constant_gap_can():
    for total in range(1, 61):
        for k in range(1, total + 1):
            gap = refresh_gap(total, k)
            count = len(refresh_steps(total, gap))
            possible = {len(refresh_steps(total, t)) for t in range(1, total + 1)}
            assert count <= k and (count == k) == (k in possible), (total, k)
            if k * k - k + 1 <= total:
                assert count == k, (total, k)
            if count < k:  # one less would overshoot
                assert len(refresh_steps(total, gap - 1)) > k
    assert refresh_gap(40, 4) == 10 and refresh_steps(40, 10) == [1, 11, 21, 31]  # the 40 steps


def test_k_refreshes_over_a_run_and_an_extended_resume_keeps_the_gap():
    """S = 8 steps, K = 2: T = 4, refreshes at 1 and 5. Extended to 12 steps on resume, the optimizer
    rebuilt with the new length's gap (6) loads the saved one (4): the run continues at its own
    cadence (a refresh at 9), bitwise the uninterrupted 12-step run at T = 4."""
    grads = [torch.randn(8, 12, generator=torch.Generator().manual_seed(t), dtype=torch.float64) for t in range(12)]

    def build(gap):
        w = nn.Parameter(torch.zeros(8, 12, dtype=torch.float64))
        return w, GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2, update_proj_gap=gap)

    def take(w, opt, g):
        def step():
            w.grad = g.clone()
            opt.step()
        return step

    w, opt = build(refresh_gap(8, 2))
    assert refreshed_at(opt, w, [take(w, opt, g) for g in grads[:8]]) == [1, 5]
    saved = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    saved = torch.load(saved, weights_only=True)
    v, resumed = build(refresh_gap(12, 2))
    with torch.no_grad():
        v.copy_(saved["w"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["update_proj_gap"] == 4
    later = refreshed_at(resumed, v, [take(v, resumed, g) for g in grads[8:]])
    assert [8 + t for t in later] == [9] and resumed.state[v]["refresh_count"] == 3
    u, whole = build(4)
    for g in grads:
        take(u, whole, g)()
    assert torch.equal(u, v)


def test_the_command_spaces_the_refreshes_over_the_run(tmp_path):
    from galore_plus.app.config import FinetuneConfig, low_rank_spec, projected_backward
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError

    assert low_rank_spec(FinetuneConfig(max_steps=40, refreshes=4)).update_proj_gap == 10
    assert low_rank_spec(FinetuneConfig(max_steps=None, epochs=2, refreshes=4), total_steps=90).update_proj_gap == 23
    assert low_rank_spec(FinetuneConfig()).update_proj_gap == 50 and low_rank_spec(FinetuneConfig()).refresh == "interval"
    spec = low_rank_spec(FinetuneConfig(refresh_policy="capture", capture_threshold=0.5))
    assert (spec.refresh, spec.capture_threshold) == ("capture", 0.5)
    assert not projected_backward(FinetuneConfig(refresh_policy="capture", capture_threshold=0.5))
    assert projected_backward(FinetuneConfig(outside="off"))  # (the recipe's Fira term needs the full backward)
    out = str(tmp_path / "run")
    for config, message in [
        (FinetuneConfig(model="tiny", max_steps=4, refreshes=5, output_dir=out),
         r"refreshes=5 is more than the run's 4 steps"),
        (FinetuneConfig(model="tiny", refreshes=4, update_proj_gap=20, output_dir=out),
         r"--refreshes 4 sets T from the run's length; drop --update-proj-gap"),
        (FinetuneConfig(model="tiny", refresh_policy="capture", output_dir=out),
         r"refresh='capture' needs capture_threshold"),
        (FinetuneConfig(model="tiny", capture_threshold=0.5, output_dir=out),
         r"--capture-threshold 0.5 needs --refresh-policy capture"),
        (FinetuneConfig(model="tiny", method="lora", refreshes=4, output_dir=out),
         r"--refreshes needs --method galore or galore\+, not lora"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validated(config)
    from galore_plus.app.cli import parse_config

    with pytest.raises(ConfigError, match=r"not allowed with argument"):
        parse_config(["finetune", "--refreshes", "4", "--update-proj-gap", "20"])
    config, _ = parse_config(["finetune", "--model", "tiny", "--refresh-policy", "capture", "--capture-threshold",
                              "0.6", "--refreshes", "3"])
    assert (config.refresh_policy, config.capture_threshold, config.refreshes) == ("capture", 0.6, 3)


def test_the_command_resumed_and_extended_keeps_its_gap(tmp_path):
    from galore_plus.app.cli import main
    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.finetune import finetune

    run = tmp_path / "run"
    finetune(FinetuneConfig(model="tiny", data="arithmetic", method="galore", rank=4, max_steps=4, batch_size=2,
                            n_train=24, n_test=4, max_length=64, max_new_tokens=4, eval_batch_size=4,
                            eval_before=False, generate=False, refreshes=2, output_dir=str(run)))

    def saved():
        state = torch.load(run / "checkpoint" / "optimizer.pt", weights_only=True)
        low_rank = [g for g in state["param_groups"] if "rank" in g]
        counts = {s["refresh_count"] for s in state["state"].values() if "refresh_count" in s}
        return {g["update_proj_gap"] for g in low_rank}, counts

    assert saved() == ({2}, {2})  # T = ⌈4/2⌉: refreshes at steps 1 and 3
    assert main(["finetune", "--resume", str(run), "--max-steps", "7"]) == 0
    assert saved() == ({2}, {4})  # kept T = 2 (not ⌈7/2⌉ = 4): refreshes at 5 and 7 too


# ---------------------------------------------------------------------------------------------- paths




def spec(**options):
    return LowRankSpec.recipe("galore+", 8, update_proj_gap=4, residual_warmup=2, scale=1.0, **options)


def refresh_counts(opt):
    return [int(s["refresh_count"]) for s in opt.state.values() if "refresh_count" in s]


def test_the_projected_backward_estimates_and_the_full_path_equals_the_interval_where_nothing_triggers():
    """The full path measures the share exactly and refreshes earlier than the interval; the projected
    backward, which forms no full gradient between refreshes, estimates it from a sketch and refreshes
    at the update after a low one (tests/test_capture_projected.py checks the estimate and the rule);
    where nothing triggers the full path is the interval, bitwise."""
    data = batches(9)  # interval refreshes at 1, 5, 9
    runs = {}
    for name, options, projected in [("interval", {}, False), ("capture", {"refresh": "capture",
                                     "capture_threshold": 0.95}, False),
                                     ("projected", {"refresh": "capture", "capture_threshold": 0.95}, True),
                                     ("never", {"refresh": "capture", "capture_threshold": 1e-6}, False)]:
        model = tiny()
        opt = build_optimizer(model, spec(**options), lr=1e-2, projected_backward=projected)
        train(model, opt, data)
        runs[name] = (model, refresh_counts(opt), opt)
    interval = runs["interval"]
    assert set(interval[1]) == {3}
    assert sum(runs["capture"][1]) > sum(interval[1])  # the full path measured and refreshed earlier
    assert sum(runs["projected"][1]) > sum(interval[1])  # so did the projected backward's estimate
    assert runs["never"][1] == interval[1]  # nothing triggered: the same training, bitwise
    for p, q in zip(interval[0].parameters(), runs["never"][0].parameters()):
        assert torch.equal(p, q)


def test_layerwise_mode_decides_on_the_gradient_it_refreshes_from():
    from galore_plus import LayerwiseOptimizer

    data = batches(9)
    step_model, layer_model = tiny(), tiny()
    options = {"refresh": "capture", "capture_threshold": 0.95}
    step_opt = build_optimizer(step_model, spec(**options), lr=1e-2)
    train(step_model, step_opt, data)
    layer_opt = build_optimizer(layer_model, spec(**options), lr=1e-2, layerwise=True)
    assert isinstance(layer_opt, LayerwiseOptimizer)
    train(layer_model, layer_opt, data)
    assert refresh_counts(engine_of(layer_opt)) == refresh_counts(step_opt)
    assert sum(refresh_counts(step_opt)) > 3 * len(refresh_counts(step_opt))  # more than the interval's 3
    for p, q in zip(step_model.parameters(), layer_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


def test_resume_across_a_capture_refresh_is_bitwise():
    data = batches(8)
    options = {"refresh": "capture", "capture_threshold": 0.95}

    def run(split=None):
        model, counts, _ = train_across_a_resume(lambda: tiny(torch.float32),
                                                 lambda m: build_optimizer(m, spec(**options), lr=1e-2), data, split)
        return model, counts

    a, counts = run()
    interval_steps = {0, 4}  # the updates 1 and 5 (0-based)
    capture_steps = [t for t in range(1, 8) if counts[t] > counts[t - 1] and t not in interval_steps]
    assert capture_steps and capture_steps[0] <= 3, counts  # a capture refresh right after the split
    b, resumed = run(split=capture_steps[0])
    assert resumed == counts
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------- DDP, FSDP2


def _scenario(rank: int) -> dict:
    from test_distributed import ddp_model, fsdp_model, full_params, train
    from galore_plus.distributed import distribute

    results = {}
    for kind, build in (("single", None), ("ddp", ddp_model), ("fsdp", fsdp_model)):
        model = _capture_model() if build is None else build()
        opt = _capture_optimizer(model)
        if kind == "ddp":
            distribute(opt)
        train(model, opt, range(20), None if kind == "single" else rank)
        results[kind] = full_params(model)
        results[kind, "counts"] = sorted(refresh_counts(opt))
        results[kind, "computed"] = opt.projectors_computed
    return results


def _capture_model():
    from test_distributed import make_model

    return make_model()


def _capture_optimizer(model):
    """test_distributed's model: q, up (right projections, row-sharded ``G Q`` under FSDP2) and down
    (left, replicated ``PᵀG``); shares around 0.45-0.75 on its data, so 0.5 triggers."""
    named = {n.removeprefix("module."): p for n, p in model.named_parameters()}
    matrices = [named[k] for k in ("q.weight", "up.weight", "down.weight")]
    others = [p for k, p in named.items() if k not in ("q.weight", "up.weight", "down.weight")]
    return GaLoreAdamW([{"params": matrices, "rank": 4, "refresh": "capture", "capture_threshold": 0.5},
                        {"params": others}], lr=1e-2, weight_decay=0.01, update_proj_gap=5, scale=1.0, seed=3)


def test_ddp_and_fsdp2_decide_as_one_process_on_every_rank(tmp_path):
    from test_distributed import WORLD

    ranks = run_ranks(_scenario, WORLD, tmp_path, deadline_s=300)
    single = ranks[0]["single", "counts"]
    assert sum(single) > 3 * 4, single  # more than the interval's 4 refreshes per matrix over 20 steps
    for kind in ("ddp", "fsdp"):
        assert all(r[kind, "counts"] == single for r in ranks), kind
        for name, p in ranks[0]["single"].items():
            for r in ranks:
                torch.testing.assert_close(r[kind][name], p, rtol=1e-6, atol=1e-8, msg=f"{kind} {name}")
    # DDP: the split refresh computed each due projector once, across the ranks
    assert sum(r["ddp", "computed"] for r in ranks) == ranks[0]["single", "computed"]
