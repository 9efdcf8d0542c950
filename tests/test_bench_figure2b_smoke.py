"""CI smoke test of bench/figure2b.py: a random tiny LLaMA end to end (the real run needs SmolLM2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_figure2b_smoke_writes_its_tables_and_plot(tmp_path):
    proc = subprocess.run([sys.executable, "bench/figure2b.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "figure2b.json").read_text())
    for name in ("q_proj", "k_proj"):
        for rank, row in data["errors"][name].items():
            per, cross = row["per_matrix"], row["cross_head"]
            assert len(per) == len(cross) == 2  # one value per layer
            # the optimal rank-r error is a lower bound of any rank-r right projection's
            assert all(0 < p <= c + 1e-6 < 1 + 1e-6 for p, c in zip(per, cross)), (name, rank, per, cross)
    md = (tmp_path / "figure2b.md").read_text()
    assert md.count("| q_proj (4) |") == 2 and md.count("| k_proj (2) |") == 2
    rows = json.loads((tmp_path / "randomized_defaults.json").read_text())["rows"]
    assert rows and all(0 < r["energy_ratio"][0] <= 1 + 1e-6 for r in rows)
    assert (tmp_path / "figure2b.png").stat().st_size > 0
