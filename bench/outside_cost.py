"""What Fira's term (``outside="fira"``, DESIGN.md "Outside the subspace") costs in optimizer-step time.

One float32 matrix (default 1024×1024, rank 64, a right projection), a fixed random gradient, the
full-gradient path (``step()`` with ``p.grad``): GaLore's steady step (projector fixed, ``update_proj_gap``
larger than the steps timed) with ``outside="off"`` and ``"fira"``, AdamW inner rule, α 1, lr 1e-3.
Each optimizer takes one untimed step first (the refresh and the state allocation), then the two
are timed in alternating rounds (``torch.utils.benchmark.Timer.timeit`` of ``--number`` steps each,
``--rounds`` rounds), so load from other jobs falls on both alike; the medians over the rounds and
the median of the per-round ratios are printed. One torch thread unless ``--threads``. The term
adds ``G − R Qᵀ`` (one more ``m·n·r`` product, one ``addmm``), its scaling by φ in place, a norm and a
fused ``addcmul_`` into the weight to a step that otherwise does two ``m·n·r`` products.

    python bench/outside_cost.py                      # 1024×1024, rank 64, CPU, 1 thread
    python bench/outside_cost.py --shape 4096 11008 --rank 128 --device cuda

Prints the median step time of each and their ratio; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils import benchmark

from galore_plus import GaLoreAdamW


def optimizer(shape: tuple[int, int], rank: int, mode: str, device: str) -> tuple[torch.Tensor, GaLoreAdamW]:
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, generator=gen).to(device))
    w.grad = torch.randn(*shape, generator=gen).to(device)
    opt = GaLoreAdamW([{"params": [w], "rank": rank, "outside": mode}], lr=1e-3, weight_decay=0.0, scale=1.0,
                      update_proj_gap=10**9)
    opt.step()  # the refresh and the state, untimed
    return w, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(1024, 1024))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=20, help="steps per timed block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sync = "torch.cuda.synchronize()" if args.device.startswith("cuda") else "pass"
    timers = {}
    for mode in ("off", "fira"):
        _, opt = optimizer(tuple(args.shape), args.rank, mode, args.device)
        timers[mode] = benchmark.Timer(stmt=f"opt.step(); {sync}", globals={"opt": opt, "torch": torch},
                                       num_threads=args.threads, label="optimizer step", sub_label=mode)
    times: dict[str, list[float]] = {mode: [] for mode in timers}
    for _ in range(args.rounds):
        for mode, timer in timers.items():
            times[mode].append(timer.timeit(args.number).median)
    m, n = args.shape
    print(f"{m}×{n}, rank {args.rank}, {args.device}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{args.rounds} rounds of {args.number} steps")
    for mode, seconds in times.items():
        print(f"  outside={mode:5s} {statistics.median(seconds) * 1e3:8.3f} ms per step (median of rounds; "
              f"min {min(seconds) * 1e3:.3f})")
    ratios = [b / a for a, b in zip(times["off"], times["fira"])]
    print(f"  ratio fira / off: {statistics.median(ratios):.2f} (median of the rounds' ratios; "
          f"{min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
