"""Run a scenario on gloo ranks (CPU, spawned processes) and collect what each rank returns; shared by
the distributed tests.

Nothing here can hang: the ranks' process group has a timeout (a desynchronised collective raises),
and the spawn is joined with a deadline after which the ranks are killed and the test fails. A rank
that raises saves its traceback, which the caller's test shows.

The scenario is a module-level function of the calling test module, ``scenario(rank, **kwargs) ->
dict``; it is pickled by reference, so the spawned ranks import that module (``tests/`` is on the
path the spawn hands down)."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # a rank waiting longer on a collective raises


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_with_deadline(fn, args: tuple, nprocs: int, deadline: float) -> None:
    """``mp.spawn`` that cannot hang: past ``deadline`` seconds every rank is killed and this fails."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    try:
        while not context.join(timeout=max(1.0, end - time.monotonic())):
            if time.monotonic() >= end:
                pytest.fail(f"the {nprocs} ranks did not finish within {deadline} s (a collective hung?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _rank_main(rank: int, scenario, world: int, port: int, out_dir: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    results = {}
    try:
        results = scenario(rank, **kwargs)
    except BaseException:
        results = {"error": traceback.format_exc()}
        raise
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_ranks(scenario, world: int, out_dir, /, deadline_s: float = 300, **kwargs) -> list:
    """Run ``scenario(rank, **kwargs)`` on ``world`` gloo ranks and return what each rank returned, by
    rank; each rank's result is saved as ``out_dir/rank{r}.pt``. Fails the test when the ranks are not
    done within ``deadline_s`` seconds, or when a rank raised (with its traceback). The first three
    arguments are positional-only, so a scenario may take an ``out_dir`` keyword of its own."""
    try:
        spawn_with_deadline(_rank_main, (scenario, world, free_port(), str(out_dir), kwargs), world, deadline_s)
    except mp.ProcessRaisedException:
        pass  # the rank files carry the traceback
    paths = [Path(out_dir) / f"rank{r}.pt" for r in range(world)]
    results = [torch.load(path, weights_only=False) if path.exists() else None for path in paths]
    # every rank's traceback, before a missing file: a rank that waited on a failed one errs or is killed
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if res is not None and "error" in res]
    assert not errors, "\n".join(errors)
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote no results"
    return results


def whole(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor: a DTensor's ``full_tensor()`` (a collective: every rank calls
    it), anything else as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (:func:`whole`), by its name without DDP's ``module.`` prefix."""
    return {n.removeprefix("module."): whole(p) for n, p in model.named_parameters()}


def single_ddp_fsdp(make_model, make_optimizer, train, rank: int, world: int) -> dict:
    """``train(model, optimizer, rank)``'s result three ways, for a test that the distributed runs equal
    one process: ``"single"`` (rank None: the whole batch), ``"ddp"`` (the model in
    ``DistributedDataParallel``, the optimizer in ``distribute``) and ``"fsdp"`` (``fully_shard`` on a
    1-D CPU mesh of ``world`` ranks); a fresh ``make_model()`` and ``make_optimizer(model)`` each time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from galore_plus.distributed import distribute

    model = make_model()
    out = {"single": train(model, make_optimizer(model), None)}
    model = DistributedDataParallel(make_model())
    out["ddp"] = train(model, distribute(make_optimizer(model)), rank)
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    out["fsdp"] = train(model, make_optimizer(model), rank)
    return out


def per_method(methods, make_model, make_optimizer, train, rank: int, world: int) -> dict:
    """:func:`single_ddp_fsdp` for each of ``methods``, with ``make_optimizer(model, method)``: the results by
    ``(kind, method)``."""
    return {(kind, method): result for method in methods
            for kind, result in single_ddp_fsdp(make_model, lambda m: make_optimizer(m, method), train, rank,
                                                world).items()}


def mse_steps(model, optimizer, data, steps: int, rank, world: int, after_step=None) -> None:
    """``steps`` optimizer steps of mean-squared error on ``data(step)``'s ``(x, y)``: the whole batch, or
    rank ``rank``'s ``1/world`` of its rows; ``after_step(step)`` is called after each."""
    import torch.nn.functional as F

    for step in range(steps):
        x, y = data(step)
        if rank is not None:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
