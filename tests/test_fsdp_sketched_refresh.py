"""Issue 26 under FSDP2: the projected backward's refresh without the full gradient across ranks
(``sharding.FactoredRows``: the row-sharded range finder's products with ``G_i`` computed from each
rank's factors, ``G Ω`` reduce-scattered to the row shards, ``Gᵀ Y`` / ``Yᵀ G`` from the thin ``Y``
all-gathered), on CPU (gloo, 2 processes, float64), against one process.

Checked: the parameters equal the single-process run's (1e-9; 20 steps, 4 refreshes; GaLore+ with
cross-head q, randomized up/down with the residual; 1 and 2 micro-batches, and warm starts with a
left basis); at refresh steps the targets' ``W.grad`` stays ``None`` and FSDP2 reduce-scatters only
the other parameters (the same payload as between refreshes), no collective of the optimizer carries
a tensor as large as a target, and no op in backward or ``step()`` returns a tensor of a target's shape
other than FSDP2's own all-gathered weights (the full-gradient refresh, the control, shows all three);
a save on 2 ranks → resume → continue across a refresh is bitwise the uninterrupted run; a rank past
the factors' cap folds into its own ``G_r`` while the other keeps factors, with the same collectives;
a NaN in one rank's batch at a refresh is refused on every rank before anything changes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from _ranks import run_ranks
from test_distributed import BATCH, GAP, STEPS, WORLD, data, fsdp_model, full_params, make_model, make_optimizer
from test_ddp_sketched_refresh import assert_equal_to, resume_cap_and_nan  # the scenarios DDP shares
from test_sketched_refresh import TargetSized
from torch import nn

from galore_plus.projected import enable_projected_backward

TARGETS = ("q", "up", "down")  # q 32×16 (cross-head, right), up 48×16 (right), down 16×48 (left)
SMALLEST = 32 * 16
#: what FSDP2 itself does with the unsharded weights (all-gather into them, copy out, free)
FSDP_OWN = ("split_with_sizes_copy", "all_gather", "_foreach_copy", "chunk_cat", "copy_")


class Collectives:
    """Every collective called from Python while inside (FSDP2's own reduce-scatter included), by
    name: the payload shapes."""

    NAMES = ("all_reduce", "reduce_scatter_single", "all_gather", "broadcast", "gather")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self) -> Collectives:
        for name, original in self.originals.items():
            def counted(*args, _name=name, _original=original, **kwargs):
                t = kwargs.get("input", kwargs.get("tensor"))
                if t is None:
                    t = args[1] if _name in ("reduce_scatter_single", "all_gather") and len(args) > 1 else args[0]
                self.calls.append((_name, t.numel()))
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)


class FsdpWatch(TargetSized):
    """``TargetSized`` less FSDP2's own copies into and out of its all-gathered weights (``weights``:
    the sharded parameters, whose local shards the update writes)."""

    def __init__(self, shapes, weights):
        super().__init__(shapes, [w.to_local() for w in weights])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(name in str(func) for name in FSDP_OWN):
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            part = getattr(t, "_local_tensor", t)  # a DTensor (the mode sees its ops whole): this rank's part
            if part.layout != torch.strided:  # the residual's sampled product: only the index set's values
                continue
            if tuple(part.shape) in self.shapes and part.untyped_storage().data_ptr() not in self.weights:
                self.seen.add((str(func), tuple(part.shape)))
        return out


def projected(method: str = "galore+", sketched: bool = True):
    model = fsdp_model()
    optimizer = make_optimizer(model, method)
    if method == "warm":
        for group in optimizer.param_groups:
            if "rank" in group:
                group["warm_start"] = True
    enable_projected_backward(model, optimizer, sketched_refresh=sketched)
    return model, optimizer


def single(method: str) -> dict:
    model = make_model()
    optimizer = make_optimizer(model, method)
    if method == "warm":
        for group in optimizer.param_groups:
            if "rank" in group:
                group["warm_start"] = True
    for step in range(STEPS):
        x, y = data(step)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return full_params(model)


def train(model: nn.Module, optimizer, steps: range, rank: int, micro: int = 1, log: list | None = None,
          rows: list[int] | None = None) -> None:
    """``rows``: how many of the global batch's rows each rank takes (default: equal halves); the loss
    is scaled so that FSDP2's mean over the ranks is the global batch's mean."""
    weights = [getattr(model, n).weight for n in TARGETS]
    shapes = {tuple(w.shape) for w in weights} | {tuple(w.shape)[::-1] for w in weights}
    for step in steps:
        x, y = data(step)
        sizes = rows or [BATCH // WORLD] * WORLD
        x, y = x.split(sizes)[rank], y.split(sizes)[rank]
        scale = sizes[rank] * WORLD / BATCH
        watch = FsdpWatch(shapes, weights)
        with Collectives() as backward:
            for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
                loss = nn.functional.mse_loss(model(xb), yb) * scale / micro
                with watch:
                    loss.backward()
        held = [optimizer.factored_gradient(w) is not None for w in weights]
        folded = [getattr(optimizer.factored_gradient(w), "dense_part", None) is not None for w in weights]
        grads = [w.grad is not None for w in weights]
        with Collectives() as stepped, watch:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if log is not None:
            log.append({"seen": sorted(watch.seen), "held": held, "grads": grads, "folded": folded,
                        "fsdp_reduce_scatter": sum(n for name, n in backward.calls if name == "reduce_scatter_single"),
                        "largest_in_step": max((n for _, n in stepped.calls), default=0),
                        "refreshes": [optimizer.state[w]["refresh_count"] for w in weights]})


def scenario(rank: int, out_dir: str) -> dict:
    assert BATCH % (2 * WORLD) == 0
    results: dict = {}
    for method in ("galore+", "warm"):
        results[("single", method)] = single(method)
    for micro in (1, 2):
        model, optimizer = projected()
        log: list = []
        train(model, optimizer, range(STEPS), rank, micro, log)
        results[("sketched", micro)] = full_params(model)
        results[("sketched", micro, "log")] = log
    model, optimizer = projected("warm")
    train(model, optimizer, range(STEPS), rank, 2)
    results[("sketched", "warm")] = full_params(model)
    model, optimizer = projected(sketched=False)  # the control: refresh steps form G
    log = []
    train(model, optimizer, range(STEPS), rank, 1, log)
    results[("full-refresh",)] = full_params(model)
    results[("full-refresh", "log")] = log
    return resume_cap_and_nan(results, rank, os.path.join(out_dir, "fsdp-sketched"), projected, train)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_sketched")
    return run_ranks(scenario, WORLD, out, deadline_s=600, out_dir=str(out))


REFRESH_STEPS = list(range(0, STEPS, GAP))


@pytest.mark.parametrize("micro", [1, 2])
def test_sketched_refresh_across_row_shards_equals_one_process(ranks, micro):
    for res in ranks:
        assert_equal_to(ranks[0][("single", "galore+")], res[("sketched", micro)], f"micro {micro}")
        log = res[("sketched", micro, "log")]
        assert log[-1]["refreshes"] == [STEPS // GAP] * 3
        assert [i for i, e in enumerate(log) if any(e["held"])] == REFRESH_STEPS
        assert all(e["held"] == [True] * 3 for e in log[::GAP])
        assert not any(any(e["grads"]) for e in log)


def test_warm_started_sketched_refresh_equals_one_process(ranks):
    for res in ranks:
        assert_equal_to(ranks[0][("single", "warm")], res[("sketched", "warm")], "warm")


@pytest.mark.parametrize("micro", [1, 2])
def test_no_rank_forms_or_sends_a_target_sized_tensor_at_any_step(ranks, micro):
    for res in ranks:
        log = res[("sketched", micro, "log")]
        assert not any(e["seen"] for e in log), [e["seen"] for e in log]
        assert all(e["largest_in_step"] < SMALLEST for e in log)
        # FSDP2 reduce-scatters the other parameters only, refresh steps included
        assert len({e["fsdp_reduce_scatter"] for e in log}) == 1
    for res in ranks:  # the control shows all three at its refresh steps, and only there
        log = res[("full-refresh", "log")]
        assert [i for i, e in enumerate(log) if e["seen"]] == REFRESH_STEPS
        steady = log[1]["fsdp_reduce_scatter"]
        assert [i for i, e in enumerate(log) if e["fsdp_reduce_scatter"] > steady] == REFRESH_STEPS
        assert_equal_to(ranks[0][("single", "galore+")], res[("full-refresh",)], "full refresh")


def test_resume_across_a_refresh_is_bitwise(ranks):
    for res in ranks:
        for name, value in res[("sketched", 1)].items():
            assert torch.equal(res[("sketched", "resumed")][name], value), name


def test_a_rank_past_the_factors_cap_folds_its_own_gradient_and_the_collectives_stay_thin(ranks):
    """Rank 0 folds q's factors into its own dense ``G_r`` (past the cap), rank 1 keeps them: the
    ranks still issue the same thin collectives, FSDP2 reduce-scatters no target, and the run equals
    one process."""
    for res in ranks:
        assert_equal_to(ranks[0][("single", "galore+")], res[("cap",)], "cap")
        log = res[("cap", "log")]
        assert all(e["largest_in_step"] < SMALLEST for e in log)
        assert len({e["fsdp_reduce_scatter"] for e in log}) == 1
        assert not any(any(e["grads"]) for e in log)
    assert all(e["folded"] == [True, False, False] for e in ranks[0][("cap", "log")][::GAP])
    assert not any(any(e["folded"]) for e in ranks[1][("cap", "log")])


def test_non_finite_factors_on_one_rank_are_refused_on_every_rank(ranks):
    for res in ranks:
        assert res[("nan",)]["error"] is not None and "NaN or Inf" in res[("nan",)]["error"]
        assert res[("nan",)]["unchanged"]
