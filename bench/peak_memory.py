"""Peak CPU memory of one training step of a LLaMA-1B-shaped model, per optimizer.

Each configuration runs in its own fresh subprocess (``--child CONFIG``), which builds a float32
``LlamaForCausalLM`` (hidden 2048, 24 layers, 32 heads, intermediate 5461, vocab 32000: ~1.3B
parameters, not tied), builds the optimizer, then runs ONE step on one batch (batch 1, 256 random
tokens, labels = inputs): forward, ``loss.backward()``, ``optimizer.step()`` (not in layer-wise
mode, where every parameter steps inside ``backward()``), ``zero_grad(set_to_none=True)``. It
reports its peak RSS (``ru_maxrss``), its RSS after imports and just before the step (model and
optimizer built; optimizers allocate their state lazily, so this is mostly the weights), and the
step's wall time. Low-rank matrices (rank 512, ``update_proj_gap`` 200, scale 0.25, proj_type std):
q, k, v, o, gate, up, down of every layer; embeddings, lm_head and norms are plain.

Configs: ``baseline`` (forward + backward, no optimizer), ``adamw`` (torch.optim.AdamW with its
defaults: for CPU tensors torch picks the single-tensor loop, not foreach, so no foreach
temporaries), ``bnb_adamw8bit``, ``galore_torch`` (galore_torch.GaLoreAdamW), ``ours_galore`` (galore_plus.GaLoreAdamW), ``ours_galore_plus_8bit``
(GaLoreAdamW8bit, svd="randomized", galore_plus_param_groups) and
``ours_galore_plus_8bit_layerwise`` (the same driven by LayerwiseOptimizer), and
``ours_galore_plus_8bit_layerwise_bf16proj`` (the same with projectors stored in bf16,
``proj_dtype=torch.bfloat16``). Targets: the layer-wise peak ≤ 0.6× galore-torch's and ≤ 0.35×
AdamW's.

    python bench/peak_memory.py --quick     # small LLaMA (hidden 256, 4 layers), rank 64, seq 64: ~1-2 min
    python bench/peak_memory.py             # full: ~30-40 min on 2 cores (the first GaLore step does an
                                            # exact SVD of every matrix: ~12 min each for galore_torch and
                                            # ours_galore); adamw needs ~22 GB of RAM (weights,
                                            # grads, 2 moments at 5.4 GB each) or it is killed
    python bench/peak_memory.py --configs baseline,adamw --out /tmp/pm
    python bench/peak_memory.py --smoke --configs adamw,ours_galore_plus_8bit_layerwise --out /tmp/pm
                                            # tiny LLaMA (hidden 64, 2 layers), rank 8: CI smoke test

Writes ``peak_memory.json`` and ``peak_memory.md`` to ``--out`` (default ``bench/results``). A child
that fails (exception, killed for memory) is recorded with its error instead of a number. Children
run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed large tensors go back to the OS and RSS follows
live tensors (glibc's adaptive threshold could otherwise keep freed gradients on the heap).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import warnings

import harness  # bench/harness.py

CONFIGS = ["baseline", "adamw", "bnb_adamw8bit", "galore_torch", "ours_galore",
           "ours_galore_plus_8bit", "ours_galore_plus_8bit_layerwise", "ours_galore_plus_8bit_layerwise_bf16proj"]
FULL = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=5461, vocab_size=32000, rank=512, seq=256)
QUICK = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=688, vocab_size=4096, rank=64, seq=64)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=172, vocab_size=256, rank=8, seq=16)
LOW_RANK = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = harness.GIB


def rss_now():
    return harness.proc_status("VmRSS")


def child(config, shape):
    harness.passive_omp_wait()
    import torch
    import transformers
    from transformers.initialization import no_init_weights
    import galore_plus
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW as TorchGaLoreAdamW
    import bitsandbytes as bnb

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rss_import = rss_now()
    cfg = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k not in ("rank", "seq")})
    with no_init_weights():  # skip the (slow) default init, then fill cheaply: every page gets touched
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    model.train()
    named = list(model.named_parameters())
    low = [(n, p) for n, p in named if n.endswith(".weight") and n.split(".")[-2] in LOW_RANK]
    low_ids = {id(p) for _, p in low}
    others = [(n, p) for n, p in named if id(p) not in low_ids]
    rank = shape["rank"]
    groups_torch = [{"params": [p for _, p in low], "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                     "proj_type": "std"}, {"params": [p for _, p in others]}]
    opt, layerwise = None, False
    if config == "adamw":
        opt = torch.optim.AdamW(model.parameters())
    elif config == "bnb_adamw8bit":
        opt = bnb.optim.AdamW8bit(model.parameters())
    elif config == "galore_torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = TorchGaLoreAdamW(groups_torch)
    elif config == "ours_galore":
        opt = galore_plus.GaLoreAdamW(groups_torch)
    elif config.startswith("ours_galore_plus_8bit"):
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        matrices = [(n, p, heads.get(n.split(".")[-2])) for n, p in low]
        groups = galore_plus.galore_plus_param_groups(matrices, rank=rank, plain=others, update_proj_gap=200)
        opt = galore_plus.GaLoreAdamW8bit(groups, svd="randomized",
                                          proj_dtype=torch.bfloat16 if config.endswith("_bf16proj") else None)
        if "_layerwise" in config:
            layerwise = galore_plus.LayerwiseOptimizer(opt, model.named_parameters())
    elif config != "baseline":
        raise ValueError(f"unknown config {config!r}")
    ids = torch.randint(0, cfg.vocab_size, (1, shape["seq"]))
    rss_before = rss_now()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None and not layerwise:
        opt.step()
    model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"config": config, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before": rss_before, "rss_import": rss_import, "seconds": seconds, "loss": loss.item(),
            "params": sum(p.numel() for _, p in named), "low_rank_params": sum(p.numel() for _, p in low),
            "optimizer": type(opt).__name__ if opt is not None else None,
            "adamw_foreach": opt.defaults.get("foreach") if config == "adamw" else None,
            "attn_implementation": cfg._attn_implementation}


def run_child(config, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config] + (["--quick"] if args.quick else []) + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"config": config}
    if proc.returncode != 0 and "error" not in result:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        result["error"] = f"exit code {proc.returncode}" + (" (killed, likely out of memory)" if proc.returncode < 0 else "") + (f": {tail}" if tail else "")
    result["child_seconds"] = time.perf_counter() - t0
    return result


def gib(x):
    return f"{x / GIB:.3f}"


def table(results, meta):
    by = {r["config"]: r for r in results if "error" not in r}
    base = by.get("baseline", {}).get("peak")
    shape = ", ".join(f"{k} {v}" for k, v in meta["shape"].items())
    lines = [f"# Peak memory of one training step ({meta['mode']} mode)", "",
             f"{shape}; float32, batch 1, {meta['cpus']} CPUs, torch {meta['torch']}, 2 threads; "
             f"{meta['total_seconds']:.0f} s in all. Peak = child's ru_maxrss; 'before step' = RSS with model and "
             "optimizer built; baseline = forward + backward, no optimizer. RSS after imports (torch, transformers, "
             "bitsandbytes, galore) is included in every number.", "",
             *harness.table_header("config", "peak RSS GiB", "RSS before step GiB", "RSS after imports GiB",
                                   "peak − baseline GiB", "step s", "peak / galore_torch", "peak / adamw")]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'].replace('|', '/')[:300]} | | | | | | |")
            continue
        ratio = lambda ref: f"{r['peak'] / by[ref]['peak']:.3f}" if ref in by else "—"  # noqa: E731
        lines.append(f"| {r['config']} | {gib(r['peak'])} | {gib(r['rss_before'])} | {gib(r['rss_import'])} | "
                     f"{gib(r['peak'] - base) if base else '—'} | {r['seconds']:.1f} | {ratio('galore_torch')} | "
                     f"{ratio('adamw')} |")
    lines += ["", f"torch.optim.AdamW with torch's defaults (foreach={by.get('adamw', {}).get('adamw_foreach')}: "
              "torch picks the single-tensor loop for CPU tensors). Targets for the layer-wise configs:", ""] + [f"- {t}" for t in targets(by)]
    return "\n".join(lines) + "\n"


def targets(by):
    out = []
    for config in ("ours_galore_plus_8bit_layerwise", "ours_galore_plus_8bit_layerwise_bf16proj"):
        lw = by.get(config)
        for ref, limit in (("galore_torch", 0.6), ("adamw", 0.35)):
            if lw is None or ref not in by:
                out.append(f"{config}: peak ≤ {limit}× {ref}: not measured")
            else:
                ratio = lw["peak"] / by[ref]["peak"]
                net = (lw["peak"] - lw["rss_import"]) / (by[ref]["peak"] - by[ref]["rss_import"])
                out.append(f"{config}: peak ≤ {limit}× {ref}: {'met' if ratio <= limit else 'NOT met'} "
                           f"({ratio:.3f}×; {net:.3f}× with each child's RSS after imports subtracted)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_modes(ap, quick="small LLaMA, rank 64, seq 64", smoke="tiny LLaMA, rank 8, seq 16 (CI smoke test)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    harness.add_out_argument(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.child:
        try:
            result = child(args.child, shape)
        except Exception as e:  # recorded by the parent, not raised
            traceback.print_exc()
            result = {"config": args.child, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)
        return
    import torch
    configs = [c for c in args.configs.split(",") if c]
    t0 = time.perf_counter()
    results = []
    for c in configs:
        results.append(run_child(c, args))
        r = results[-1]
        print(f"{c}: " + (r["error"] if "error" in r else f"peak {gib(r['peak'])} GiB, before {gib(r['rss_before'])} GiB, "
                          f"step {r['seconds']:.1f} s"), flush=True)
    meta = {"mode": harness.mode(args), "shape": shape, "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "total_seconds": time.perf_counter() - t0,
            "malloc_mmap_threshold": 65536, "peak_definition": "ru_maxrss of the child (bytes here)"}
    os.makedirs(args.out, exist_ok=True)
    harness.write_json(os.path.join(args.out, "peak_memory.json"), {"meta": meta, "results": results})
    md = table(results, meta)
    harness.write_text(os.path.join(args.out, "peak_memory.md"), md)
    print(md)
    print(f"total {meta['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
