"""Optimizer step time on one LLaMA-7B decoder layer, rank 128: projector refresh, steady step, amortized.

One process, one set of parameters and one set of gradients shared by every optimizer: the seven
weight matrices of a LLaMA-7B decoder layer (PyTorch layout out×in: q, k, v, o 4096×4096; gate, up
11008×4096; down 4096×11008; q and k have 32 heads of 128 rows), float32, each with a fixed
low-rank-plus-noise gradient (``refresh_time.fake_grad``, seed 1234). The gradients are never
modified (checked). Optimizers, all with lr 1e-3 and no weight decay:

- ``torch AdamW``: ``torch.optim.AdamW(foreach=True)``;
- ``bnb AdamW8bit``: ``bitsandbytes.optim.AdamW8bit``;
- ``galore-torch``: ``galore_torch.GaLoreAdamW``, rank 128, proj_type std, scale 0.25 (exact SVD);
- ``APOLLO``: ``apollo_torch.APOLLOAdamW``, its README's APOLLO setting: rank 128, proj "random",
  scale_type "channel", scale 1, proj_type std;
- ``ours GaLore``: ``galore_plus.GaLoreAdamW`` (exact SVD), the same group as galore-torch;
- ``GaLore+``: ``GaLorePlusAdamW`` with ``galore_plus_param_groups`` (cross-head projection and the
  1.2% sparse residual on q/k, randomized subspace iteration everywhere);
- ``GaLore+ 8-bit``: ``GaLoreAdamW8bit(svd="randomized")`` with the same groups.

What is timed (``time.perf_counter``; ``torch.cuda.synchronize`` around each step on CUDA):

- *refresh step*: the first ``step()`` on the layer, which computes every projector (each optimizer
  was first stepped on a tiny layer, untimed, so no code path is cold);
- *projector refresh*: the time spent inside that step computing projectors alone (galore-torch's
  ``GaLoreProjector.get_orthogonal_matrix``, APOLLO's ``GradientProjector.update_ortho_matrix``, ours
  record their own ``refresh_seconds``; the peers' are timed by wrapping those functions in this process);
- *steady step*: median of ``--steps`` steps after a warm-up (``--warmup`` steps, at least past
  GaLore+'s 20-step residual warm-up, so the sparse residual is in every steady step of GaLore+);
- *amortized* at update gap 200: ``(refresh step + 199 × steady step) / 200``. For AdamW and
  AdamW8bit (no projector) it is the steady step;
- *later refresh step* (randomized and random projectors only): the optimizers are built with
  ``update_proj_gap`` = 1 + warm-up + timed steps, so their next step refreshes again, with every
  state (residual included) allocated; exact-SVD refreshes (~6 min per layer here) are timed once.

The five low-rank optimizers are stepped round-robin (order rotated every round) so that load from
other jobs falls on all of them alike; AdamW and AdamW8bit (1.6 GB and 0.4 GB of state in full
mode) run one after the other before them, their state freed after. Optimizer-state bytes count
every tensor in ``optimizer.state`` once, including those inside galore-torch's and APOLLO's
projector objects, after the last step. Targets: GaLore+ projector refresh ≥ 40× faster than
galore-torch's; GaLore+ steady step no slower than galore-torch's; GaLore+ amortized step ≤ 1.5×
APOLLO's.

    python bench/step_time.py            # full: 57 min on 2 CPU cores shared at load 8-12 (two exact-SVD
                                         # layer refreshes, ~14 min each there; ~6 min each unloaded)
    python bench/step_time.py --quick    # every dimension / 4, rank 32: ~1 min
    python bench/step_time.py --smoke    # tiny shapes (128, 344), rank 8: seconds (CI)
    python bench/step_time.py --device cuda

Writes ``step_time.json`` and ``step_time.md`` to ``--out`` (default ``bench/results``).
"""

import argparse
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)

# Passive OpenMP waiting: on a shared 2-core box spinning threads slow factorizations down a lot;
# set before torch loads libgomp (as refresh_time.py does).
harness.passive_omp_wait()
import torch  # noqa: E402

from refresh_time import fake_grad, layer_shapes  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import apollo_torch  # noqa: E402
    import apollo_torch.random_projector  # noqa: E402
    import bitsandbytes as bnb  # noqa: E402
    import galore_torch  # noqa: E402
    import galore_torch.galore_projector  # noqa: E402

import galore_plus  # noqa: E402
from galore_plus import (  # noqa: E402
    GaLoreAdamW, GaLoreAdamW8bit, GaLorePlusAdamW, galore_plus_param_groups, state_bytes,
)

MODES = {  # hidden size, intermediate size, rank
    "full": (4096, 11008, 128),
    "quick": (1024, 2752, 32),
    "smoke": (128, 344, 8),
}
HEADS = 32
HEADED = ("q", "k")
GAP = 200            # the update gap the amortized time is computed for
LR = 1e-3
SCALE = 0.25         # GaLore's alpha (galore-torch README); APOLLO uses its own (1)
FULL_RANK = ["torch AdamW", "bnb AdamW8bit"]
LOW_RANK = ["galore-torch", "APOLLO", "ours GaLore", "GaLore+", "GaLore+ 8-bit"]
PEERS = FULL_RANK + LOW_RANK
EXACT_SVD = {"galore-torch", "ours GaLore"}   # refresh timed once
OURS = {"ours GaLore", "GaLore+", "GaLore+ 8-bit"}
RESIDUAL_WARMUP = galore_plus.LOW_RANK_DEFAULTS["residual_warmup"]


class ProjectorClock:
    """Seconds spent computing projectors: from wrapped projector functions (galore-torch, APOLLO),
    synchronising the device around each call on CUDA, plus what our optimizers record themselves
    (``refresh_seconds`` and ``projectors_computed``, synchronised on CUDA too)."""

    def __init__(self, sync):
        self.wrapped_seconds, self.wrapped_calls, self.sync = 0.0, 0, sync
        self.ours, self.base = [], []

    def watch(self, opt):
        """Count ``opt``'s own refresh timing (one of ours) from the next ``reset()`` on."""
        self.ours.append(opt)
        self.base.append((opt.refresh_seconds, opt.projectors_computed))

    @property
    def seconds(self):
        return self.wrapped_seconds + sum(o.refresh_seconds - b[0] for o, b in zip(self.ours, self.base))

    @property
    def calls(self):
        return self.wrapped_calls + sum(o.projectors_computed - b[1] for o, b in zip(self.ours, self.base))

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.wrapped_seconds += time.perf_counter() - t0
            self.wrapped_calls += 1
            return out
        return timed

    def reset(self):
        self.wrapped_seconds, self.wrapped_calls = 0.0, 0
        self.base = [(o.refresh_seconds, o.projectors_computed) for o in self.ours]


def build(name, params, rank, gap, clock):
    """The optimizer ``name`` over the layer's parameters (dict name -> Parameter)."""
    plist = list(params.values())
    galore_group = {"params": plist, "rank": rank, "update_proj_gap": gap, "scale": SCALE, "proj_type": "std"}
    if name == "torch AdamW":
        return torch.optim.AdamW(plist, lr=LR, weight_decay=0.0, foreach=True)
    if name == "bnb AdamW8bit":
        return bnb.optim.AdamW8bit(plist, lr=LR, weight_decay=0.0)
    if name == "galore-torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return galore_torch.GaLoreAdamW([galore_group], lr=LR, weight_decay=0.0)
    if name == "APOLLO":
        return apollo_torch.APOLLOAdamW([{"params": plist, "rank": rank, "proj": "random", "scale_type": "channel",
                                          "scale": 1.0, "update_proj_gap": gap, "proj_type": "std"}],
                                        lr=LR, weight_decay=0.0)
    if name == "ours GaLore":
        opt = GaLoreAdamW([galore_group], lr=LR, weight_decay=0.0)
    else:
        matrices = [(n, p, HEADS if n in HEADED else None) for n, p in params.items()]
        groups = galore_plus_param_groups(matrices, rank, update_proj_gap=gap, scale=SCALE)
        if name == "GaLore+":
            opt = GaLorePlusAdamW(groups, lr=LR, weight_decay=0.0)
        elif name == "GaLore+ 8-bit":
            opt = GaLoreAdamW8bit(groups, lr=LR, weight_decay=0.0, svd="randomized")
        else:
            raise ValueError(f"unknown optimizer {name!r}; choose from {PEERS}")
    clock.watch(opt)
    return opt


def optimizer_state_bytes(opt):
    """``(tensor_bytes, storage_bytes)`` of every tensor reachable from ``opt.state`` (inside lists,
    dicts and projector objects such as galore-torch's ``GaLoreProjector``), each counted once.

    ``tensor_bytes`` counts each tensor's own elements; ``storage_bytes`` the whole storage behind
    it, which is what stays allocated: galore-torch keeps ``Vh[:r]`` (or ``U[:, :r]``), a view that
    holds the full ``min(m, n)``-row factor of the SVD alive."""
    tensors, storages, tensor_bytes, storage_bytes = set(), set(), 0, 0

    def visit(value, depth):
        nonlocal tensor_bytes, storage_bytes
        if isinstance(value, torch.Tensor):
            if not value.numel():
                return
            key = (value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()), value.device)
            if key not in tensors:
                tensors.add(key)
                tensor_bytes += value.numel() * value.element_size()
            storage = (value.untyped_storage().data_ptr(), value.device)
            if storage not in storages:
                storages.add(storage)
                storage_bytes += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth)
        elif hasattr(value, "__dict__") and depth < 3:
            visit(vars(value), depth + 1)

    for s in opt.state.values():
        visit(s, 0)
    return tensor_bytes, storage_bytes


def make_layer(d, f, rank, device, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, (m, n) in layer_shapes(d, f).items():
        p = torch.nn.Parameter(torch.randn(m, n, generator=gen).mul_(0.02).to(device))
        p.grad = fake_grad(m, n, 2 * rank, gen).to(device)
        params[name] = p
    return params


def grad_checksums(params):
    return [torch.sum(p.grad, dtype=torch.float64).item() for p in params.values()]


def git_info():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return {"commit": commit, "src_uncommitted_changes": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "src_uncommitted_changes": None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_modes(ap, quick="every dimension / 4, rank 32", smoke="tiny shapes, rank 8 (a few seconds; CI)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steady steps (default 7; quick 5; smoke 3)")
    ap.add_argument("--warmup", type=int, default=3,
                    help=f"untimed steps before the steady ones (raised to {RESIDUAL_WARMUP} for the low-rank "
                         "optimizers, past GaLore+'s residual warm-up)")
    ap.add_argument("--optimizers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    harness.add_out_argument(ap)
    args = ap.parse_args()

    mode_name = harness.mode(args)
    d, f, rank = MODES[mode_name]
    steps = args.steps if args.steps is not None else {"full": 7, "quick": 5, "smoke": 3}[mode_name]
    if steps < 1 or args.warmup < 0:
        ap.error("--steps must be ≥ 1 and --warmup ≥ 0")
    chosen = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in chosen if o not in PEERS]
    if unknown:
        ap.error(f"unknown optimizer(s) {unknown}; choose from {PEERS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    clock = ProjectorClock(sync)
    galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix = clock.wrap(
        galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix)
    apollo_torch.random_projector.GradientProjector.update_ortho_matrix = clock.wrap(
        apollo_torch.random_projector.GradientProjector.update_ortho_matrix)

    def timed_step(opt):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        return time.perf_counter() - t0

    low_warmup = max(args.warmup, RESIDUAL_WARMUP)
    bench_gap = 1 + low_warmup + steps   # the low-rank optimizers refresh again at the step after the timed ones

    # Untimed warm-up of every code path on a tiny layer (kernels, bitsandbytes' library, LAPACK).
    tiny = make_layer(128, 344, 8, device, seed=1)
    for name in chosen:
        opt = build(name, tiny, 8, 2, clock)
        for _ in range(RESIDUAL_WARMUP + 3):
            opt.step()
    del tiny, opt
    gc.collect()

    git = git_info()  # the tree the code was loaded from (others may commit while a full run goes on)
    params = make_layer(d, f, rank, device)
    numel = sum(p.numel() for p in params.values())
    checksums = grad_checksums(params)
    results = {name: {} for name in chosen}
    load_start = os.getloadavg()
    start_all = time.perf_counter()

    # Full-rank peers one after the other (their state is large), each freed after.
    for name in [n for n in FULL_RANK if n in chosen]:
        opt = build(name, params, rank, bench_gap, clock)
        r = results[name]
        r["first_step_seconds"] = timed_step(opt)
        for _ in range(args.warmup):
            opt.step()
        r["steady_seconds_all"] = [timed_step(opt) for _ in range(steps)]
        r["state_bytes"], r["state_storage_bytes"] = optimizer_state_bytes(opt)
        print(f"{name:>14}: first step {r['first_step_seconds']:.3f} s, steady "
              f"{statistics.median(r['steady_seconds_all']):.3f} s", flush=True)
        del opt
        gc.collect()

    # Low-rank peers round-robin.
    low = [n for n in LOW_RANK if n in chosen]
    opts = {name: build(name, params, rank, bench_gap, clock) for name in low}
    for name, opt in opts.items():
        clock.reset()
        results[name]["first_step_seconds"] = timed_step(opt)
        results[name]["projector_seconds"] = clock.seconds
        results[name]["projector_calls"] = clock.calls
        print(f"{name:>14}: refresh step {results[name]['first_step_seconds']:.3f} s "
              f"(projectors {clock.seconds:.3f} s, {clock.calls} calls)", flush=True)
    for _ in range(low_warmup):
        for opt in opts.values():
            opt.step()
    for name in low:
        results[name]["steady_seconds_all"] = []
    for i in range(steps):
        order = low[i % len(low):] + low[:i % len(low)]
        for name in order:
            results[name]["steady_seconds_all"].append(timed_step(opts[name]))
    for name in low:
        print(f"{name:>14}: steady {statistics.median(results[name]['steady_seconds_all']):.3f} s", flush=True)
    for name in [n for n in low if n not in EXACT_SVD]:
        clock.reset()
        results[name]["later_refresh_step_seconds"] = timed_step(opts[name])
        results[name]["later_projector_seconds"] = clock.seconds
        if clock.calls != len(params):
            raise RuntimeError(f"{name}: expected a refresh of all {len(params)} projectors at step {bench_gap + 1}, "
                               f"saw {clock.calls}")
        print(f"{name:>14}: later refresh step {results[name]['later_refresh_step_seconds']:.3f} s "
              f"(projectors {clock.seconds:.3f} s)", flush=True)
    for name, opt in opts.items():
        results[name]["state_bytes"], results[name]["state_storage_bytes"] = optimizer_state_bytes(opt)
        if name in OURS:
            results[name]["state_bytes_galore_plus_count"] = state_bytes(opt)
    del opts
    gc.collect()
    wall = time.perf_counter() - start_all
    if grad_checksums(params) != checksums:
        raise RuntimeError("an optimizer modified the shared gradients; the timings are not comparable")

    for name, r in results.items():
        r["steady_seconds"] = statistics.median(r["steady_seconds_all"])
        r["state_bytes_per_element"] = r["state_bytes"] / numel
        r["state_storage_bytes_per_element"] = r["state_storage_bytes"] / numel
        if name in FULL_RANK:
            r["refresh_step_seconds"] = None
            r["amortized_seconds"] = r["steady_seconds"]
        else:
            r["refresh_step_seconds"] = r["first_step_seconds"]
            r["refresh_overhead_seconds"] = r["first_step_seconds"] - r["steady_seconds"]
            r["amortized_seconds"] = (r["first_step_seconds"] + (GAP - 1) * r["steady_seconds"]) / GAP

    result = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "device": str(device), "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else None, "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                    "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "wall_seconds": wall,
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "versions": harness.versions(distributions=(
            "galore-plus", "bitsandbytes", "galore-torch", "apollo-torch", "transformers")), "git": git,
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "config": {"mode": mode_name, "hidden": d, "intermediate": f, "rank": rank, "heads": HEADS,
                   "layer_elements": numel, "update_gap_amortized": GAP, "update_proj_gap_built": bench_gap,
                   "steady_steps": steps, "warmup_full_rank": args.warmup, "warmup_low_rank": low_warmup,
                   "lr": LR, "galore_scale": SCALE, "apollo_scale": 1.0, "dtype": "float32"},
        "results": results,
        "targets": targets(results),
    }
    os.makedirs(args.out, exist_ok=True)
    harness.write_json(os.path.join(args.out, "step_time.json"), result, indent=2)
    md = markdown(result, chosen)
    harness.write_text(os.path.join(args.out, "step_time.md"), md)
    print(md)
    print(f"wall {wall:.1f} s")


def targets(results):
    """The three targets of the benchmark issue, each with its figure (None when a peer was not run)."""
    out = {}
    gp, gt, ap = results.get("GaLore+"), results.get("galore-torch"), results.get("APOLLO")
    if gp and gt:
        ratio = gt["projector_seconds"] / gp["projector_seconds"]
        out["refresh_40x_faster_than_galore_torch"] = {
            "met": ratio >= 40, "speedup": ratio,
            "speedup_of_refresh_overhead": gt["refresh_overhead_seconds"] / gp["refresh_overhead_seconds"]
            if gp["refresh_overhead_seconds"] > 0 else None}
        ratio = gp["steady_seconds"] / gt["steady_seconds"]
        out["steady_no_slower_than_galore_torch"] = {"met": ratio <= 1.0, "ratio": ratio}
    if gp and ap:
        ratio = gp["amortized_seconds"] / ap["amortized_seconds"]
        out["amortized_within_1.5x_apollo"] = {"met": ratio <= 1.5, "ratio": ratio}
    return out


def markdown(result, chosen):
    mc, cf, v, res = result["machine"], result["config"], result["versions"], result["results"]
    fmt = lambda x, p=3: "—" if x is None else f"{x:.{p}f}"  # noqa: E731
    where = mc["cuda_device"] or f"{mc['cpu_count']} CPUs ({mc['processor']}), {mc['threads']} threads"
    lines = [
        f"# Optimizer step time, one LLaMA-7B decoder layer ({cf['mode']} mode, rank {cf['rank']})", "",
        f"`{result['command']}` — {where}; {cf['dtype']}, layer {cf['hidden']}/{cf['intermediate']} "
        f"({cf['layer_elements'] / 1e6:.1f} M elements). torch {v['torch']}, bitsandbytes {v['bitsandbytes']}, "
        f"galore-torch {v['galore-torch']}, apollo-torch {v['apollo-torch']}, galore-plus {v['galore-plus']} "
        f"(commit {result['git']['commit']}{', src with uncommitted changes' if result['git']['src_uncommitted_changes'] else ''}), "
        f"Python {v['python']}. OMP_WAIT_POLICY={mc['omp_wait_policy']}; 1-min load average "
        f"{mc['load_avg_start'][0]:.2f} at start, {mc['load_avg_end'][0]:.2f} at end; {mc['wall_seconds']:.0f} s; "
        f"peak RSS {mc['peak_rss_bytes'] / 2**30:.2f} GiB.", "",
        "Seconds. Steady: median of "
        f"{cf['steady_steps']} steps [min–max] after {cf['warmup_low_rank']} warm-up steps (low-rank; "
        f"{cf['warmup_full_rank']} for AdamW/AdamW8bit). Amortized at update gap {cf['update_gap_amortized']}: "
        f"(refresh step + {cf['update_gap_amortized'] - 1} × steady) / {cf['update_gap_amortized']}. "
        "Projector refresh: time inside the refresh step spent computing projectors. State: optimizer-state "
        "bytes per parameter element, every tensor in optimizer.state (projectors included); held: the "
        "storages behind those tensors (a view keeps its whole storage allocated).", "",
        *harness.table_header("optimizer", "projector refresh", "refresh step", "steady step", "amortized",
                              "later refresh step", "state B/elem", "held B/elem")]
    for name in chosen:
        r = res[name]
        steady = r["steady_seconds_all"]
        lines.append(
            f"| {name} | {fmt(r.get('projector_seconds'))} | {fmt(r['refresh_step_seconds'])} | "
            f"{r['steady_seconds']:.3f} [{min(steady):.3f}–{max(steady):.3f}] | {r['amortized_seconds']:.3f} | "
            f"{fmt(r.get('later_refresh_step_seconds'))} | {r['state_bytes_per_element']:.3f} | "
            f"{r['state_storage_bytes_per_element']:.3f} |")
    t = result["targets"]
    lines += ["", "Targets (GaLore+):", ""]
    if "refresh_40x_faster_than_galore_torch" in t:
        x = t["refresh_40x_faster_than_galore_torch"]
        extra = (f"; refresh step − steady step: {x['speedup_of_refresh_overhead']:.1f}×"
                 if x["speedup_of_refresh_overhead"] is not None else "")
        lines.append(f"- projector refresh ≥ 40× faster than galore-torch's: **{'met' if x['met'] else 'missed'}** "
                     f"({x['speedup']:.1f}×{extra})")
        x = t["steady_no_slower_than_galore_torch"]
        lines.append(f"- steady step no slower than galore-torch's: **{'met' if x['met'] else 'missed'}** "
                     f"({x['ratio']:.3f}× galore-torch's)")
    if "amortized_within_1.5x_apollo" in t:
        x = t["amortized_within_1.5x_apollo"]
        lines.append(f"- amortized step ≤ 1.5× APOLLO's: **{'met' if x['met'] else 'missed'}** "
                     f"({x['ratio']:.3f}× APOLLO's)")
    if not t:
        lines.append("- not evaluated (GaLore+, galore-torch or APOLLO not run)")
    if cf["mode"] != "full":
        lines += ["", f"{cf['mode']} mode: shapes and rank are not the targets' (full mode is the reference)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
