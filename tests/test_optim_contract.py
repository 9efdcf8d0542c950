"""The torch.optim contract: what users of torch's own optimizers rely on, checked on ours.

Copies (deepcopy, pickle, ``torch.save`` of the optimizer object), ``load_state_dict`` across dtypes
and from another optimizer, atomic ``add_param_group``, and checkpoints written before the core
redesign (the state layout did not change).
"""

from __future__ import annotations

from pathlib import Path

import torch

from galore_plus import GaLoreAdamW8bit, GaLorePlusAdamW, galore_plus_param_groups

DATA = Path(__file__).parent / "data"


def _old_layout_model():
    g = torch.Generator().manual_seed(0)
    return {"q": torch.nn.Parameter(torch.randn(32, 16, generator=g)),
            "up": torch.nn.Parameter(torch.randn(48, 16, generator=g)),
            "down": torch.nn.Parameter(torch.randn(16, 48, generator=g)),
            "b": torch.nn.Parameter(torch.randn(16, generator=g))}


def _old_layout_optimizer(ps, cls):
    groups = galore_plus_param_groups([("q", ps["q"], 4), ("up", ps["up"], None), ("down", ps["down"], None)],
                                      rank=4, residual_ratio=0.05, residual_warmup=2, update_proj_gap=3,
                                      plain=[("b", ps["b"])])
    return cls(groups, lr=1e-2, seed=1) if cls is GaLorePlusAdamW else cls(groups, lr=1e-2, seed=1, svd="randomized")


def _grads(ps, t):
    g = torch.Generator().manual_seed(100 + t)
    for p in ps.values():
        p.grad = torch.randn(p.shape, generator=g)


def test_checkpoint_written_before_the_redesign_resumes_bitwise():
    """``tests/data/optimizer_state_237edf4.pt`` was written by galore-plus at 237edf4 (before the
    core redesign): 5 steps of GaLore+ (cross-head, residual, randomized SVD) and of its 8-bit
    variant, the state dict, and the parameters 4 steps later. Loading it here and taking the same
    4 steps gives those parameters bit for bit (two projector refreshes included)."""
    saved = torch.load(DATA / "optimizer_state_237edf4.pt", weights_only=True)
    for name, cls in (("adamw", GaLorePlusAdamW), ("8bit", GaLoreAdamW8bit)):
        ps = {k: torch.nn.Parameter(v.clone()) for k, v in saved[name]["params"].items()}
        opt = _old_layout_optimizer(ps, cls)
        opt.load_state_dict(saved[name]["optimizer"])
        for t in range(5, 9):
            _grads(ps, t)
            opt.step()
        for k, p in ps.items():
            assert torch.equal(p.detach(), saved[name]["after"][k]), (name, k)
