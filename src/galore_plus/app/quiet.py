"""Third-party messages that do not concern a user of the command, hidden unless ``-v`` (DESIGN.md,
"Quiet by default").

Each is named narrowly — the logger or the warning's category and module, and the start of its text —
so that anything else, and every message of galore-plus, still shows. :func:`quiet_third_party`
installs the filters for the process (the command calls it before importing those libraries); the
library itself never changes warning or logging state.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["LOG_RECORDS", "WARNINGS", "quiet_third_party"]

#: ``(logger, start of the message)``: records logged at import by bitsandbytes (its optional CPU
#: kernel, which is fetched from a hub the command never contacts) and by the ``kernels`` package it asks
LOG_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
)

#: ``(category, message regex, module regex)`` for ``warnings.filterwarnings``: deprecations inside a
#: library that another library calls (PEFT asks transformers' model ``is_gradient_checkpointing``)
WARNINGS = (
    (FutureWarning, re.escape("`is_gradient_checkpointing` is deprecated"), r"transformers\."),
)


class _Drop(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_third_party() -> None:
    """Hide the messages of :data:`LOG_RECORDS` and :data:`WARNINGS` in this process (idempotent)."""
    for name, start in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in logger.filters):
            logger.addFilter(_Drop(start))
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
