"""Train a tiny byte-level language model on English text with GaLoreAdamW and print its loss falling.

A smoke test of the library alone: it needs torch and galore-plus only (``pip install -e .``), runs
offline, and takes a few seconds on one CPU core. The text is the docstrings of a few Python
standard-library modules; the model predicts each byte from the 8 before it (embeddings, then a
two-layer MLP). Its two 256-wide linear weights train through a rank-8 projection; the embedding,
biases and output layer are plain AdamW in the same optimizer.

    python examples/train_tiny.py [--steps 300] [--rank 8]
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from torch import nn

from galore_plus import GaLoreAdamW

CONTEXT = 8


def corpus_bytes() -> torch.Tensor:
    import argparse as a, collections, json, logging, pathlib, textwrap, unittest

    text = "\n\n".join(inspect.getdoc(m) or "" for m in (a, collections, json, logging, pathlib, textwrap, unittest))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class ByteMLP(nn.Module):
    """Next-byte logits from the previous :data:`CONTEXT` bytes."""

    def __init__(self, width: int = 256, embed: int = 32):
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.hidden = nn.Sequential(nn.Linear(CONTEXT * embed, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.out = nn.Linear(width, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.embed(context).flatten(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = ByteMLP()
    data = corpus_bytes()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; text: {len(data)} bytes")

    # the hidden layers' weights (256×256 each) low-rank; the rest plain AdamW
    low_rank = [p for n, p in model.named_parameters() if n.startswith("hidden.") and p.dim() == 2]
    others = [p for n, p in model.named_parameters() if not (n.startswith("hidden.") and p.dim() == 2)]
    optimizer = GaLoreAdamW(
        [{"params": low_rank, "rank": args.rank, "update_proj_gap": 50, "scale": 1.0}, {"params": others}],
        lr=3e-3, weight_decay=0.0, seed=args.seed,
    )
    gen = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        ends = torch.randint(CONTEXT, len(data), (128,), generator=gen)
        context = torch.stack([data[e - CONTEXT:e] for e in ends.tolist()])
        loss = nn.functional.cross_entropy(model(context), data[ends])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 50 == 0:
            print(f"step {step:4d}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    first, last = losses[0], sum(losses[-20:]) / len(losses[-20:])
    print(f"loss fell from {first:.3f} to {last:.3f} (uniform over bytes: {torch.log(torch.tensor(256.)):.3f})")
    if not last < first - 1.0:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
