"""Where the fira package's norm-growth limiter and ours part (DESIGN.md, "Outside the subspace").

The package's limiter compares ‖S‖ before Adam's bias correction (its ``norm_grad`` is
``M / (sqrt(V) + ε)``, the correction sits in the step size); ours compares the applied term's
``S``, built from the bias-corrected ψ (the paper's). This feeds both the same stream of gradients of
one 64×128 float64 matrix (a rank-16 signal with a decaying spectrum, jittered each step, plus noise
of 0.02; rank 8, T 50, lr 1e-3, α 1, ε 1e-8, no weight decay; the package's projector from the same
float64 SVD) and prints, at a few steps, the applied term's norm (lr-free, bias-corrected) of each
and their ratio. Needs the fira package (``pip install --no-deps fira==1.0.2``).

    python bench/outside_limiter.py
"""

from __future__ import annotations

import math
import warnings

import torch

from galore_plus import GaLoreAdamW

STEPS = 200
SHOWN = (1, 2, 5, 10, 20, 30, 50, 51, 60, 100, 150, 200)


def main() -> None:
    from fira import FiraAdamW
    from fira.gradient_projection import GradientProjector

    def float64_svd(self, weights, rank, type):
        u, _, vh = torch.linalg.svd(weights, full_matrices=False)
        return vh[:rank] if type == "right" else u[:, :rank]

    GradientProjector.get_orthogonal_matrix = float64_svd  # the same projector as ours
    warnings.filterwarnings("ignore", category=FutureWarning)
    gen = torch.Generator().manual_seed(0)
    m, n, rank, lr, betas = 64, 128, 8, 1e-3, (0.9, 0.999)
    u = torch.linalg.qr(torch.randn(m, 16, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 16, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -1, 16, dtype=torch.float64)
    w0 = torch.randn(m, n, dtype=torch.float64, generator=gen)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    theirs = FiraAdamW([{"params": [a], "rank": rank, "update_proj_gap": 50, "alpha": 1.0, "proj_type": "std"}],
                       lr=lr, betas=betas, eps=1e-8, weight_decay=0.0, no_deprecation_warning=True)
    ours = GaLoreAdamW([{"params": [b], "rank": rank, "outside": "fira"}], lr=lr, betas=betas, eps=1e-8,
                       weight_decay=0.0, update_proj_gap=50, scale=1.0)
    print("step  package  ours  package/ours   (‖S‖ applied, lr-free)")
    for t in range(1, STEPS + 1):
        jitter = 1 + 0.3 * torch.randn(16, generator=gen, dtype=torch.float64)
        g = u @ torch.diag(spectrum * jitter) @ v.T + 0.02 * torch.randn(m, n, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        if t in SHOWN:
            correction = math.sqrt(1 - betas[1]**t) / (1 - betas[0]**t)  # the package's step-size factor
            package = float(theirs.state[a]["scaling_grad"]) * correction
            mine = float(ours.state[b]["outside_norm"])
            print(f"{t:4d} {package:8.3f} {mine:6.3f} {package / mine:8.3f}")


if __name__ == "__main__":
    main()
