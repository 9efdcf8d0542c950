"""Benchmark: the projected backward against the full path, LoRA, DoRA and AdamW (issue 16).

Part A, SmolLM2-135M-Instruct on the command's data (arithmetic: short sequences, ~4×45 tokens a
step; gsm_symbolic: long, ~4×280), batch 4, at rank 8 and 32, side by side in one invocation:

- ``galore+ projected`` / ``galore+ full``: ``build_optimizer(model, "galore+", rank,
  projected_backward=True/False)`` with the command's settings (α 4, T 50, lr 2e-5, the 1.2%
  residual on q/k from step 20), the embedding/``lm_head`` (tied: one matrix) either ``frozen`` like
  LoRA's or trained in ``full`` (the published recipe, the command's default);
- ``lora`` / ``dora``: PEFT on every linear (``all-linear``, r = rank, α = 2r) with torch AdamW, as
  the command builds them (the embedding frozen);
- ``adamw``: torch AdamW on every parameter (rank-independent; once per task).

Each configuration runs in its own process (one thread, ``torch.set_num_threads(1)``), so its peak
RSS is its own; configurations are interleaved and the whole grid is repeated (``--repeat``), and
the medians are reported. A process: load the model, build, then ``warmup`` steps (the first is a
projector refresh), ``steps`` timed steady steps (no refresh), and one timed refresh step (the
projector gap is set so it falls there). Tokens per second: steady, and amortized over the
command's gap of 50 steps (``(49·steady + refresh) / 50``; the full path refreshes too). Phases
(forward, backward, optimizer step) are timed separately. Memory: the process's peak RSS (loading
included) and the peak above the RSS after loading (``train peak``: activations, gradients, state).

Part B, one LLaMA-7B decoder layer (q, k, v, o 4096×4096, gate/up 11008×4096, down 4096×11008),
rank 128, the GaLore+ groups (cross-head + 1.2% residual on q/k): the backward's weight-gradient
work for given ``dy`` and ``x`` (tokens 512 and 2048), full ``dyᵀ x`` against the projected
gradients (``projected.projected_weight_gradient``, residual entries included), and the bytes a DDP
step all-reduces for the layer's targets, counted by the optimizer on a one-process gloo group
(projected between refreshes vs full at a refresh).

    python bench/projected_backward.py --smoke     # seconds: tiny random LLaMA, synthetic batches
    python bench/projected_backward.py --quick     # arithmetic only, 1 repeat, part B at 512 tokens
    python bench/projected_backward.py             # the whole grid, 2 repeats: ~1.5 h on one core
    python bench/projected_backward.py --tasks arithmetic --out /tmp/a &   # or split over the 2 cores,
    python bench/projected_backward.py --tasks gsm_symbolic --no-layer --out /tmp/g; wait
    python bench/projected_backward.py --merge /tmp/a/projected_backward.json /tmp/g/projected_backward.json
    python bench/projected_backward.py --small 128,32 --repeat 5   # the small LLaMA below, per-phase split

``--small LENGTHS``: instead of SmolLM2, the small LLaMA of BENCHMARKS §7's prediction (hidden 512,
intermediate 1376, 4 layers, 8 heads, SmolLM2's 49152-token vocabulary, embedding and ``lm_head``
tied, random weights) on random batches of 4×L tokens for each L, rank 32 (``--ranks``), LoRA
against GaLore+ projected with the embedding frozen, trained in full (the default recipe) and trained
low-rank (``low_rank``: with the tied weight's projected backward, issue 26); the
optimizer step is split into the plain parameters' updates and the low-rank ones'
(``step_split``, timed around ``LowRankOptimizer.apply``/``apply_plain``). With other jobs on the
cores, wall seconds say more about them than about the code: each phase is also timed in the
process's CPU seconds (``cpu_phases``, ``tokens_per_cpu_second``), and the table's ×LoRA columns are
medians of per-repeat ratios (each repeat runs every configuration once, interleaved). Writes
``projected_backward_small.json``/``.md``.

Writes ``projected_backward.json`` and ``.md`` to ``--out`` (default ``bench/results``;
``_quick``/``_smoke`` suffixes in those modes), rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import harness  # bench/harness.py

TASKS = ("arithmetic", "gsm_symbolic")
RANKS = (8, 32)
BATCH = 4
LR = 2e-5
GAP = 50
#: the command refreshes projected targets inside backward with one micro-batch per step (so the full
#: gradients never pile up at a refresh step); the timed runs of BENCHMARKS §7 predate that and
#: refreshed at step() (their steady steps are the same computation)
REFRESH_IN_BACKWARD = True


#: ``--small``: a 4-layer hidden-512 LLaMA with SmolLM2's tied 49152×512 embedding
SMALL = dict(vocab_size=49152, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, tie_word_embeddings=True)


def small_configs(lengths, ranks, variants=None):
    """``--small``: LoRA against GaLore+ projected with each embedding choice, per sequence length
    (``low_rank``: the tied embedding/``lm_head`` trained low-rank, projected since issue 26).
    ``variants`` (``--capture``: :data:`CAPTURE_CONFIGS`, ``--fira``: :data:`FIRA_CONFIGS`): instead,
    LoRA against these GaLore+ configurations, the embedding frozen."""
    out = []
    for length in lengths:
        for rank in ranks:
            task = f"small 4x{length}"
            out.append({"task": task, "method": "lora", "rank": rank, "embeddings": "frozen"})
            if variants:
                out += [{"task": task, "method": method, "rank": rank, "embeddings": "frozen", **extra}
                        for method, extra in variants]
                continue
            for embeddings in ("frozen", "full", "low_rank"):
                out.append({"task": task, "method": "galore+ projected", "rank": rank,
                            "embeddings": embeddings})
    return out


#: ``--capture``: what the captured-share refresh costs (DESIGN.md, "Refresh"), as (method, config keys;
#: none: the interval). With no interval refresh in the timed steps (T 10⁶), the projected backward at
#: threshold 1e-9 pays the sketch alone, at 1.0 the sketch and a refresh from factors every other update
#: (its most frequent); the full path at 1e-9 pays the full backward and the exact share every update.
CAPTURE_CONFIGS = (("galore+ projected", {}), ("galore+ projected", {"capture": 1e-9}),
                   ("galore+ projected", {"capture": 1.0}), ("galore+ full", {"capture": 1e-9}))
#: ``--fira``: what Fira's term costs (``outside="fira"``, the fine-tuning recipe since session 35; it reads
#: ``G`` every update, so the full backward), against the projected and the full path on the interval
FIRA_CONFIGS = (("galore+ projected", {}), ("galore+ full", {}), ("galore+ full", {"outside": "fira"}))


def configs(tasks, ranks):
    """Every configuration of part A, in the order they are interleaved."""
    out = []
    for task in tasks:
        out.append({"task": task, "method": "adamw", "rank": None, "embeddings": "full"})
        for rank in ranks:
            for method, choices in (("galore+ projected", ("frozen", "full", "low_rank")),
                                    ("galore+ full", ("frozen", "full"))):
                for embeddings in choices:
                    out.append({"task": task, "method": method, "rank": rank, "embeddings": embeddings})
            for method in ("lora", "dora"):
                out.append({"task": task, "method": method, "rank": rank, "embeddings": "frozen"})
    return out


def label(c):
    rank = "" if c["rank"] is None else f" r{c['rank']}"
    emb = f", embedding {c['embeddings']}" if c["method"].startswith("galore") else ""
    if "capture" in c:
        emb += f", capture < {c['capture']:g} ({'sketched' if c['method'] == 'galore+ projected' else 'exact'})"
    if "outside" in c:
        emb += ", Fira term"
    code = f" [{c['code']}]" if c.get("code") else ""
    return f"{c['method']}{rank}{emb}{code}"


# ---------------------------------------------------------------------------------------------- one process

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def batches_for(task, tokenizer, count, smoke, vocab=SMALL["vocab_size"]):
    from galore_plus.app.data import collate, encode, load_task

    if task.startswith("small"):
        gen = torch.Generator().manual_seed(0)
        length = int(task.split("x")[-1])
        return [{"input_ids": (ids := torch.randint(0, vocab, (BATCH, length), generator=gen)),
                 "attention_mask": torch.ones_like(ids), "labels": ids} for _ in range(count)]
    if smoke:
        gen = torch.Generator().manual_seed(0)
        length = 12 if task == "arithmetic" else 40
        return [{"input_ids": (ids := torch.randint(0, 200, (BATCH, length), generator=gen)),
                 "attention_mask": torch.ones_like(ids), "labels": ids} for _ in range(count)]
    data = load_task(task, n_train=BATCH * count, n_test=1, seed=0)
    features = [encode(tokenizer, ex, 384) for ex in data.train]
    return [collate(features[i:i + BATCH], tokenizer.pad_token_id) for i in range(0, BATCH * count, BATCH)]


def build(c, model, gap):
    from galore_plus import build_optimizer

    if c["method"] in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=c["rank"], lora_alpha=2 * c["rank"], lora_dropout=0.0,
                                                 target_modules="all-linear", use_dora=c["method"] == "dora"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    if c["method"] == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    projected = c["method"] == "galore+ projected"
    options = {"refresh": "capture", "capture_threshold": c["capture"]} if "capture" in c else {}
    if "outside" in c:
        options["outside"] = c["outside"]
    optimizer = build_optimizer(model, "galore+", c["rank"], lr=LR, weight_decay=0.0,
                                update_proj_gap=10**6 if "capture" in c else gap, scale=4.0, residual_warmup=1,
                                embeddings=c["embeddings"], projected_backward=projected,
                                refresh_in_backward=projected and REFRESH_IN_BACKWARD, **options)
    return model, optimizer


def worker(c, warmup, steps, smoke):
    """One configuration in this process; returns its measurements."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if c["task"].startswith("small"):
        from transformers import LlamaConfig, LlamaForCausalLM

        model, tokenizer = LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": c.get("vocab", SMALL["vocab_size"])})), None
    elif smoke:
        from galore_plus.app.models import load_model

        model, tokenizer = load_model("tiny")
    else:
        from galore_plus.app.models import load_model

        model, tokenizer = load_model("smollm2")
    loaded = rss_bytes()
    gap = warmup + steps  # refreshes at step 1 and at the step after the timed ones
    model, optimizer = build(c, model, gap)
    model.train()
    batches = batches_for(c["task"], tokenizer, warmup + steps + 1, smoke, c.get("vocab", SMALL["vocab_size"]))
    phases = {"forward": [], "backward": [], "step": []}
    split = _time_applies(optimizer)  # the step's plain vs low-rank updates (GaLore+ only)
    splits = []
    tokens = []
    refresh = None
    cpu = {"forward": [], "backward": [], "step": []}  # process CPU seconds: robust to other jobs' load
    for i, batch in enumerate(batches):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        c1, t1 = time.process_time(), time.perf_counter()
        loss.backward()
        c2, t2 = time.process_time(), time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        c3, t3 = time.process_time(), time.perf_counter()
        if warmup <= i < warmup + steps:
            for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[key].append(seconds)
            for key, seconds in zip(cpu, (c1 - c0, c2 - c1, c3 - c2)):
                cpu[key].append(seconds)
            splits.append(dict(split))
            tokens.append(int(batch["attention_mask"].sum()))
        elif i == warmup + steps:
            refresh = t3 - t0
        split.update(plain=0.0, low_rank=0.0)
    steady = statistics.median(f + b + s for f, b, s in zip(*phases.values()))
    counts = [int(state["refresh_count"]) for state in getattr(optimizer, "state", {}).values()
              if isinstance(state, dict) and "refresh_count" in state]
    per_step_tokens = statistics.mean(tokens)
    amortized = ((GAP - 1) * steady + refresh) / GAP
    return {"steady_seconds": steady, "refresh_step_seconds": refresh,
            "phases": {k: statistics.median(v) for k, v in phases.items()},
            "step_split": {k: statistics.median(s[k] for s in splits) for k in ("plain", "low_rank")},
            "cpu_phases": {k: statistics.median(v) for k, v in cpu.items()},
            "tokens_per_cpu_second": statistics.mean(tokens) / statistics.median(sum(x) for x in zip(*cpu.values())),
            # the mean over the timed steps (steps that refresh and steps that do not, as a run has them)
            "tokens_per_cpu_second_mean": statistics.mean(tokens) / statistics.mean(sum(x) for x in zip(*cpu.values())),
            "refreshes_per_matrix": statistics.mean(counts) if counts else None,
            "tokens_per_step": per_step_tokens, "tokens_per_second": per_step_tokens / steady,
            "tokens_per_second_amortized": per_step_tokens / amortized,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": loaded,
            "train_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - loaded}


def _time_applies(optimizer):
    """Seconds inside ``optimizer.apply`` this step, for plain and low-rank parameters (a dict the
    caller resets; zeros for optimizers that are not ours)."""
    split = {"plain": 0.0, "low_rank": 0.0}
    apply = getattr(optimizer, "apply", None)
    if apply is None:
        return split

    inside = []  # apply_plain calls apply for what its fused kernel does not take

    def timed(p, grad):
        t0 = time.perf_counter()
        apply(p, grad)
        if not inside:
            split["low_rank" if optimizer.is_low_rank(p) else "plain"] += time.perf_counter() - t0

    def timed_plain(params):
        t0 = time.perf_counter()
        inside.append(True)
        try:
            apply_plain(params)
        finally:
            inside.pop()
        split["plain"] += time.perf_counter() - t0

    optimizer.apply = timed  # instance attributes: step() and update() call self.apply / self.apply_plain
    apply_plain = getattr(optimizer, "apply_plain", None)
    if apply_plain is not None:
        optimizer.apply_plain = timed_plain
    return split


# ---------------------------------------------------------------------------------------------- part B

def llama7b_layer(token_counts, smoke):
    """Weight-gradient work of one LLaMA-7B decoder layer, full vs projected, and DDP bytes."""
    import torch.distributed as dist

    from galore_plus import GaLorePlusAdamW, galore_plus_param_groups
    from galore_plus.projected import projected_weight_gradient

    torch.set_num_threads(1)
    d, f, heads, rank = (512, 1376, 4, 16) if smoke else (4096, 11008, 32, 128)
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for n, s in shapes.items()}
    groups = galore_plus_param_groups([(n, p, heads if n in ("q", "k") else None) for n, p in params.items()], rank,
                                      residual_warmup=1, update_proj_gap=1000)
    optimizer = GaLorePlusAdamW(groups, lr=1e-5)
    out = {"shape": {"hidden": d, "intermediate": f, "heads": heads, "rank": rank}, "tokens": {}}
    for tokens in token_counts:
        xs = {n: torch.randn(tokens, s[1], generator=gen) for n, s in shapes.items()}
        dys = {n: torch.randn(tokens, s[0], generator=gen) * 1e-3 for n, s in shapes.items()}
        if not optimizer.state:  # two steps: a refresh, then the residual index set is fixed
            for _ in range(2):
                for n, p in params.items():
                    p.grad = dys[n].T @ xs[n]
                optimizer.step()
        full = projected = 0.0
        for _ in range(3):
            for n, p in params.items():
                t0 = time.perf_counter()
                _ = dys[n].T @ xs[n]
                t1 = time.perf_counter()
                left, right = optimizer.projector(p)
                _ = projected_weight_gradient(xs[n], dys[n], left, right, optimizer.residual_index(p), p.shape[1])
                t2 = time.perf_counter()
                full += (t1 - t0) / 3
                projected += (t2 - t1) / 3
        out["tokens"][str(tokens)] = {"full_seconds": full, "projected_seconds": projected,
                                      "speedup": full / projected}
        print(f"7B layer, {tokens} tokens: weight gradients full {full:.3f} s, projected {projected:.3f} s "
              f"({full / projected:.1f}x)", flush=True)
    # DDP bytes per step: the projected backward's own all-reduce, counted on a one-process group
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from galore_plus.projected import ProjectedBackward

        class Layer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for n, p in params.items():
                    lin = torch.nn.Linear(p.shape[1], p.shape[0], bias=False)
                    lin.weight = p
                    setattr(self, n, lin)

        layer = Layer()
        handle = ProjectedBackward(layer, optimizer)
        handle.reduce_over(dist.group.WORLD)
        tokens = token_counts[0]
        counted = {}
        for phase in ("projected step", "refresh step"):
            for n, p in params.items():
                p.grad = None
                if phase == "refresh step":
                    p.grad = dys[n].T @ xs[n]
                else:
                    left, right = optimizer.projector(p)
                    optimizer.add_projected_gradient(p, projected_weight_gradient(
                        xs[n][:tokens], dys[n][:tokens], left, right, optimizer.residual_index(p), p.shape[1]))
            before = optimizer.comm_bytes["step"]["all_reduce"]
            if phase == "refresh step":  # make every projector due, as at a refresh
                for p in params.values():
                    optimizer.state[p]["last_refresh"] = -10**6
            optimizer.step()
            optimizer.zero_grad()
            counted[phase] = optimizer.comm_bytes["step"]["all_reduce"] - before
        handle.remove()
    finally:
        dist.destroy_process_group()
    out["ddp_bytes_per_step"] = counted
    out["full_gradient_bytes"] = sum(p.numel() * 4 for p in params.values())
    print(f"7B layer, DDP bytes all-reduced per step: projected {counted['projected step'] / 2**20:.1f} MiB, "
          f"refresh {counted['refresh step'] / 2**20:.1f} MiB (full gradients)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- the grid

def table(results, part_b, memory=None):
    memory = memory or {}
    lines = harness.table_header("task", "configuration", "steady tok/s", "amortized tok/s", "×LoRA (steady)",
                                 "fwd / bwd / step s", "peak RSS GiB", "train peak GiB",
                                 *(["live train peak GiB"] if memory else []))
    by_key = {}
    for key, runs in results.items():
        c = json.loads(key)
        med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_second", "tokens_per_second_amortized",
                                                                   "peak_rss_bytes", "train_peak_bytes")}
        med["phases"] = {k: statistics.median(r["phases"][k] for r in runs) for k in ("forward", "backward", "step")}
        by_key[(c["task"], c["method"], c["rank"], c["embeddings"])] = (c, med)
    for (task, method, rank, embeddings), (c, med) in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][2] or 0,
                                                                                          kv[0][1], kv[0][3])):
        lora = by_key.get((task, "lora", rank, "frozen"))
        ratio = f"{med['tokens_per_second'] / lora[1]['tokens_per_second']:.2f}" if lora else "—"
        ph = med["phases"]
        live = memory.get(json.dumps(c, sort_keys=True))
        live = f" {statistics.median(r['train_peak_bytes'] for r in live) / 2**30:.2f} |" if live else (" — |" if memory else "")
        lines.append(f"| {task} | {label(c)} | {med['tokens_per_second']:.0f} | {med['tokens_per_second_amortized']:.0f} "
                     f"| {ratio} | {ph['forward']:.3f} / {ph['backward']:.3f} / {ph['step']:.3f} | "
                     f"{med['peak_rss_bytes'] / 2**30:.2f} | {med['train_peak_bytes'] / 2**30:.2f} |" + live)
    if part_b:
        lines += ["", f"One LLaMA-7B decoder layer, rank {part_b['shape']['rank']}: weight-gradient seconds (1 thread)", "",
                  *harness.table_header("tokens", "full dyᵀx", "projected (+ residual)", "speed-up")]
        for tokens, r in part_b["tokens"].items():
            lines.append(f"| {tokens} | {r['full_seconds']:.3f} | {r['projected_seconds']:.3f} | {r['speedup']:.1f}× |")
        b = part_b["ddp_bytes_per_step"]
        lines += ["", f"DDP bytes all-reduced per step for the layer's targets: {b['projected step'] / 2**20:.1f} MiB "
                  f"between refreshes, {b['refresh step'] / 2**20:.1f} MiB at a refresh "
                  f"(full gradients: {part_b['full_gradient_bytes'] / 2**20:.1f} MiB)."]
    return "\n".join(lines) + "\n"


def refreshes(runs):
    """Projector refreshes per low-rank matrix over a run (median over repeats; "—" for LoRA, older records)."""
    counts = [r.get("refreshes_per_matrix") for r in runs]
    return "—" if None in counts else f"{statistics.median(counts):.1f}"


def small_table(results):
    """``--small``'s table: tokens/s (median over repeats) against LoRA's at the same length and rank,
    and the step split into the plain parameters' updates and the low-rank ones'."""
    lines = harness.table_header("tokens", "configuration", "tok/CPU-s", "×LoRA (CPU)", "×LoRA (CPU, mean)",
                                 "CPU fwd / bwd / step s", "wall tok/s", "×LoRA (wall)",
                                 "step wall: plain / low-rank s", "refreshes a matrix")
    runs = {json.loads(k)["task"] + "|" + label(json.loads(k)): (json.loads(k), v) for k, v in results.items()}
    for key, (c, rs) in runs.items():
        lora = runs.get(f"{c['task']}|lora r{c['rank']}")
        def ratio(key):
            return statistics.median(r[key] / lr[key] for r, lr in zip(rs, lora[1])) if lora else float("nan")

        ph = {k: statistics.median(r["cpu_phases"][k] for r in rs) for k in ("forward", "backward", "step")}
        sp = {k: statistics.median(r["step_split"][k] for r in rs) for k in ("plain", "low_rank")}
        lines.append(f"| {c['task'].split()[-1]} | {label(c)} | "
                     f"{statistics.median(r['tokens_per_cpu_second'] for r in rs):.0f} | {ratio('tokens_per_cpu_second'):.2f} "
                     f"| {ratio('tokens_per_cpu_second_mean') if 'tokens_per_cpu_second_mean' in rs[0] else float('nan'):.2f} "
                     f"| {ph['forward']:.3f} / {ph['backward']:.3f} / {ph['step']:.3f} "
                     f"| {statistics.median(r['tokens_per_second'] for r in rs):.0f} | {ratio('tokens_per_second'):.2f} "
                     f"| {sp['plain']:.3f} / {sp['low_rank']:.3f} | {refreshes(rs)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_modes(ap, smoke="seconds: tiny random LLaMA, synthetic batches",
                      quick="arithmetic only, 1 repeat, part B at 512 tokens")
    ap.add_argument("--repeat", type=int, default=None, help="runs of the whole grid (default 2; quick/smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steady steps (default 5; smoke 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS))
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (e.g. 'galore+ projected')")
    harness.add_out_argument(ap)
    ap.add_argument("--memory", action="store_true",
                    help="instead of timing: each configuration once with glibc's mmap threshold fixed at 64 KiB, so "
                         "the process's RSS follows its live tensors (the default threshold adapts and keeps freed "
                         "memory resident, which made the timed runs' peaks differ by up to 0.4 GiB between "
                         "configurations that hold the same tensors)")
    ap.add_argument("--no-layer", dest="layer", action="store_false",
                    help="skip part B (the LLaMA-7B layer), e.g. in a second invocation over other --tasks")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="write the table of these result files together (e.g. two invocations' --out) and exit")
    ap.add_argument("--small", metavar="LENGTHS", default=None,
                    help="comma-separated sequence lengths: time the small LLaMA (hidden 512, 4 layers, tied "
                         "49152-token embedding) at 4×L tokens instead of SmolLM2 (see the module docstring)")
    ap.add_argument("--baseline-src", metavar="DIR", default=None,
                    help="also run every GaLore+ configuration with this source tree (another checkout's src/) "
                         "first on PYTHONPATH, labelled [before], interleaved with the others")
    variant = ap.add_mutually_exclusive_group()
    variant.add_argument("--capture", action="store_true",
                         help="--small: LoRA against GaLore+ (embedding frozen) on the interval and with the "
                              "captured-share refresh, sketched on the projected backward and exact on the full path "
                              "(CAPTURE_CONFIGS)")
    variant.add_argument("--fira", action="store_true",
                         help="--small: LoRA against GaLore+ (embedding frozen) projected, on the full path, and on the "
                              "full path with Fira's term (FIRA_CONFIGS)")
    ap.add_argument("--vocab", type=int, default=SMALL["vocab_size"],
                    help="--small: the vocabulary (default SmolLM2's; smaller for a quick check)")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks (default 8,32; --small: 32)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["config"], job["warmup"], job["steps"], job["smoke"])))
        return
    suffix = ("_smoke" if args.smoke else "_quick" if args.quick else "") + ("_small" if args.small else "") + (
        "_capture" if args.capture else "") + ("_fira" if args.fira else "") + (
        "_memory" if args.memory else "")
    if args.merge:  # timing records, and --memory records for the live-peak column
        records = [json.loads(Path(f).read_text()) for f in args.merge]
        timing = [r for r in records if not r["mode"].endswith("memory")]
        merged = {"mode": timing[0]["mode"], "command": [r["command"] for r in records], "torch": timing[0]["torch"],
                  "results": {k: v for r in timing for k, v in r["results"].items()},
                  "memory": {k: v for r in records if r["mode"].endswith("memory") for k, v in r["results"].items()},
                  "part_b": next((r["part_b"] for r in records if r["part_b"]), None)}
        out = Path(args.out)
        harness.write_json(out / f"projected_backward{suffix}.json", merged)
        text = table(merged["results"], merged["part_b"], merged["memory"])
        harness.write_text(out / f"projected_backward{suffix}.md", text)
        print(text)
        return
    repeat = args.repeat or (1 if args.smoke or args.quick else 2)
    steps = args.steps or (2 if args.smoke else 5)
    tasks = args.tasks.split(",") if args.tasks else (["arithmetic"] if args.quick or args.smoke else list(TASKS))
    ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else (4,) if args.smoke else (
        (32,) if args.small else RANKS)
    grid = configs(tasks, ranks)
    if args.small:
        variants = CAPTURE_CONFIGS if args.capture else FIRA_CONFIGS if args.fira else None
        grid, args.layer = small_configs([int(n) for n in args.small.split(",")], ranks, variants), False
        for c in grid:
            if args.vocab != SMALL["vocab_size"]:
                c["vocab"] = args.vocab
    if args.smoke:
        grid = [c for c in grid if c["method"] in ("galore+ projected", "galore+ full", "lora")
                and c["embeddings"] == "frozen"]
    if args.methods:
        grid = [c for c in grid if c["method"] in args.methods.split(",")]
    if args.baseline_src:
        grid = [v for c in grid for v in ([c, {**c, "code": "before"}] if c["method"].startswith("galore") else [c])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"projected_backward{suffix}.json"
    record = {"mode": suffix.strip("_") or "full", "command": " ".join(["python", "bench/projected_backward.py"] + sys.argv[1:]),
              "torch": torch.__version__, "results": {}, "part_b": None}
    env = harness.child_env(1, MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if args.memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        repeat, steps, args.layer = 1, 1, False
    for r in range(repeat):
        order = grid if r % 2 == 0 else list(reversed(grid))  # interleaved, alternating order across repeats
        for c in order:
            job = json.dumps({"config": c, "warmup": args.warmup, "steps": steps, "smoke": args.smoke})
            run_env = env if not c.get("code") else harness.child_env(
                1, MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(Path(args.baseline_src).resolve()), env.get("PYTHONPATH", "")]))
            done = subprocess.run([sys.executable, __file__, "--worker", job], capture_output=True, text=True,
                                  env=run_env)
            if done.returncode != 0:
                raise SystemExit(f"{label(c)} on {c['task']} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            record["results"].setdefault(json.dumps(c, sort_keys=True), []).append(result)
            print(f"[{r + 1}/{repeat}] {c['task']:>12} {label(c):<42} {result['tokens_per_second']:7.0f} tok/s steady, "
                  f"{result['tokens_per_second_amortized']:7.0f} amortized, train peak "
                  f"{result['train_peak_bytes'] / 2**30:.2f} GiB", flush=True)
            harness.write_json(path, record)
    if args.layer:
        record["part_b"] = llama7b_layer((64,) if args.smoke else (512,) if args.quick else (512, 2048), args.smoke)
    harness.write_json(path, record)
    text = small_table(record["results"]) if args.small else table(record["results"], record["part_b"])
    harness.write_text(out / f"projected_backward{suffix}.md", text)
    print(text)


if __name__ == "__main__":
    main()
