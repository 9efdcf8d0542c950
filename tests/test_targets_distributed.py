"""Fused q/k/v head blocks under DDP (split refresh) and FSDP2 (row shards) on CPU (gloo, 2 processes),
against the single-process run: a row-blocked ``nn.Linear`` (right projector) and a column-blocked
``Conv1D``-like weight (``in × out``, left projector; under FSDP2 its rows, the input features, are
sharded, so the chosen column blocks are gathered). One spawn runs every scenario; it cannot hang
(the process group times out, the spawn has a deadline)."""

from __future__ import annotations

import pytest
import torch
from _ranks import full_params, run_ranks
from torch import nn

from galore_plus import GaLorePlusAdamW
from galore_plus.distributed import distribute, wrap_model
from galore_plus.projected import enable_projected_backward

WORLD = 2
STEPS = 9
GAP = 3
BATCH = 8
ROW_BLOCKS = {"count": 12, "eligible": [0, 1, 3, 4, 6, 7, 9, 10], "dim": 0}  # per head [q; k; v], 4 rows each
COLUMN_BLOCKS = {"count": 12, "eligible": list(range(8)), "dim": 1}        # [Q | K | V], 4 columns each


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48, bias=False)                # 48×16, row blocks
        self.c_attn = nn.Parameter(torch.randn(16, 48) * 0.2)   # 16×48 (in × out), column blocks
        self.out = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.qkv(x)) + torch.tanh(x @ self.c_attn))


def make_model() -> Fused:
    torch.manual_seed(0)
    return Fused().double()


def make_optimizer(model: nn.Module, warm: bool):
    by_name = {n.removeprefix("module."): p for n, p in model.named_parameters()}
    # rank 6 > 4 rows/columns per block: two blocks stacked; oversample 0 with rank 2 sketches them
    groups = [{"params": [by_name["qkv.weight"]], "rank": 6, "head_blocks": ROW_BLOCKS},
              {"params": [by_name["c_attn"]], "rank": 6 if not warm else 2, "head_blocks": COLUMN_BLOCKS,
               "warm_start": warm, "oversample": 0},
              {"params": [by_name["out.weight"], by_name["out.bias"]]}]
    return GaLorePlusAdamW(groups, lr=1e-2, update_proj_gap=GAP, scale=1.0, seed=3)


def data(step: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(BATCH, 16, generator=g, dtype=torch.float64), torch.randn(BATCH, 16, generator=g,
                                                                              dtype=torch.float64)


def train(model, optimizer, rank):
    for step in range(STEPS):
        x, y = data(step)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for warm in (False, True):
        model = make_model()
        train(model, make_optimizer(model, warm), None)
        results[("single", warm)] = full_params(model)
        model = DistributedDataParallel(make_model())
        train(model, distribute(make_optimizer(model, warm)), rank)
        results[("ddp", warm)] = full_params(model)
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        optimizer = make_optimizer(model, warm)
        train(model, optimizer, rank)
        results[("fsdp", warm)] = full_params(model)
        results[("fsdp", warm, "left")] = type(optimizer.state[model.c_attn]["proj_left"]).__name__
        # the projected backward on the row-blocked qkv (an nn.Linear): its refresh sketched from the
        # ranks' factors (issue 26; distributed_sketch under DDP, sharding.FactoredRows under FSDP2)
        for kind in ("ddp", "fsdp"):
            model = make_model()
            if kind == "fsdp":
                fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
            optimizer = make_optimizer(model, warm)
            enable_projected_backward(model, optimizer)
            if kind == "ddp":
                model = wrap_model(model, "ddp", torch.device("cpu"))
                distribute(optimizer)
            held = []
            qkv = getattr(model, "module", model).qkv.weight
            original = optimizer.add_factored_gradient
            optimizer.add_factored_gradient = lambda p, g: (held.append(p is qkv), original(p, g))[1]
            train(model, optimizer, rank)
            results[(f"{kind}-projected", warm)] = full_params(model)
            results[(f"{kind}-projected", warm, "held")] = held
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(run, WORLD, tmp_path_factory.mktemp("fused"), deadline_s=300)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("warm", [False, True])
def test_fused_head_blocks_equal_the_single_process_run(ranks, kind, warm):
    reference = ranks[0][("single", warm)]
    for res in ranks:
        got = res[(kind, warm)]
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-9, atol=1e-11, msg=f"{kind} {name}")
    start = make_model()
    assert not torch.allclose(reference["c_attn"], start.c_attn.detach(), atol=1e-3)
    assert not torch.allclose(reference["qkv.weight"], start.qkv.weight.detach(), atol=1e-3)
    assert ranks[0][("fsdp", warm, "left")] == "DTensor"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("warm", [False, True])
def test_fused_head_blocks_with_the_sketched_refresh_equal_the_single_process_run(ranks, kind, warm):
    reference = ranks[0][("single", warm)]
    for res in ranks:
        got = res[(f"{kind}-projected", warm)]
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-9, atol=1e-11, msg=f"{kind} {name}")
        assert res[(f"{kind}-projected", warm, "held")] == [True] * (STEPS // GAP)  # qkv, once per refresh
