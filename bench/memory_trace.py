"""RSS over one layer-wise GaLore+ 8-bit training step, sampled every 20 ms, with marks at named hooks.

The diagnostic behind the peak-memory section of BENCHMARKS.md: it showed the peak at the
embedding's 8-bit AdamW update (whole-tensor float32 temporaries, since chunked). Same model and
optimizer as ``peak_memory.py``'s ``ours_galore_plus_8bit_layerwise``; run it under
``MALLOC_MMAP_THRESHOLD_=65536`` (as peak_memory.py's children) so RSS follows live tensors.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/memory_trace.py --shape medium   # hidden 1024, vocab 32000: ~1-2 min
    MALLOC_MMAP_THRESHOLD_=65536 python bench/memory_trace.py --shape full --proj-dtype bfloat16   # LLaMA-1B: ~5 min
    python bench/memory_trace.py --shape smoke --out /tmp/trace.json

Prints (and writes to ``--out``) the peak, the RSS at each mark (before/after forward, the hooks of the
first and last layers' matrices, lm_head and the embedding) and the optimizer-state bytes.
"""

import argparse
import json
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)

harness.passive_omp_wait()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

import galore_plus  # noqa: E402
import peak_memory as pm  # noqa: E402

SHAPES = {"smoke": pm.SMOKE, "quick": pm.QUICK, "full": pm.FULL,
          "medium": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=2730, vocab_size=32000, rank=256, seq=256)}


def trace(shape, proj_dtype=None):
    samples, events, stop = [], [], threading.Event()
    t0 = time.perf_counter()

    def sampler():
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, pm.rss_now()))
            time.sleep(0.02)

    def mark(label):
        events.append({"t": round(time.perf_counter() - t0, 2), "rss_gib": round(pm.rss_now() / 2**30, 3),
                       "at": label})

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    cfg = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k not in ("rank", "seq")})
    with no_init_weights():
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    named = list(model.named_parameters())
    low = [(n, p) for n, p in named if n.endswith(".weight") and n.split(".")[-2] in pm.LOW_RANK]
    low_ids = {id(p) for _, p in low}
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    groups = galore_plus.galore_plus_param_groups(
        [(n, p, heads.get(n.split(".")[-2])) for n, p in low], rank=shape["rank"], update_proj_gap=200,
        plain=[(n, p) for n, p in named if id(p) not in low_ids], proj_dtype=proj_dtype)
    opt = galore_plus.GaLoreAdamW8bit(groups, svd="randomized")
    galore_plus.LayerwiseOptimizer(opt, model.named_parameters())
    last = cfg.num_hidden_layers - 1
    watched = ("layers.0.self_attn.q_proj.weight", f"layers.{last}.mlp.down_proj.weight", "lm_head.weight",
               "embed_tokens.weight")
    for n, p in named:  # registered after the optimizer's hooks: they fire after its update
        if n.endswith(watched):
            p.register_post_accumulate_grad_hook(lambda p, n=n: mark(f"after the update of {n}"))
    ids = torch.randint(0, cfg.vocab_size, (1, shape["seq"]))
    mark("before forward")
    loss = model(input_ids=ids, labels=ids).loss
    mark("after forward")
    loss.backward()
    mark("after backward")
    stop.set()
    thread.join()
    t_peak, peak = max(samples, key=lambda s: s[1])
    return {"shape": shape, "proj_dtype": str(proj_dtype), "ru_maxrss_gib": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "sampled_peak_gib": round(peak / 2**30, 3),
        "sampled_peak_t": round(t_peak, 2), "state_bytes": galore_plus.state_bytes(opt),
        "marks": events, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--proj-dtype", default=None, help="e.g. bfloat16 (default: the compute dtype)")
    ap.add_argument("--out", default=None, help="also write the result here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    result = trace(SHAPES[args.shape], getattr(torch, args.proj_dtype) if args.proj_dtype else None)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        harness.write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
