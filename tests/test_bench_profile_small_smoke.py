"""``bench/profile_small.py`` runs: each configuration profiled in its own process, the ranges and the ops'
self CPU time per step written to JSON. Nothing about speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_small_smoke(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_small.py", "--length", "8", "--vocab", "256", "--warmup", "1",
                           "--steps", "1", "--configs", "lora,low_rank", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "profile_small_8.json").read_text())
    assert [r["config"] for r in record["results"]] == ["lora", "low_rank"]
    for r in record["results"]:
        assert set(r["ranges"]) == {"forward", "backward", "step", "zero_grad"}
        assert any(name == "aten::mm" for name, _, _ in r["ops"])
    # the low-rank tied embedding takes the projected lookup's backward
    assert any(name == "_ProjectedLookupBackward" for name, _, _ in record["results"][1]["ops"])
    assert "== low_rank 4x8" in done.stdout
