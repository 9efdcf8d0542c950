"""``projected.clip_grad_norm_`` under DDP with the projected backward: the targets' projected gradients
are averaged over the ranks before their norm is taken (``ProjectedBackward._reduce_ddp``), so every
rank clips by the norm of the global batch's gradient, as one process does, and the ranks stay equal.
Before, each rank measured its own un-averaged projected gradients: the ranks' clip factors differed
and so did their weights after the first clipped step.

2 gloo ranks, float64, GaLore+ (cross-head q, the residual, the sketched refresh across ranks) with a
max norm small enough to clip every step, against one process clipping the whole batch.
"""

from __future__ import annotations

import torch
from _ranks import run_ranks
from test_ddp_sketched_refresh import ddp_projected
from test_distributed import BATCH, STEPS, WORLD, data, full_params, make_model, make_optimizer
from torch import nn

from galore_plus.projected import clip_grad_norm_, enable_projected_backward

MAX_NORM = 1e-3  # below every step's gradient norm here: each step clips


def train(model, optimizer, rank: int | None) -> list[float]:
    norms = []
    for step in range(STEPS):
        x, y = data(step)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(clip_grad_norm_(optimizer, MAX_NORM))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def scenario(rank: int) -> dict:
    model, optimizer = ddp_projected()
    norms = train(model, optimizer, rank)
    return {"ddp": full_params(model), "norms": norms}


def test_clipping_under_ddp_measures_the_ranks_mean_and_equals_one_process(tmp_path):
    assert BATCH % WORLD == 0
    model = make_model()  # one process (here, no process group): the reference
    optimizer = make_optimizer(model, "galore+")
    # no cap: the whole batch's 16 tokens would fold q's factors (cap 10.7 tokens) into G, which clipping
    # then measures whole at the refresh step; each rank's 8 stay factors (DESIGN.md, "the factors' cap")
    enable_projected_backward(model, optimizer).cap_factors = False
    single_norms = train(model, optimizer, None)
    single = full_params(model)
    assert all(n > MAX_NORM for n in single_norms)  # every step clipped
    ranks = run_ranks(scenario, WORLD, tmp_path, deadline_s=600)
    for res in ranks:
        torch.testing.assert_close(torch.tensor(res["norms"]), torch.tensor(single_norms), rtol=1e-9, atol=0)
        for name, p in single.items():
            torch.testing.assert_close(res["ddp"][name], p, rtol=1e-9, atol=1e-11, msg=name)
    for a, b in zip(ranks[0]["ddp"].values(), ranks[1]["ddp"].values()):
        assert torch.equal(a, b)  # the ranks hold the same parameters, bit for bit
