"""``--lr-scheduler`` and ``--warmup-ratio`` (``app/schedules.py``): the default is the cosine schedule with
linear warm-up every run had before, bitwise; each schedule is transformers' own; a resumed run with
another schedule ends where the uninterrupted one does; what contradicts itself is refused in one line."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_scheduler

from galore_plus.app import finetune as finetune_module
from galore_plus.app.cli import main
from galore_plus.app.config import LEGACY_VALUES, FinetuneConfig
from galore_plus.app.finetune import finetune
from galore_plus.app.schedules import SCHEDULERS, build_scheduler, warmup_steps
from test_cli import argv, assert_same_weights, crash_at, log_steps, run_main, tiny_config


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_the_default_is_the_cosine_schedule_runs_had_before_bitwise():
    config = FinetuneConfig()
    assert (config.lr_scheduler, config.warmup_ratio) == (LEGACY_VALUES["lr_scheduler"], LEGACY_VALUES["warmup_ratio"])
    for total in (1, 7, 150, 1000):
        ours = build_scheduler(optimizer(), config, total)
        before = get_cosine_schedule_with_warmup(optimizer(), config.warmup_steps, total)
        assert ours.lr_lambdas[0].func is before.lr_lambdas[0].func
        assert ours.lr_lambdas[0].keywords == before.lr_lambdas[0].keywords
        assert lrs(ours, total + 2) == lrs(before, total + 2)  # exactly equal floats


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_schedule_is_transformers_own(name):
    config = FinetuneConfig(lr_scheduler=name, warmup_steps=0 if name == "constant" else 4)
    got = lrs(build_scheduler(optimizer(), config, 20), 21)
    assert got == lrs(get_scheduler(name, optimizer(), num_warmup_steps=config.warmup_steps, num_training_steps=20), 21)
    if name != "constant":
        assert got[:5] == [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]  # linear warm-up over 4 steps
    assert {"cosine": got[-1] == 0.0, "linear": got[-1] == 0.0, "constant": set(got) == {1e-3},
            "constant_with_warmup": set(got[4:]) == {1e-3}}[name]


def test_warmup_ratio_is_a_share_of_the_steps_rounded_up():
    assert warmup_steps(FinetuneConfig(warmup_ratio=0.1), 150) == 15
    assert warmup_steps(FinetuneConfig(warmup_ratio=0.1), 151) == 16
    assert warmup_steps(FinetuneConfig(warmup_ratio=0.0), 151) == 0
    assert warmup_steps(FinetuneConfig(), 151) == FinetuneConfig.warmup_steps


def test_a_run_logs_its_schedule_and_resumes_bitwise_with_it(tmp_path, monkeypatch):
    """linear decay after a warm-up of half the steps; a crash at step 5 (checkpoint at 3), then
    ``--resume``: the weights and the logged learning rates of the uninterrupted run."""
    options = dict(max_steps=6, lr_scheduler="linear", warmup_ratio=0.5, warmup_steps=FinetuneConfig.warmup_steps,
                   eval_before=False, generate=False)
    finetune(tiny_config(tmp_path, output_dir=str(tmp_path / "full"), **options))
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lr = tiny_config(tmp_path).lr
    # the lr after each step's scheduler.step(): warm-up 3 steps, then linear to 0 at step 6
    assert [r["lr"] for r in log] == pytest.approx([lr * x for x in (1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0)], abs=1e-12)
    real = crash_at(monkeypatch, 4)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(tmp_path, save_every=3, output_dir=str(run), **options))
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(tmp_path / "full", run)
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]
    resumed = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in log]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in log]


BAD = [
    (["--warmup-ratio", "0.1", "--warmup-steps", "5"], r"argument --warmup-steps: not allowed with argument --warmup-ratio"),
    (["--warmup-ratio", "1.5"], r"--warmup-ratio must be a share in \[0, 1\], got 1.5"),
    (["--warmup-ratio", "nan"], r"--warmup-ratio must be a share in \[0, 1\], got nan"),
    (["--lr-scheduler", "constant", "--warmup-ratio", "0.1"], r"--lr-scheduler constant has no warm-up, so "
                                                              r"--warmup-ratio 0.1 would be ignored; use --lr-scheduler "
                                                              r"constant_with_warmup"),
    (["--lr-scheduler", "constant", "--warmup-steps", "5"], r"--lr-scheduler constant has no warm-up, so "
                                                            r"--warmup-steps 5 would be ignored"),
    (["--lr-scheduler", "polynomial"], r"argument --lr-scheduler: invalid choice: 'polynomial'"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_contradictory_warm_up_is_one_line(tmp_path, capsys, extra, message):
    code, err = run_main(capsys, ["finetune", *argv(model="tiny"), "--output-dir", str(tmp_path / "o"), *extra])
    assert code == 2 and re.fullmatch(rf"galore-plus: (finetune: )?{message}.*\n", err), err
    assert not (tmp_path / "o").exists()


def test_warmup_ratio_from_python_refuses_a_warmup_steps_too():
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--warmup-ratio 0.2 sets the warm-up from the run's length; drop "
                                          r"--warmup-steps 3"):
        validated(FinetuneConfig(model="tiny", warmup_ratio=0.2, warmup_steps=3))
    assert math.isclose(validated(FinetuneConfig(model="tiny", warmup_ratio=0.2)).warmup_ratio, 0.2)
