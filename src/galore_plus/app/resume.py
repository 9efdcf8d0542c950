"""What a resumed run may change: the saved config, continued with the options given beside
``--resume`` (only a larger ``--max-steps``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import FinetuneConfig, absolute_data, flag
from .errors import ConfigError


def resumed(saved: FinetuneConfig, given: dict[str, Any], directory: str | os.PathLike) -> FinetuneConfig:
    """The config that continues the run saved in ``directory``: its saved options, with those
    ``given`` beside ``--resume``. A resumed run computes what the uninterrupted one would, so a given
    option must equal the saved one; the exception is a larger ``--max-steps``, which extends the run
    (the cosine schedule then spans the new length from the step reached on). ``--output-dir`` may
    only name ``directory``; ``--overwrite`` contradicts a resume."""
    given = dict(given)
    where = f"--resume {directory}"
    if given.pop("overwrite", False):
        raise ConfigError(f"{where} with --overwrite: choose one (continue the run, or start a new one over it "
                          "without --resume)")
    out = given.pop("output_dir", None)
    if out is not None and Path(out).resolve() != Path(directory).resolve():
        raise ConfigError(f"{where} continues the run in that directory; --output-dir {out} names another")
    for name in ("data", "eval_data"):
        if given.get(name) is not None:
            given[name] = absolute_data(given[name])
    steps = given.pop("max_steps", None)
    conflicts = [f"{flag(k)} {v!r} (the run's is {getattr(saved, k)!r})" for k, v in given.items()
                 if v != getattr(saved, k)]
    if conflicts:
        raise ConfigError(f"{where}: a resumed run keeps its options, and {'; '.join(conflicts)} "
                          f"{'differs' if len(conflicts) == 1 else 'differ'}; only --max-steps may be raised "
                          "(start a new run for other options)")
    changes: dict[str, Any] = {"output_dir": str(directory), "overwrite": False}
    if steps is not None and steps != saved.max_steps:
        if saved.max_steps is None:
            raise ConfigError(f"{where} --max-steps {steps}: the run's length is --epochs {saved.epochs}; it can "
                              "be extended by --max-steps only if it was set by it")
        if steps < saved.max_steps:
            raise ConfigError(f"{where} --max-steps {steps}: a resumed run can be extended, not shortened "
                              f"(its --max-steps is {saved.max_steps})")
        changes["max_steps"] = steps
    return dataclasses.replace(saved, **changes)


def changes(config: FinetuneConfig, saved: FinetuneConfig) -> dict[str, Any]:
    """The options where ``config`` differs from ``saved`` (what :func:`resumed` is given when
    ``finetune(config, resume=...)`` is called from Python), ``config`` with its ``--preset``'s values;
    an option of ``config.RESOLVED`` left unset (``lr``, ``outside``: the method's default) is the run's
    recorded value, whatever the default is now."""
    from .config import RESOLVED
    from .presets import with_preset

    defaulted = {name for name in RESOLVED if getattr(config, name) is None}
    config = with_preset(config)
    return {f.name: getattr(config, f.name) for f in fields(config)
            if getattr(config, f.name) != getattr(saved, f.name) and (f.name != "output_dir")
            and f.name not in defaulted}
