"""End-to-end ``galore-plus finetune`` on the tiny model: every method, resume, bad data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from galore_plus.app import cli
from galore_plus.app.cli import FinetuneConfig, finetune, parse_config


def tiny_config(tmp_path, **overrides):
    base = dict(model="tiny", data="arithmetic", method="galore+", rank=4, max_steps=4, batch_size=2, n_train=24,
                n_test=4, max_length=64, max_new_tokens=4, eval_batch_size=4, warmup_steps=1, lr=1e-3,
                update_proj_gap=2, residual_warmup=1, output_dir=str(tmp_path / "run"))
    base.update(overrides)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("method,extra", [
    ("galore+", {}), ("galore", {}), ("adamw", {}), ("adamw8bit", {}), ("lora", {}), ("dora", {}),
    ("galore+", {"layerwise": True, "grad_accum": 2}), ("galore", {"eightbit": True}),
])
def test_every_method_runs_end_to_end(tmp_path, method, extra):
    metrics = finetune(tiny_config(tmp_path, method=method, **extra))
    out = tmp_path / "run"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == method and saved["steps"] == 4
    assert 0 < saved["peak_memory_bytes"] <= saved["peak_memory_bytes_with_eval"]
    for key in ("train_seconds", "tokens_per_second", "refresh_seconds", "eval_before", "eval_after"):
        assert key in saved
    assert {"answer_loss", "accuracy"} <= set(saved["eval_after"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    assert (out / "loss.png").stat().st_size > 0
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "state.json"):
        assert (out / "checkpoint" / name).exists()
    torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)
    if method in ("galore", "galore+"):
        assert metrics["refresh_seconds"] > 0


@pytest.mark.parametrize("method,extra", [("galore+", {}), ("galore", {"layerwise": True, "grad_accum": 2})])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, method, extra):
    full = tiny_config(tmp_path, method=method, max_steps=6, output_dir=str(tmp_path / "full"), **extra)
    finetune(full)
    real_save = cli.save_checkpoint

    def crash_after_step_3(out, model, optimizer, scheduler, step, config, history):
        real_save(out, model, optimizer, scheduler, step, config, history)
        if step == 3:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")

    monkeypatch.setattr(cli, "save_checkpoint", crash_after_step_3)
    interrupted = tiny_config(tmp_path, method=method, max_steps=6, save_every=3,
                              output_dir=str(tmp_path / "interrupted"), **extra)
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted)
    monkeypatch.setattr(cli, "save_checkpoint", real_save)
    cli.main(["finetune", "--resume", str(tmp_path / "interrupted")])
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "interrupted" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "interrupted" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("complete", [True, False])
def test_crash_between_the_checkpoint_renames_resumes(tmp_path, monkeypatch, complete):
    """A crash after the previous checkpoint became ``checkpoint.old`` and before the new one left
    ``checkpoint.tmp``: resume uses the new one if it is complete, the old one if not."""
    full = tiny_config(tmp_path, max_steps=6, output_dir=str(tmp_path / "full"))
    finetune(full)
    real_save, real_replace = cli.save_checkpoint, cli.os.replace

    def crash_mid_save_at_step_4(out, model, optimizer, scheduler, step, config, history):
        if step == 4:
            def replace(src, dst):
                if str(src).endswith(".tmp"):
                    if not complete:
                        (out / "checkpoint.tmp" / "state.json").unlink()
                    raise KeyboardInterrupt("simulated crash between the two renames")
                real_replace(src, dst)
            monkeypatch.setattr(cli.os, "replace", replace)
        real_save(out, model, optimizer, scheduler, step, config, history)

    monkeypatch.setattr(cli, "save_checkpoint", crash_mid_save_at_step_4)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, max_steps=6, save_every=2, output_dir=str(run)))
    monkeypatch.setattr(cli.os, "replace", real_replace)
    monkeypatch.setattr(cli, "save_checkpoint", real_save)
    assert not (run / "checkpoint").exists() and (run / "checkpoint.old").exists()
    assert json.loads((run / "checkpoint.old" / "state.json").read_text())["step"] == 2
    cli.main(["finetune", "--resume", str(run)])
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(run / "checkpoint" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (run / "checkpoint.old").exists() and not (run / "checkpoint.tmp").exists()


def test_malformed_data_stops_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2 #### 2"}\n{"question": "2+2?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2:"):
        finetune(tiny_config(tmp_path, data=str(bad)))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_command_line_options():
    config, resume = parse_config(["finetune", "--method", "galore", "--rank", "8", "--8bit", "--layerwise",
                                   "--grad-accum", "2", "--epochs", "1.5"])
    assert (config.method, config.rank, config.eightbit, config.layerwise, config.grad_accum) == ("galore", 8, True,
                                                                                                  True, 2)
    assert config.epochs == 1.5 and config.max_steps is None and resume is None
    assert parse_config(["finetune"])[0] == FinetuneConfig()
    with pytest.raises(SystemExit):
        parse_config(["finetune", "--method", "sgd"])
    with pytest.raises(SystemExit):
        parse_config(["finetune", "--max-steps", "3", "--epochs", "1"])
    with pytest.raises(SystemExit, match="--layerwise needs --method galore"):
        parse_config(["finetune", "--method", "lora", "--layerwise"])
    with pytest.raises(SystemExit):
        parse_config(["finetune", "--rnak", "3"])


def test_batch_order_is_a_function_of_seed_and_index():
    seen = [i for u in range(6) for i in cli.batch_indices(u, 4, 10, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs are permutations
    assert cli.batch_indices(4, 4, 10, seed=3) == cli.batch_indices(4, 4, 10, seed=3)


def test_command_reports_bad_data_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2 #### 2"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"galore-plus: .*bad.jsonl:2:"):
        cli.main(["finetune", "--model", "tiny", "--data", str(bad), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"galore-plus: .*not found"):
        cli.main(["finetune", "--model", "tiny", "--data", str(tmp_path / "missing.jsonl")])
