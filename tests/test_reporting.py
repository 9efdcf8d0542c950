"""Where a fine-tune reports (app/reporting.py), end to end on the tiny model: TensorBoard event files
read back with TensorBoard's own ``EventAccumulator`` (each step once, a resumed run included),
``--eval-every`` in log.jsonl and on the plot, the best evaluation point kept and (with
``--load-best-at-end``) made the final model, evaluation that leaves training bitwise unchanged, the
closing summary, and the one-line errors before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from galore_plus.app import evaluate as evaluate_module
from galore_plus.app import finetune as finetune_module
from galore_plus.app import models, reporting
from galore_plus.app.cli import main
from galore_plus.app.config import FinetuneConfig
from galore_plus.app.errors import ConfigError
from galore_plus.app.finetune import finetune
from galore_plus.app.outputs import OUTPUTS, plot_losses

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import crash_at  # noqa: E402

TINY = dict(model="tiny", data="arithmetic", method="galore+", rank=4, max_steps=4, batch_size=2, n_train=24,
            n_test=4, max_length=64, max_new_tokens=4, eval_batch_size=4, warmup_steps=1, lr=1e-3,
            update_proj_gap=2, residual_warmup=1)


def tiny_config(tmp_path: Path, name: str = "run", **overrides) -> FinetuneConfig:
    return FinetuneConfig(**{**TINY, "output_dir": str(tmp_path / name), **overrides})


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of ``out/tensorboard`` as TensorBoard reads it: ``{tag: [(step, value)]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_step_and_the_evaluations(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = finetune(tiny_config(tmp_path, report_to="tensorboard", eval_every=3))
    series = scalars(out)
    log = log_records(out)
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in series["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [v for _, v in series["train/learning_rate"]] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    assert [s for s, _ in series["train/tokens_per_second"]] == [1, 2, 3, 4]
    # every 3 steps and at the last; on the held-out split (no --n-validation)
    assert [(r["step"], r["split"], r["n"]) for r in evals] == [(3, "test", 4), (4, "test", 4)]
    assert series["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals]
    assert series["eval_before/answer_loss"] == [(0, pytest.approx(metrics["eval_before"]["answer_loss"], rel=1e-6))]
    assert series["eval_after/accuracy"] == [(4, pytest.approx(metrics["eval_after"]["accuracy"]))]
    # the last evaluation point is the model evaluated after training
    assert evals[-1]["eval_loss"] == pytest.approx(metrics["eval_after"]["answer_loss"], rel=1e-9)
    # the summary: the before/after table and three sample generations, on stdout
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "answer_loss" in printed and "sample 3/3" in printed
    assert printed.count("  reference: ") == 3 and "sample 4/" not in printed
    # the event files and best/ are the run's: --overwrite removes them
    assert (out / "best" / "model.safetensors").exists()
    finetune(tiny_config(tmp_path, max_steps=2, overwrite=True, generate=False))
    assert not (out / "tensorboard").exists() and not (out / "best").exists()
    assert "sample" not in capsys.readouterr().out  # --no-generate: no samples


def test_resume_continues_the_event_files_without_duplicate_steps(tmp_path, monkeypatch):
    """A crash at step 5 (steps 4 and 5 logged, the checkpoint at step 3) → ``--resume``: TensorBoard
    reads steps 1–6 once each (the writer purges what followed the checkpoint), log.jsonl likewise,
    and the best evaluation point is the one of the uninterrupted run."""
    options = dict(max_steps=6, save_every=3, eval_every=2, report_to="tensorboard")
    full = finetune(tiny_config(tmp_path, "full", **options))
    real = crash_at(monkeypatch, 4)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, **options))
    assert [s for s, _ in scalars(run)["train/loss"]] == [1, 2, 3, 4]  # closed (flushed) by the crash
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    assert main(["finetune", "--resume", str(run)]) == 0
    series, log = scalars(run), log_records(run)
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in series["eval/loss"]] == [2, 4, 6]
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 4, 6]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in series["eval/loss"]] == pytest.approx([r["eval_loss"] for r in log if "eval_loss" in r])
    assert [s for s, _ in series["eval_before/answer_loss"]] == [0]
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["best"] == full["best"]
    assert json.loads((run / "best" / "best.json").read_text())["step"] == full["best"]["step"]


def test_a_resume_from_before_the_first_checkpoint_starts_the_event_files_over(tmp_path, monkeypatch):
    real = crash_at(monkeypatch, 2)
    run = tmp_path / "run"
    options = dict(max_steps=3, eval_every=1, report_to="tensorboard", generate=False)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, **options))
    assert [s for s, _ in scalars(run)["train/loss"]] == [1, 2] and not (run / "checkpoint").exists()
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    finetune(tiny_config(tmp_path, **options), resume=run)
    series = scalars(run)
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3] and [s for s, _ in series["eval/loss"]] == [1, 2, 3]
    assert [s for s, _ in series["eval_before/answer_loss"]] == [0]


def test_eval_every_keeps_the_best_step_and_load_best_at_end_makes_final_from_it(tmp_path):
    """A learning rate so high that the validation loss gets worse after step 2: the recorded best step
    is the argmin of the logged evaluations, best/ holds that step's weights, and with
    ``--load-best-at-end`` final/ and the metrics after training are those weights', while the
    checkpoint keeps the last step's (to extend the run)."""
    out = tmp_path / "run"
    metrics = finetune(tiny_config(tmp_path, lr=0.1, max_steps=5, eval_every=2, n_validation=4, eval_before=False, outside="off",
                                   generate=False, load_best_at_end=True))
    evals = [r for r in log_records(out) if "eval_loss" in r]
    assert [(r["step"], r["split"], r["n"]) for r in evals] == [(2, "validation", 4), (4, "validation", 4),
                                                              (5, "validation", 4)]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert best["step"] != 5  # the last step is not the best: the test tells them apart
    assert metrics["best"] == {"step": best["step"], "eval_loss": best["eval_loss"], "split": "validation",
                               "loaded_at_end": True}
    assert json.loads((out / "metrics.json").read_text())["best"] == metrics["best"]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best["step"]
    assert metrics["eval_validation"]["answer_loss"] == pytest.approx(best["eval_loss"], rel=1e-9)
    kept, final, last = (load_file(out / path) for path in ("best/model.safetensors", "final/model.safetensors",
                                                            "checkpoint/model.safetensors"))
    assert set(kept) <= set(final)
    for name, tensor in kept.items():
        assert torch.equal(final[name], tensor), name
    shared = set(kept) & set(last)  # the checkpoint keeps one name of the tied embedding
    assert len(shared) >= len(kept) - 1 and any(not torch.equal(last[name], kept[name]) for name in shared)


def test_load_best_at_end_restores_lora_adapters(tmp_path):
    """LoRA: best/ holds the adapters only (the base is frozen); restored, the model scores what it
    scored at the best step, not at the last."""
    out = tmp_path / "run"
    metrics = finetune(tiny_config(tmp_path, method="lora", lr=3.0, max_steps=5, eval_every=2, n_validation=4,
                                   eval_before=False, generate=False, load_best_at_end=True))
    evals = {r["step"]: r["eval_loss"] for r in log_records(out) if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert metrics["best"]["step"] == best != 5 and evals[best] != evals[5]
    assert metrics["eval_validation"]["answer_loss"] == pytest.approx(evals[best], rel=1e-9)
    names = list(load_file(out / "best" / "model.safetensors"))
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)


def _attention_dropout(monkeypatch):
    """The model's attention with dropout 0.1: a training step then draws from the global random
    stream and depends on the train mode, so an evaluation that drew from it or left eval mode on
    would change the weights."""
    real = models.load_model

    def load_model(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        changed = [m for m in model.modules() if hasattr(m, "attention_dropout")]
        assert changed
        for module in changed:
            module.attention_dropout = 0.1
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", load_model)


def test_evaluation_during_training_does_not_change_training(tmp_path, monkeypatch):
    _attention_dropout(monkeypatch)
    real = evaluate_module.answer_loss

    def answer_loss_that_draws(*args, **kwargs):  # an evaluation drawing random numbers (sampling would)
        torch.rand(7)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "answer_loss", answer_loss_that_draws)
    options = dict(max_steps=4, eval_before=False, generate=False, export=False)
    finetune(tiny_config(tmp_path, "plain", **options))
    finetune(tiny_config(tmp_path, "evaluated", eval_every=1, **options))
    plain, evaluated = (load_file(tmp_path / name / "checkpoint" / "model.safetensors") for name in
                        ("plain", "evaluated"))
    assert plain.keys() == evaluated.keys()
    for name in plain:
        assert torch.equal(plain[name], evaluated[name]), name
    assert [r["step"] for r in log_records(tmp_path / "evaluated") if "eval_loss" in r] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- units and errors


def test_the_plot_shows_the_training_and_the_evaluation_losses(tmp_path, monkeypatch):
    import matplotlib.axes

    plotted = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: plotted.append((a, k)) or real(self, *a, **k))
    log = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7, "split": "validation"},
           {"step": 3, "loss": 2.0}, {"step": 3, "eval_loss": None, "split": "validation"}]
    plot_losses(log, tmp_path / "loss.png", "title")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [(list(a[0]), list(a[1]), k["label"]) for a, k in plotted] == [
        ([1, 2, 3], [3.0, 2.5, 2.0], "loss"), ([2], [2.7], "validation loss")]


def test_the_reporting_directories_are_a_runs_outputs():
    assert {reporting.TENSORBOARD, reporting.WANDB, reporting.MLFLOW, reporting.BEST, reporting.BEST + ".tmp"} <= set(
        OUTPUTS)


def test_the_summary_table_lists_before_after_and_the_best_point():
    table = reporting.summary_table({
        "method": "galore+", "steps": 4, "train_seconds": 1.5, "tokens_per_second": 100.0,
        "eval_before": {"n": 4, "answer_loss": 3.0, "accuracy": 0.0}, "eval_after": {"n": 4, "answer_loss": 2.0,
                                                                                      "accuracy": 0.25},
        "eval_validation": None, "best": {"step": 2, "eval_loss": 1.9, "split": "test", "loaded_at_end": True}})
    lines = table.splitlines()
    assert lines[0] == "galore+, 4 steps, 1.5 s, 100.0 tokens/s"
    assert lines[1].startswith("best evaluation: step 2 (test loss 1.9000)")
    assert lines[2].split() == ["before", "after"]
    assert lines[4].split() == ["answer_loss", "3", "2"] and lines[5].split() == ["accuracy", "0", "0.25"]


def test_report_to_names(monkeypatch):
    assert reporting.targets("none") == ()
    assert reporting.targets("tensorboard, mlflow,tensorboard") == ("tensorboard", "mlflow")
    installed = {"tensorboard"}
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert reporting.targets("all") == ("tensorboard",)
    with pytest.raises(ConfigError, match="--report-to 'tensorbord': give none, all, or"):
        reporting.targets("tensorbord")


@pytest.mark.parametrize("args,message", [
    (["--report-to", "wandb"], "--report-to wandb needs the wandb package, which is not installed: pip install wandb"),
    (["--report-to", "tensorboard,comet"], "--report-to 'tensorboard,comet': give none, all, or one or more"),
    (["--eval-every", "-1"], "--eval-every must be ≥ 0"),
    (["--load-best-at-end"], "--load-best-at-end chooses among the evaluations of --eval-every N"),
])
def test_bad_reporting_options_are_one_line_errors_before_the_model_loads(args, message, monkeypatch, capsys):
    real = reporting.importlib.util.find_spec
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(["finetune", "--model", "tiny", "--max-steps", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_eval_every_needs_examples_to_evaluate_on(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(8)))
    with pytest.raises(ConfigError, match="--eval-every 2 with --eval-fraction 0 has nothing to evaluate on"):
        from galore_plus.app.validation import validated

        validated(tiny_config(tmp_path, data=str(data), eval_fraction=0.0, eval_every=2))


# ---------------------------------------------------------------------------------------------- W&B and MLflow (when installed)


def test_mlflow_logs_offline_to_a_file_store_in_the_output_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    finetune(tiny_config(tmp_path, report_to="mlflow", eval_every=2, generate=False))
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("galore-plus").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.001"
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("train/loss", "eval/loss", "eval_after/answer_loss")}
    log = log_records(out)
    assert history["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in log if "loss" in r]
    assert history["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"])) for r in log if "eval_loss" in r]
    assert [s for s, _ in history["eval_after/answer_loss"]] == [4]


def test_wandb_logs_an_offline_run_in_the_output_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    finetune(tiny_config(tmp_path, report_to="wandb", eval_every=2, generate=False))
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing was sent
    data = run_file.read_bytes()  # wandb has no public reader of offline runs; the keys are in it
    for key in (b"train/loss", b"train/learning_rate", b"eval/loss", b"eval_after/answer_loss"):
        assert key in data, key


# ---------------------------------------------------------------------------------------------- under torchrun


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_best_model_under_torchrun_is_saved_and_restored(tmp_path, kind):
    """Two ranks (gloo, CPU): the evaluation points run on both (under FSDP2 a collective forward), best/
    holds the full weights of the best step (FSDP2: gathered), ``--load-best-at-end`` puts them back on
    every rank, so final/ equals best/; rank 0 alone writes the log and the event files."""
    import os
    import subprocess
    import sys

    from _ranks import free_port

    options = dict(TINY, lr=0.1, max_steps=5, update_proj_gap=4)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    out = tmp_path / kind
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "galore_plus.app", "finetune", *argv, "--distributed", kind,
               "--eval-every", "2", "--n-validation", "4", "--no-eval-before", "--no-generate",
               "--load-best-at-end", "--report-to", "tensorboard", "--output-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [r for r in log_records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert best["step"] != 5  # final/ from the last step would differ
    assert json.loads((out / "metrics.json").read_text())["best"]["step"] == best["step"]
    assert [s for s, _ in scalars(out)["eval/loss"]] == [2, 4, 5]
    assert len(list((out / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    kept, final = (load_file(out / path) for path in ("best/model.safetensors", "final/model.safetensors"))
    assert kept and set(kept) <= set(final)
    for name, tensor in kept.items():
        assert torch.equal(final[name], tensor), name
