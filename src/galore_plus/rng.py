"""Seeded randomness: every random draw is a pure function of (seed, parameter index, refresh count).

DESIGN.md, "Randomness": the optimizer owns its randomness through explicit ``torch.Generator`` objects, never the
global RNG. Deriving a fresh generator from the three numbers (instead of carrying one generator's
state forward) makes a resumed run repeat the uninterrupted one exactly, lets every data-parallel
rank compute the same projector, and lets ranks split refresh work in any order.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, param_index: int, refresh_count: int) -> int:
    """A 63-bit seed that depends on all three numbers (splitmix64 chained over them)."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (param_index & _MASK64))
    x = _splitmix64(x ^ (refresh_count & _MASK64))
    return x >> 1  # manual_seed takes a signed 64-bit value


def generator_for(seed: int, param_index: int, refresh_count: int) -> torch.Generator:
    """A CPU generator for one parameter's refresh. Draws are made on the CPU and moved, so the
    numbers are the same on every device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, param_index, refresh_count))
    return generator


def rounding_generator(seed: int, param_index: int, step: int, offset: int, device: torch.device) -> torch.Generator:
    """The generator of a parameter's stochastic rounding at ``step`` (``offset``: the first flat
    element written, for updates written in chunks or by row shards), on ``device``: a pure function
    of the four numbers, so a resumed run rounds as the uninterrupted one did. A different stream
    from the projector refreshes' (``generator_for``) by construction of the seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(derive_seed(seed, param_index, step) ^ _ROUNDING_TAG, offset, 0))
    return generator


_ROUNDING_TAG = 0x5EED_0F_5A  # separates the rounding streams from the refresh streams
_SHARE_TAG = 0x5EED_5_CA7E  # separates the captured share's sketches from both


def share_generator(seed: int, param_index: int, update: int) -> torch.Generator:
    """A CPU generator for the sketch of one parameter's captured share at ``update`` (the projected
    backward's ``refresh="capture"``; DESIGN.md, "Refresh"): a pure function of the three numbers, so
    every micro-batch and every DDP rank draws the same sketch and a resumed run repeats it."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(derive_seed(seed, param_index, update) ^ _SHARE_TAG, 0, 0))
    return generator
