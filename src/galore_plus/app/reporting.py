"""Where a fine-tune reports: the logging libraries of ``--report-to`` (TensorBoard's
``SummaryWriter``, W&B and MLflow offline, all under the output directory), the answer loss every
``--eval-every`` steps with the best model kept in ``OUTPUT/best/`` (``--load-best-at-end`` makes the
final model from it), and the closing summary on stdout: before/after metrics and sample generations.

:func:`check` is the config's part (called by ``validation.validated``: a library that is not installed
is an error before any work); :class:`Reporter` is the run's, opened by ``finetune`` once the output
directory is the run's, and called by ``train`` after each step's log line and by ``finish``. Only the
main rank writes or prints; evaluations and the best model's gathering run on every rank (an FSDP2
forward is collective). DESIGN.md, "Reporting and evaluation during training".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, RunError
from .outputs import LOG, remove

__all__ = ["REPORTERS", "TENSORBOARD", "WANDB", "MLFLOW", "BEST", "targets", "check", "Reporter", "summary_table",
           "SAMPLES"]

#: ``--report-to`` names and the module each needs (its PyPI package has the same name)
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD = "tensorboard"  # OUTPUT/tensorboard: the event files
WANDB = "wandb"  # OUTPUT/wandb: W&B's offline run directories (``wandb sync`` uploads them)
MLFLOW = "mlruns"  # OUTPUT/mlruns: MLflow's file store (``mlflow ui --backend-store-uri OUTPUT/mlruns``)
BEST = "best"  # OUTPUT/best: the trainable weights of the best evaluation point, and best.json
BEST_INFO = "best.json"
BEST_WEIGHTS = "model.safetensors"
#: sample generations printed at the end
SAMPLES = 3


def targets(report_to: str) -> tuple[str, ...]:
    """The libraries ``--report-to`` names: ``none``, ``all`` (those of :data:`REPORTERS` that are
    installed) or a comma-separated list of them."""
    if report_to == "none":
        return ()
    if report_to == "all":
        return tuple(name for name, module in REPORTERS.items() if importlib.util.find_spec(module) is not None)
    names = tuple(dict.fromkeys(part.strip() for part in report_to.split(",")))
    unknown = [name for name in names if name not in REPORTERS]
    if unknown or not names:
        raise ConfigError(f"--report-to {report_to!r}: give none, all, or one or more (comma-separated) of "
                          f"{', '.join(REPORTERS)}")
    return names


def check(config: Any) -> None:
    """The reporting options of a ``FinetuneConfig``: known libraries, installed ones, an
    ``--eval-every`` with something to evaluate on; ``ConfigError`` naming the problem."""
    for name in targets(config.report_to):
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {REPORTERS[name]} package, which is not installed: "
                              f"pip install {REPORTERS[name]} (or --report-to none)")
    if config.eval_every < 0:
        raise ConfigError(f"--eval-every must be ≥ 0 (0: no evaluation during training), got {config.eval_every}")
    if config.load_best_at_end and not config.eval_every:
        raise ConfigError("--load-best-at-end chooses among the evaluations of --eval-every N; give --eval-every")
    if config.eval_every and not config.n_validation and config.eval_data is None and config.eval_fraction == 0:
        raise ConfigError(f"--eval-every {config.eval_every} with --eval-fraction 0 has nothing to evaluate on: "
                          "hold out examples (--eval-fraction, --eval-data or --n-validation)")


# ---------------------------------------------------------------------------------------------- the libraries


class _TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` into ``OUTPUT/tensorboard``. Resumed at step ``S``, the
    writer's ``purge_step`` S + 1 makes TensorBoard drop what the interrupted run logged after its
    checkpoint, so each step is read once; started at step 0 (a resumed run may have had no checkpoint
    yet) it drops everything before."""

    def __init__(self, out: Path, config: Any, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=start_step + 1 if start_step else 0)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(dataclasses.asdict(config), indent=1) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run in ``OUTPUT/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync``
    uploads it later). A resumed run is a new W&B run that starts at the resumed step."""

    def __init__(self, out: Path, config: Any, start_step: int) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "galore-plus"), name=out.name, dir=str(out),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=dataclasses.asdict(config),
                              reinit="create_new" if _wandb_takes_create_new() else True)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_takes_create_new() -> bool:
    import wandb

    major, minor = (int(part) for part in wandb.__version__.split(".")[:2])
    return (major, minor) >= (0, 19)


class _MLflow:
    """An MLflow run in the file store ``OUTPUT/mlruns`` (``MLFLOW_TRACKING_URI`` replaces it), through
    ``MlflowClient``, so no process-wide MLflow state is set. MLflow 3 keeps its file store in
    maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set unless the user set it. A
    resumed run is a new MLflow run."""

    def __init__(self, out: Path, config: Any, start_step: int) -> None:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or (out / MLFLOW).resolve().as_uri())
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "galore-plus")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in dataclasses.asdict(config).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_WRITERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


# ---------------------------------------------------------------------------------------------- the run's reporter


class Reporter:
    """A run's reporting, from the step it starts at (``start_step``, after a resume the checkpoint's)
    to its end; a context manager that closes the writers (flushing them) however the run ends.

    ``history`` is the run's (saved in each checkpoint): the best evaluation point so far is kept in
    it (``history["best"]``), so a resumed run compares with what the checkpointed run had seen."""

    def __init__(self, run: Any, built: Any, start_step: int, history: dict[str, Any]) -> None:
        config = run.config
        self.run, self.built, self.history = run, built, history
        self.main = run.runtime.is_main
        self.split = "validation" if run.task.validation else "test"
        self.examples = run.task.validation or run.task.test
        if config.eval_every and not self.examples:
            raise ConfigError(f"--eval-every {config.eval_every}: the run holds out no examples to evaluate on")
        self.writers = [_WRITERS[name](run.out, config, start_step) for name in targets(config.report_to)
                        ] if self.main else []
        if start_step == 0 and history.get("eval_before"):
            self._log(_prefixed("eval_before", history["eval_before"]), 0)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()

    # --------------------------------------------------------------------- during training

    def after_step(self, record: dict[str, Any]) -> None:
        """After the log line of step ``record["step"]`` (and before its checkpoint, which then holds
        this evaluation's best): its scalars, and at an evaluation point the answer loss, logged and
        compared with the best."""
        step = record["step"]
        self._log({"train/loss": record["loss"], "train/learning_rate": record["lr"],
                   "train/tokens_per_second": record["tokens"] / max(record["seconds"], 1e-9)}, step)
        every = self.run.config.eval_every
        if every and (step % every == 0 or step == self.built.total_steps):
            self.evaluate(step)

    def evaluate(self, step: int) -> float:
        """The answer loss on :attr:`examples` (no generation), as a separate ``eval_loss`` line of
        log.jsonl and ``eval/loss``; an improvement writes ``OUTPUT/best/``. Neither the training's
        random numbers nor the model's train/eval mode are changed (``fork_rng``; ``answer_loss``
        restores the mode)."""
        from .evaluate import answer_loss

        config, built = self.run.config, self.built
        began = time.perf_counter()
        with torch.random.fork_rng(devices=_devices(self.run.runtime.device)):
            loss = answer_loss(built.model, built.tokenizer, self.examples, batch_size=config.eval_batch_size,
                               max_length=config.max_length)
        record = {"step": step, "eval_loss": loss if math.isfinite(loss) else None, "split": self.split,
                  "n": len(self.examples), "seconds": round(time.perf_counter() - began, 4)}
        if self.main:
            with (self.run.out / LOG).open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        self._log({"eval/loss": loss}, step)
        best = self.history.get("best")
        if math.isfinite(loss) and (best is None or loss < best["eval_loss"]):
            self.history["best"] = {"step": step, "eval_loss": loss, "split": self.split}
            self._save_best(step, loss)
        return loss

    def _save_best(self, step: int, loss: float) -> None:
        """``OUTPUT/best/``: the trainable parameters (``model.safetensors``, named as in the run's
        model: LoRA/DoRA adapters only) and ``best.json``; written to ``best.tmp`` and renamed, so the
        previous best is replaced whole or not at all."""
        from safetensors.torch import save_file

        weights = self._trainable_weights()
        if self.main:
            tmp, best = self.run.out / (BEST + ".tmp"), self.run.out / BEST
            remove(tmp)
            tmp.mkdir()
            save_file(weights, str(tmp / BEST_WEIGHTS), metadata={"step": str(step)})
            (tmp / BEST_INFO).write_text(json.dumps({"step": step, "eval_loss": loss, "split": self.split}) + "\n")
            remove(best)
            tmp.replace(best)
        self.run.runtime.barrier()

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        model = self.built.model
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        if self.run.config.distributed == "fsdp":  # every rank takes part; rank 0 gets the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {name: state[name].contiguous() for name in names if name in state}
        if not self.main:  # the main rank holds the same weights and writes them
            return {}
        parameters = dict(model.named_parameters())
        return {name: parameters[name].detach().to("cpu", copy=True).contiguous() for name in names}

    # --------------------------------------------------------------------- at the end

    def restore_best(self) -> None:
        """With ``--load-best-at-end``: the best evaluation point's weights (``OUTPUT/best/``) back into
        the model, after the final checkpoint (which keeps the last step's, to extend the run) and
        before the final evaluation and ``final/``."""
        if not self.run.config.load_best_at_end:
            return
        from safetensors.torch import load_file

        best = self.history.get("best")
        directory = self.run.out / BEST
        try:
            saved = json.loads((directory / BEST_INFO).read_text())
        except (OSError, ValueError):
            saved = None
        if best is None or saved is None or saved.get("step") != best["step"]:
            raise RunError(f"--load-best-at-end: {directory} does not hold the best evaluation point "
                           f"({best and best['step']}; it holds {saved and saved.get('step')}), so final/ is not "
                           "written from it")
        model = self.built.model
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        if self.run.config.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            weights = load_file(str(directory / BEST_WEIGHTS)) if self.main else {}
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True, strict=False))
        else:
            weights = load_file(str(directory / BEST_WEIGHTS))
            if set(weights) != names:
                raise RunError(f"--load-best-at-end: {directory / BEST_WEIGHTS} does not hold this run's trainable "
                               "parameters")
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    parameters[name].copy_(value)
        if self.main:
            print(f"loaded the best evaluation point (step {best['step']}, {best['split']} loss "
                  f"{best['eval_loss']:.4f}) for the final evaluation and final/", file=sys.stderr)

    def metrics(self) -> dict[str, Any]:
        """What metrics.json adds: the best evaluation point (with ``--eval-every``) and whether the
        final model is it."""
        if not self.run.config.eval_every:
            return {}
        return {"best": dict(self.history.get("best") or {}, loaded_at_end=self.run.config.load_best_at_end)}

    def finish(self, metrics: dict[str, Any]) -> None:
        """The final metrics to the libraries (at the last step), then on stdout the before/after table
        and :data:`SAMPLES` generations of held-out examples (not with ``--no-generate``). Every rank
        generates (a collective forward under FSDP2); the main rank prints."""
        steps = metrics["steps"]
        for name in ("eval_after", "eval_validation"):
            if metrics.get(name):
                self._log(_prefixed(name, metrics[name]), steps)
        samples = []
        if self.run.config.generate and self.run.task.test:
            from .evaluate import generate

            examples = self.run.task.test[:SAMPLES]
            with torch.random.fork_rng(devices=_devices(self.run.runtime.device)):
                answers = generate(self.built.model, self.built.tokenizer, examples,
                                   max_new_tokens=self.built.max_new_tokens, batch_size=len(examples), progress=False)
            samples = list(zip(examples, answers))
        if self.main:
            print(summary_table(metrics))
            for i, (example, answer) in enumerate(samples, 1):
                print(f"sample {i}/{len(samples)}\n  prompt:    {_short(example.prompt)}\n"
                      f"  reference: {_short(example.answer)}\n  model:     {_short(answer) or '(nothing)'}")
            sys.stdout.flush()

    def _log(self, values: dict[str, float], step: int) -> None:
        for writer in self.writers:
            writer.log(values, step)


def summary_table(metrics: dict[str, Any]) -> str:
    """The before/after metrics of ``metrics`` (metrics.json's) as a small table, with a line on the run."""
    columns = [(title, metrics.get(key)) for key, title in
               (("eval_before", "before"), ("eval_after", "after"), ("eval_validation", "validation"))]
    columns = [(title, values) for title, values in columns if values]
    lines = [f"{metrics['method']}, {metrics['steps']} steps, {metrics['train_seconds']} s, "
             f"{metrics['tokens_per_second']} tokens/s"]
    best = metrics.get("best")
    if best and best.get("step") is not None:
        lines.append(f"best evaluation: step {best['step']} ({best['split']} loss {best['eval_loss']:.4f})"
                     + ("; final/ and the metrics after are from it" if best.get("loaded_at_end") else ""))
    if columns:
        rows = list(dict.fromkeys(key for _, values in columns for key in values if key != "generations"))
        width = max(map(len, rows))
        lines.append(" " * width + "".join(f"  {title:>10}" for title, _ in columns))
        for key in rows:
            lines.append(f"{key:<{width}}" + "".join(f"  {_number(values.get(key)):>10}" for _, values in columns))
    return "\n".join(lines)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation's result under ``prefix/`` (its example count left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _devices(device: torch.device) -> list[Any]:
    """The CUDA device whose random state ``fork_rng`` must keep too (none on other devices)."""
    return [device] if device.type == "cuda" else []
