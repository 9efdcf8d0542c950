"""Train a tiny randomly initialised LLaMA on English text with GaLoreAdamW and print its loss falling.

The text is the docstrings of a few Python standard-library modules (offline, byte-level tokens).
Every linear weight inside the decoder layers is trained through a rank-8 projection; embeddings,
norms and the output head are plain AdamW in the same optimizer.

    python examples/train_tiny.py [--steps 200] [--rank 8]
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from galore_plus import GaLoreAdamW


def corpus_bytes() -> torch.Tensor:
    import argparse as a, collections, json, logging, pathlib, textwrap, unittest

    text = "\n\n".join(inspect.getdoc(m) or "" for m in (a, collections, json, logging, pathlib, textwrap, unittest))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    data = corpus_bytes()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; text: {len(data)} bytes")

    low_rank = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    others = [p for n, p in model.named_parameters() if not (".layers." in n and p.dim() == 2)]
    optimizer = GaLoreAdamW(
        [{"params": low_rank, "rank": args.rank, "update_proj_gap": 50, "scale": 1.0}, {"params": others}],
        lr=3e-3, weight_decay=0.0, seed=args.seed,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))

    gen = torch.Generator().manual_seed(args.seed)
    batch, length = 16, 64
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
        tokens = torch.stack([data[s: s + length] for s in starts.tolist()])
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 20 == 0:
            print(f"step {step:4d}  loss {sum(losses[-20:]) / len(losses[-20:]):.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    first, last = losses[0], sum(losses[-20:]) / len(losses[-20:])
    print(f"loss fell from {first:.3f} to {last:.3f} (uniform over bytes: {torch.log(torch.tensor(256.)):.3f})")
    if not last < first:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
