"""CI smoke test of bench/memory_trace.py (tiny LLaMA): the trace runs and its marks are in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_trace_smoke(tmp_path):
    out = tmp_path / "trace.json"
    proc = subprocess.run([sys.executable, "bench/memory_trace.py", "--shape", "smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    labels = [m["at"] for m in result["marks"]]
    assert labels[:2] == ["before forward", "after forward"] and labels[-1] == "after backward"
    # backward runs from the output: lm_head steps first, the embedding last
    hooks = [label for label in labels if label.startswith("after the update of")]
    assert hooks[0].endswith("lm_head.weight") and hooks[-1].endswith("embed_tokens.weight") and len(hooks) == 4
    assert 0 < result["state_bytes"] and result["sampled_peak_gib"] <= result["ru_maxrss_gib"] + 1e-3
