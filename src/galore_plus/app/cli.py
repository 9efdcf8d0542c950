"""``galore-plus``: the command line. ``main(argv)`` parses, runs the subcommand, and turns the
command's errors into one line on stderr (``galore-plus: <what is wrong>``) and an exit code: 2 for
what the user gave, 1 for a run that had to stop. Anything else is a bug and keeps its traceback.

``galore-plus finetune [options]`` runs :func:`galore_plus.app.finetune.finetune`; its options are
generated from :class:`galore_plus.app.config.FinetuneConfig`. ``--resume DIR`` continues the run in
``DIR`` with its saved options (those given beside it must agree, except a larger ``--max-steps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ArgumentParser, FinetuneConfig, add_arguments, from_arguments, resumed, validated
from .data import DataError
from .errors import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="galore-plus", description="GaLore / GaLore+ fine-tuning, offline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    finetune = commands.add_parser(
        "finetune", help="fine-tune a model and evaluate it before and after (defaults: SmolLM2, arithmetic, "
                         "GaLore+)",
        description="Fine-tune a causal LM with GaLore+ (or a baseline) and evaluate it on held-out examples; "
                    "writes metrics.json, log.jsonl, loss.png and a resumable checkpoint to --output-dir.")
    add_arguments(finetune)
    finetune.add_argument("--resume", metavar="DIR", default=None,
                          help="continue the run in DIR from its last checkpoint (from the start if it stopped "
                               "before one); options given with it must equal the run's, except a larger "
                               "--max-steps, which extends it")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[FinetuneConfig, str | None]:
    """``galore-plus finetune`` arguments → ``(config, resume directory or None)``, checked."""
    given: dict[str, Any] = vars(build_parser().parse_args(argv))
    given.pop("command")
    resume = given.pop("resume")
    if resume is None:
        return validated(from_arguments(given)), None
    return validated(resumed(checkpoint.saved_config(Path(resume)), given, resume)), resume


def main(argv: list[str] | None = None) -> int:
    from .finetune import finetune

    try:
        config, resume = parse_config(argv)
        finetune(config, resume)
    except (CommandError, DataError) as err:
        # a data file's problems are one FILE:LINE line each
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"galore-plus: {line}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
