"""The command's errors: each is one line for the user, never a traceback, with its exit code.

``main`` prints ``galore-plus: <message>`` and exits with ``exit_code``: 2 (argparse's convention)
for what the user gave (options, data, an output directory, a checkpoint to resume), 1 for a run
that had to stop. ``finetune()`` called from Python raises them like any exception.
"""

from __future__ import annotations


class CommandError(Exception):
    """A problem the user can fix; the message says what is wrong and what is allowed."""

    exit_code = 2


class ConfigError(CommandError, ValueError):
    """A bad option value or combination, found before anything slow happens."""


class CheckpointError(CommandError):
    """A checkpoint that is missing, corrupt or does not fit the run resuming it."""


class RunError(CommandError, RuntimeError):
    """Training had to stop (a non-finite loss); what was saved before is kept."""

    exit_code = 1
