"""Bytes communicated by GaLore+ under FSDP2 and DDP for one LLaMA-shaped decoder layer, and refresh
time on 2 ranks vs 1 (CPU, gloo).

The layer's seven weight matrices (PyTorch layout out×in; LLaMA-7B: q, k, v, o 4096×4096 with 32
heads of 128 rows, gate/up 11008×4096, down 4096×11008) are built as FSDP2-style DTensors
(``Shard(0)`` over a 1-D mesh of ``--world`` ranks) with low-rank-plus-noise gradients, and driven
by ``GaLorePlusAdamW`` through ``galore_plus.distributed.distribute`` with the paper's recipe:
cross-head projection and a 1.2% residual on q/k, randomized subspace iteration (oversample 8, two
power iterations) everywhere, rank ``--rank``. The optimizer counts the payload of each of its own
collectives (``optimizer.comm_bytes``); bytes *sent per rank* use the ring model: all-reduce of B
bytes 2(N−1)/N·B, all-gather of a b-byte shard (N−1)·b, broadcast B, gather b.

Compared with the all-gather approach (what a GaLore that needs the whole gradient does under FSDP:
all-gather every matrix's gradient, (N−1)/N·m·n·4 bytes per rank, at every step, since the
projection ``G Q`` and the refresh both read the whole gradient).

Refresh time: a refresh step minus a steady step (best of 3, the maximum over ranks; wall and CPU
seconds), for
FSDP2 on N ranks, DDP on N ranks (each rank computes the projectors it owns, then broadcasts) and one
process, each rank with one thread (so N ranks use N cores). DDP gradients are the same on every
rank, as after DDP's all-reduce.

    python bench/communication.py               # LLaMA-7B dimensions / 2, rank 128, 2 ranks
    python bench/communication.py --divisor 1   # the LLaMA-7B layer itself (≤ 1 GB per rank; slow on 2 cores)
    python bench/communication.py --quick       # every dimension / 8, rank 16: ~1 min

The bytes are exact functions of the shapes (``expected_payload``; every run checks the counted
payloads against it), so the LLaMA-7B figures are also given from the formula.

``--projected-backward`` measures instead what issue 26 asks of FSDP2 with the projected backward:
a real LLaMA-shaped model (random weights, ``--hidden``, ``--layers``; intermediate 2.6875×hidden,
heads of 64) under ``fully_shard`` on ``--world`` gloo ranks, trained by the command's GaLore+ optimizer
(``build_optimizer``, rank ``--rank``, ``update_proj_gap`` 4) once with the full backward and once with
the projected one, counting per step the payload FSDP2 reduce-scatters (``dist.reduce_scatter_single``,
which FSDP2 calls, less the optimizer's own reduce-scatters) and the optimizer's own collectives. The target matrices' share of FSDP2's payload
is the full run's minus the projected run's between refreshes (the other parameters), checked against
``Σ ⌈m/N⌉·N·n·4``. Refresh steps of the full path form the full gradient; the projected path refreshes
from the ranks' factors (DESIGN.md, "Distributed"), its products counted as refresh-phase traffic, so
the average per step is given with and without that work, for the measured gap (4) and the command's
default (50). Writes
``communication_projected.json`` / ``.md``:

    python bench/communication.py --projected-backward              # hidden 512, 4 layers, rank 32
    python bench/communication.py --projected-backward --quick      # hidden 128, 2 layers, rank 8

``--projected-backward --ddp``: the same model under DDP (``wrap_model(..., "ddp")``, ``distribute``),
three runs: the full path (DDP all-reduces every target's ``m×n``; a DDP comm hook counts its
buckets), the projected backward with the full-gradient refresh (``sketched_refresh=False``) and with
the sketched refresh across ranks (``distributed_sketch``: every range-finder product all-reduced).
Writes ``communication_projected_ddp.json`` / ``.md``:

    python bench/communication.py --projected-backward --ddp        # hidden 512, 4 layers, rank 32

Writes ``communication.json`` and ``communication.md`` (``--out``, default ``bench/results``).
FSDP2's own all-gather of parameters and reduce-scatter of gradients, and DDP's gradient all-reduce,
are the same for every optimizer and not counted here.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness  # bench/harness.py

REPEATS = 3
SHAPES_7B = {  # name: (rows, cols, heads)
    "q_proj": (4096, 4096, 32), "k_proj": (4096, 4096, 32), "v_proj": (4096, 4096, None),
    "o_proj": (4096, 4096, None), "gate_proj": (11008, 4096, None), "up_proj": (11008, 4096, None),
    "down_proj": (4096, 11008, None),
}


def shapes(divisor: int) -> dict[str, tuple[int, int, int | None]]:
    """The LLaMA-7B layer with every dimension divided by ``divisor`` (heads keep 128 rows down to /2)."""
    if divisor == 1:
        return SHAPES_7B
    head_rows = 128 if divisor <= 2 else 64
    return {k: (m // divisor, n // divisor, m // divisor // head_rows if h else None)
            for k, (m, n, h) in SHAPES_7B.items()}


def expected_payload(layer: dict, rank: int, oversample: int = 8, power_iters: int = 2,
                     residual_ratio: float = 0.012) -> dict[str, dict[str, int]]:
    """The payload bytes (float32) the optimizer's collectives carry, from the algorithm alone
    (``distributed.py``): checked against the counted bytes by every run, and used for the LLaMA-7B
    layer without running it.

    FSDP2 refresh of a randomized m×n matrix (k = r + oversample): CholeskyQR2 Gram matrices 2·k² per
    orthonormalisation of a row-sharded block (1 + power_iters of them), ``Aᵀ Y`` n·k per power
    iteration, ``Yᵀ A`` k·n. Cross-head (q, k): the ⌈r/d_k⌉ heads' rows, ⌈r/d_k⌉·d_k·n (their SVD is
    local). Residual index set (q, k): ρ·m·n candidate values all-gathered. Per step: r·n for a left
    projection (m < n), nothing for a right one. DDP refresh: the projector broadcast, r·n (right) or
    m·r (left)."""
    fsdp_refresh = {"all_reduce": 0, "all_gather": 0}
    fsdp_step = {"all_reduce": 0}
    ddp_refresh = {"broadcast": 0}
    for m, n, heads in layer.values():
        left = heads is None and m < n
        if heads is not None:
            d_k = m // heads
            fsdp_refresh["all_reduce"] += 4 * -(-rank // d_k) * d_k * n
            fsdp_refresh["all_gather"] += 4 * max(1, round(residual_ratio * m * n))
        else:
            k = min(rank + oversample, m, n)
            fsdp_refresh["all_reduce"] += 4 * (2 * k * k * (1 + power_iters) + power_iters * n * k + k * n)
        if left:
            fsdp_step["all_reduce"] += 4 * rank * n
        ddp_refresh["broadcast"] += 4 * (m * rank if left else rank * n)
    return {"fsdp_refresh": fsdp_refresh, "fsdp_step": fsdp_step, "ddp_refresh": ddp_refresh}


def gradient(m: int, n: int, seed: int) -> torch.Tensor:
    """Rank-256 product with a spectrum decaying 100×, plus small noise (as bench/refresh_time.py)."""
    g = torch.Generator().manual_seed(seed)
    k = min(256, m, n)
    decay = torch.logspace(0, -2, k)
    return (torch.randn(m, k, generator=g) * decay) @ torch.randn(k, n, generator=g) / n**0.5 \
        + 1e-3 * torch.randn(m, n, generator=g)


def build(kind: str, layer: dict, rank: int, world: int, mesh):
    """Parameters and gradients of the layer: DTensor shards (fsdp) or whole tensors (ddp, single)."""
    from torch.distributed.tensor import DTensor, Shard

    params, heads = [], []
    for i, (name, (m, n, h)) in enumerate(layer.items()):
        full = gradient(m, n, seed=i)
        if kind == "fsdp":
            chunk = -(-m // world)
            local = full[rank * chunk: (rank + 1) * chunk].clone()
            del full
            p = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
        else:
            p = torch.nn.Parameter(full)
        # the gradient shares the parameter's storage: half the memory, and neither bytes nor times
        # depend on the values after the refresh has read them
        p.grad = p.detach()
        params.append((name, p))
        heads.append(h)
    return params, heads


def optimizer_for(params, heads, rank_r: int):
    from galore_plus import GaLorePlusAdamW, galore_plus_param_groups

    matrices = [(name, p, h) for (name, p), h in zip(params, heads)]
    groups = galore_plus_param_groups(matrices, rank=rank_r, update_proj_gap=2, scale=1.0, residual_warmup=1)
    return GaLorePlusAdamW(groups, lr=1e-5, weight_decay=0.0, seed=0)


def timed_step(optimizer) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one step, between barriers."""
    if dist.is_initialized():
        dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    optimizer.step()
    cpu = time.process_time() - cpu
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - wall, cpu


def run(kind: str, layer: dict, rank_r: int, rank: int, world: int) -> dict:
    from galore_plus.distributed import distribute

    mesh = None
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    params, heads = build(kind, layer, rank, world, mesh)
    optimizer = optimizer_for(params, heads, rank_r)
    if kind != "single":
        optimizer = distribute(optimizer)
    timed_step(optimizer)                   # step 1: refresh + residual index selection (untimed warm-up)
    after_refresh = snapshot(optimizer)
    steady, refresh = [], []                # update_proj_gap=2: steps 2, 4, 6 steady; 3, 5, 7 refresh
    for i in range(REPEATS):
        before = snapshot(optimizer)
        steady.append(timed_step(optimizer))
        if i == 0:
            between = snapshot(optimizer)
            per_step = {op: between["step"].get(op, 0) - before["step"].get(op, 0) for op in between["step"]}
        refresh.append(timed_step(optimizer))
    wall_steady, cpu_steady = (min(t[j] for t in steady) for j in (0, 1))
    wall_refresh, cpu_refresh = (min(t[j] for t in refresh) for j in (0, 1))
    return {"refresh_seconds": max(wall_refresh - wall_steady, 0.0), "step_seconds": wall_steady,
            "refresh_cpu_seconds": max(cpu_refresh - cpu_steady, 0.0), "step_cpu_seconds": cpu_steady,
            "refresh_payload": after_refresh["refresh"], "step_payload": per_step,
            "first_step_payload": after_refresh["step"]}


def snapshot(optimizer) -> dict:
    counts = getattr(optimizer, "comm_bytes", {})
    return {phase: dict(counts.get(phase, {})) for phase in ("step", "refresh")}


def sent_per_rank(payload: dict, world: int) -> float:
    """Ring-model bytes one rank sends for the payloads counted by the optimizer."""
    factor = {"all_reduce": 2 * (world - 1) / world, "all_gather": world - 1, "broadcast": 1.0, "gather": 1.0}
    return sum(factor[op] * b for op, b in payload.items())


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layer = shapes(args.divisor)
    out = {}
    for kind in ("fsdp", "ddp"):
        result = run(kind, layer, args.rank, rank, world)
        keys = ("refresh_seconds", "step_seconds", "refresh_cpu_seconds", "step_cpu_seconds")
        times = torch.tensor([result[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        result.update(zip(keys, times.tolist()))
        out[kind] = result
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- issue 26


PROJECTED_GAP = 4  # update_proj_gap of the projected-backward measurement


def llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def projected_run(projected: bool, args, rank: int, world: int) -> dict:
    """Per-step payloads of one run: FSDP2's reduce-scatter, the optimizer's step and refresh phases."""
    from galore_plus.distributed import wrap_model
    from galore_plus.integration import build_optimizer
    from galore_plus.spec import LowRankSpec

    model = wrap_model(llama(args.hidden, args.layers), "fsdp", torch.device("cpu"))
    spec = LowRankSpec.recipe("galore+", args.rank, "finetune", update_proj_gap=PROJECTED_GAP, scale=4.0,
                              residual_warmup=1)
    optimizer = build_optimizer(model, spec, lr=1e-4, projected_backward=projected)
    targets = [(name, tuple(p.shape)) for g in optimizer.param_groups if "rank" in g
               for name, p in zip(g["param_names"], g["params"])]
    original, counted = dist.reduce_scatter_single, [0]

    def reduce_scatter(*a, **k):
        t = k.get("input", a[1] if len(a) > 1 else None)
        counted[0] += t.numel() * t.element_size()
        return original(*a, **k)

    dist.reduce_scatter_single = reduce_scatter
    steps = []
    try:
        for step in range(3 * PROJECTED_GAP):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, 1024, (args.batch, args.tokens), generator=g).chunk(world)[rank]
            counted[0] = 0
            before = snapshot(optimizer)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after = snapshot(optimizer)
            # the optimizer's own reduce-scatters (between refreshes G Q, at a sketched refresh G Ω too)
            mine = sum(after[ph].get("reduce_scatter", 0) - before[ph].get("reduce_scatter", 0)
                       for ph in ("step", "refresh"))
            steps.append({"fsdp_reduce_scatter": counted[0] - mine, **{
                f"optimizer_{ph}": {op: after[ph].get(op, 0) - before[ph].get(op, 0) for op in after[ph]}
                for ph in ("step", "refresh")}})
    finally:
        dist.reduce_scatter_single = original
    return {"steps": steps, "targets": targets}


def projected_worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {"full": projected_run(False, args, rank, world), "projected": projected_run(True, args, rank, world)}
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


RING = {"all_reduce": lambda w: 2 * (w - 1) / w, "reduce_scatter": lambda w: (w - 1) / w,
        "all_gather": lambda w: w - 1, "broadcast": lambda w: 1.0, "gather": lambda w: 1.0}


def projected_summary(multi: dict, args) -> dict:
    """Payload and ring-model bytes per step of the targets' gradients, full against projected."""
    world, gap = args.world, PROJECTED_GAP
    full, proj = multi["full"]["steps"], multi["projected"]["steps"]
    steady_idx = [i for i in range(gap + 1, len(proj)) if i % gap]  # after the residual set is in place
    others = proj[steady_idx[0]]["fsdp_reduce_scatter"]
    targets = multi["full"]["targets"]
    target_rs = sum(-(-m // world) * world * n * 4 for _, (m, n) in targets)

    def per_step(entry: dict, ring: bool) -> float:
        factor = (lambda op: RING[op](world)) if ring else (lambda op: 1.0)
        own = sum(factor(op) * b for op, b in entry["optimizer_step"].items())
        refresh = sum(factor(op) * b for op, b in entry["optimizer_refresh"].items())
        return (entry["fsdp_reduce_scatter"] - others) * factor("reduce_scatter") + own, refresh

    rows = {}
    for name, log in (("full", full), ("projected", proj)):
        for ring in (False, True):
            steady = per_step(log[steady_idx[0]], ring)
            refresh = per_step(log[2 * gap], ring)
            key = f"{name}_{'sent' if ring else 'payload'}"
            rows[key] = {"steady_step": steady[0], "steady_refresh_phase": steady[1],
                         "refresh_step": refresh[0], "refresh_step_refresh_phase": refresh[1]}
            for T in (gap, 50):
                rows[key][f"mean_per_step_T{T}"] = ((T - 1) * steady[0] + refresh[0]) / T
                rows[key][f"mean_per_step_T{T}_with_refresh_work"] = ((T - 1) * sum(steady) + sum(refresh)) / T
    r_min = min(args.rank / min(shape) for _, shape in targets)
    r_max = max(args.rank / min(shape) for _, shape in targets)
    return {"hidden": args.hidden, "layers": args.layers, "rank": args.rank, "world": world, "gap": gap,
            "tokens_per_step": args.batch * args.tokens,
            "targets": [[n, list(s)] for n, s in targets], "fsdp_others_payload": others,
            "fsdp_target_payload_formula": target_rs,
            "fsdp_target_payload_counted": full[steady_idx[0]]["fsdp_reduce_scatter"] - others,
            "r_over_min_side": [r_min, r_max], "rows": rows, "steps": multi,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                       "one thread per rank, gloo"}


def projected_markdown(r: dict) -> str:
    kib = lambda b: f"{b / 2**10:,.1f} KiB"  # noqa: E731
    rows = r["rows"]
    lines = [f"# FSDP2 with the projected backward: bytes per step of the target matrices ({r['world']} ranks)", "",
             f"LLaMA-shaped, hidden {r['hidden']}, {r['layers']} layers, GaLore+ rank {r['rank']} (cross-head + "
             f"residual on q/k, randomized elsewhere), {r['tokens_per_step']} tokens per step, float32; "
             f"{r['machine']}. r/min(m, n) of the targets: {r['r_over_min_side'][0]:.4f}–"
             f"{r['r_over_min_side'][1]:.4f}. FSDP2's reduce-scatter of the targets: {r['fsdp_target_payload_counted']:,} "
             f"bytes counted, {r['fsdp_target_payload_formula']:,} from the shapes.", "",
             "| targets' gradients | steady step | refresh step | mean per step, T=4 | mean per step, T=50 | "
             "T=4 with refresh work | T=50 with refresh work |", "|---|---|---|---|---|---|---|"]
    for kind in ("payload", "sent"):
        for name in ("full", "projected"):
            row = rows[f"{name}_{kind}"]
            lines.append(f"| {name}, {'payload' if kind == 'payload' else 'sent per rank (ring)'} | "
                         f"{kib(row['steady_step'])} | {kib(row['refresh_step'])} | {kib(row['mean_per_step_T4'])} | "
                         f"{kib(row['mean_per_step_T50'])} | {kib(row['mean_per_step_T4_with_refresh_work'])} | "
                         f"{kib(row['mean_per_step_T50_with_refresh_work'])} |")
        f, p = rows[f"full_{kind}"], rows[f"projected_{kind}"]
        lines.append(f"| ratio projected/full ({kind}) | {p['steady_step'] / f['steady_step']:.4f} | "
                     f"{p['refresh_step'] / f['refresh_step']:.4f} | {p['mean_per_step_T4'] / f['mean_per_step_T4']:.4f} "
                     f"| {p['mean_per_step_T50'] / f['mean_per_step_T50']:.4f} | "
                     f"{p['mean_per_step_T4_with_refresh_work'] / f['mean_per_step_T4_with_refresh_work']:.4f} | "
                     f"{p['mean_per_step_T50_with_refresh_work'] / f['mean_per_step_T50_with_refresh_work']:.4f} |")
    lines += ["", "Steady step: FSDP2's reduce-scatter of the targets' m×n gradients plus the optimizer's r×n "
              "all-reduce of left projections (full), against the projected path's reduce-scatter of G Q "
              "(m×r), all-reduce of Pᵀ G (r×n) and of the residual entries. Refresh steps: the full path forms and "
              "reduce-scatters G; the projected path refreshes from the ranks' factors (issue 26, "
              "sharding.FactoredRows), its range-finder products being refresh-phase traffic: 'with refresh "
              "work' adds the optimizer's refresh-phase collectives (range finder, head rows, residual candidates; "
              "on the projected path also the all-gathered left bases, thin Y and residual indices).", "", f"Command: `{r['command']}`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ DDP with the projected backward (issue 26)
DDP_RUNS = ("full", "projected_full_refresh", "projected")


def ddp_projected_run(mode: str, args, rank: int, world: int) -> dict:
    """Per-step payloads of one DDP run (``mode`` in ``DDP_RUNS``): DDP's own all-reduce (a comm hook
    counts its buckets) and the optimizer's step and refresh phases. ``projected_full_refresh``: the
    projected backward with ``sketched_refresh=False`` (each refresh step forms and all-reduces ``G``);
    ``projected``: the sketched refresh across ranks (``distributed_sketch``)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from galore_plus.distributed import distribute, wrap_model
    from galore_plus.integration import build_optimizer
    from galore_plus.spec import LowRankSpec

    model = llama(args.hidden, args.layers)
    spec = LowRankSpec.recipe("galore+", args.rank, "finetune", update_proj_gap=PROJECTED_GAP, scale=4.0,
                              residual_warmup=1)
    optimizer = build_optimizer(model, spec, lr=1e-4, projected_backward=mode != "full")
    if mode == "projected_full_refresh":
        optimizer.projected_backward.sketched_refresh = False
    targets = [(name, tuple(p.shape)) for g in optimizer.param_groups if "rank" in g
               for name, p in zip(g["param_names"], g["params"])]
    ddp = wrap_model(model, "ddp", torch.device("cpu"))
    distribute(optimizer)
    counted = [0]

    def hook(state, bucket):
        counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    steps = []
    for step in range(3 * PROJECTED_GAP):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 1024, (args.batch, args.tokens), generator=g).chunk(world)[rank]
        counted[0] = 0
        before = snapshot(optimizer)
        ddp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = snapshot(optimizer)
        steps.append({"ddp_all_reduce": counted[0], **{
            f"optimizer_{ph}": {op: after[ph].get(op, 0) - before[ph].get(op, 0) for op in after[ph]}
            for ph in ("step", "refresh")}})
    return {"steps": steps, "targets": targets}


def ddp_projected_worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {mode: ddp_projected_run(mode, args, rank, world) for mode in DDP_RUNS}
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def ddp_projected_summary(multi: dict, args) -> dict:
    """Payload and ring-model bytes per step of the targets' gradients under DDP: the full path (DDP's
    all-reduce of ``m×n``), the projected backward with the full-gradient refresh, and with the
    sketched refresh across ranks."""
    world, gap = args.world, PROJECTED_GAP
    steady_idx = [i for i in range(gap + 1, 3 * gap) if i % gap][0]  # after the residual set is in place
    refresh_idx = 2 * gap
    others = multi["projected"]["steps"][steady_idx]["ddp_all_reduce"]  # DDP's buckets without the targets
    targets = multi["full"]["targets"]

    def per_step(entry: dict, ring: bool) -> tuple[float, float]:
        factor = (lambda op: RING[op](world)) if ring else (lambda op: 1.0)
        own = sum(factor(op) * b for op, b in entry["optimizer_step"].items())
        refresh = sum(factor(op) * b for op, b in entry["optimizer_refresh"].items())
        return (entry["ddp_all_reduce"] - others) * factor("all_reduce") + own, refresh

    rows = {}
    for name in DDP_RUNS:
        log = multi[name]["steps"]
        for ring in (False, True):
            steady, refresh = per_step(log[steady_idx], ring), per_step(log[refresh_idx], ring)
            key = f"{name}_{'sent' if ring else 'payload'}"
            rows[key] = {"steady_step": sum(steady), "refresh_step": sum(refresh)}
            for T in (gap, 50):
                rows[key][f"mean_per_step_T{T}"] = ((T - 1) * sum(steady) + sum(refresh)) / T
    return {"hidden": args.hidden, "layers": args.layers, "rank": args.rank, "world": world, "gap": gap,
            "tokens_per_step": args.batch * args.tokens, "targets": [[n, list(s)] for n, s in targets],
            "ddp_others_payload": others, "ddp_target_payload_formula": sum(m * n * 4 for _, (m, n) in targets),
            "ddp_target_payload_counted": multi["full"]["steps"][steady_idx]["ddp_all_reduce"] - others,
            "optimizer_payload_largest_step": {
                name: max(sum(e["optimizer_step"].values()) + sum(e["optimizer_refresh"].values())
                          for e in multi[name]["steps"]) for name in DDP_RUNS},
            "r_over_min_side": [min(args.rank / min(s) for _, s in targets), max(args.rank / min(s) for _, s in targets)],
            "rows": rows, "steps": multi,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                       "one thread per rank, gloo"}


def ddp_projected_markdown(r: dict) -> str:
    kib = lambda b: f"{b / 2**10:,.1f} KiB"  # noqa: E731
    rows = r["rows"]
    lines = [f"# DDP with the projected backward: bytes per step of the target matrices ({r['world']} ranks)", "",
             f"LLaMA-shaped, hidden {r['hidden']}, {r['layers']} layers, GaLore+ rank {r['rank']} (cross-head + "
             f"residual on q/k, randomized elsewhere), {r['tokens_per_step']} tokens per step, float32; "
             f"{r['machine']}. DDP's all-reduce of the targets: {r['ddp_target_payload_counted']:,} bytes counted "
             f"(comm hook), {r['ddp_target_payload_formula']:,} from the shapes. Every step includes the "
             "optimizer's refresh-phase collectives (range finder products, flags, projector broadcasts).", "",
             "| targets' gradients | steady step | refresh step | mean per step, T=4 | mean per step, T=50 |",
             "|---|---|---|---|---|"]
    for kind in ("payload", "sent"):
        full = rows[f"full_{kind}"]
        for name in DDP_RUNS:
            row = rows[f"{name}_{kind}"]
            lines.append(f"| {name}, {'payload' if kind == 'payload' else 'sent per rank (ring)'} | "
                         f"{kib(row['steady_step'])} | {kib(row['refresh_step'])} | {kib(row['mean_per_step_T4'])} | "
                         f"{kib(row['mean_per_step_T50'])} |")
        for name in DDP_RUNS[1:]:
            row = rows[f"{name}_{kind}"]
            lines.append(f"| ratio {name}/full ({kind}) | " + " | ".join(
                f"{row[k] / full[k]:.4f}" for k in ("steady_step", "refresh_step", "mean_per_step_T4",
                                                    "mean_per_step_T50")) + " |")
    lines += ["", f"Command: `{r['command']}`.", ""]
    return "\n".join(lines)


def ddp_projected_main(args) -> None:
    multi = spawn_ranks(ddp_projected_worker, args)
    result = ddp_projected_summary(multi, args)
    result["command"] = "python bench/communication.py --projected-backward --ddp" + (" --quick" if args.quick else "")
    name = "communication_projected_ddp_quick" if args.quick else "communication_projected_ddp"
    harness.write_outputs(args.out, name, result, ddp_projected_markdown)
    print(ddp_projected_markdown(result))


def spawn_ranks(target, args):
    """``target(rank, world, port, args, queue)`` in ``args.world`` spawned processes; what rank 0 puts
    on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, args.world, port, args, queue))
             for port in [free_port()] for r in range(args.world)]
    for p in procs:
        p.start()
    multi = queue.get()
    for p in procs:
        p.join()
    return multi


def projected_main(args) -> None:
    multi = spawn_ranks(projected_worker, args)
    result = projected_summary(multi, args)
    result["command"] = "python bench/communication.py --projected-backward" + (" --quick" if args.quick else "")
    name = "communication_projected_quick" if args.quick else "communication_projected"
    harness.write_outputs(args.out, name, result, projected_markdown)
    print(projected_markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_modes(parser, quick="dimensions / 8, rank 16")
    parser.add_argument("--projected-backward", action="store_true",
                        help="issue 26: a LLaMA-shaped model under FSDP2, full against projected backward")
    parser.add_argument("--ddp", action="store_true",
                        help="with --projected-backward: DDP instead of FSDP2, the full path against the projected "
                             "backward with the full-gradient and with the sketched refresh across ranks")
    parser.add_argument("--hidden", type=int, default=None, help="with --projected-backward (default 512; 128 quick)")
    parser.add_argument("--layers", type=int, default=None, help="with --projected-backward (default 4; 2 quick)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--divisor", type=int, default=2,
                        help="LLaMA-7B dimensions divided by this (default 2: 2048 hidden, 5504 MLP, 16 heads)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default 128; 16 with --quick)")
    harness.add_out_argument(parser)
    args = parser.parse_args()
    if args.projected_backward:
        args.rank = args.rank or (8 if args.quick else 32)
        args.hidden = args.hidden or (128 if args.quick else 512)
        args.layers = args.layers or (2 if args.quick else 4)
        return ddp_projected_main(args) if args.ddp else projected_main(args)
    args.rank = args.rank or (16 if args.quick else 128)
    if args.quick:
        args.divisor = 8
    layer = shapes(args.divisor)

    torch.set_num_threads(1)
    single = run("single", layer, args.rank, 0, 1)
    multi = spawn_ranks(worker, args)

    world = args.world
    gather_step = sum((world - 1) / world * m * n * 4 for m, n, _ in layer.values())
    rows = {}
    for kind in ("fsdp", "ddp"):
        r = multi[kind]
        rows[kind] = {
            "step_bytes_sent_per_rank": sent_per_rank(r["step_payload"], world),
            "refresh_bytes_sent_per_rank": sent_per_rank(r["refresh_payload"], world)
            + sent_per_rank(r["first_step_payload"], world),
            "step_payload": r["step_payload"], "refresh_payload": r["refresh_payload"],
            **{k: r[k] for k in ("refresh_seconds", "step_seconds", "refresh_cpu_seconds", "step_cpu_seconds")},
        }
    expected = expected_payload(layer, args.rank)
    counted = {"fsdp_refresh": {op: multi["fsdp"]["refresh_payload"].get(op, 0) for op in ("all_reduce", "all_gather")},
               "fsdp_step": multi["fsdp"]["step_payload"], "ddp_refresh": multi["ddp"]["refresh_payload"]}
    if counted != expected:
        print(f"counted payload {counted} differs from the formula {expected}", file=sys.stderr)
    e7 = expected_payload(SHAPES_7B, 128)
    llama7b = {
        "fsdp_step_bytes_sent_per_rank": sent_per_rank(e7["fsdp_step"], world),
        "fsdp_refresh_bytes_sent_per_rank": sent_per_rank(e7["fsdp_refresh"], world),
        "ddp_refresh_bytes_sent_per_rank": sent_per_rank(e7["ddp_refresh"], world),
        "all_gather_bytes_per_rank": sum((world - 1) / world * m * n * 4 for m, n, _ in SHAPES_7B.values()),
    }
    result = {
        "layer": {k: list(v) for k, v in layer.items()}, "rank": args.rank, "world": world, "divisor": args.divisor,
        "payload_counted_equals_formula": counted == expected, "payload_formula": expected,
        "llama7b_layer_rank128_from_formula": llama7b,
        "all_gather_bytes_per_rank_per_step": gather_step,
        "all_gather_bytes_per_rank_per_refresh": gather_step,
        "fsdp": rows["fsdp"], "ddp": rows["ddp"],
        "single": {k: single[k] for k in ("refresh_seconds", "step_seconds", "refresh_cpu_seconds", "step_cpu_seconds")},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                   "one thread per rank",
    }
    name = "communication_quick" if args.quick else "communication"
    result["command"] = "python bench/communication.py" + (" --quick" if args.quick else f" --divisor {args.divisor}")
    harness.write_outputs(args.out, name, result, markdown)
    print(markdown(result))


def markdown(r: dict) -> str:
    mb = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    f, d, s, g = r["fsdp"], r["ddp"], r["single"], r["all_gather_bytes_per_rank_per_step"]
    L = r["llama7b_layer_rank128_from_formula"]
    shape = ", ".join(f"{k} {m}×{n}" + (f" ({h} heads)" if h else "") for k, (m, n, h) in r["layer"].items())
    lines = [
        f"# Communication of GaLore+ on {r['world']} ranks (one LLaMA-shaped layer, rank {r['rank']})", "",
        f"Layer: {shape}. GaLore+ recipe (cross-head + 1.2% residual on q/k, randomized SVD elsewhere), float32, "
        f"gloo on CPU; {r['machine']}. Bytes sent per rank (ring model) by the optimizer's own collectives.", "",
        "| | per step | per refresh |",
        "|---|---|---|",
        f"| all-gather approach (whole gradient of every matrix) | {mb(g)} | {mb(r['all_gather_bytes_per_rank_per_refresh'])} |",
        f"| FSDP2, ours | {mb(f['step_bytes_sent_per_rank'])} | {mb(f['refresh_bytes_sent_per_rank'])} |",
        f"| DDP, ours (beyond DDP's own gradient all-reduce) | {mb(d['step_bytes_sent_per_rank'])} | "
        f"{mb(d['refresh_bytes_sent_per_rank'])} |",
        "",
        f"FSDP2 per step: {f['step_payload']} (payload bytes; the left projection's r×n all-reduce). "
        f"Per refresh: {f['refresh_payload']} (range-finder n×k/k×n and k×k all-reduces, head rows, "
        "residual candidates).", "",
        "Refresh of the whole layer (a refresh step minus a steady step, best of 3; max over ranks). Wall time "
        "depends on what else runs on the machine; CPU seconds per rank show how the work is split.", "",
        "| refresh | wall s | vs 1 process | CPU s per rank | vs 1 process |",
        "|---|---|---|---|---|",
        f"| 1 process | {s['refresh_seconds']:.2f} | 1.00× | {s['refresh_cpu_seconds']:.2f} | 1.00× |",
        f"| FSDP2, {r['world']} ranks | {f['refresh_seconds']:.2f} | {f['refresh_seconds'] / s['refresh_seconds']:.2f}× | "
        f"{f['refresh_cpu_seconds']:.2f} | {f['refresh_cpu_seconds'] / s['refresh_cpu_seconds']:.2f}× |",
        f"| DDP, {r['world']} ranks (split + broadcast) | {d['refresh_seconds']:.2f} | "
        f"{d['refresh_seconds'] / s['refresh_seconds']:.2f}× | {d['refresh_cpu_seconds']:.2f} | "
        f"{d['refresh_cpu_seconds'] / s['refresh_cpu_seconds']:.2f}× |",
        "",
        f"Steady step (wall): 1 process {s['step_seconds']:.3f} s, FSDP2 {f['step_seconds']:.3f} s, "
        f"DDP {d['step_seconds']:.3f} s.",
        "",
        f"Counted payloads equal the formula of `expected_payload`: {r['payload_counted_equals_formula']}. "
        f"From that formula, one LLaMA-7B layer (4096/11008, 32 heads, rank 128) on {r['world']} ranks:", "",
        "| LLaMA-7B layer, rank 128 | per step | per refresh |",
        "|---|---|---|",
        f"| all-gather approach | {mb(L['all_gather_bytes_per_rank'])} | {mb(L['all_gather_bytes_per_rank'])} |",
        f"| FSDP2, ours | {mb(L['fsdp_step_bytes_sent_per_rank'])} | {mb(L['fsdp_refresh_bytes_sent_per_rank'])} |",
        f"| DDP, ours | 0 | {mb(L['ddp_refresh_bytes_sent_per_rank'])} |",
        "", f"Command: `{r['command']}`.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
