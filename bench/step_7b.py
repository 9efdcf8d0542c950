"""Benchmark: one LLaMA-2-7B-shaped training step on this machine's CPU, and its peak memory (issue 26).

The model: LLaMA-2-7B's shape (hidden 4096, intermediate 11008, 32 heads, vocab 32000, untied
``lm_head``) with random weights in bfloat16, built on the meta device and materialized directly in
bf16 (``to_empty`` + in-place init: no float32 copy of any weight ever exists). Training: GaLore+
(the recipe: cross-head q/k with the 1.2% residual, randomized range finder elsewhere), rank
``--rank`` (128), layer-wise updates (``layerwise=True``), 8-bit states (``eightbit=True``), the
projected backward (``projected_backward=True``; at the refresh step the projector comes from ``x``
and ``dy`` inside backward: no ``m×n`` gradient), non-reentrant gradient checkpointing, one sequence
of 512 tokens, embedding and ``lm_head`` trained in full (the command's default recipe; their
gradients are applied and freed in backward, layer-wise).

A full 32-layer step may not fit the time or the memory left on a shared 2-core, 24 GB machine, so
each process builds the model with ``--layers`` decoder layers (default 2, 4 and 8, one child process
each: its peak RSS is its own) and the linear fit of the peaks in the layer count is extrapolated to
32 (``--full`` also runs 32 layers). Each child runs two steps: the first refreshes every projector
and creates the optimizer state, the second is a steady step.

Measured per child and step:

- **peak RSS**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak, loading
  included) and, per step, ``VmHWM`` after resetting it (``/proc/self/clear_refs``); glibc's mmap
  threshold is fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that RSS follows the live tensors;
- **tensor bytes**: the bytes of every live tensor allocated by torch's CPU allocator, from torch's
  own accounting (the profiler's memory events, ``profile_memory=True``: every allocation and free
  with its size): the bytes alive when the step starts (parameters + optimizer state, counted by
  walking them) plus the highest running sum of the step's allocations and frees.

    python bench/step_7b.py                  # 2, 4, 8 layers, one thread each (~10 min here)
    python bench/step_7b.py --layers 2 --smoke   # a tiny shape, seconds (the tests' check)
    python bench/step_7b.py --full           # also the 32-layer model (~16 GiB)
    python bench/step_7b.py --layers 32      # only 32 layers; the layer counts measured before are kept

Writes ``step_7b.json`` and ``.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import harness  # bench/harness.py

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
TOKENS, RANK, GIB = 512, 128, 2**30
PAPER = {"GaLore+ paper (GPU, LLaMA2-7B)": 15.5e9, "GaLore README (8-bit, layer-wise)": 22.72e9}


def build_model(layers, shape, seed=0):
    """A random LLaMA of ``shape`` with ``layers`` decoder layers, every weight bf16 from the start."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=TOKENS,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # no storage: nothing is allocated in float32
    model.to_empty(device="cpu")  # bf16 storage, uninitialized
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)  # in place, in bf16
    # the rotary embedding's inv_freq buffer came out of to_empty uninitialized: build it again on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    return model


def tensor_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def state_tensors(opt):
    from galore_plus import engine_of

    engine = engine_of(opt)
    for state in engine.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                yield value


def step_peak_bytes(prof):
    """The highest running sum of the allocations (+) and frees (−) the profiler recorded."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, running


def child(layers, smoke, rank, steps):
    harness.passive_omp_wait()
    harness.offline()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from galore_plus import build_optimizer

    torch.manual_seed(0)
    shape = SMOKE if smoke else SHAPE
    start = time.perf_counter()
    model = build_model(layers, shape)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    opt = build_optimizer(model, "galore+", rank, lr=1e-5, layerwise=True, eightbit=True, projected_backward=True,
                          update_proj_gap=200)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (1, TOKENS), generator=gen)
    param_bytes = tensor_bytes(model.parameters())
    rss_model = harness.proc_status("VmRSS")
    records = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        before = param_bytes + tensor_bytes(state_tensors(opt))
        harness.reset_peak_rss()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()  # layer-wise: the updates ran in backward; this applies nothing left over
        seconds = time.perf_counter() - t0
        peak_alloc, net = step_peak_bytes(prof)
        del prof
        records.append({"step": i + 1, "seconds": seconds, "loss": loss.item(),
                        "peak_rss_step": harness.proc_status("VmHWM"), "bytes_at_start": before,
                        "tensor_peak": before + peak_alloc, "net_allocated": net})
    state_bytes = tensor_bytes(state_tensors(opt))
    return {"layers": layers, "rank": rank, "tokens": TOKENS, "build_seconds": build_s,
            "param_bytes": param_bytes, "state_bytes": state_bytes, "rss_after_build": rss_model,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads(), "steps": records}


def run_child(layers, smoke, rank, steps, threads):
    args = [sys.executable, __file__, "--child", str(layers), "--rank", str(rank), "--steps", str(steps)]
    # under memory pressure the kernel's OOM killer takes this child first, not a neighbour's process
    preexec = (lambda: Path("/proc/self/oom_score_adj").write_text("1000")) if sys.platform == "linux" else None
    args += ["--smoke"] if smoke else []
    env = harness.child_env(threads=threads, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(args, env=env, capture_output=True, text=True, preexec_fn=preexec)
    if done.returncode != 0:
        return {"layers": layers, "error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points):
    """Least-squares line through ``(x, y)`` points: ``(intercept, slope)``."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def summarize(results, target=32):
    ok = [r for r in results if "error" not in r]
    measured = {r["layers"]: r for r in ok}
    columns = {"peak RSS (process)": lambda r: r["peak_rss"],
               "tensor peak": lambda r: max(s["tensor_peak"] for s in r["steps"]),
               "parameters": lambda r: r["param_bytes"],
               "optimizer state": lambda r: r["state_bytes"]}
    fits = {}
    if len(measured) >= 2:
        for name, f in columns.items():
            a, b = fit([(layers, f(r)) for layers, r in measured.items() if layers != target])
            fits[name] = {"intercept": a, "per_layer": b, f"at_{target}": a + b * target}
    return {"fits": fits, "columns": list(columns)}


def markdown(results, summary, machine):
    lines = [f"# One LLaMA-2-7B-shaped training step ({machine})", "",
             "GaLore+ rank %d, layer-wise, 8-bit states, projected backward, gradient checkpointing, %d tokens, "
             "bf16 weights; GiB = 2³⁰ bytes." % (results[0].get("rank", RANK), TOKENS), "",
             "| layers | peak RSS | tensor peak, 1st step (refresh) | tensor peak, 2nd step | parameters | "
             "optimizer state | 1st step s | 2nd step s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: r["layers"]):
        if "error" in r:
            lines.append(f"| {r['layers']} | error | | | | | | |")
            continue
        s = r["steps"]
        lines.append(f"| {r['layers']} | {r['peak_rss'] / GIB:.2f} | {s[0]['tensor_peak'] / GIB:.2f} | "
                     f"{s[-1]['tensor_peak'] / GIB:.2f} | {r['param_bytes'] / GIB:.2f} | {r['state_bytes'] / GIB:.3f} | "
                     f"{s[0]['seconds']:.1f} | {s[-1]['seconds']:.1f} |")
    if summary["fits"]:
        lines += ["", "Linear fit in the layer count (measured points above, 32 excluded), extrapolated to 32 layers:",
                  "", "| quantity | per layer GiB | intercept GiB | at 32 layers GiB |", "|---|---:|---:|---:|"]
        for name, f in summary["fits"].items():
            lines.append(f"| {name} | {f['per_layer'] / GIB:.3f} | {f['intercept'] / GIB:.3f} | {f['at_32'] / GIB:.2f} |")
    lines += ["", "For reference: " + "; ".join(f"{k}: {v / 1e9:.2f} GB = {v / GIB:.2f} GiB" for k, v in PAPER.items())]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--full", action="store_true", help="also run the 32-layer model")
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.smoke, args.rank, args.steps)))
        return
    layers = list(args.layers) + ([32] if args.full else [])
    name = "step_7b_smoke" if args.smoke else "step_7b"
    args.out.mkdir(parents=True, exist_ok=True)
    # the layer counts measured before at this rank and step count are kept (a run adds or re-measures its own)
    path = args.out / f"{name}.json"
    earlier = json.loads(path.read_text())["results"] if path.exists() else []
    results = [r for r in earlier if "error" not in r and r["layers"] not in layers and r.get("rank") == args.rank
               and len(r.get("steps", ())) == args.steps]
    for n in layers:
        results.append(run_child(n, args.smoke, args.rank, args.steps, args.threads))
        print(json.dumps(results[-1])[:400], flush=True)
        summary = summarize(results)
        (args.out / f"{name}.json").write_text(json.dumps({"results": results, "summary": summary,
                                                            "cpu": harness.cpu_name()}, indent=1))
        harness.write_text(args.out / f"{name}.md", markdown(results, summary, harness.cpu_name()))
    print(markdown(results, summarize(results), harness.cpu_name()))


if __name__ == "__main__":
    main()
