"""Peak memory of the fine-tuning table's held-out answer-loss pass alone, to tell whether the
evaluation after training, rather than training, could set a run's recorded peak RSS.

``python bench/eval_memory.py --task gsm_symbolic`` loads the base model (the float32 export that
``bench/finetune_table.py`` makes under its runs dir, else ``smollm2``), draws the same 200-question
test sample as the table's seed, and runs ``galore_plus.evaluate.answer_loss`` with the table's
batch (32) and max_length (384) on one torch thread. It prints the process peak RSS after loading
and after the pass, and the answer loss (equal to the table's "before" for that task and seed).
One process per measurement: ``ru_maxrss`` is the process's. ``--model tiny --n-test 8``: smoke.
Generation is not measured: ``generate`` keeps only the last position's logits and a KV cache of
32 sequences × ≤ 640 tokens, far below the answer-loss pass's full-vocabulary logits.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from galore_plus.data import load_task
from galore_plus.evaluate import answer_loss
from galore_plus.models import load_model

EXPORT = Path(__file__).resolve().parents[1] / "runs" / "finetune_table" / "smollm2-f32"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="gsm_symbolic", choices=["gsm_symbolic", "arithmetic"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=str(EXPORT) if EXPORT.exists() else "smollm2")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task(args.task, n_train=2000, n_test=args.n_test, seed=args.seed)
    model, tokenizer = load_model(args.model, seed=args.seed)
    loaded = peak_gib()
    began = time.perf_counter()
    loss = answer_loss(model, tokenizer, task.test, batch_size=args.batch_size, max_length=args.max_length)
    result = {"task": args.task, "seed": args.seed, "model": args.model, "n_test": len(task.test),
              "batch_size": args.batch_size, "answer_loss": round(loss, 4), "peak_gib_after_loading": round(loaded, 2),
              "peak_gib_after_answer_loss": round(peak_gib(), 2),
              "seconds": round(time.perf_counter() - began, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
