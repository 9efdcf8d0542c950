"""``examples/train_tiny.py``, the README's smoke test of the library alone: it runs with torch and
galore-plus only (transformers made unimportable here) and its loss falls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def test_train_tiny_needs_only_torch_and_its_loss_falls(tmp_path):
    blocker = tmp_path / "transformers"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('transformers is not installed')\n")
    path = os.pathsep.join([str(tmp_path), str(EXAMPLE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "150"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loss fell from 5.5" in done.stdout
