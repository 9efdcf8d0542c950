"""Fine-tuning data, one import away: re-exports the names of the modules that do the work, so that
``from galore_plus.app.data import ...`` keeps working.

Application layer: nothing here is imported by the optimizers. The jobs, one module each:

- :mod:`galore_plus.app.examples`: :class:`Example`, :class:`Task`, :class:`DataError` and the
  final-number rule (:func:`normalize_number`) every source and consumer shares.
- :mod:`galore_plus.app.builtin_tasks`: the built-in tasks ``"gsm_symbolic"`` and ``"arithmetic"``,
  generated offline by reasoning-gym (and its quirks, handled there).
- :mod:`galore_plus.app.formats`: users' ``.jsonl``, ``.json``, ``.parquet`` and ``.csv`` files in
  the common SFT forms (:data:`FORMS`), checked record by record (``FILE:LINE`` errors).
- :mod:`galore_plus.app.tasks`: what ``--data`` names, checked (:func:`check_source`), loaded and
  split into training, validation and held-out examples (:func:`load_task`, :func:`eval_examples`).
- :mod:`galore_plus.app.sources`: several ``--data`` files, glob patterns and ``save_to_disk``
  directories expanded, and their one sha256.
- :mod:`galore_plus.app.templates`: the prompt in the tokenizer's chat template, a conversation's
  context and response tokens (:func:`prompt_ids`, :func:`context_ids`).
- :mod:`galore_plus.app.encoding`: an example's training tokens with the loss on its responses only
  (:func:`encode`), and batches (:func:`collate`).
- :mod:`galore_plus.app.packing`: ``--packing``, short examples concatenated into sequences
  (:func:`~galore_plus.app.packing.pack`).

Training encodes the context (the prompt in the tokenizer's chat template, when it has one) and the
response with the loss on the response tokens only (every assistant turn of a conversation);
evaluation (``galore_plus.app.evaluate``) generates from :func:`context_ids`, so generation sees
exactly the tokens training conditioned on.
"""

from __future__ import annotations

# the public names beside __all__ (ARITHMETIC_CONFIG, SPLITS, ...) are re-exported too
from .builtin_tasks import ARITHMETIC_CONFIG, SEED_STRIDE, TASKS  # noqa: F401
from .encoding import IGNORE_INDEX, collate, encode
from .examples import MAX_DIGITS, NUMBER_RE, DataError, Example, Task, normalize_number  # noqa: F401
from .formats import FILE_TYPES, FORMS, ROLES, read_examples  # noqa: F401
from .tasks import SPLITS, check_source, eval_count, eval_examples, is_real_fraction, load_task  # noqa: F401
from .templates import PLAIN_CHAT_TEMPLATE, build_prompt, context_ids, prompt_ids  # noqa: F401

__all__ = [
    "DataError",
    "Example",
    "Task",
    "TASKS",
    "FILE_TYPES",
    "FORMS",
    "check_source",
    "load_task",
    "read_examples",
    "eval_count",
    "eval_examples",
    "build_prompt",
    "prompt_ids",
    "context_ids",
    "encode",
    "collate",
    "normalize_number",
    "NUMBER_RE",
    "IGNORE_INDEX",
]

