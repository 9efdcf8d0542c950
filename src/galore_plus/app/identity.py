"""A run's identity: what it computes, as readable fields and their sha256 (DESIGN.md, "Run identity").

``run.json`` and every checkpoint's ``state.json`` carry it. A ``--resume`` compares the identity of
the checkpoint with that of the directory's ``run.json``: a ``checkpoint/`` copied in from another run
(another method, seed, model or data file) is refused naming what differs, so the directory's
``run.json`` and ``log.jsonl`` are never rewritten or continued with another run's config.

The identity is computed from the readable fields each time it is compared (a saved config read by
``config.from_dict``, which gives an option the record predates the value of the runs before it), so
records written by earlier versions compare like new ones; the stored hash is for people and tools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .config import from_dict
from .errors import CheckpointError, ConfigError

#: options left out of the identity: where and how a run writes, saves or reports (a subset of the
#: benchmark's ``NOT_SETTINGS``, tested), and ``max_steps``, which a resume may raise (the run extended)
NOT_IDENTITY = ("output_dir", "device", "save_every", "save_checkpoint", "save_total_limit", "overwrite", "export",
                "max_steps")


def identity(config: dict[str, Any], data_sha256: str | None, eval_data_sha256: str | None) -> dict[str, Any]:
    """``{"sha256": ..., "fields": {...}}``: the options that say what a run computes and the sha256 of
    its data files. ``config``: a saved config (``dataclasses.asdict`` of a ``FinetuneConfig``)."""
    try:
        complete = dataclasses.asdict(from_dict(config, "the run's config"))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    fields = {k: v for k, v in sorted(complete.items()) if k not in NOT_IDENTITY}
    fields["data_sha256"], fields["eval_data_sha256"] = data_sha256, eval_data_sha256
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "fields": fields}


def of_record(record: dict[str, Any]) -> dict[str, Any]:
    """The identity of a ``run.json`` or ``state.json`` record (its config and data files' sha256)."""
    return identity(record["config"], record.get("data_sha256"), record.get("eval_data_sha256"))


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``name value (the other's value)`` for each field where two identities differ."""
    a, b = ours["fields"], theirs["fields"]
    return [f"{name} {_short(a.get(name))} (run.json: {_short(b.get(name))})" for name in sorted(set(a) | set(b))
            if a.get(name) != b.get(name)]


def _short(value: Any) -> str:
    text = repr(value)
    return text[:19] + "…" if isinstance(value, str) and len(text) > 20 else text


def check_same_run(state: dict[str, Any], run: dict[str, Any], directory: Path) -> None:
    """The checkpoint was written by the run of ``directory/run.json`` (their identities agree): a
    ``checkpoint/`` copied in from another run would otherwise rewrite ``run.json`` and continue
    ``log.jsonl`` with that run's steps."""
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise CheckpointError(f"{Path(directory) / 'run.json'} has no 'config' object: it was not written by "
                              "galore-plus")
    # a record from before the data files' sha256 were recorded (an old checkpoint, an old run.json) agrees
    # with any: what the data are now is checked against the checkpoint's by ``check_resumable``
    for key in ("data_sha256", "eval_data_sha256"):
        if key not in state or key not in run:
            state, run = {**state, key: None}, {**run, key: None}
    ours, theirs = of_record(state), of_record(run)
    if ours["sha256"] != theirs["sha256"]:
        raise CheckpointError(f"--resume {directory}: checkpoint/ belongs to another run than run.json (identity "
                              f"{ours['sha256'][:12]}, run.json's {theirs['sha256'][:12]}): "
                              f"{'; '.join(differences(ours, theirs))}; nothing was changed (resume the run from "
                              "its own directory, or start a new one)")
