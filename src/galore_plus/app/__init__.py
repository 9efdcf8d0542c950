"""The application beside the library: the ``galore-plus finetune`` command.

``config`` (the command's typed options), ``cli`` (``main``), ``finetune`` (one run: set up, build,
train, evaluate, write), ``checkpoint`` (a run's resumable checkpoint), ``data`` (tasks, prompts,
batches), ``evaluate`` (held-out metrics) and ``models`` (offline model loading). These import
``transformers``; the library (``galore_plus``) never imports them.
"""
