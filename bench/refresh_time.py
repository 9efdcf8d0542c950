"""Projector-refresh time for one LLaMA-7B decoder layer's weight gradients, rank 128, on the CPU.

Measures, in one process, the wall time (time.perf_counter, one timed call per matrix after an
untimed warm-up on a small matrix) of computing a rank-r projector at a refresh for the seven
weight-gradient shapes of a LLaMA-7B layer (PyTorch layout out×in: q, k, v, o 4096×4096;
gate, up 11008×4096; down 4096×11008; q and k have 32 heads of 128 rows):

- galore-torch: ``GaLoreProjector(proj_type='std').get_orthogonal_matrix`` (full SVD);
- ours exact: ``svd_projector`` (full SVD, same side rule);
- ours randomized: ``randomized_projector`` (oversample 8, 2 power iterations);
- GaLore+: ``cross_head_projector(randomized=True)`` for q, k; ``randomized_projector`` otherwise;
- cross-head exact: ``cross_head_projector(randomized=False)`` for q, k only.

Gradients are float32, low-rank-ish (rank-256 product with a spectrum decaying 100×, plus small
noise), fixed seed. For every method it also reports the captured energy of its basis against the
exact top-r one of the same matrix: ``‖G Q‖_F / ‖G Q_exact‖_F`` (right) or ``‖Pᵀ G‖_F / ‖P_exactᵀ G‖_F``
(left). The project's target: GaLore+ refreshes the layer ≥ 40× faster than galore-torch.

    python bench/refresh_time.py               # full: ~11 min on 2 CPU cores (two exact SVD passes)
    python bench/refresh_time.py --threads 1   # full, one thread: ~15 min
    python bench/refresh_time.py --quick       # every dimension / 4, rank 32: ~20 s
    python bench/refresh_time.py --smoke       # every dimension / 32, rank 4: a few seconds (CI)

Run it alone: on a shared 2-core box OpenMP thread wake-ups make small factorizations erratic
(``OMP_WAIT_POLICY=PASSIVE`` is set below for that reason). The randomized methods orthonormalize
with CholeskyQR2 (``projection.orthonormalize``), which sidesteps LAPACK's slow 4096×136
Householder QR at 2 threads (0.3–0.45 s each, measured before the change).

Writes ``refresh_time.json`` and ``refresh_time.md`` to ``--out`` (default ``bench/results``).
"""

import argparse
import os
import platform
import time
import warnings

import harness  # bench/harness.py

# Passive OpenMP waiting: on a shared 2-core box, spinning threads of two busy processes slow an SVD
# down up to 10×; set before torch loads libgomp.
harness.passive_omp_wait()
import torch  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from galore_torch.galore_projector import GaLoreProjector

from galore_plus.projection import (  # noqa: E402
    cross_head_projector, project, projection_side, randomized_projector, svd_projector,
)

METHODS = ["galore-torch", "ours exact", "ours randomized", "GaLore+", "cross-head exact"]
HEADED = ("q", "k")


def layer_shapes(d, f):
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}


def fake_grad(m, n, inner, gen):
    decay = torch.logspace(0, -2, inner)[:, None]
    G = torch.randn(m, inner, generator=gen) @ (torch.randn(inner, n, generator=gen) * decay)
    return G + 1e-3 * G.std() * torch.randn(m, n, generator=gen)


def run_method(method, G, name, rank, heads, gen):
    """The projector as ``(left, right)``, or None when the method does not apply to this matrix."""
    side = projection_side(G.shape, "std")
    if method == "galore-torch":
        kind = "right" if G.shape[0] >= G.shape[1] else "left"
        out = GaLoreProjector(rank=rank, proj_type="std").get_orthogonal_matrix(G, rank, kind)
        return (None, out) if kind == "right" else (out, None)
    if method == "ours exact":
        return svd_projector(G, rank, side)
    if method == "ours randomized" or (method == "GaLore+" and name not in HEADED):
        return randomized_projector(G, rank, side, gen, oversample=8, power_iters=2)
    if method in ("GaLore+", "cross-head exact") and name in HEADED:
        return cross_head_projector(G, rank, num_heads=heads, generator=gen,
                                    randomized=method == "GaLore+", oversample=8, power_iters=2)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_modes(ap, quick="every dimension / 4, rank 32", smoke="every dimension / 32, rank 4 (CI)")
    harness.add_out_argument(ap)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    scale = 32 if args.smoke else 4 if args.quick else 1
    d, f, rank, heads = 4096 // scale, 11008 // scale, 128 // scale, 32
    torch.set_num_threads(args.threads)
    gens = {m: torch.Generator().manual_seed(0) for m in METHODS}

    warm = fake_grad(d // 4, d // 4, rank, torch.Generator().manual_seed(1))  # untimed warm-up
    for method in METHODS:
        run_method(method, warm, "q", rank, heads, torch.Generator().manual_seed(0))

    seconds = {m: {} for m in METHODS}
    energy = {m: {} for m in METHODS}
    data_gen = torch.Generator().manual_seed(1234)
    load_start = os.getloadavg()
    start_all = time.perf_counter()
    for name, (m, n) in layer_shapes(d, f).items():
        G = fake_grad(m, n, 2 * rank, data_gen)
        projs = {}
        for method in METHODS:
            t0 = time.perf_counter()
            proj = run_method(method, G, name, rank, heads, gens[method])
            dt = time.perf_counter() - t0
            if proj is None:
                continue
            seconds[method][name] = dt
            projs[method] = proj
            print(f"{method:>17} {name:>5} {m}x{n}: {dt:9.3f} s", flush=True)
        ref = project(G, *projs["ours exact"]).norm()
        for method, proj in projs.items():
            energy[method][name] = (project(G, *proj).norm() / ref).item()
    wall = time.perf_counter() - start_all

    totals = {m: sum(s.values()) for m, s in seconds.items()}
    qk_galore = sum(seconds["galore-torch"][k] for k in HEADED)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "load_avg_start": load_start,
                    "mode": harness.mode(args), "rank": rank, "heads": heads,
                    "head_dim": d // heads, "wall_seconds": wall,
                    "load_avg_end": os.getloadavg()},
        "seconds": seconds, "layer_total_seconds": totals, "energy_vs_exact": energy,
        "speedup_vs_galore_torch": {m: (qk_galore if m == "cross-head exact" else totals["galore-torch"]) / t
                                    for m, t in totals.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    harness.write_json(os.path.join(args.out, "refresh_time.json"), result, indent=2)

    mc = result["machine"]
    lines = [f"# Projector refresh time, one LLaMA-7B layer ({mc['mode']} mode, rank {rank})", "",
             f"{mc['cpu_count']} CPUs, torch {mc['torch']}, {mc['threads']} threads, float32; seconds, "
             f"one timed call per matrix, OMP_WAIT_POLICY={mc['omp_wait_policy']}, 1-min load average "
             f"{mc['load_avg_start'][0]:.1f} at start, {mc['load_avg_end'][0]:.1f} at end. "
             "cross-head exact applies to q, k only (its total is q + k).", "",
             *harness.table_header("matrix", *METHODS)]
    for name, (m, n) in layer_shapes(d, f).items():
        cells = [f"{seconds[x][name]:.3f} ({energy[x][name]:.4f})" if name in seconds[x] else "—" for x in METHODS]
        lines.append(f"| {name} {m}×{n} | " + " | ".join(cells) + " |")
    lines.append("| layer total | " + " | ".join(f"**{totals[x]:.3f}**" for x in METHODS) + " |")
    lines += ["", "In parentheses: captured energy of the basis / that of the exact top-r basis.", "",
              "Speed-up, galore-torch total / method total (cross-head exact: galore-torch q + k / its q + k): "
              + ", ".join(f"{x} {v:.1f}×" for x, v in result["speedup_vs_galore_torch"].items()), "",
              f"Target GaLore+ ≥ 40×: {'met' if result['speedup_vs_galore_torch']['GaLore+'] >= 40 else 'NOT met'}."]
    harness.write_text(os.path.join(args.out, "refresh_time.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall {wall:.1f} s")


if __name__ == "__main__":
    main()
