"""Which 8-bit quantizer GaLoreAdamW8bit uses: bitsandbytes' blockwise functions vs torchao's 8-bit state.

Both quantize blockwise (256 values per float32 absmax) with a dynamic map. Measured on
Adam-moment-like tensors of a rank-128 low-rank state of a 4096-wide matrix (4096×128): round-trip
relative error of M (signed, heavy-tailed) and V (unsigned, M²-like), and the time of one
quantize + dequantize of both, as GaLoreAdamW8bit does every step.

    pip install torchao   # not a dependency of galore-plus; only this comparison needs it
    python bench/quantizer_choice.py     # ~20 s
"""

from __future__ import annotations

import time

import torch

import harness  # bench/harness.py
from galore_plus import adamw8bit


def moments(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(4) * 1e-3
    v = m * m * (1 + torch.rand(shape, generator=gen)) + 1e-12
    return m, v


def bnb_roundtrip(m, v):
    mq, ma = adamw8bit.quantize(m, signed=True)
    vq, va = adamw8bit.quantize(v, signed=False)
    return adamw8bit.dequantize(mq, ma, signed=True), adamw8bit.dequantize(vq, va, signed=False)


def torchao_roundtrip(m, v):
    from torchao.optim.subclass_8bit import OptimState8bit

    ms = OptimState8bit.zeros(m.shape, signed=True, block_size=256)
    vs = OptimState8bit.zeros(v.shape, signed=False, block_size=256)
    ms.copy_(m)
    vs.copy_(v)
    return ms.dequantize(), vs.dequantize()


def measure(fn, m, v, reps=20):
    fn(m, v)
    start = time.perf_counter()
    for _ in range(reps):
        dm, dv = fn(m, v)
    seconds = (time.perf_counter() - start) / reps
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    # the Adam direction M/sqrt(V) is what the quantization error finally perturbs
    direction = rel(dm / (dv.sqrt() + 1e-8), m / (v.sqrt() + 1e-8))
    return {"m_rel_error": rel(dm, m), "v_rel_error": rel(dv, v), "direction_rel_error": direction,
            "ms_per_step": seconds * 1e3}


def main():
    torch.set_num_threads(2)
    m, v = moments((4096, 128))
    rows = {"bitsandbytes blockwise": measure(bnb_roundtrip, m, v)}
    try:
        rows["torchao OptimState8bit"] = measure(torchao_roundtrip, m, v)
    except ImportError as err:
        rows["torchao OptimState8bit"] = {"error": str(err)}
    out = harness.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "quantizer_choice.json", rows, indent=2)
    lines = harness.table_header("quantizer", "M rel. error", "V rel. error", "M/sqrt(V) rel. error",
                                 "ms per quantize+dequantize of M and V")
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
        else:
            lines.append(f"| {name} | {r['m_rel_error']:.4f} | {r['v_rel_error']:.4f} | "
                         f"{r['direction_rel_error']:.4f} | {r['ms_per_step']:.1f} |")
    text = "# 8-bit quantizer choice (4096×128 moments, CPU)\n\n" + "\n".join(lines) + "\n"
    harness.write_text(out / "quantizer_choice.md", text)
    print(text)


if __name__ == "__main__":
    main()
