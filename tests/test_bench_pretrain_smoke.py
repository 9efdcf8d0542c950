"""``bench/pretrain.py --smoke`` runs end to end and writes well-formed results.

The cache directory is an empty temporary one, so the smoke mode takes its synthetic text (it never
fetches the corpus): the test needs neither npm nor the network.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pretrain.py"
METHODS = ["adamw", "galore", "galore+", "apollo"]


def test_pretrain_smoke(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--cache", str(tmp_path / "cache"),
         "--threads", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "pretrain_smoke.json").read_text())
    assert result["mode"] == "smoke"
    assert result["data"]["source"].startswith("synthetic")
    assert result["data"]["train_docs"] > 0 and result["data"]["val_docs"] > 0
    steps = result["config"]["steps"]
    tokens = steps * result["config"]["batch"] * result["config"]["seq"]
    assert [m["label"] for m in result["methods"]] == METHODS
    for m in result["methods"]:
        assert m["steps"] == steps and m["tokens"] == tokens
        assert len(m["train_curve"]) == steps
        assert [p["step"] for p in m["val_curve"]][0] == 0 and m["val_curve"][-1]["step"] == steps
        for key in ("final_train_loss", "final_val_loss", "val_perplexity", "tokens_per_s", "wall_s"):
            assert math.isfinite(m[key]) and m[key] > 0, (m["label"], key, m[key])
        assert math.isclose(m["val_perplexity"], math.exp(m["final_val_loss"]), rel_tol=1e-9)
        # a few steps from a random init must not diverge: at most a little above log(vocab)
        assert m["final_val_loss"] < math.log(result["data"]["vocab"]) + 1.0
    # same data, init and seed: every method starts from the same validation loss
    starts = {m["val_curve"][0]["val_loss"] for m in result["methods"]}
    assert len(starts) == 1

    md = (out / "pretrain_smoke.md").read_text()
    assert "| method | peak lr | steps | tokens |" in md
    for label in METHODS:
        assert f"| {label} |" in md
    png = (out / "pretrain_smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
