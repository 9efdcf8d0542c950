"""``GaLoreAdamW8bit``: GaLoreAdamW with blockwise 8-bit moments, on CPU and CUDA (and FSDP2 shards)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .adamw import AdamWRule, GaLoreAdamW
from .functional import adam_direction
from .lowrank import ParameterWrite, moment_steps, register_rule
from .sharding import is_dtensor, local, placed_blocks, placed_like
from .transport import Rotation

#: bitsandbytes' block size for its 8-bit blockwise optimizers, and its threshold below which a
#: tensor's state stays 32-bit (``min_8bit_size``): tiny tensors gain nothing from quantization.
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
#: elements per chunk of a quantized update (a multiple of BLOCK_SIZE): the float32 temporaries of a
#: step (dequantized moments, Adam's intermediates) are chunk-sized, not tensor-sized. Blocks are
#: quantized independently, so chunking changes no bit of the result.
CHUNK_SIZE = 2**20

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


@register_rule("adamw8bit")
class AdamW8bitRule(AdamWRule):
    """AdamW with blockwise 8-bit moments (see ``GaLoreAdamW8bit``)."""

    name = "8-bit AdamW"

    def direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float) -> Tensor:
        if not self._quantized(grad, state):
            return super().direction(grad, state, group, lr)
        part = local(grad)
        out = torch.empty(part.numel(), dtype=torch.float32, device=part.device)

        def sink(a: int, b: int, step: Tensor) -> None:
            out[a:b] = step

        adam = self._sharded_quantized_adam if is_dtensor(grad) else self._quantized_adam
        adam(grad, state, group, lr, sink)
        return placed_like(out.view(part.shape).to(grad.dtype), grad)

    def apply_full(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float,
                   write: ParameterWrite) -> None:
        """A group without ``rank``: quantized moments update the parameter (under FSDP2: this rank's
        shard) chunk by chunk, in place."""
        if not (self._quantized(grad, state) and write.local.is_contiguous()):
            return super().apply_full(grad, state, group, lr, write)

        def sink(a: int, b: int, step: Tensor) -> None:
            write.sub(step, start=a, end=b)

        adam = self._sharded_quantized_adam if is_dtensor(grad) else self._quantized_adam
        adam(grad, state, group, lr, sink)

    def fusable(self, target: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
        """Only tensors whose moments stay 32-bit (below ``MIN_8BIT_SIZE``) take the fused AdamW kernel."""
        return not self._quantized(grad, state) and super().fusable(target, grad, state)

    @staticmethod
    def _quantized(grad: Tensor, state: dict[str, Any]) -> bool:
        """Whether this tensor's moments are (or, at its first step, will be) 8-bit."""
        if "exp_avg" in state:
            return False
        return "exp_avg_q" in state or grad.numel() >= MIN_8BIT_SIZE

    def _quantized_adam(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float,
                        sink: Callable[[int, int, Tensor], None]) -> None:
        """Adam on 8-bit moments, ``CHUNK_SIZE`` elements at a time: dequantize a chunk, update it,
        quantize it back into the state, hand ``sink(start, end, step)`` the chunk's step."""
        numel = grad.numel()
        if "exp_avg_q" not in state:
            zeros = quantize(torch.zeros(min(numel, CHUNK_SIZE), device=grad.device), signed=True)
            zeros_sq = quantize(torch.zeros(min(numel, CHUNK_SIZE), device=grad.device), signed=False)
            blocks = -(-numel // BLOCK_SIZE)
            for key, (codes, absmax) in (("exp_avg", zeros), ("exp_avg_sq", zeros_sq)):
                state[f"{key}_q"] = codes[:1].expand(numel).reshape(grad.shape).clone()
                state[f"{key}_absmax"] = absmax[:1].expand(blocks).clone()
        beta1, beta2 = group["betas"]
        flat_grad = grad.reshape(-1)
        codes_m, codes_v = state["exp_avg_q"].view(-1), state["exp_avg_sq_q"].view(-1)
        absmax_m, absmax_v = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
        for a in range(0, numel, CHUNK_SIZE):
            b = min(a + CHUNK_SIZE, numel)
            blocks = slice(a // BLOCK_SIZE, -(-b // BLOCK_SIZE))
            exp_avg = dequantize(codes_m[a:b], absmax_m[blocks], signed=True)
            exp_avg_sq = dequantize(codes_v[a:b], absmax_v[blocks], signed=False)
            direction, factor = adam_direction(
                flat_grad[a:b].float(), exp_avg, exp_avg_sq, moment_steps(state), beta1, beta2, group["eps"])
            # A NaN/Inf gradient entry poisons its own parameter entry through ``direction`` (as in
            # AdamW) but must not reach the block's absmax, which would make all 256 entries of its
            # block non-finite: its stored moments are reset to 0 instead (DESIGN.md, "8-bit").
            exp_avg.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            exp_avg_sq.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            codes_m[a:b], absmax_m[blocks] = quantize(exp_avg, signed=True)
            codes_v[a:b], absmax_v[blocks] = quantize(exp_avg_sq, signed=False)
            sink(a, b, direction.mul_(lr * factor))

    def _sharded_quantized_adam(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float,
                                sink: Callable[[int, int, Tensor], None]) -> None:
        """``_quantized_adam`` on this rank's shard of a sharded moment (FSDP2): the local codes and
        the used part of the local absmax are viewed (updated in place); at the first step the
        fresh local state is placed like the moment (see the class docstring)."""
        part = local(grad)
        blocks = -(-part.numel() // BLOCK_SIZE)
        local_state: dict[str, Any] = {k: state[k] for k in ("step", "moment_start") if k in state}
        if "exp_avg_q" in state:
            for key in ("exp_avg", "exp_avg_sq"):
                local_state[f"{key}_q"] = local(state[f"{key}_q"])
                local_state[f"{key}_absmax"] = local(state[f"{key}_absmax"])[:blocks]
        if part.numel():
            self._quantized_adam(part, local_state, group, lr, sink)
        else:  # a rank without rows of this matrix (fewer rows than ranks)
            for key in ("exp_avg", "exp_avg_sq"):
                local_state.setdefault(f"{key}_q", torch.empty(part.shape, dtype=torch.uint8, device=part.device))
                local_state.setdefault(f"{key}_absmax", torch.empty(0, dtype=torch.float32, device=part.device))
        if "exp_avg_q" not in state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}_q"] = placed_like(local_state[f"{key}_q"].reshape(part.shape), grad)
                state[f"{key}_absmax"] = placed_blocks(local_state[f"{key}_absmax"], grad, BLOCK_SIZE)

    def moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        if is_dtensor(state["exp_avg_q"]):
            return tuple(placed_like(_dequantize_local(local(state[f"{key}_q"]), local(state[f"{key}_absmax"]),
                                                       signed), state[f"{key}_q"])
                         for key, signed in (("exp_avg", True), ("exp_avg_sq", False)))
        return (dequantize(state["exp_avg_q"], state["exp_avg_absmax"], signed=True),
                dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False))

    # issue 29, moment transport (DESIGN.md, "Moment transport")
    def reset_moments(self, state: dict[str, Any]) -> None:
        super().reset_moments(state)
        for key in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
            state.pop(key, None)

    def transport_moments(self, state: dict[str, Any], group: dict[str, Any], rotation: Rotation) -> None:
        """8-bit moments: dequantize this process's part, transport in float32, quantize again (in place:
        the codes and the used part of the absmax, as a step writes them)."""
        if "exp_avg_q" not in state:
            return super().transport_moments(state, group, rotation)
        codes = [local(state["exp_avg_q"]), local(state["exp_avg_sq_q"])]
        if not codes[0].numel():  # a rank without rows of this matrix
            return
        blocks = -(-codes[0].numel() // BLOCK_SIZE)
        absmax = [local(state["exp_avg_absmax"])[:blocks], local(state["exp_avg_sq_absmax"])[:blocks]]
        m = dequantize(codes[0], absmax[0], signed=True).view(codes[0].shape)
        v = dequantize(codes[1], absmax[1], signed=False).view(codes[1].shape)
        moved = self.transported(m, v, group, moment_steps(state), rotation)
        for value, code, scale, signed in zip(moved, codes, absmax, (True, False)):
            new_code, new_scale = quantize(value, signed)
            code.copy_(new_code.view(code.shape))
            scale.copy_(new_scale)

    def state_shapes(self, shape: tuple[int, ...], group: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
        numel = math.prod(shape)
        blocks = (-(-numel // BLOCK_SIZE),)
        quantized = {"exp_avg_q": shape, "exp_avg_absmax": blocks, "exp_avg_sq_q": shape, "exp_avg_sq_absmax": blocks}
        return [quantized] if numel >= MIN_8BIT_SIZE else super().state_shapes(shape, group)

    def state_dtype(self, key: str, grad_dtype: torch.dtype) -> torch.dtype:
        if key.endswith("_q"):
            return torch.uint8
        if key.endswith("_absmax"):
            return torch.float32
        return super().state_dtype(key, grad_dtype)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        numel = math.prod(shape)
        if numel >= MIN_8BIT_SIZE:
            return 2 * (numel + math.ceil(numel / BLOCK_SIZE) * 4)
        return super().state_bytes(shape, dtype, group)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW (and every GaLore+ option) with blockwise 8-bit Adam moments.

    Low-rank moments, and the moments of groups without ``rank``, are stored as uint8 codes of
    bitsandbytes' dynamic map, one float32 absmax per block of 256 (signed map for ``M``, unsigned
    for ``V``, as ``bitsandbytes.optim.AdamW8bit``); tensors under 4096 elements keep 32-bit moments.
    Each step dequantizes to float32, runs the same Adam kernel as ``GaLoreAdamW`` and quantizes
    again, so the math is float32 whatever is stored. It does so in chunks of ``CHUNK_SIZE``
    elements (whole quantization blocks, so the result is the same), and a group without ``rank``
    subtracts each chunk's step from the parameter in place: a step of an embedding-sized matrix
    needs a few MiB of temporaries, not four float32 copies of it. Projectors and residual state
    stay in the compute dtype (or ``proj_dtype``).

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

    Under FSDP2 (the moment is sharded like the low-rank gradient, or like the parameter in a group
    without ``rank``), each rank quantizes its own shard: the codes are placed like the moment, the
    absmax ``Shard(0)`` as ``world × B`` blocks (``B`` the blocks of the largest shard; a shorter last
    shard leaves its tail unused), or replicated with a replicated moment (``sharding.placed_blocks``).
    Whether a moment is 8-bit is decided on its global size, as in one process. Blocks are per shard:
    when the rows of a full shard hold a multiple of 256 elements (``⌈m/N⌉·cols``), they are exactly
    the single-process blocks and the run equals the single-process one; otherwise a block does not
    straddle two shards, which changes only the quantization blocking (results differ at the
    quantizer's resolution, not the math).
    """

    rule = AdamW8bitRule()

    def __init__(self, params: Any, *args: Any, **kwargs: Any):
        _bnb_functional()  # fail here, not at the first step of a large enough tensor
        super().__init__(params, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- FSDP2 shards


def _dequantize_local(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return dequantize(codes, absmax[: -(-codes.numel() // BLOCK_SIZE)], signed)
