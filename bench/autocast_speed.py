"""Benchmark: float32 against bf16 ``torch.autocast`` on the CPU, GaLore+ with the projected backward (issue 26).

The small LLaMA of BENCHMARKS.md §7 (random, hidden 512, 4 layers, 8 heads, intermediate 1376, vocab
32000, untied ``lm_head``), float32 weights, GaLore+ rank 32 (cross-head q/k with the residual,
randomized range finder), embedding and ``lm_head`` frozen, 4×128 tokens a step. Configurations:
the projected backward and the full path (``projected_backward=False``), each in float32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (forward under autocast, backward and ``step()``
outside it, as torch's AMP recipe does; the optimizer's math is float32 either way). One process per
configuration and repeat, one thread, configurations interleaved and the grid repeated (the machine
is shared: medians). Tokens/s of steady steps (after 2 warm-up steps, the first a refresh).

    python bench/autocast_speed.py              # 3 repeats, ~3 min
    python bench/autocast_speed.py --smoke      # a tiny shape, 1 repeat

Writes ``autocast_speed.json`` and ``.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness  # bench/harness.py

SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1376, vocab_size=32000, batch=4, seq=128, rank=32)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=172, vocab_size=256, batch=2, seq=16, rank=8)
CONFIGS = ("projected fp32", "projected bf16-autocast", "full fp32", "full bf16-autocast")
WARMUP, STEPS = 2, 6


def child(config, smoke):
    harness.passive_omp_wait()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from galore_plus import build_optimizer

    harness.pin_threads(1)
    shape = SMOKE if smoke else SHAPE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq", "rank")},
                                         max_position_embeddings=shape["seq"], tie_word_embeddings=False))
    model.train()
    opt = build_optimizer(model, "galore+", shape["rank"], lr=1e-5, update_proj_gap=1000, residual_warmup=1,
                          projected_backward=config.startswith("projected"), embeddings="frozen")
    autocast = config.endswith("autocast")
    gen = torch.Generator().manual_seed(1)
    times, losses = [], []
    for i in range(WARMUP + STEPS):
        ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=gen)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    tokens = shape["batch"] * shape["seq"]
    return {"config": config, "tokens_per_s": tokens / statistics.median(times), "step_s": times, "losses": losses}


def run_child(config, smoke):
    args = [sys.executable, __file__, "--child", config] + (["--smoke"] if smoke else [])
    done = subprocess.run(args, env=harness.child_env(threads=1), capture_output=True, text=True)
    if done.returncode != 0:
        return {"config": config, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results):
    lines = ["| configuration | tokens/s (median of repeats) | per repeat | ×fp32 (same path) |", "|---|---:|---|---:|"]
    med = {}
    for config in CONFIGS:
        runs = [r["tokens_per_s"] for r in results if r["config"] == config and "error" not in r]
        med[config] = statistics.median(runs) if runs else float("nan")
    for config in CONFIGS:
        runs = [r["tokens_per_s"] for r in results if r["config"] == config and "error" not in r]
        base = med[config.split()[0] + " fp32"]
        lines.append(f"| {config} | {med[config]:.0f} | {', '.join(f'{t:.0f}' for t in runs)} | "
                     f"{med[config] / base:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.smoke)))
        return
    repeat = 1 if args.smoke else args.repeat
    name = "autocast_speed_smoke" if args.smoke else "autocast_speed"
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for r in range(repeat):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]  # rotated each repeat
        for config in order:
            results.append(run_child(config, args.smoke) | {"repeat": r})
            print(json.dumps(results[-1])[:300], flush=True)
            (args.out / f"{name}.json").write_text(json.dumps({"results": results, "cpu": harness.cpu_name()},
                                                              indent=1))
            harness.write_text(args.out / f"{name}.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
