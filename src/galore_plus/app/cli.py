"""``galore-plus finetune``: fine-tune a causal LM with GaLore+ (or a baseline) and evaluate it.

The harness layer: reads options, loads a model and a task offline, trains with a cosine schedule,
evaluates before and after on the held-out split, and writes ``metrics.json``, ``log.jsonl``,
``loss.png`` and a resumable checkpoint to ``--output-dir``. ``--resume DIR`` continues a run from
its checkpoint and gives the same result as the uninterrupted run (data order, optimizer randomness
and schedule are pure functions of the seed and the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

METHODS = ("galore+", "galore", "adamw", "adamw8bit", "lora", "dora")
DISTRIBUTED = ("none", "ddp", "fsdp")
CHECKPOINT = "checkpoint"


@dataclass
class FinetuneConfig:
    """Every option of ``galore-plus finetune``, with its default (defined here only)."""

    model: str = "smollm2"
    data: str = "arithmetic"
    split: str = "question"
    method: str = "galore+"
    rank: int = 32
    scale: float = 4.0
    update_proj_gap: int = 50
    residual_ratio: float | None = None  # None: the method's default (galore+: 1.2% on q/k)
    residual_mode: str = "exact"
    residual_warmup: int = 20
    layerwise: bool = False
    eightbit: bool = False
    lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = 150
    epochs: float | None = None
    n_train: int = 2000
    n_test: int = 200
    max_length: int = 384
    max_new_tokens: int | None = None  # None: 16 for arithmetic, 256 otherwise
    eval_batch_size: int = 32
    eval_before: bool = True
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/finetune"
    save_every: int = 0  # also checkpoint every N steps (0: only at the end)
    distributed: str = "none"  # none, ddp, fsdp (launch with torchrun; --batch-size is the global batch)


def _parser() -> argparse.ArgumentParser:
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(prog="galore-plus", description="GaLore / GaLore+ fine-tuning, offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune and evaluate a model (defaults: SmolLM2, arithmetic, GaLore+)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults.model, help="smollm2, tiny, a local model directory or .gguf file")
    p.add_argument("--data", default=defaults.data, help="arithmetic, gsm_symbolic, or a local .jsonl file")
    p.add_argument("--split", default=defaults.split, choices=("question", "template"),
                   help="gsm_symbolic: disjoint questions, or no template in both train and test")
    p.add_argument("--method", default=defaults.method, choices=METHODS)
    p.add_argument("--rank", type=int, default=defaults.rank, help="projection rank (LoRA/DoRA: adapter rank)")
    p.add_argument("--scale", type=float, default=defaults.scale, help="GaLore α")
    p.add_argument("--update-proj-gap", type=int, default=defaults.update_proj_gap)
    p.add_argument("--residual-ratio", type=float, default=defaults.residual_ratio,
                   help="GaLore+ residual ρ on q/k (default 0.012; 0 turns it off)")
    p.add_argument("--residual-mode", default=defaults.residual_mode, choices=("exact", "paper"))
    p.add_argument("--residual-warmup", type=int, default=defaults.residual_warmup)
    p.add_argument("--layerwise", action="store_true", help="update each parameter inside backward()")
    p.add_argument("--8bit", dest="eightbit", action="store_true", help="8-bit optimizer states")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default {defaults.max_steps})")
    length.add_argument("--epochs", type=float, default=None)
    p.add_argument("--n-train", type=int, default=defaults.n_train)
    p.add_argument("--n-test", type=int, default=defaults.n_test)
    p.add_argument("--max-length", type=int, default=defaults.max_length)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    p.add_argument("--no-eval-before", dest="eval_before", action="store_false")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, ...")
    p.add_argument("--output-dir", default=defaults.output_dir)
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--distributed", default=defaults.distributed, choices=DISTRIBUTED,
                   help="under torchrun: ddp or fsdp (FSDP2); --batch-size is the global batch, split across ranks")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run saved in DIR (its saved options are used)")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[FinetuneConfig, str | None]:
    args = vars(_parser().parse_args(argv))
    args.pop("command")
    resume = args.pop("resume")
    if args["max_steps"] is None and args["epochs"] is None:
        args["max_steps"] = FinetuneConfig.max_steps
    config = FinetuneConfig(**args)
    _validate(config)
    return config, resume


def _validate(c: FinetuneConfig) -> None:
    for name in ("rank", "batch_size", "grad_accum", "n_train", "n_test", "max_length", "eval_batch_size"):
        if getattr(c, name) < 1:
            raise SystemExit(f"galore-plus: --{name.replace('_', '-')} must be ≥ 1, got {getattr(c, name)}")
    if c.max_steps is not None and c.max_steps < 1:
        raise SystemExit(f"galore-plus: --max-steps must be ≥ 1, got {c.max_steps}")
    if c.epochs is not None and not c.epochs > 0:
        raise SystemExit(f"galore-plus: --epochs must be > 0, got {c.epochs}")
    low_rank_only = {"layerwise": c.layerwise, "residual_ratio": c.residual_ratio}
    if c.method not in ("galore", "galore+"):
        used = [k for k, v in low_rank_only.items() if v]
        if used:
            raise SystemExit(f"galore-plus: --{used[0].replace('_', '-')} needs --method galore or galore+, "
                             f"not {c.method}")
    if c.eightbit and c.method not in ("galore", "galore+"):
        raise SystemExit(f"galore-plus: --8bit applies to galore/galore+; use --method adamw8bit for 8-bit AdamW")
    if c.distributed not in DISTRIBUTED:
        raise SystemExit(f"galore-plus: --distributed must be one of {DISTRIBUTED}, got {c.distributed!r}")
    if c.distributed != "none" and c.layerwise:
        from ..distributed import layerwise_unsupported_reason

        raise SystemExit(f"galore-plus: --layerwise with --distributed {c.distributed}: {layerwise_unsupported_reason()}")
    if c.distributed == "fsdp" and c.method == "adamw8bit":
        raise SystemExit("galore-plus: --distributed fsdp runs galore and galore+ (with or without --8bit) and adamw; "
                         "--method adamw8bit is bitsandbytes' own AdamW8bit, whose kernels take plain tensors, not "
                         "FSDP2's DTensor parameters (use --method galore --8bit, or --distributed ddp)")
    if c.distributed == "fsdp" and c.method not in ("galore", "galore+", "adamw"):
        raise SystemExit("galore-plus: --distributed fsdp runs galore, galore+ (with or without --8bit) and adamw; "
                         f"{c.method} keeps state that is not sharded with its parameter")


# ---------------------------------------------------------------------------------------------- data


def batch_indices(micro_index: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of one micro-batch: epoch ``e`` visits a permutation seeded by ``seed + e``, so
    the order is a pure function of (seed, micro-batch index) and a resumed run sees the same data."""
    out = []
    for position in range(micro_index * batch_size, (micro_index + 1) * batch_size):
        epoch, offset = divmod(position, n)
        generator = torch.Generator().manual_seed(seed + epoch)
        out.append(int(torch.randperm(n, generator=generator)[offset]))
    return out


# ---------------------------------------------------------------------------------------------- optimizers


def build_method(config: FinetuneConfig, model: torch.nn.Module):
    """``(model, optimizer)`` for ``config.method`` (LoRA/DoRA wrap the model with PEFT)."""
    if config.method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
                                 target_modules="all-linear", use_dora=config.method == "dora")
        model = get_peft_model(model, peft_config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.method == "adamw8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    from ..integration import build_optimizer

    options: dict[str, Any] = {"update_proj_gap": config.update_proj_gap, "scale": config.scale}
    if config.method == "galore+":
        options.update(residual_warmup=config.residual_warmup, residual_mode=config.residual_mode)
        if config.residual_ratio is not None:
            options["residual_ratio"] = config.residual_ratio
    elif config.residual_ratio:
        options.update(residual_ratio=config.residual_ratio, residual_warmup=config.residual_warmup,
                       residual_mode=config.residual_mode)
    if config.layerwise:
        options["accumulation_steps"] = config.grad_accum
    optimizer = build_optimizer(model, config.method, config.rank, lr=config.lr, weight_decay=config.weight_decay,
                                eightbit=config.eightbit, layerwise=config.layerwise, seed=config.seed, **options)
    return model, optimizer


def refresh_seconds(optimizer: torch.optim.Optimizer) -> float:
    inner = getattr(optimizer, "optimizer", optimizer)
    return float(getattr(inner, "refresh_seconds", 0.0))


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, model, optimizer, scheduler, step: int, config: FinetuneConfig,
                    history: dict[str, Any]) -> None:
    """Write ``out/checkpoint`` atomically: a crash while saving leaves the previous one intact.

    Distributed runs call it on every rank: model and optimizer go to ``distributed/`` through
    ``torch.distributed.checkpoint`` (each rank writes its shards), rank 0 writes the rest."""
    from safetensors.torch import save_model

    distributed = None
    if config.distributed != "none":
        from .. import distributed
    rank0 = distributed is None or distributed.process_rank() == 0
    tmp = out / (CHECKPOINT + ".tmp")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed is not None:
        distributed.barrier()
        distributed.save_checkpoint(str(tmp / "distributed"), model, optimizer)
        distributed.barrier()
        if not rank0:
            distributed.barrier()  # rank 0 moves the directory into place
            return
    else:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "config": dataclasses.asdict(config), "history": history}, indent=1))
    final = out / CHECKPOINT
    old = out / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    if distributed is not None:
        distributed.barrier()


def recover_checkpoint(directory: Path) -> None:
    """Finish a ``save_checkpoint`` that a crash cut short between its two renames.

    ``save_checkpoint`` moves the previous checkpoint to ``checkpoint.old`` and then the new one from
    ``checkpoint.tmp`` into place; a crash between the two leaves no ``checkpoint``. The new one is
    complete once its ``state.json`` (written last) is there, so it is promoted; otherwise the old one
    is put back. Every rank of a distributed run may call this: a rename another rank already made is
    not an error."""
    final = directory / CHECKPOINT
    tmp, old = directory / (CHECKPOINT + ".tmp"), directory / (CHECKPOINT + ".old")
    for candidate in ([tmp] if (tmp / "state.json").exists() else []) + [old]:
        if final.exists():
            return
        if candidate.exists():
            try:
                os.replace(candidate, final)
            except OSError:  # another rank promoted one first
                continue
            print(f"galore-plus: {final} was missing after an interrupted save; restored it from {candidate.name}",
                  file=sys.stderr)


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    from safetensors.torch import load_model

    recover_checkpoint(directory)
    ckpt = directory / CHECKPOINT
    if (ckpt / "distributed").exists():
        from .. import distributed

        distributed.load_checkpoint(str(ckpt / "distributed"), model, optimizer)
    else:
        load_model(model, str(ckpt / "model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text())
    return state["step"], state["history"]


def saved_config(directory: Path) -> FinetuneConfig:
    recover_checkpoint(directory)
    path = directory / CHECKPOINT / "state.json"
    if not path.exists():
        raise SystemExit(f"galore-plus: --resume {directory}: no checkpoint there ({path} is missing)")
    return FinetuneConfig(**json.loads(path.read_text())["config"])


# ---------------------------------------------------------------------------------------------- the run


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def plot_losses(log: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune(config: FinetuneConfig, resume: str | None = None) -> dict[str, Any]:
    """Run (or continue) a fine-tune; returns the metrics written to ``metrics.json``."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .data import collate, encode, load_task
    from .evaluate import evaluate
    from .models import load_model

    out = Path(resume) if resume else Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    rank, world = 0, 1
    if config.distributed != "none":  # under torchrun: rank 0 alone writes logs, metrics and the plot
        from .. import distributed

        rank, world, local_rank = distributed.init_from_env(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if config.batch_size % world:
            raise SystemExit(f"galore-plus: --batch-size {config.batch_size} (the global batch) must be a multiple "
                             f"of the {world} ranks")
    # the data first: a malformed file stops the run before anything slow happens
    task = load_task(config.data, n_train=config.n_train, n_test=config.n_test, seed=config.seed, split=config.split)
    model, tokenizer = load_model(config.model, seed=config.seed)
    max_new_tokens = config.max_new_tokens or (16 if config.data == "arithmetic" else 256)
    features = [encode(tokenizer, ex, config.max_length) for ex in task.train]
    steps_per_epoch = math.ceil(len(features) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)

    model.to(device)
    train_model = model
    if config.distributed == "fsdp":  # shard first: the optimizer must see the DTensor parameters
        train_model = distributed.wrap_model(model, "fsdp", device)
    model, optimizer = build_method(config, model)
    if config.distributed != "none":
        if config.distributed == "ddp":
            train_model = distributed.wrap_model(model, "ddp", device)
        if config.method in ("galore", "galore+"):
            optimizer = distributed.distribute(optimizer)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)
    if config.method in ("galore", "galore+") and rank == 0:
        from ..integration import optimizer_summary

        print(optimizer_summary(optimizer), file=sys.stderr)

    def run_eval(label: str) -> dict[str, Any]:
        print(f"evaluating {label} on {len(task.test)} held-out examples...", file=sys.stderr)
        return evaluate(model, tokenizer, task.test, task.kind, max_new_tokens=max_new_tokens,
                        batch_size=config.eval_batch_size, max_length=config.max_length)

    start_step, history = 0, {"train_seconds": 0.0, "tokens": 0, "refresh_seconds": 0.0}
    if resume:
        start_step, history = load_checkpoint(out, model, optimizer, scheduler)
        print(f"resumed {out} at step {start_step}/{total_steps}", file=sys.stderr)
    elif config.eval_before:
        history["eval_before"] = run_eval("before training")
    log_path = out / "log.jsonl"
    if not resume and rank == 0:
        log_path.write_text("")

    model.train()
    refresh_base = refresh_seconds(optimizer) - history["refresh_seconds"]
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="fine-tuning",
               dynamic_ncols=True, disable=rank != 0)
    for step in bar:
        began = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        micro_batches = [batch_indices(step * config.grad_accum + j, config.batch_size, len(features), config.seed)
                         for j in range(config.grad_accum)]
        answer_tokens = sum(sum(1 for t in features[i]["labels"] if t != -100) for ids in micro_batches for i in ids)
        for ids in micro_batches:
            ids = ids[rank::world]  # this rank's share of the global batch
            batch = {k: v.to(device) for k, v in collate([features[i] for i in ids], tokenizer.pad_token_id).items()}
            logits = train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # token-level mean over the whole step's answer tokens, so accumulation equals a bigger batch
            # (times the world size: DDP and FSDP2 average the ranks' gradients, we want their sum)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                reduction="sum") * world / answer_tokens
            loss.backward()
            loss_sum += loss.item() / world
            tokens += int(batch["attention_mask"].sum())
        if world > 1:
            loss_sum, tokens = distributed.sum_across_ranks(loss_sum, tokens)
            tokens = int(tokens)
        optimizer.step()  # layer-wise: closes the step, the parameters were updated inside backward()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seconds = time.perf_counter() - began
        history["train_seconds"] += seconds
        history["tokens"] += tokens
        history["refresh_seconds"] = refresh_seconds(optimizer) - refresh_base
        record = {"step": step + 1, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                  "seconds": round(seconds, 4), "refresh_seconds": round(history["refresh_seconds"], 4)}
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / seconds:.0f}",
                        refresh_s=f"{history['refresh_seconds']:.1f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, model, optimizer, scheduler, step + 1, config, history)
    bar.close()
    save_checkpoint(out, model, optimizer, scheduler, total_steps, config, history)

    train_peak = peak_memory_bytes(device)  # the evaluation's batches (logits of 32 long answers) can exceed it
    eval_after = run_eval("after training")  # on every rank: an FSDP2 forward is collective
    metrics = {
        "method": config.method, "rank": config.rank, "model": config.model, "data": task.name,
        "steps": total_steps, "train_seconds": round(history["train_seconds"], 2),
        "tokens_per_second": round(history["tokens"] / max(history["train_seconds"], 1e-9), 1),
        "peak_memory_bytes": train_peak, "peak_memory_bytes_with_eval": peak_memory_bytes(device),
        "refresh_seconds": round(history["refresh_seconds"], 3),
        "eval_before": history.get("eval_before"), "eval_after": eval_after,
        "config": dataclasses.asdict(config),
    }
    if rank == 0:
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        plot_losses(log, out / "loss.png", f"{config.method} rank {config.rank} on {task.name}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(json.dumps({k: metrics[k] for k in ("method", "steps", "train_seconds", "eval_before", "eval_after")},
                         indent=1))
    if config.distributed != "none":
        distributed.shutdown()
    return metrics


def main(argv: list[str] | None = None) -> None:
    from .data import DataError

    config, resume = parse_config(argv)
    if resume:
        config = saved_config(Path(resume))
    try:
        finetune(config, resume)
    except (DataError, FileNotFoundError) as err:  # bad input: the message says what and where
        raise SystemExit(f"galore-plus: {err}") from None


if __name__ == "__main__":
    main()
