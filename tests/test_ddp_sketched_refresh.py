"""Issue 26 under DDP: the projected backward's refresh without the full gradient across ranks
(``distributed_sketch.RankMeanGradient``: every product the range finder, the cross-head block, the
first projection and the residual entries take with ``G`` is this rank's, all-reduced), on CPU (gloo,
2 processes, float64), against one process.

Checked: the parameters equal the single-process run's (1e-9; 20 steps, 4 refreshes; GaLore+ with
cross-head q, randomized up/down with a power iteration, the residual; 1 and 2 micro-batches, and
with warm starts); no op in backward or ``step()`` on any rank returns a tensor of a target's shape
and no all-reduce carries one, at any step, refresh steps included (the full-gradient refresh, the
control, shows both at its refresh steps); a save on 2 ranks → resume → continue across a refresh is
bitwise the uninterrupted run; ranks whose token counts put one over the factors' cap and the other
under it (the first folds into its own ``G_r``) send no more and still equal one process; sketched and
exact-SVD targets refresh in the same step (the latter split across the ranks); a NaN in one rank's
batch at a refresh is refused on every rank before anything changes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from _ranks import run_ranks
from test_distributed import BATCH, GAP, STEPS, WORLD, data, full_params, make_model, make_optimizer
from test_sketched_refresh import TargetSized
from torch import nn

from galore_plus.distributed import distribute, load_checkpoint, save_checkpoint, wrap_model
from galore_plus.projected import enable_projected_backward

TARGETS = ("q", "up", "down")  # q 32×16 (cross-head, right), up 48×16 (right), down 16×48 (left)


class AllReduces:
    """The shapes of every ``dist.all_reduce`` called from Python (the optimizer's and the projected
    backward's; DDP's reducer calls its own from C++ and averages the other parameters only)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.original = dist.all_reduce

    def __enter__(self) -> AllReduces:
        def counted(tensor, *args, **kwargs):
            self.shapes.append(tuple(tensor.shape))
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original


def adjusted(optimizer, method: str):
    """``warm``: every low-rank group warm-started; ``mixed``: up/down by exact SVD (their refresh all-reduces
    ``G``, split across the ranks by ``distribute``) beside the sketched cross-head q in the same step."""
    for group in optimizer.param_groups:
        if "rank" in group and method == "warm":
            group["warm_start"] = True
        if "rank" in group and method == "mixed" and group["num_heads"] is None:
            group["svd"] = "exact"
    return optimizer


def ddp_projected(method: str = "galore+", sketched: bool = True):
    model = make_model()
    optimizer = adjusted(make_optimizer(model, method), method)
    enable_projected_backward(model, optimizer, sketched_refresh=sketched)
    ddp = wrap_model(model, "ddp", torch.device("cpu"))
    distribute(optimizer)
    return ddp, optimizer


def single(method: str) -> dict:
    model = make_model()
    optimizer = adjusted(make_optimizer(model, method), method)
    train(model, optimizer, range(STEPS), None)
    return full_params(model)


def train(model: nn.Module, optimizer, steps: range, rank: int | None, micro: int = 1, log: list | None = None,
          rows: list[int] | None = None) -> None:
    """``rows``: how many of the global batch's rows each rank takes (default: equal halves); the loss
    is scaled so that DDP's mean over the ranks is the global batch's mean."""
    module = getattr(model, "module", model)
    weights = [getattr(module, n).weight for n in TARGETS]
    shapes = {tuple(w.shape) for w in weights} | {tuple(w.shape)[::-1] for w in weights}
    for step in steps:
        x, y = data(step)
        scale = 1.0
        if rank is not None:
            sizes = rows or [BATCH // WORLD] * WORLD
            x, y = x.split(sizes)[rank], y.split(sizes)[rank]
            scale = sizes[rank] * WORLD / BATCH
        watch = TargetSized(shapes, weights)
        with AllReduces() as reduces:
            for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
                loss = nn.functional.mse_loss(model(xb), yb) * scale / micro
                with watch:
                    loss.backward()
            held = [optimizer.factored_gradient(w) is not None for w in weights]
            folded = [getattr(optimizer.factored_gradient(w), "dense_part", None) is not None for w in weights]
            grads = [w.grad is not None for w in weights]
            with watch:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if log is not None:
            log.append({"seen": sorted(watch.seen), "held": held, "grads": grads, "folded": folded,
                        "target_reduces": [s for s in reduces.shapes if s in shapes],
                        "refreshes": [optimizer.state[w]["refresh_count"] for w in weights]})


def scenario(rank: int, out_dir: str) -> dict:
    results: dict = {}
    for method in ("galore+", "warm", "mixed"):
        results[("single", method)] = single(method)
    for micro in (1, 2):
        model, optimizer = ddp_projected()
        log: list = []
        train(model, optimizer, range(STEPS), rank, micro, log)
        results[("sketched", micro)] = full_params(model)
        results[("sketched", micro, "log")] = log
        results[("sketched", micro, "comm")] = {ph: dict(ops) for ph, ops in optimizer.comm_bytes.items()}
    model, optimizer = ddp_projected("warm")
    train(model, optimizer, range(STEPS), rank, 2)
    results[("sketched", "warm")] = full_params(model)
    model, optimizer = ddp_projected("mixed")
    log = []
    train(model, optimizer, range(STEPS), rank, 1, log)
    results[("sketched", "mixed")] = full_params(model)
    results[("sketched", "mixed", "log")] = log
    results[("sketched", "mixed", "comm")] = {ph: dict(ops) for ph, ops in optimizer.comm_bytes.items()}
    # the control: the full-gradient refresh (sketched_refresh=False) forms and all-reduces G
    model, optimizer = ddp_projected(sketched=False)
    log = []
    train(model, optimizer, range(STEPS), rank, 1, log)
    results[("full-refresh", "log")] = log
    results[("full-refresh",)] = full_params(model)
    return resume_cap_and_nan(results, rank, os.path.join(out_dir, "ddp-sketched"), ddp_projected, train)


def resume_cap_and_nan(results: dict, rank: int, path: str, build, train) -> dict:
    """The scenarios DDP and FSDP2 share, with their model and optimizer (``build()``) and ``train``:
    a save on 2 ranks after half the steps (the next step refreshes), resume, continue; unequal token
    counts (rank 0's 12 rows put q, 32×16, over the factors' cap at 10.7 tokens, rank 1's 4 not); a NaN
    on one rank. Adds them to ``results``."""
    model, optimizer = build()
    train(model, optimizer, range(STEPS // 2), rank)
    save_checkpoint(path, model, optimizer)
    model, optimizer = build()
    load_checkpoint(path, model, optimizer)
    train(model, optimizer, range(STEPS // 2, STEPS), rank)
    results[("sketched", "resumed")] = full_params(model)
    model, optimizer = build()
    log = []
    train(model, optimizer, range(STEPS), rank, 1, log, rows=[12, 4])
    results[("cap",)] = full_params(model)
    results[("cap", "log")] = log
    results[("nan",)] = non_finite_on_one_rank(rank, build)
    return results


def non_finite_on_one_rank(rank: int, build=ddp_projected) -> dict:
    """A NaN in rank 0's batch at a refresh step (the first): every rank refuses the refresh (one flag
    all-reduced), before anything changes."""
    model, optimizer = build()
    before = full_params(model)
    x, y = data(0)
    x, y = x.chunk(WORLD)[rank].clone(), y.chunk(WORLD)[rank]
    if rank == 0:
        x[0, 0] = float("nan")
    nn.functional.mse_loss(model(x), y).backward()
    try:
        optimizer.step()
    except FloatingPointError as err:
        return {"error": str(err), "unchanged": all(torch.equal(before[n], p) for n, p in full_params(model).items())}
    return {"error": None}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_sketched")
    return run_ranks(scenario, WORLD, out, deadline_s=600, out_dir=str(out))


def assert_equal_to(reference: dict, got: dict, what: str) -> None:
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-9, atol=1e-11, msg=f"{what} {name}")


@pytest.mark.parametrize("micro", [1, 2])
def test_sketched_refresh_across_ranks_equals_one_process(ranks, micro):
    for res in ranks:
        assert_equal_to(ranks[0][("single", "galore+")], res[("sketched", micro)], f"micro {micro}")
        log = res[("sketched", micro, "log")]
        assert log[-1]["refreshes"] == [STEPS // GAP] * 3
        # refresh steps held the factors (no W.grad), every target
        assert [i for i, e in enumerate(log) if any(e["held"])] == list(range(0, STEPS, GAP))
        assert all(e["held"] == [True] * 3 for e in log[::GAP])
        assert not any(any(e["grads"]) for e in log)
    for a, b in zip(ranks[0][("sketched", micro)].values(), ranks[1][("sketched", micro)].values()):
        assert torch.equal(a, b)  # the ranks hold the same parameters, bit for bit


def test_warm_started_sketched_refresh_equals_one_process(ranks):
    for res in ranks:
        assert_equal_to(ranks[0][("single", "warm")], res[("sketched", "warm")], "warm")


@pytest.mark.parametrize("micro", [1, 2])
def test_no_rank_forms_or_all_reduces_a_target_sized_tensor_at_any_step(ranks, micro):
    for res in ranks:
        log = res[("sketched", micro, "log")]
        assert not any(e["seen"] for e in log), [e["seen"] for e in log]
        assert not any(e["target_reduces"] for e in log)
    # the control can fail: the full-gradient refresh shows both at its refresh steps, and only there
    for res in ranks:
        log = res[("full-refresh", "log")]
        assert [i for i, e in enumerate(log) if e["seen"]] == list(range(0, STEPS, GAP))
        assert [i for i, e in enumerate(log) if e["target_reduces"]] == list(range(0, STEPS, GAP))
        assert_equal_to(ranks[0][("single", "galore+")], res[("full-refresh",)], "full refresh")


def test_refresh_products_are_counted_as_refresh_traffic(ranks):
    comm = ranks[0][("sketched", 1, "comm")]
    # between refreshes: q 32×4, up 48×4, down 4×48 float64, plus residual entries; the refresh's
    # products go to the refresh phase (counted there, never an m×n payload: see the test above)
    assert comm["refresh"]["all_reduce"] > 0
    assert "broadcast" not in comm["refresh"]  # nothing is owned: every rank computed every projector


def test_resume_across_a_refresh_is_bitwise(ranks):
    for res in ranks:
        for name, value in res[("sketched", 1)].items():
            assert torch.equal(res[("sketched", "resumed")][name], value), name


def test_a_rank_past_the_factors_cap_folds_its_own_gradient_and_sends_no_more(ranks):
    """Rank 0 folds q's factors into its own dense ``G_r`` (past the cap), rank 1 keeps them: the
    ranks still issue the same thin collectives (no ``m×n`` all-reduce) and equal one process."""
    for res in ranks:
        assert_equal_to(ranks[0][("single", "galore+")], res[("cap",)], "cap")
        log = res[("cap", "log")]
        assert all(e["held"] == [True] * 3 for e in log[::GAP])
        assert not any(any(e["grads"]) or e["target_reduces"] for e in log)
    assert all(e["folded"] == [True, False, False] for e in ranks[0][("cap", "log")][::GAP])
    assert not any(any(e["folded"]) for e in ranks[1][("cap", "log")])


def test_non_finite_factors_on_one_rank_are_refused_on_every_rank(ranks):
    for res in ranks:
        assert res[("nan",)]["error"] is not None and "NaN or Inf" in res[("nan",)]["error"]
        assert res[("nan",)]["unchanged"]


def test_sketched_and_exact_svd_targets_in_one_step(ranks):
    """q refreshed from the ranks' factors on every rank, up/down from their all-reduced G by their
    owner rank and broadcast (the split refresh), in the same steps: equal to one process."""
    for res in ranks:
        assert_equal_to(ranks[0][("single", "mixed")], res[("sketched", "mixed")], "mixed")
        log = res[("sketched", "mixed", "log")]
        assert all(e["held"] == [True, False, False] and e["grads"] == [False, True, True] for e in log[::GAP])
        assert all(sorted(e["target_reduces"]) == [(16, 48), (48, 16)] for e in log[::GAP])
    assert ranks[0][("sketched", "mixed", "comm")]["refresh"]["broadcast"] > 0
