"""Quiet by default: the third-party messages of ``app/quiet.py`` are hidden from a run's stderr, ``-v``
shows them, and nothing else is hidden (other messages of the same loggers, the same warning from
galore-plus, galore-plus's own warnings); ``--version`` is the installed distribution's."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from importlib.metadata import version

import pytest

from galore_plus.app.cli import main, package_version
from galore_plus.app.quiet import LOG_RECORDS, quiet_third_party
from test_cli import TINY, argv

#: the start of each hidden message as it reaches stderr
HIDDEN = ("Failed to load CPU gemm_4bit_forward from kernels-community", "Skipping publisher trust check for",
          "FutureWarning: `is_gradient_checkpointing` is deprecated")


def stderr_of(tmp_path, name: str, *extra: str) -> str:
    options = dict(TINY, method="lora", max_steps=1, n_test=2, eval_before=False, generate=False)
    command = [sys.executable, "-m", "galore_plus.app", "finetune", *argv(**options), "--output-dir",
               str(tmp_path / name), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONWARNINGS"):  # as a user's shell has them
        env.pop(key, None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_run_hides_the_third_party_noise_and_v_shows_it(tmp_path):
    verbose = stderr_of(tmp_path, "verbose", "-v")
    shown = [m for m in HIDDEN if m in verbose]
    if not shown:
        pytest.skip("none of the hidden messages occurs with this environment's library versions")
    quiet = stderr_of(tmp_path, "quiet")
    assert not [m for m in HIDDEN if m in quiet], quiet
    for ours in ("data: arithmetic", "saved the model to"):  # the command's own lines stay
        assert ours in quiet and ours in verbose


def test_the_filters_are_narrow():
    name, start = LOG_RECORDS[0]
    logger = logging.getLogger(name)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        quiet_third_party()
        quiet_third_party()  # idempotent: one filter per message
        assert len(logger.filters) == 1
        logger.warning("%s: %s", start, "offline")
        logger.warning("Failed to load the CUDA library")  # another message of the same logger
        assert seen == ["Failed to load the CUDA library"]
    finally:
        logger.removeHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        deprecated = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
        warnings.warn_explicit(deprecated, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit(deprecated, FutureWarning, "ours.py", 1, module="galore_plus.app.ours")
        warnings.warn_explicit("keeping the previous projector", RuntimeWarning, "refresh.py", 1,
                               module="galore_plus.refresh")
    assert [(w.category, w.filename) for w in caught] == [(FutureWarning, "ours.py"), (RuntimeWarning, "refresh.py")]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"galore-plus {version('galore-plus')}\n" == f"galore-plus {package_version()}\n"
