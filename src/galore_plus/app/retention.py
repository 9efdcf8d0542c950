"""Which checkpoints a run keeps (``--save-total-limit``; DESIGN.md, "Interrupts and checkpoints"):
``checkpoint/`` is always the newest, the one ``--resume`` continues; with a limit other than 1 the
checkpoint a save replaces is kept as ``checkpoint-STEP/`` (its own manifest with it), and the oldest
of those beyond the limit are deleted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHECKPOINT = "checkpoint"
STATE = "state.json"


#: an earlier checkpoint kept beside ``checkpoint/`` (``--save-total-limit``): ``checkpoint-STEP``
KEPT_PREFIX = CHECKPOINT + "-"


def kept_checkpoints(out: Path) -> list[Path]:
    """The earlier checkpoints kept in ``out`` (``checkpoint-STEP/``), oldest first."""
    found = [(int(p.name[len(KEPT_PREFIX):]), p) for p in Path(out).glob(KEPT_PREFIX + "*")
             if p.is_dir() and p.name[len(KEPT_PREFIX):].isdigit()]
    return [p for _, p in sorted(found)]


def retire(out: Path, old: Path, limit: int) -> None:
    """The checkpoint a save replaced (now ``old``): deleted (``limit`` 1, the default), or kept as
    ``checkpoint-STEP`` with at most ``limit`` checkpoints in all (``checkpoint/`` one of them; 0: no
    limit, Hugging Face's ``save_total_limit`` convention)."""
    if not old.exists():
        return
    if limit == 1:
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        step = int(json.loads((old / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(old, ignore_errors=True)
        return
    kept = out / f"{KEPT_PREFIX}{step}"
    shutil.rmtree(kept, ignore_errors=True)
    os.replace(old, kept)
    if limit > 1:
        for stale in kept_checkpoints(out)[:-(limit - 1)]:
            shutil.rmtree(stale, ignore_errors=True)
