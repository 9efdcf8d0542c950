"""``galore-plus``: the command line. ``main(argv)`` parses, runs the subcommand, and turns the
command's errors into one line on stderr (``galore-plus: <what is wrong>``) and an exit code: 2 for
what the user gave, 1 for a run that had to stop. Anything else is a bug and keeps its traceback.

``galore-plus finetune [options]`` runs :func:`galore_plus.app.finetune.finetune`; its options are
generated from :class:`galore_plus.app.config.FinetuneConfig`. ``--resume DIR`` continues the run in
``DIR`` with its saved options (those given beside it must agree, except a larger ``--max-steps``).

``--config FILE`` reads options from a YAML/JSON file or a run (:mod:`galore_plus.app.configfile`);
the flags given beside it override it. ``-v`` shows the third-party warnings hidden as noise
(:mod:`galore_plus.app.quiet`); ``--version`` prints the installed version.

``galore-plus evaluate --model DIR --data FILE`` runs :func:`galore_plus.app.evaluate.evaluate_model`,
the evaluation ``finetune`` runs after training, on any model (options from
:class:`galore_plus.app.evaluate_config.EvaluateConfig`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import checkpoint, models
from .arguments import ArgumentParser, add_arguments, from_arguments
from .config import FinetuneConfig
from .evaluate_config import EvaluateConfig, validated_evaluate
from .resume import resumed
from .examples import DataError
from .errors import CommandError
from .configfile import with_file
from .quiet import quiet_third_party
from .validation import validated


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="galore-plus", description="GaLore / GaLore+ fine-tuning, offline.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    finetune = commands.add_parser(
        "finetune", help="fine-tune a model and evaluate it before and after (defaults: SmolLM2, arithmetic, "
                         "GaLore+)",
        description="Fine-tune a causal LM with GaLore+ (or a baseline) and evaluate it on held-out examples; "
                    "writes metrics.json, log.jsonl, loss.png, a resumable checkpoint and final/ (the trained "
                    "model) to --output-dir.")
    add_arguments(finetune)
    finetune.add_argument("--config", metavar="FILE", default=None,
                          help="read options from a YAML or JSON file (keys: the options' names, e.g. max_steps or "
                               "max-steps), a run's config.yaml or run.json, or a run directory; options given on "
                               "the command line override it")
    finetune.add_argument("--resume", metavar="DIR", default=None,
                          help="continue the run in DIR from its last checkpoint (from the start if it stopped "
                               "before one); options given with it must equal the run's, except a larger "
                               "--max-steps, which extends it")
    finetune.add_argument("--trust-unverified-checkpoint", action="store_true",
                          help="with --resume: a checkpoint written before galore-plus wrote manifests gets one "
                               "(you vouch for its files) instead of being refused (default: off)")
    evaluate = commands.add_parser(
        "evaluate", help="evaluate a model (e.g. a run's final/) on a data file or task, as finetune does",
        description="The evaluation finetune runs after training, for any model: answer loss and perplexity, "
                    "and exact-match accuracy of the final number ('#### N' data) or BLEU and ROUGE-L (text). "
                    "Prints the metrics as JSON.")
    add_arguments(evaluate, EvaluateConfig)
    for command in (finetune, evaluate):
        command.add_argument("-v", "--verbose", action="store_true",
                             help="also show third-party libraries' warnings that galore-plus hides as noise")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[FinetuneConfig, str | None]:
    """``galore-plus finetune`` arguments → ``(config, resume directory or None)``, checked."""
    given: dict[str, Any] = vars(build_parser().parse_args(argv))
    return _finetune_config(given)


def _finetune_config(given: dict[str, Any]) -> tuple[FinetuneConfig, str | None]:
    given = dict(given)
    given.pop("command")
    given.pop("trust_unverified_checkpoint", None)
    given.pop("verbose", None)
    resume = given.pop("resume")
    config_file = given.pop("config", None)
    if config_file is not None:  # its options, with those given beside it over them
        given = with_file(config_file, given)
    if resume is None:
        return validated(from_arguments(given)), None
    return validated(resumed(checkpoint.saved_config(Path(resume)), given, resume)), resume


def main(argv: list[str] | None = None) -> int:
    try:
        args = vars(build_parser().parse_args(argv))
        models._offline()  # before any library reads it: bitsandbytes' import would ask a hub for a kernel
        if not args["verbose"]:
            quiet_third_party()
        if args["command"] == "evaluate":
            from .evaluate import evaluate_model

            args.pop("command")
            args.pop("verbose")
            evaluate_model(validated_evaluate(EvaluateConfig(**args)), print_json=True)
            return 0
        from .finetune import finetune

        trust = args.get("trust_unverified_checkpoint", False)
        config, resume = _finetune_config(args)
        finetune(config, resume, trust_unverified_checkpoint=trust)
    except (CommandError, DataError) as err:
        # a data file's problems are one FILE:LINE line each
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"galore-plus: {line}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:  # Ctrl-C outside a run's handlers (parsing, evaluate): nothing to save
        print("galore-plus: interrupted", file=sys.stderr)
        return 130
    return 0


def package_version() -> str:
    """The installed galore-plus distribution's version (``importlib.metadata``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("galore-plus")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


__all__ = ["main", "build_parser", "parse_config", "package_version"]

if __name__ == "__main__":
    raise SystemExit(main())
