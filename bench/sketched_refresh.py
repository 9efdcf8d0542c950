"""Benchmark: a refresh step's memory and time with and without the full gradient (issue 26).

The projected backward (``build_optimizer(..., projected_backward=True)``) computes the targets'
projected gradients from ``x`` and ``dy`` between refreshes; at a refresh step it used to form every
target's ``m×n`` gradient (``sketched_refresh=False``). With ``sketched_refresh=True`` (the default)
the randomized range finder and the cross-head block run on ``x`` and ``dy`` instead
(``projection.FactoredGradient``). Four modes, GaLore+ (randomized, cross-head q/k, the residual on
q/k from step 2), rank 64, the embedding/``lm_head`` as the recipe says (``--embeddings``):

- ``full``: ``sketched_refresh=False``, the refresh at ``step()`` (every target's ``G`` alive there);
- ``full_in_backward``: ``sketched_refresh=False``, ``refresh_in_backward=True`` (one ``G`` at a
  time; what the command runs with one micro-batch in one process);
- ``sketched``: the factors ``x``, ``dy`` of each target held until ``step()``;
- ``sketched_in_backward``: the refresh inside backward from ``x`` and ``dy``, nothing held.

Each configuration runs in its own process, one thread, ``MALLOC_MMAP_THRESHOLD_=65536`` (freed
large tensors go back to the OS, so RSS follows live tensors). A process builds a random float32
LLaMA (hidden 1024, 6 layers, 16 heads, intermediate 2730, vocab 32000; issue 26's setting), then
runs 5 steps of 4×256 random tokens with ``update_proj_gap`` 3 (refreshes at steps 1 and 4). Before
each step the peak RSS is reset (``/proc/self/clear_refs``), after it read (``VmHWM``): the step's
peak above the RSS after the model was built (the "training memory above the model"), and the
step's wall time. Modes are interleaved and repeated (``--repeat``), medians reported: the machine
is shared, timings are noisy.

    python bench/sketched_refresh.py                      # 4 modes × 2 repeats: ~15-25 min, one core
    python bench/sketched_refresh.py --smoke --out /tmp/s # tiny LLaMA, seconds
    python bench/sketched_refresh.py --embeddings frozen --checkpointing   # the regime where G sets the peak
    python bench/sketched_refresh.py --residual           # the residual's index set: seconds
    python bench/sketched_refresh.py --layer              # one layer's refresh work alone: ~1 min
    python bench/sketched_refresh.py --against-lora       # against PEFT LoRA/DoRA r64: 8 rows × 2, ~1 h
    python bench/sketched_refresh.py --against-lora --table bench/results/sketched_refresh_vs_lora.json
    python bench/sketched_refresh.py --saved-tensors      # what autograd saves in one forward: ~1 min

``--against-lora``: GaLore+'s projected path as the command runs it with one micro-batch
(``sketched_in_backward``) with the embedding/``lm_head`` frozen and trained in full (the default
recipe), against PEFT LoRA and DoRA at the same rank built by the command's own
``app.methods.build_method`` (``--adapters lora`` leaves DoRA out), each with and without
checkpointing, one process per row, interleaved; the same model, batches and measurement. Memory is
counted above the RSS of the base model alone (peft and the command's modules imported before it in
every row), so LoRA's adapter weights count, and each step's peak is also split by phase
(``PHASES``: forward, the loss head's backward up to the logits' gradient, the rest of backward,
``step()``; ``PhasePeaks``). The JSON is written after every process; ``--table`` redoes the table
from it.

``--layer``: the refresh's own work for one decoder layer of that shape (1024 tokens, GaLore+: q/k
cross-head, one 64-row head block; v, o, gate, up, down the randomized range finder, rank 64,
oversample 8, 2 power iterations; then the projected gradient), from ``G`` (formed from ``x`` and
``dy`` first, as backward did) against from ``x`` and ``dy``; one thread, the two interleaved over
``--repeat`` rounds (default 7), medians.

``--residual``: the residual's index set as the optimizer now chooses it (the top-ρ of ``|P M'|`` by
row blocks, ``residual.select_top_product``) against the top-ρ of the whole ``|P M'|`` matrix
(``residual.select_indices``, the choice before) and, for reference, against the top-ρ of ``|G|``
(the step's own gradient, which no rule here uses), on a small random LLaMA's real gradients (hidden
128, 2 layers, random tokens), GaLore+ at rank 16, ρ 1.2% on q/k, chosen at step 3.

Writes ``sketched_refresh.json`` and ``.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness  # bench/harness.py

MODES = ("full", "full_in_backward", "sketched", "sketched_in_backward")
#: ``--against-lora``'s adapters, built as the command builds them (``app.methods.build_method``)
ADAPTERS = ("lora", "dora")
#: ``--against-lora``'s rows: (label, child mode, embeddings); the GaLore+ rows are the command's path with one
#: micro-batch (the refresh inside backward from x and dy)
AGAINST_LORA = (("galore+ projected, embedding frozen", "sketched_in_backward", "frozen"),
                ("galore+ projected, embedding full (default recipe)", "sketched_in_backward", "full"),
                ("lora", "lora", "frozen"), ("dora", "dora", "frozen"))
SHAPE = dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=2730, vocab_size=32000, batch=4, seq=256, rank=64)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=172, vocab_size=256, batch=2, seq=16, rank=8)
STEPS, GAP = 5, 3
MIB = 2**20


def child(mode, shape, embeddings, checkpointing=False):
    harness.passive_omp_wait()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from galore_plus import build_optimizer, engine_of
    # imported in every mode, before any RSS is read, so that the libraries' own pages count in no mode
    importlib.import_module("peft")
    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.methods import build_method

    harness.pin_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq", "rank")},
                         max_position_embeddings=shape["seq"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rss_base = harness.proc_status("VmRSS")  # the base model alone, before adapters or optimizer
    if mode in ADAPTERS:
        # PEFT LoRA/DoRA as ``finetune --method lora|dora --rank R`` builds it: every linear layer but
        # lm_head, alpha 2r, no dropout, the embedding frozen; torch.optim.AdamW on the adapters
        model, opt = build_method(FinetuneConfig(method=mode, rank=shape["rank"], lr=1e-5), model)
        return run_steps(mode, model, opt, shape, rss_base)
    opt = build_optimizer(model, "galore+", shape["rank"], lr=1e-5, update_proj_gap=GAP, residual_warmup=2,
                          projected_backward=True, refresh_in_backward=mode.endswith("_in_backward"),
                          embeddings=embeddings)
    engine_of(opt).projected_backward.sketched_refresh = mode.startswith("sketched")
    return run_steps(mode, model, opt, shape, rss_base)


def run_steps(mode, model, opt, shape, rss_base):
    """``STEPS`` steps of random tokens (the same batches in every mode), each step's peak RSS and time, and
    the peak of each of its phases (``PHASES``; ``phase_peaks``)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=gen)
               for _ in range(STEPS)]
    rss_model = harness.proc_status("VmRSS")
    phases = PhasePeaks(rss_model)

    def logits_hook(module, args, logits):
        # its gradient is ready: the loss head's backward (cross-entropy over the vocabulary) is done
        if logits.requires_grad:
            logits.register_hook(lambda grad: phases.cut("loss head"))

    model.get_output_embeddings().register_forward_hook(logits_hook)
    steps = []
    for ids in batches:
        harness.reset_peak_rss()
        phases.start()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        phases.cut("forward")
        loss.backward()
        del loss
        phases.cut("layers")
        held = harness.proc_status("VmRSS")  # what backward leaves for step(): gradients, held factors
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        phases.cut("step")
        steps.append({"seconds": seconds, "peak_above_model_mib": max(phases.peaks.values()),
                      "after_backward_above_model_mib": (held - rss_model) / MIB,
                      "phase_peaks_above_model_mib": dict(phases.peaks)})
    from galore_plus import state_bytes

    return {"mode": mode, "rss_model_mib": rss_model / MIB, "rss_base_mib": rss_base / MIB, "steps": steps,
            "state_mib": state_bytes(opt) / MIB,
            "trainable_mib": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / MIB}


#: a step's phases: forward (to the loss), the loss head's backward (to the logits' gradient), the rest of
#: backward (the layers, the embedding), ``step()`` with ``zero_grad``
PHASES = ("forward", "loss head", "layers", "step")


class PhasePeaks:
    """The peak RSS of each phase of a step, MiB above ``rss_model``: ``cut(name)`` reads the peak since the
    last cut (``VmHWM``) as phase ``name``'s and resets it (``/proc/self/clear_refs``), so the step's peak
    is the largest phase peak. One thread: a cut inside backward (a tensor hook) sees nothing concurrent."""

    def __init__(self, rss_model):
        self.rss_model = rss_model
        self.peaks = {}

    def start(self):
        self.peaks = {}

    def cut(self, name):
        self.peaks[name] = (harness.proc_status("VmHWM") - self.rss_model) / MIB
        harness.reset_peak_rss()


def run_child(mode, smoke, embeddings, checkpointing=False):
    args = ([sys.executable, __file__, "--child", mode, "--embeddings", embeddings] + (["--smoke"] if smoke else [])
            + (["--checkpointing"] if checkpointing else []))
    env = harness.child_env(threads=1, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"mode": mode, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results, embeddings):
    refresh_steps = [i for i in range(STEPS) if i % GAP == 0]  # 0-based: steps 1 and 4
    lines = [f"embeddings {embeddings}; medians over {len(results[MODES[0]])} interleaved runs; one thread; "
             "MiB above the RSS after the model was built",
             "",
             "| mode | peak, run (MiB) | peak, 1st step (MiB) | peak, 2nd refresh step (MiB) | peak, steady step (MiB) "
             "| left by backward, 2nd refresh (MiB) | left by backward, steady (MiB) "
             "| 2nd refresh step (s) | steady step (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        runs = [r for r in results[mode] if "steps" in r]
        if not runs:
            lines.append(f"| {mode} | failed | | | | | | | |")
            continue

        def med(f):
            return statistics.median(f(r) for r in runs)

        second = refresh_steps[1]
        steady = [i for i in range(STEPS) if i not in refresh_steps]
        lines.append(
            f"| {mode} | {med(lambda r: max(s['peak_above_model_mib'] for s in r['steps'])):.0f} "
            f"| {med(lambda r: r['steps'][0]['peak_above_model_mib']):.0f} "
            f"| {med(lambda r: r['steps'][second]['peak_above_model_mib']):.0f} "
            f"| {med(lambda r: max(r['steps'][i]['peak_above_model_mib'] for i in steady)):.0f} "
            f"| {med(lambda r: r['steps'][second].get('after_backward_above_model_mib', float('nan'))):.0f} "
            f"| {med(lambda r: max(r['steps'][i].get('after_backward_above_model_mib', float('nan')) for i in steady)):.0f} "
            f"| {med(lambda r: r['steps'][second]['seconds']):.2f} "
            f"| {med(lambda r: statistics.median(r['steps'][i]['seconds'] for i in steady)):.2f} |")
    return "\n".join(lines) + "\n"


def against_lora(smoke, repeat, out, only=None):
    """``--against-lora``: each row of ``AGAINST_LORA`` with and without checkpointing, one process each,
    interleaved over ``repeat`` rounds; writes ``sketched_refresh_vs_lora[_smoke].{json,md}`` after every
    process (a stopped run keeps what it measured)."""
    rows = [(label, mode, emb, ckpt) for ckpt in (False, True) for label, mode, emb in AGAINST_LORA
            if only is None or mode in only or mode not in ADAPTERS]
    record = {"shape": SMOKE if smoke else SHAPE, "steps": STEPS, "gap": GAP, "machine": harness.machine_line(),
              "rows": [{"label": label, "mode": mode, "embeddings": emb, "checkpointing": ckpt, "runs": []}
                       for label, mode, emb, ckpt in rows]}
    stem = "sketched_refresh_vs_lora" + ("_smoke" if smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(repeat):
        for row in record["rows"]:  # interleaved: each round runs every row once
            run = run_child(row["mode"], smoke, row["embeddings"], row["checkpointing"])
            row["runs"].append(run)
            summary = f"peak above the base model {peak_above_base(run):.0f} MiB" if "steps" in run else run
            print(row["label"], "checkpointing" if row["checkpointing"] else "", summary, flush=True)
            harness.write_json(out / f"{stem}.json", record)
    text = lora_table(record)
    harness.write_text(out / f"{stem}.md", text)
    print(text)


def peak_above_base(run):
    """A run's peak RSS over its steps, MiB above the RSS of the base model alone (before adapters or optimizer)."""
    return max(s["peak_above_model_mib"] for s in run["steps"]) + run["rss_model_mib"] - run["rss_base_mib"]


def lora_table(record):
    """The ``--against-lora`` table: medians of each row's runs, ×LoRA at the same checkpointing; each phase's
    peak (``PHASES``) is its largest over the run's steps."""
    def med(runs, f):
        return statistics.median(f(r) for r in runs)

    def phase(name):
        def peak(run):
            shift = run["rss_model_mib"] - run["rss_base_mib"]
            return max(s["phase_peaks_above_model_mib"][name] for s in run["steps"]) + shift
        return peak

    lora = {row["checkpointing"]: med([r for r in row["runs"] if "steps" in r], peak_above_base)
            for row in record["rows"] if row["mode"] == "lora" and any("steps" in r for r in row["runs"])}
    lines = [f"{record['machine']}; {record['steps']} steps; medians over the interleaved runs; MiB above the RSS "
             "of the base model alone; a phase's peak is its largest over the steps", "",
             "| method | checkpointing | runs | peak over the run (MiB) | ×LoRA | forward | loss head's backward "
             "| layers' backward | step() | optimizer state (MiB) | trainable parameters (MiB) | steady step (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in record["rows"]:
        runs = [r for r in row["runs"] if "steps" in r]
        ckpt = "yes" if row["checkpointing"] else "no"
        if not runs:  # every run failed, or none has run yet (a stopped run's JSON)
            lines.append(f"| {row['label']} | {ckpt} | 0 | {'failed' if row['runs'] else 'not run'} | | | | | | | | |")
            continue
        peak = med(runs, peak_above_base)
        ratio = f"{peak / lora[row['checkpointing']]:.2f}" if row["checkpointing"] in lora else "—"
        steady = [i for i in range(record["steps"]) if i % record["gap"] != 0]
        phases = " | ".join(f"{med(runs, phase(name)):.0f}" for name in PHASES)
        lines.append(
            f"| {row['label']} | {ckpt} | {len(runs)} | {peak:.0f} | {ratio} | {phases} "
            f"| {med(runs, lambda r: r['state_mib']):.0f} | {med(runs, lambda r: r['trainable_mib']):.0f} "
            f"| {med(runs, lambda r: statistics.median(r['steps'][i]['seconds'] for i in steady)):.2f} |")
    return "\n".join(lines) + "\n"


def saved_tensors(shape):
    """``--saved-tensors``: the bytes autograd saves in one forward (distinct storages, parameters left
    out), by shape, for GaLore+'s projected path with the embedding frozen and for LoRA, the model and
    batch of ``--against-lora`` (no checkpointing): the activations each keeps for backward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from galore_plus import build_optimizer
    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.methods import build_method

    harness.pin_threads(1)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    rows = {}
    for method in ("galore+ projected, embedding frozen", "lora"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq", "rank")},
                                             max_position_embeddings=shape["seq"], tie_word_embeddings=False))
        model.train()
        if method == "lora":
            model, _ = build_method(FinetuneConfig(method="lora", rank=shape["rank"], lr=1e-5), model)
        else:
            build_optimizer(model, "galore+", shape["rank"], lr=1e-5, projected_backward=True, refresh_in_backward=True,
                            embeddings="frozen")
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen, by_shape = set(), {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                by_shape[tuple(t.shape)] = by_shape.get(tuple(t.shape), 0) + t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss  # noqa: B018 (the forward is what is counted)
        rows[method] = by_shape
    shapes = sorted({s for by in rows.values() for s in by}, key=lambda s: -max(by.get(s, 0) for by in rows.values()))
    lines = ["| saved tensor shape | " + " | ".join(f"{m} (MiB)" for m in rows) + " |", "|---|" + "---:|" * len(rows),
             "| all | " + " | ".join(f"{sum(by.values()) / MIB:.1f}" for by in rows.values()) + " |"]
    lines += [f"| {'×'.join(map(str, s))} | " + " | ".join(f"{by.get(s, 0) / MIB:.1f}" for by in rows.values()) + " |"
              for s in shapes if max(by.get(s, 0) for by in rows.values()) >= MIB / 10]
    return "\n".join(lines) + "\n"


def residual_overlap():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from galore_plus import build_optimizer, projection, residual

    harness.pin_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    opt = build_optimizer(model, "galore+", 16, lr=1e-3, residual_warmup=3)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(3):
        ids = torch.randint(0, 512, (4, 64), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {p: p.grad.clone() for g in opt.param_groups if g.get("residual_ratio", 0) > 0 for p in g["params"]}
        opt.step()
        opt.zero_grad()
    names = {p: n for g in opt.param_groups for p, n in zip(g["params"], g["param_names"])}
    for p, grad in grads.items():
        state = opt.state[p]
        chosen = set(state["residual_index"].tolist())
        k = len(chosen)
        left, right = opt.projector(p)
        whole = set(residual.select_indices(projection.project_back(state["exp_avg"], left, right),
                                            opt.group_of(p)["residual_ratio"]).tolist())
        by_g = set(grad.abs().reshape(-1).topk(k).indices.tolist())
        rows.append((names[p], tuple(p.shape), k, len(chosen & whole) / k, len(chosen & by_g) / k))
    lines = ["| matrix | shape | entries | overlap with the whole-matrix top-ρ of abs(P M') | "
             "overlap with the top-ρ of abs(G) (reference) |", "|---|---|---:|---:|---:|"]
    lines += [f"| {n} | {s[0]}×{s[1]} | {k} | {a:.3f} | {b:.3f} |" for n, s, k, a, b in rows]
    return "\n".join(lines) + "\n"


def layer_time(repeat):
    import torch

    from galore_plus import projection
    from galore_plus.rng import generator_for

    harness.pin_threads(1)
    h, inter, rank, heads = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "rank", "num_attention_heads"))
    tokens = SHAPE["batch"] * SHAPE["seq"]
    gen = torch.Generator().manual_seed(0)
    # (name, m, n, cross-head): the GaLore+ groups of one LLaMA layer
    targets = [("q", h, h, True), ("k", h, h, True), ("v", h, h, False), ("o", h, h, False),
               ("gate", inter, h, False), ("up", inter, h, False), ("down", h, inter, False)]
    data = {name: (torch.randn(tokens, n, generator=gen), torch.randn(tokens, m, generator=gen))
            for name, m, n, _ in targets}

    def refresh(grad, m, n, cross, i):
        g = generator_for(0, i, 1)
        if cross:
            left, right = projection.cross_head_projector(grad, rank, heads, g, True, 8, 2)
        else:
            left, right = projection.randomized_projector(grad, rank, projection.projection_side((m, n), "std"), g,
                                                          8, 2)
        return projection.project(grad, left, right)

    def full():
        for i, (name, m, n, cross) in enumerate(targets):
            x, dy = data[name]
            refresh(dy.T @ x, m, n, cross, i)

    def sketched():
        for i, (name, m, n, cross) in enumerate(targets):
            x, dy = data[name]
            refresh(projection.FactoredGradient.of(x, dy), m, n, cross, i)

    times = {"from G (formed)": [], "from x and dy": []}
    for _ in range(repeat):
        for label, run in (("from G (formed)", full), ("from x and dy", sketched)):
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    lines = [f"one layer (hidden {h}, intermediate {inter}, {tokens} tokens, rank {rank}), one thread, "
             f"{repeat} interleaved rounds", "", "| refresh | median (s) | min (s) | max (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |" for k, v in times.items()]
    return "\n".join(lines) + "\n", times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=MODES + ADAPTERS)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--embeddings", default="full", choices=("full", "frozen"))
    parser.add_argument("--residual", action="store_true", help="the residual index-set comparison only")
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--layer", action="store_true", help="one layer's refresh work alone")
    parser.add_argument("--against-lora", action="store_true",
                        help="GaLore+'s projected path (embedding frozen, and full) against PEFT LoRA and DoRA, "
                             "each with and without checkpointing")
    parser.add_argument("--adapters", default=",".join(ADAPTERS),
                        help="with --against-lora: which of lora,dora to run (default both)")
    parser.add_argument("--saved-tensors", action="store_true",
                        help="the bytes autograd saves in one forward, GaLore+ (embedding frozen) against LoRA")
    parser.add_argument("--table", type=Path,
                        help="with --against-lora: write the table of this JSON (a stopped run's too) beside it")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    if args.against_lora and args.table:  # the table again from a (possibly stopped) run's JSON
        text = lora_table(json.loads(args.table.read_text()))
        harness.write_text(args.table.with_suffix(".md"), text)
        print(text)
        return
    if args.against_lora and not args.child:
        only = [a for a in args.adapters.split(",") if a]
        if not set(only) <= set(ADAPTERS) or "lora" not in only:
            parser.error(f"--adapters must name lora and optionally dora, got {args.adapters!r}")
        against_lora(args.smoke, 1 if args.smoke else args.repeat, args.out, only)
        return
    if args.layer:
        text, times = layer_time(args.repeat if args.repeat != 2 else 7)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sketched_refresh_layer.md").write_text(text)
        (args.out / "sketched_refresh_layer.json").write_text(json.dumps({"seconds": times,
                                                                          "machine": harness.machine_line()}))
        print(text)
        return
    if args.saved_tensors:
        text = saved_tensors(SMOKE if args.smoke else SHAPE)
        args.out.mkdir(parents=True, exist_ok=True)
        harness.write_text(args.out / ("sketched_refresh_saved" + ("_smoke" if args.smoke else "") + ".md"), text)
        print(text)
        return
    if args.residual:
        text = residual_overlap()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sketched_refresh_residual.md").write_text(text)
        print(text)
        return
    shape = SMOKE if args.smoke else SHAPE
    if args.child:
        print(json.dumps(child(args.child, shape, args.embeddings, args.checkpointing)))
        return
    results = {mode: [] for mode in MODES}
    for _ in range(args.repeat if not args.smoke else 1):
        for mode in MODES:  # interleaved: each repeat runs every mode once
            results[mode].append(run_child(mode, args.smoke, args.embeddings, args.checkpointing))
            print(mode, json.dumps(results[mode][-1])[:300], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("sketched_refresh" + ("_smoke" if args.smoke else "") + ("_frozen" if args.embeddings == "frozen" else "")
            + ("_checkpointing" if args.checkpointing else ""))
    (args.out / f"{stem}.json").write_text(json.dumps({"shape": shape, "steps": STEPS, "gap": GAP,
                                                       "embeddings": args.embeddings,
                                                       "checkpointing": args.checkpointing, "results": results,
                                                       "machine": harness.machine_line()}, indent=1))
    (args.out / f"{stem}.md").write_text(table(results, args.embeddings))
    print(table(results, args.embeddings))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
