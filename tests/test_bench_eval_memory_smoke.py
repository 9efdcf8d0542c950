"""CI smoke of bench/eval_memory.py: the tiny model, 8 questions, in a subprocess (ru_maxrss is
the process's); the answer loss it prints is the one ``answer_loss`` gives in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_eval_memory_smoke():
    from galore_plus.data import load_task
    from galore_plus.evaluate import answer_loss
    from galore_plus.models import load_model

    out = subprocess.run([sys.executable, "bench/eval_memory.py", "--model", "tiny", "--task", "arithmetic",
                          "--n-test", "8", "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n_test"] == 8 and 0 < result["peak_gib_after_loading"] <= result["peak_gib_after_answer_loss"]
    task = load_task("arithmetic", n_train=2000, n_test=8, seed=0)
    model, tokenizer = load_model("tiny", seed=0)
    assert result["answer_loss"] == round(answer_loss(model, tokenizer, task.test, batch_size=4, max_length=384), 4)
