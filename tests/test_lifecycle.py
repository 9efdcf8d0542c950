"""A run's lifecycle (issues 25 and 28): its identity (a checkpoint copied in from another run is
refused), SIGINT/SIGTERM (a checkpoint, one line, exit 130/143, a bitwise resume; a second signal
stops at once and never leaves a half-written checkpoint as the newest), the checkpoint interval
and ``--save-total-limit``, ``final/``'s manifest and what ``evaluate`` refuses (corrupt, truncated,
non-finite), what a non-finite loss's message says, float16 training, a full disk or an undeletable
checkpoint as one line, and the files' modes."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from galore_plus.app import checkpoint, models
from galore_plus.app import finetune as finetune_module
from galore_plus.app.cli import main
from galore_plus.app.config import FinetuneConfig
from galore_plus.app.errors import ConfigError, RunError
from galore_plus.app.finetune import finetune
from galore_plus.app.identity import NOT_IDENTITY
from galore_plus.app.interrupts import Interrupted

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import argv, assert_same_weights, crash_at, log_steps, run_main, snapshot  # noqa: E402

TINY = dict(model="tiny", data="arithmetic", method="galore+", rank=4, max_steps=4, batch_size=2, n_train=24,
            n_test=2, max_length=64, max_new_tokens=2, eval_batch_size=4, warmup_steps=1, lr=1e-3,
            update_proj_gap=2, residual_warmup=1, eval_before=False, generate=False)


def config(tmp_path, name="run", **overrides) -> FinetuneConfig:
    return FinetuneConfig(**{**TINY, "output_dir": str(tmp_path / name), **overrides})


def one_line(err: str) -> str:
    """The single line of stderr a refusal prints (and that there is no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("galore-plus: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("other", [{"seed": 1}, {"method": "lora"}])
def test_a_checkpoint_copied_in_from_another_run_is_refused_naming_what_differs(tmp_path, capsys, other):
    finetune(config(tmp_path, "ours"))
    finetune(config(tmp_path, "theirs", **other))
    ours = tmp_path / "ours"
    shutil.rmtree(ours / "checkpoint")
    shutil.copytree(tmp_path / "theirs" / "checkpoint", ours / "checkpoint")
    before = snapshot(ours)
    code, err = run_main(capsys, ["finetune", "--resume", str(ours), "--max-steps", "6"])
    line = one_line(err)
    assert code == 2
    (name, value), = other.items()
    assert "checkpoint/ belongs to another run than run.json" in line, line
    assert f"{name} {value!r} (run.json: {getattr(config(tmp_path), name)!r})" in line, line
    assert snapshot(ours) == before  # run.json and log.jsonl untouched


def test_run_json_and_the_checkpoint_carry_the_same_identity(tmp_path):
    finetune(config(tmp_path, save_every=2, save_total_limit=2))
    run = tmp_path / "run"
    ids = {json.loads(p.read_text())["identity"]["sha256"] for p in
           (run / "run.json", run / "checkpoint" / "state.json", run / "checkpoint-2" / "state.json")}
    assert len(ids) == 1
    finetune(config(tmp_path, "other", seed=3))
    assert json.loads((tmp_path / "other" / "run.json").read_text())["identity"]["sha256"] not in ids


def test_the_identity_leaves_out_only_where_and_how_a_run_writes():
    """Every option that changes what a run computes is in the identity: the ones left out are the
    benchmark's NOT_SETTINGS (where and how a run writes) and max_steps (a resume may raise it)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from finetune_table import NOT_SETTINGS

    assert set(NOT_IDENTITY) <= set(NOT_SETTINGS) | {"max_steps"}


# ---------------------------------------------------------------------------------------------- signals


def _start(run: Path, **options) -> subprocess.Popen:
    command = [sys.executable, "-m", "galore_plus.app", "finetune", *argv(**options), "--output-dir", str(run)]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _signal_after(process: subprocess.Popen, run: Path, steps: int, signum: int) -> tuple[int, str]:
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            log = run / "log.jsonl"
            if log.exists() and log.read_text().count("\n") >= steps:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before the signal"
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, err


def test_two_real_runs_into_one_directory_the_second_is_refused_and_the_first_finishes_intact(tmp_path, capsys):
    """Two processes: a run in progress holds its directory; a second run into it (another seed, with
    --overwrite even) is refused in one line before it touches anything, and the first goes on intact."""
    options = dict(TINY, max_steps=100_000, save_every=0, update_proj_gap=5)  # it is interrupted long before
    run = tmp_path / "run"
    first = _start(run, **options)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if (run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert first.poll() is None, "the first run ended too soon"
        record = (run / "run.json").read_text()
        code, err = run_main(capsys, ["finetune", *argv(**{**options, "seed": 1}), "--output-dir", str(run),
                                      "--overwrite"])
        assert code != 0
        assert re.search(r"is in use by another run \(pid \d+\)", one_line(err)), err
        assert (run / "run.json").read_text() == record  # the second wrote nothing
    finally:
        rc, err = _signal_after(first, run, 3, signal.SIGINT)
    assert rc == 130, err
    step = checkpoint.read_state(run)["step"]
    assert log_steps(run) == list(range(1, step + 1))  # one run's steps, each once
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 0


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_exits_with_one_line_and_resumes_bitwise(tmp_path, signum, code):
    options = dict(TINY, max_steps=150, save_every=0, update_proj_gap=5)
    run = tmp_path / "run"
    rc, err = _signal_after(_start(run, **options), run, 5, signum)
    assert rc == code, err
    line = one_line(err)
    match = re.fullmatch(rf"galore-plus: interrupted at step (\d+); resume with: galore-plus finetune --resume {run}",
                         line)
    assert match, line
    step = int(match[1])
    assert 5 <= step < 150
    assert checkpoint.read_state(run)["step"] == step  # verified against its manifest
    assert log_steps(run) == list(range(1, step + 1))
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()
    if signum == signal.SIGINT:  # the resume: the uninterrupted run's weights, each step logged once
        finetune(FinetuneConfig(**{**options, "output_dir": str(tmp_path / "full")}))
        assert main(["finetune", "--resume", str(run)]) == 0
        assert_same_weights(tmp_path / "full", run)
        assert log_steps(run) == list(range(1, 151))


def test_a_second_signal_during_the_save_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """SIGINT while step 4 is trained (the run saves at 2, 4, 6), the second while step 4's checkpoint
    is written: the run stops at once, the half-written checkpoint is deleted and step 2's stays the
    newest; it resumes to the uninterrupted run's weights."""
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the shell ran pytest in the background
    finetune(config(tmp_path, "full", max_steps=6))
    real_forward, real_manifest = finetune_module._forward_backward, checkpoint.write_manifest

    def forward(run, built, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first: deferred to the end of the step
        return real_forward(run, built, step)

    def manifest(ckpt):
        if json.loads((ckpt / "state.json").read_text())["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the second, in the middle of the save: at once
        return real_manifest(ckpt)

    monkeypatch.setattr(finetune_module, "_forward_backward", forward)
    monkeypatch.setattr(checkpoint, "write_manifest", manifest)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match=r"interrupted at step 4 at once \(a second signal\): the steps after the "
                                          r"checkpoint of step 2 are trained again; resume with") as caught:
        finetune(config(tmp_path, max_steps=6, save_every=2))
    assert caught.value.exit_code == 130
    assert checkpoint.read_state(run)["step"] == 2
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()
    assert signal.getsignal(signal.SIGINT) == before  # the handlers are put back
    monkeypatch.undo()
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_signal_before_training_writes_nothing(tmp_path, monkeypatch, capsys):
    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the signal did not stop the run")

    monkeypatch.setattr(models, "load_model", load)
    code, err = run_main(capsys, ["finetune", *argv(**TINY), "--output-dir", str(tmp_path / "run")])
    assert code == 143 and one_line(err) == "galore-plus: interrupted before training began; nothing was written"
    assert not (tmp_path / "run").exists()


def test_the_default_checkpoint_interval_saves_during_the_run(tmp_path, monkeypatch):
    steps = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda out, *a, **k: (steps.append(a[3]), real(out, *a, **k)))
    monkeypatch.setattr(finetune_module, "DEFAULT_SAVE_EVERY", 2)
    finetune(config(tmp_path, max_steps=5))
    assert config(tmp_path).save_every is None and steps == [2, 4, 5]
    steps.clear()
    finetune(config(tmp_path, "zero", max_steps=5, save_every=0))
    assert steps == [5]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, capsys):
    finetune(config(tmp_path, max_steps=6, save_every=1, save_total_limit=3))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-4", "checkpoint-5"]
    for name, step in (("checkpoint-4", 4), ("checkpoint-5", 5)):
        checkpoint.verify(run / name)
        assert json.loads((run / name / "state.json").read_text())["step"] == step
    assert checkpoint.read_state(run)["step"] == 6
    finetune(config(tmp_path, "all", max_steps=4, save_every=1, save_total_limit=0))
    assert sorted(p.name for p in (tmp_path / "all").glob("checkpoint*")) == [
        "checkpoint", "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    finetune(config(tmp_path, "one", max_steps=4, save_every=1))
    assert [p.name for p in (tmp_path / "one").glob("checkpoint*")] == ["checkpoint"]
    # a directory holding only a kept checkpoint holds a run; --overwrite removes it
    for path in (tmp_path / "all").iterdir():
        if not path.name.startswith("checkpoint-") and path.name != ".lock":
            path.unlink() if path.is_file() else shutil.rmtree(path)
    code, err = run_main(capsys, ["finetune", *argv(**TINY), "--output-dir", str(tmp_path / "all")])
    assert code == 2 and "already holds a run (checkpoint-1, checkpoint-2, checkpoint-3)" in one_line(err)
    assert main(["finetune", *argv(**TINY), "--output-dir", str(tmp_path / "all"), "--overwrite"]) == 0
    assert not list((tmp_path / "all").glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------- final/, evaluate


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    out = tmp_path_factory.mktemp("final")
    finetune(config(out, max_steps=2))
    return out / "run" / "final"


def _evaluate(capsys, model: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["evaluate", "--model", str(model), "--data", "arithmetic", "--n-test", "2", "--max-new-tokens", "2",
                 *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_final_has_a_manifest_and_readable_files_and_evaluate_verifies_it(final, tmp_path, capsys):
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "config.json"} <= set(manifest)
    umask = os.umask(0)
    os.umask(umask)
    for p in [*final.iterdir(), *(final.parent / "checkpoint").iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p  # 0644 under 022, as save_pretrained writes
    code, out, err = _evaluate(capsys, final, "--output", str(tmp_path / "m.json"))
    assert code == 0 and _strict(out)["n"] == 2 and _strict((tmp_path / "m.json").read_text())["n"] == 2
    flipped = tmp_path / "flipped"
    shutil.copytree(final, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-100] ^= 1
    (flipped / "model.safetensors").write_bytes(bytes(data))
    code, out, err = _evaluate(capsys, flipped)
    assert code == 2 and out == ""
    assert re.fullmatch(rf"galore-plus: evaluate: --model {flipped}: {flipped}/model.safetensors is corrupt: its "
                        r"sha256 .*", one_line(err))


@pytest.mark.parametrize("size", [0, 100, 200_000])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_evaluate_refuses_a_truncated_model_with_one_line(final, tmp_path, capsys, size, with_manifest):
    model = tmp_path / "model"
    shutil.copytree(final, model)
    if not with_manifest:
        (model / "manifest.json").unlink()
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(size)
    code, out, err = _evaluate(capsys, model, "--output", str(tmp_path / "m.json"))
    line = one_line(err)
    assert code == 2 and out == "" and not (tmp_path / "m.json").exists()
    assert ("is corrupt" if with_manifest else "cannot be loaded") in line, line


def test_evaluate_refuses_non_finite_weights_and_never_writes_nan(final, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    shutil.copy(final / "tokenizer.json", tmp_path / "nan")
    shutil.copy(final / "tokenizer_config.json", tmp_path / "nan")
    code, out, err = _evaluate(capsys, tmp_path / "nan", "--output", str(tmp_path / "m.json"))
    assert code == 2 and out == "" and not (tmp_path / "m.json").exists()
    assert "has 1 non-finite weight entries (the first in model.layers.0.mlp.down_proj.weight)" in one_line(err)
    # finite weights whose evaluation is not finite (e.g. a float16 overflow): refused, not "NaN" in JSON
    from galore_plus.app import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: {"n": 2, "answer_loss": math.inf,
                                                                      "perplexity": math.inf})
    code, out, err = _evaluate(capsys, final, "--output", str(tmp_path / "m.json"))
    assert code == 1 and out == "" and not (tmp_path / "m.json").exists()
    assert "gave non-finite metrics (answer_loss inf, perplexity inf)" in one_line(err)


# ---------------------------------------------------------------------------------------------- non-finite


def test_non_finite_weights_before_training_are_refused_before_training(tmp_path, monkeypatch):
    real = models.load_model

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 3] = float("inf")
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", load)
    with pytest.raises(ConfigError, match=r"--model tiny has 1 non-finite weight entries \(the first in "
                                          r"model.layers.1.mlp.up_proj.weight\) before training; nothing was trained"):
        finetune(config(tmp_path))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_non_finite_loss_before_any_update_does_not_blame_the_learning_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune_module, "_forward_backward", lambda run, built, step: (math.nan, 1))
    with pytest.raises(RunError) as caught:
        finetune(config(tmp_path, dtype="float16"))
    message = str(caught.value)
    assert message.startswith("step 1: the training loss is nan on the model's weights before any update"), message
    assert "--lr" not in message and "float16 overflows above 65504" in message


def test_a_non_finite_loss_after_updates_says_the_weights_were_and_what_may_cause_it(tmp_path, monkeypatch):
    real = finetune_module._forward_backward

    def forward(run, built, step):
        if step == 2:  # as if the update of step 2 had left a weight non-finite
            with torch.no_grad():
                built.model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
            return math.nan, 1
        return real(run, built, step)

    monkeypatch.setattr(finetune_module, "_forward_backward", forward)
    with pytest.raises(RunError) as caught:
        finetune(config(tmp_path, weight_decay=0.1, lr=0.5))
    message = str(caught.value)
    assert message.startswith("step 3: the training loss is nan because 1 weight entries are already non-finite: an "
                              "update since the start made them so"), message
    assert "no checkpoint had been written yet" in message
    for clause in ("--weight-decay 0.1 scales the weights by 1 − lr·λ = 0.95", "a smaller --lr than 0.5"):
        assert clause in message, message


# ---------------------------------------------------------------------------------------------- float16


@pytest.mark.parametrize("method", ["galore+", "adamw"])
def test_float16_trains_with_a_finite_falling_loss(tmp_path, method):
    finetune(config(tmp_path, method=method, dtype="float16", max_steps=8, device="cpu"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(w.dtype == torch.float16 and torch.isfinite(w).all() for w in weights.values())


# ---------------------------------------------------------------------------------------------- failing writes


def test_overwrite_over_a_checkpoint_that_cannot_be_deleted_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    finetune(config(tmp_path))
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == run / "checkpoint":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    code, err = run_main(capsys, ["finetune", *argv(**TINY), "--output-dir", str(run), "--overwrite"])
    assert code == 2
    assert re.fullmatch(rf"galore-plus: --overwrite: {run}/checkpoint cannot be deleted \(\[Errno 13\] Permission "
                        r"denied: .*\); the new run did not start", one_line(err))
    assert checkpoint.read_state(run)["step"] == 4


@pytest.mark.parametrize("where", ["checkpoint", "log", "metrics"])
def test_a_full_disk_mid_run_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, where):
    """ENOSPC while step 4's checkpoint is written (the run saves every 2 steps), or while step 3's log
    line is: exit 1, one line, step 2's checkpoint intact and no half-written one; a directory turned
    read-only when metrics.json is written: step 6's checkpoint kept. Resuming gives the uninterrupted
    run's weights."""
    finetune(config(tmp_path, "full", max_steps=6))
    full = OSError(errno.ENOSPC, "No space left on device")
    if where in ("checkpoint", "metrics"):
        real = checkpoint.write_json

        def write_json(path, value):
            if path.name == "state.json" and value["step"] == 4 and where == "checkpoint":
                raise full
            if path.name == "metrics.json":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, value)

        monkeypatch.setattr(checkpoint, "write_json", write_json)
    else:
        real_open = Path.open

        def open_(self, mode="r", *args, **kwargs):
            if self.name == "log.jsonl" and mode == "a" and log_steps(self.parent) == [1, 2]:
                raise full
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)
    run = tmp_path / "run"
    code, err = run_main(capsys, ["finetune", *argv(**dict(TINY, max_steps=6, save_every=2)), "--output-dir", str(run)])
    assert code == 1
    step, kept = {"checkpoint": (4, 2), "log": (3, 2), "metrics": (6, 6)}[where]
    error = r"\[Errno 13\] Permission denied: .*" if where == "metrics" else r"\[Errno 28\] No space left on device"
    assert re.fullmatch(rf"galore-plus: step {step}: writing to {run} failed \({error}\); its checkpoint of step "
                        rf"{kept} is kept in {run}/checkpoint\. Free space or make it writable, then resume",
                        one_line(err))
    assert checkpoint.read_state(run)["step"] == kept and not (run / "checkpoint.tmp").exists()
    monkeypatch.undo()
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]



# ---------------------------------------------------------------------------------------------- torchrun


def _workers(agent: int) -> list[int]:
    """The processes ``agent`` started that run the command (torchrun's workers)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent and b"galore_plus.app" in command:
            out.append(int(entry))
    return out


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM to one of two DDP ranks only: both stop after the same step (the other learns of it by
    the per-step all-reduce instead of waiting in a collective), the checkpoint of that step is
    written whole by both, and each rank's line names it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    options = dict(TINY, method="galore", max_steps=400, batch_size=4, save_every=0)
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(port), "-m", "galore_plus.app", "finetune", *argv(**options), "--distributed", "ddp",
                              "--output-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and agent.poll() is None:
            log = run / "log.jsonl"
            if log.exists() and log.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        workers = _workers(agent.pid)
        assert agent.poll() is None and len(workers) == 2, "the run ended before the signal"
        os.kill(workers[1], signal.SIGTERM)
        _, err = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    lines = re.findall(rf"galore-plus: interrupted at step (\d+); resume with: galore-plus finetune --resume {run} "
                       r"\(under torchrun, as the run was\)", err)
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]
    step = int(lines[0])
    # torchrun's agent reports the ranks' non-zero exits with a traceback of its own; none is the ranks'
    assert not re.search(r'File ".*galore_plus', err), err[-3000:]
    state = checkpoint.read_state(run)  # verified against its manifest
    assert state["step"] == step and state["world_size"] == 2
    assert log_steps(run) == list(range(1, step + 1)) and step < 400


def test_ctrl_c_outside_a_run_is_one_line(monkeypatch, capsys):
    from galore_plus.app import evaluate as evaluate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate_model", interrupted)
    code, err = run_main(capsys, ["evaluate", "--model", "tiny", "--data", "arithmetic"])
    assert code == 130 and one_line(err) == "galore-plus: interrupted"


def test_a_signal_during_the_evaluation_after_training_stops_at_once_and_resumes(tmp_path, monkeypatch):
    """Outside a step nothing is half done: SIGTERM while the model is evaluated after training stops at
    once, the final checkpoint on disk; --resume evaluates and writes the rest."""
    real = finetune_module._evaluate

    def evaluate(run, built, label, validation=False):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(run, built, label, validation)

    monkeypatch.setattr(finetune_module, "_evaluate", evaluate)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match=rf"^interrupted at step 4; resume with: galore-plus finetune --resume {run}$"):
        finetune(config(tmp_path))
    assert checkpoint.read_state(run)["step"] == 4 and not (run / "metrics.json").exists()
    monkeypatch.undo()
    assert main(["finetune", "--resume", str(run)]) == 0
    assert (run / "metrics.json").exists() and log_steps(run) == [1, 2, 3, 4]


def test_a_signal_to_a_run_without_checkpoints_says_it_cannot_be_resumed(tmp_path, monkeypatch):
    real = finetune_module._forward_backward

    def forward(run, built, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(run, built, step)

    monkeypatch.setattr(finetune_module, "_forward_backward", forward)
    with pytest.raises(Interrupted, match=r"^interrupted at step 2; the run writes no checkpoint "
                                          r"\(--no-save-checkpoint\), so it cannot be resumed$") as caught:
        finetune(config(tmp_path, save_checkpoint=False))
    assert caught.value.exit_code == 130 and not (tmp_path / "run" / "checkpoint").exists()


def test_a_lora_checkpoint_holds_the_trained_tensors_only_and_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """LoRA: checkpoint/model.safetensors holds the adapters (the frozen base is the model's, its sha256
    recorded); a crashed run resumes to the uninterrupted run's weights; another base is refused."""
    finetune(config(tmp_path, "full", method="lora", max_steps=6))
    crash_at(monkeypatch, 4)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(config(tmp_path, method="lora", max_steps=6, save_every=3))
    monkeypatch.undo()
    saved = load_file(run / "checkpoint" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    assert len(checkpoint.read_state(run)["frozen_sha256"]) == 64
    before = snapshot(run)
    real_load = models.load_model

    def other_base(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", other_base)
    code, err = run_main(capsys, ["finetune", "--resume", str(run)])
    assert code == 2 and "are not those the checkpoint's adapters were trained on" in one_line(err)
    assert snapshot(run) == before
    monkeypatch.undo()
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "full", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
