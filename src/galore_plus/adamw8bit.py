"""``GaLoreAdamW8bit``: GaLoreAdamW with blockwise 8-bit moments, on CPU and CUDA."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .adamw import GaLoreAdamW
from .functional import adam_direction

#: bitsandbytes' block size for its 8-bit blockwise optimizers, and its threshold below which a
#: tensor's state stays 32-bit (``min_8bit_size``): tiny tensors gain nothing from quantization.
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096

_CODES: dict[tuple[bool, torch.device], Tensor] = {}


def _bnb_functional():
    try:
        import bitsandbytes.functional as F
    except ImportError as err:  # pragma: no cover - exercised only without the extra installed
        raise ImportError("GaLoreAdamW8bit needs bitsandbytes: pip install 'galore-plus[8bit]'") from err
    return F


def _code(signed: bool, device: torch.device) -> Tensor:
    """bitsandbytes' dynamic quantization map (signed for M, unsigned for V); a constant, never state."""
    key = (signed, device)
    if key not in _CODES:
        _CODES[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit codes (uint8, ``x``'s shape) and per-block absmax (float32)."""
    codes, quant_state = _bnb_functional().quantize_blockwise(
        x.float().contiguous(), code=_code(signed, x.device), blocksize=BLOCK_SIZE)
    return codes, quant_state.absmax.float()


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """float32 values back from ``quantize``'s codes."""
    return _bnb_functional().dequantize_blockwise(
        codes, absmax=absmax, code=_code(signed, codes.device), blocksize=BLOCK_SIZE)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW (and every GaLore+ option) with blockwise 8-bit Adam moments.

    Low-rank moments, and the moments of groups without ``rank``, are stored as uint8 codes of
    bitsandbytes' dynamic map, one float32 absmax per block of 256 (signed map for ``M``, unsigned
    for ``V``, as ``bitsandbytes.optim.AdamW8bit``); tensors under 4096 elements keep 32-bit moments.
    Each step dequantizes to float32, runs the same Adam kernel as ``GaLoreAdamW`` and quantizes
    again, so the math is float32 whatever is stored. Projectors and residual state stay in the
    compute dtype (they are small).

    Why bitsandbytes' blockwise functions (not torchao's 8-bit state), measured by
    ``bench/quantizer_choice.py`` on 4096×128 Adam moments on this 2-core CPU: the same round-trip
    error on ``M`` (1.17%) and ``V`` (0.51%), a smaller error of ``M/sqrt(V)`` (0.27 vs 6.6, torchao
    losing the smallest ``V`` entries), and 70 ms vs 1.8 s per quantize + dequantize (torchao has no
    compiled CPU path for it). The state is also plain uint8 and float32 tensors, so it loads with
    ``torch.load(weights_only=True)`` without registering tensor subclasses, and the same code runs
    on CPU and CUDA (galore-torch's 8-bit optimizer asserts CUDA). The parity test against
    ``bitsandbytes.optim.AdamW8bit`` is in ``tests/test_memory.py`` (agreement within 1% of the
    quantizer's own distance from 32-bit AdamW).

    State per quantized moment: ``exp_avg_q``/``exp_avg_sq_q`` (uint8) and
    ``exp_avg_absmax``/``exp_avg_sq_absmax`` (float32); 32-bit ones keep ``exp_avg``/``exp_avg_sq``.
    """

    def _inner_step(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float) -> Tensor:
        if "exp_avg" not in state and "exp_avg_q" not in state:
            if grad.numel() < MIN_8BIT_SIZE:
                return super()._inner_step(grad, state, group, lr)
            zeros = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_q"], state["exp_avg_absmax"] = quantize(zeros, signed=True)
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize(zeros, signed=False)
        if "exp_avg" in state:
            return super()._inner_step(grad, state, group, lr)
        exp_avg, exp_avg_sq = self._low_rank_moments(state)
        beta1, beta2 = group["betas"]
        direction, factor = adam_direction(
            grad.float(), exp_avg, exp_avg_sq, state["step"], beta1, beta2, group["eps"])
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize(exp_avg, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize(exp_avg_sq, signed=False)
        return direction.mul_(lr * factor).to(grad.dtype)

    def _low_rank_moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return (dequantize(state["exp_avg_q"], state["exp_avg_absmax"], signed=True),
                dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False))
