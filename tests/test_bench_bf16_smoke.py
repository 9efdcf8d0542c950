"""``bench/bf16_rounding.py --smoke`` runs every configuration and records what rounding did.

The cache directory is an empty temporary one, so the smoke takes synthetic text (it never fetches).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bf16_rounding.py"
CONFIGS = [(o, p) for o in ("adamw", "galore+") for p in ("fp32", "bf16-rn", "bf16-sr")]


def test_bf16_rounding_smoke(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    result = json.loads((out / "bf16_rounding_smoke.json").read_text())
    assert result["data"]["source"].startswith("synthetic")
    runs = {(r["optimizer"], r["precision"]): r for r in result["runs"]}
    assert sorted(runs) == sorted(CONFIGS) and len(result["runs"]) == len(CONFIGS)
    steps = result["config"]["steps"]
    for (o, p), r in runs.items():
        assert r["dtype"] == ("float32" if p == "fp32" else "bfloat16")
        assert r["settings"]["stochastic_rounding"] == (p != "bf16-rn")
        assert r["steps"] == steps and r["val_curve"][-1]["step"] == steps
        assert all(math.isfinite(e["val_loss"]) for e in r["val_curve"]), (o, p)
        assert r["final_val_loss"] < r["val_curve"][0]["val_loss"], (o, p)  # it trained
    for o in ("adamw", "galore+"):
        # same initialisation: the two bf16 runs start from the same weights, fp32 from nearly the same
        starts = [runs[o, p]["val_curve"][0]["val_loss"] for p in ("fp32", "bf16-rn", "bf16-sr")]
        assert starts[1] == starts[2] and abs(starts[0] - starts[1]) < 0.05
        # fp32 writes every update; the two roundings are different runs
        assert runs[o, "fp32"]["changed_over_run"]["matrices"] == 1.0
        assert runs[o, "bf16-rn"]["final_val_loss"] != runs[o, "bf16-sr"]["final_val_loss"]
    # AdamW at lr ≤ 1e-3 cannot move a norm weight of 1.0 by half a unit in the last place (2⁻⁸)
    # with round-to-nearest; stochastic rounding moves some of them
    assert runs["adamw", "bf16-rn"]["changed_over_run"]["norms"] == 0.0
    assert runs["adamw", "bf16-sr"]["changed_over_run"]["norms"] > 0.0

    rows = {(s["optimizer"], s["precision"]): s for s in result["summary"]}
    assert sorted(rows) == sorted(CONFIGS)
    for (o, p), s in rows.items():
        assert s["gap_to_fp32"] == [runs[o, p]["final_val_loss"] - runs[o, "fp32"]["final_val_loss"]]
    md = (out / "bf16_rounding_smoke.md").read_text()
    for o, p in CONFIGS:
        assert f"| {o} | {p} |" in md
    png = (out / "bf16_rounding_smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
