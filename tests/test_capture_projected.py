"""The captured-share refresh (``refresh="capture"``) on the projected backward (issue 29 mechanism 3
on the path issue 26 made fast; DESIGN.md, "Refresh"): between refreshes the backward sketches
``G`` with ``refresh.SHARE_SKETCH`` seeded columns on the side the projector leaves whole, ``step()``
records ``‖Pᵀ G Ω‖ / ‖G Ω‖`` as the update's share, and a share below the threshold refreshes at
the next update, from factors where the projector allows it.

Checked: the sketch and the recorded share equal the plain float64 formulas on ``G`` formed by the
full path (one and two micro-batches, left and right projectors, cross-head q/k); the refreshes
follow the rule restated plainly from the recorded shares; threshold 1 refreshes every other update
and a tiny one is the interval, bitwise; 8-bit states decide alike; a resume across a late refresh is
bitwise; layer-wise mode takes no estimate (the interval) and warns, as two-sided projectors do; DDP on 2 gloo ranks equals one process
(float64, 1e-9) with the same refreshes on every rank; the command accepts ``--refresh-policy capture
--projected-backward`` and refuses it where no estimate is taken."""

from __future__ import annotations


import pytest
import torch
from _tiny_llama import batches, tiny
from _ranks import run_ranks
from _saving import train_across_a_resume

from galore_plus import LowRankSpec, build_optimizer, engine_of
from galore_plus.refresh import SHARE_SKETCH



def spec(threshold, gap=100, **options):
    return LowRankSpec.recipe("galore+", 8, update_proj_gap=gap, residual_warmup=2, scale=1.0, refresh="capture",
                              capture_threshold=threshold, **options)


def backward(model, ids, micro=1):
    for part in ids.chunk(micro):
        (model(input_ids=part, labels=part).loss / micro).backward()


def targets(opt):
    engine = engine_of(opt)
    return [p for g in engine.param_groups if "rank" in g for p in g["params"]]


def history(model, opt, data, micro=1):
    """Per update: each target's (refresh_count, capture_share, capture_step) after it."""
    out = []
    for ids in data:
        backward(model, ids, micro)
        opt.step()
        opt.zero_grad()
        out.append([(int(opt.state[p]["refresh_count"]), opt.state[p].get("capture_share"),
                     opt.state[p].get("capture_step")) for p in targets(opt)])
    return out


# ---------------------------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("micro", [1, 2])
def test_the_sketch_and_the_share_are_the_plain_formulas_on_the_full_gradient(micro):
    """Update 2 (after the refresh at 1): the projected path's summed sketch is ``G Ω`` (left) or
    ``Ωᵀ G`` (right) of the ``G`` the full path forms from the same weights and batch, and the share it
    records is ``‖Pᵀ G Ω‖ / ‖G Ω‖`` (``‖Ωᵀ G Qᵀ‖ / ‖Ωᵀ G‖``), float64."""
    data = batches(2)
    model = tiny()
    opt = build_optimizer(model, spec(1e-9), lr=1e-2, projected_backward=True)
    backward(model, data[0], micro)
    opt.step()
    opt.zero_grad()
    plain = tiny()
    plain.load_state_dict(model.state_dict())
    backward(plain, data[1], micro)
    backward(model, data[1], micro)
    names = {id(p): n for n, p in model.named_parameters()}
    full = dict(plain.named_parameters())
    sides = set()
    for p in targets(opt):
        G = full[names[id(p)]].grad
        left, right = opt.projector(p)
        omega = opt.share_sketch(p)
        assert omega.shape == (G.shape[1] if right is None else G.shape[0], SHARE_SKETCH)
        held = opt.projected_gradient(p)
        if right is None:
            sketch, kept = G @ omega, left.T @ G @ omega
        else:
            sketch, kept = omega.T @ G, omega.T @ G @ right.T
        sides.add(right is None)
        torch.testing.assert_close(held.sketch, sketch, rtol=1e-10, atol=1e-12)
        p._expected = (torch.linalg.norm(kept) / torch.linalg.norm(sketch)).item()
    assert sides == {True, False}  # both kinds of projector were checked
    opt.step()
    for p in targets(opt):
        state = opt.state[p]
        assert state["capture_step"] == 2 and state["capture_share"] == pytest.approx(p._expected, rel=1e-10)
        assert 0 < state["capture_share"] < 1


# ---------------------------------------------------------------------------------------------- the decision


def test_a_low_share_refreshes_at_the_next_update_as_the_rule_says():
    """The refreshes equal the rule restated from the recorded shares: update ``u + 1`` refreshes iff
    update ``u`` recorded a share below the threshold and did not refresh itself (or the interval)."""
    threshold, gap = 0.62, 6
    model = tiny()
    opt = build_optimizer(model, spec(threshold, gap), lr=1e-2, projected_backward=True)
    steps = history(model, opt, batches(14))
    late = interval = 0
    for i in range(len(targets(opt))):
        count, last, previous = 1, 1, None  # the first update refreshes
        for u, row in enumerate(steps[1:], start=2):
            refreshed = row[i][0] > count
            low = previous is not None and previous[2] == u - 1 and previous[1] < threshold and last != u - 1
            assert refreshed == (low or u - last >= gap), (i, u)
            late += low
            interval += refreshed and not low
            if refreshed:
                count, last = row[i][0], u
            else:  # an update that did not refresh recorded its estimate
                assert row[i][2] == u
            previous = row[i]
    assert late and interval  # both reasons occurred


def test_threshold_one_refreshes_every_other_update_and_a_tiny_one_is_the_interval_bitwise():
    data = batches(10)
    counts = {}
    for name, threshold in (("always", 1.0), ("never", 1e-9)):
        model = tiny()
        opt = build_optimizer(model, spec(threshold, gap=4), lr=1e-2, projected_backward=True)
        steps = history(model, opt, data)
        counts[name] = {row[0][0] for row in steps[-1:]}, [row[0][0] for row in steps], model
    assert counts["always"][1] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # 1, 3, 5, 7, 9
    interval = tiny()
    opt = build_optimizer(interval, LowRankSpec.recipe("galore+", 8, update_proj_gap=4, residual_warmup=2, scale=1.0),
                          lr=1e-2, projected_backward=True)
    history(interval, opt, data)
    assert counts["never"][1] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]  # 1, 5, 9: the interval's
    for p, q in zip(interval.parameters(), counts["never"][2].parameters()):
        assert torch.equal(p, q)


def test_eight_bit_states_decide_alike():
    data = batches(8)
    model = tiny(torch.float32)
    opt = build_optimizer(model, spec(1.0, rule="adamw8bit"), lr=1e-3, projected_backward=True)
    steps = history(model, opt, data)
    assert [row[0][0] for row in steps] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_layerwise_mode_takes_no_estimate_is_the_interval_and_says_so():
    model = tiny()
    with pytest.warns(UserWarning, match=r"no share estimate in layer-wise mode .*: they refresh every update_proj_gap"):
        opt = build_optimizer(model, spec(1.0, gap=4), lr=1e-2, projected_backward=True, layerwise=True)
    for ids in batches(6):
        backward(model, ids)
    engine = engine_of(opt)
    assert {int(engine.state[p]["refresh_count"]) for p in targets(opt)} == {2}  # updates 1 and 5
    assert all("capture_step" not in engine.state[p] for p in targets(opt))


def test_resume_across_a_late_refresh_is_bitwise():
    data = batches(7)

    def run(split=None):
        model, counts, _ = train_across_a_resume(
            lambda: tiny(torch.float32), lambda m: build_optimizer(m, spec(0.7), lr=1e-2, projected_backward=True),
            data, split)
        return model, counts

    a, counts = run()
    late = [t for t in range(1, 7) if counts[t] > counts[t - 1]]
    assert late, counts  # some late refresh happened (the interval is 100)
    b, resumed = run(split=late[0])  # saved after the update whose share called for it
    assert resumed == counts
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------- DDP


def _capture_run(rank: int | None) -> dict:
    """test_ddp_sketched_refresh's model and data with the capture policy on its GaLore+ groups, on the
    projected backward: in one process (``rank`` None) or as this rank of a DDP run."""
    from test_ddp_sketched_refresh import TARGETS, train
    from test_distributed import STEPS, full_params, make_model, make_optimizer

    from galore_plus.distributed import distribute, wrap_model
    from galore_plus.projected import enable_projected_backward

    model = make_model()
    optimizer = make_optimizer(model, "galore+")
    for group in optimizer.param_groups:
        if "rank" in group:
            group["refresh"], group["capture_threshold"], group["update_proj_gap"] = "capture", 0.6, 100
    enable_projected_backward(model, optimizer)
    if rank is not None:
        model = wrap_model(model, "ddp", torch.device("cpu"))
        distribute(optimizer)
    log: list = []
    train(model, optimizer, range(STEPS), rank, log=log)
    module = getattr(model, "module", model)
    return {"params": full_params(model), "refreshes": [row["refreshes"] for row in log],
            "shares": [optimizer.state[getattr(module, n).weight].get("capture_share") for n in TARGETS]}


def _ddp_scenario(rank: int) -> dict:
    return _capture_run(rank)


def test_ddp_equals_one_process_and_decides_alike_on_every_rank(tmp_path):
    from test_distributed import WORLD

    single = _capture_run(None)
    assert single["refreshes"][-1] != [1, 1, 1] and max(single["refreshes"][-1]) < 20, single["refreshes"]
    for r in run_ranks(_ddp_scenario, WORLD, tmp_path, deadline_s=300):
        assert r["refreshes"] == single["refreshes"]
        for a, b in zip(r["shares"], single["shares"]):
            assert a == pytest.approx(b, rel=1e-9)
        for name, p in single["params"].items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-9, atol=1e-9, msg=name)


# ---------------------------------------------------------------------------------------------- the command


def test_the_command_takes_capture_on_the_projected_backward_and_refuses_it_where_no_estimate_is_taken(tmp_path):
    from galore_plus.app.config import FinetuneConfig, projected_backward
    from galore_plus.app.errors import ConfigError
    from galore_plus.app.validation import validated

    base = dict(model="tiny", refresh_policy="capture", capture_threshold=0.5, output_dir=str(tmp_path / "run"))
    # the default for capture stays the full path (exact shares), as the recorded runs ran it
    assert not projected_backward(FinetuneConfig(refresh_policy="capture", capture_threshold=0.5))
    validated(FinetuneConfig(**base, projected_backward=True))
    for extra, message in [({"layerwise": True}, r"--layerwise"), ({"distributed": "fsdp"}, r"--distributed fsdp")]:
        with pytest.raises(ConfigError, match=message):
            validated(FinetuneConfig(**base, projected_backward=True, **extra))


def test_two_sided_projectors_take_no_estimate_and_say_so():
    model = tiny()
    with pytest.warns(UserWarning, match=r"no share estimate in these targets"):
        opt = build_optimizer(model, LowRankSpec.recipe("galore", 8, update_proj_gap=4, scale=1.0, proj_type="full",
                                                        refresh="capture", capture_threshold=1.0),
                              lr=1e-2, projected_backward=True)
    steps = history(model, opt, batches(6))
    assert [row[0][0] for row in steps] == [1, 1, 1, 1, 2, 2]  # the interval: 1, 5
