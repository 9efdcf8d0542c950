"""Where the projected backward's time goes against PEFT LoRA: ``torch.profiler`` (CPU time, one thread)
over steady steps of ``projected_backward.py``'s ``--small`` LLaMA (issue 26; BENCHMARKS §7).

    python bench/profile_small.py --length 128 --configs lora,frozen,low_rank --steps 2

Each configuration in its own process (one thread): ``projected_backward.build`` and ``batches_for``,
``--warmup`` steps (the first refreshes), then ``torch.profiler.profile`` around ``--steps`` steady steps,
with ``record_function`` ranges ``forward``, ``backward``, ``step`` and ``zero_grad``. Prints, per
configuration, each range's CPU seconds per step and the ops' self CPU time per step (top ``--top``),
and writes them to ``--out``/``profile_small_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import harness  # bench/harness.py

CONFIGS = {"lora": ("lora", "frozen"), "frozen": ("galore+ projected", "frozen"),
           "full": ("galore+ projected", "full"), "low_rank": ("galore+ projected", "low_rank")}


def worker(name: str, length: int, warmup: int, steps: int, rank: int, vocab: int | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import projected_backward as pb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    method, embeddings = CONFIGS[name]
    c = {"task": f"small 4x{length}", "method": method, "rank": rank, "embeddings": embeddings}
    model = LlamaForCausalLM(LlamaConfig(**{**pb.SMALL, "vocab_size": vocab or pb.SMALL["vocab_size"]}))
    model, optimizer = pb.build(c, model, warmup + steps + 1)
    model.train()
    batches = pb.batches_for(c["task"], None, warmup + steps, False, vocab or pb.SMALL["vocab_size"])

    def one(batch):
        with record_function("forward"):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        with record_function("backward"):
            loss.backward()
        with record_function("step"):
            optimizer.step()
        with record_function("zero_grad"):
            optimizer.zero_grad(set_to_none=True)

    for batch in batches[:warmup]:
        one(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[warmup:]:
            one(batch)
    events = prof.key_averages()
    ranges = {e.key: e.cpu_time_total / 1e6 / steps for e in events if e.key in ("forward", "backward", "step",
                                                                                   "zero_grad")}
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps) for e in events
                  if e.key not in ranges), key=lambda t: -t[1])
    return {"config": name, "ranges": ranges, "ops": ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--configs", default="lora,frozen")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    harness.add_out_argument(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.length, args.warmup, args.steps, args.rank, args.vocab)))
        return
    env = harness.child_env(1, MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    results = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--length", str(args.length), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--rank", str(args.rank)] + (["--vocab", str(args.vocab)] if args.vocab else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"== {name} 4x{args.length}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ranges"].items()) + " CPU-s/step")
        for key, seconds, count in r["ops"][:args.top]:
            print(f"   {key:<48} {seconds * 1e3:8.1f} ms  x{count}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / f"profile_small_{args.length}.json", {"command": " ".join(sys.argv), "results": results})


if __name__ == "__main__":
    main()
