"""A default learning rate per ``--method`` (``config.DEFAULT_LR``; DESIGN.md, "Learning rate per method"):
each method's rate when ``--lr`` is absent, an explicit ``--lr`` wins, ``--help`` and the README show the
table, and a run records the rate it used, so a resume or a ``--config`` of the run reproduces it even
after the table changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from galore_plus.app import config as config_module
from galore_plus.app import finetune as finetune_module
from galore_plus.app.cli import build_parser, parse_config
from galore_plus.app.config import DEFAULT_LR, METHODS, FinetuneConfig, learning_rate
from galore_plus.app.validation import validated
from galore_plus.app.finetune import finetune
from test_cli import TINY, argv, assert_same_weights, crash_at

BASE = {k: v for k, v in TINY.items() if k != "lr"}  # the tiny run, --lr left out
QUICK = dict(BASE, max_steps=6, eval_before=False, generate=False)
README = Path(__file__).resolve().parents[1] / "README.md"


def shown(rate: float) -> str:
    return f"{rate:.0e}".replace("e-0", "e-")  # 1e-4, as --help and the README write it


def parsed(tmp_path, **options):
    return parse_config(["finetune", *argv(**{**BASE, **options}), "--output-dir", str(tmp_path / "run")])[0]


def test_the_table_has_a_rate_for_every_method_and_loras_is_not_galores():
    assert set(DEFAULT_LR) == set(METHODS) and all(0 < r < 1 for r in DEFAULT_LR.values())
    assert DEFAULT_LR["lora"] > DEFAULT_LR["galore+"]  # BENCHMARKS.md §8: 10× on the command's own job
    assert FinetuneConfig().lr is None  # "the method's": resolved by validated()


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("fira", "adamw8bit")])
def test_each_methods_rate_is_used_without_lr_and_an_explicit_lr_wins(tmp_path, method):
    assert parsed(tmp_path, method=method).lr == DEFAULT_LR[method]
    given = FinetuneConfig(**{**BASE, "method": method, "output_dir": str(tmp_path / "run")})
    assert validated(given).lr == DEFAULT_LR[method]
    assert parsed(tmp_path, method=method, lr=3e-5).lr == 3e-5
    assert parsed(tmp_path, method=method, lr=DEFAULT_LR["lora"] * 7).lr == DEFAULT_LR["lora"] * 7


@pytest.mark.parametrize("method", METHODS)
def test_learning_rate_resolves_every_method(method):
    """fira and adamw8bit too (their packages may be absent here, so not through validated())."""
    assert learning_rate(FinetuneConfig(method=method)) == DEFAULT_LR[method]
    assert learning_rate(FinetuneConfig(method=method, lr=2e-5)) == 2e-5


def test_help_and_readme_show_each_methods_rate(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--lr X peak")  # the option's help, not the usage line
    lr_help = text[start:text.index("--warmup-steps N", start)]
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `--lr`"))
    for method, rate in DEFAULT_LR.items():
        assert f"{method} {shown(rate)}" in lr_help, (method, lr_help)
        assert re.search(rf"`{re.escape(method)}` {shown(rate)}\b", row), (method, row)


def test_a_run_records_its_rate_and_a_resume_or_config_of_it_reproduces_it(tmp_path, monkeypatch):
    """The run without --lr trains at galore+'s rate and writes it to run.json and config.yaml; the table
    then changes (a later version), and a resume from Python with --lr still left out continues at the
    recorded rate (bitwise the uninterrupted run), as ``--config`` of the run does; a new run takes the
    new table's rate."""
    rate = DEFAULT_LR["galore+"]
    full, run = tmp_path / "full", tmp_path / "interrupted"
    finetune(FinetuneConfig(**QUICK, output_dir=str(full)))
    assert json.loads((full / "run.json").read_text())["config"]["lr"] == rate
    assert yaml.safe_load((full / "config.yaml").read_text())["lr"] == rate
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in log) == pytest.approx(rate)  # the peak of the schedule
    real = crash_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(**QUICK, save_every=3, output_dir=str(run)))
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    monkeypatch.setitem(config_module.DEFAULT_LR, "galore+", rate * 7)
    finetune(FinetuneConfig(**QUICK, save_every=3, output_dir=str(run)), resume=str(run))
    assert_same_weights(full, run)
    resumed = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in log]
    for source in (full, full / "config.yaml", full / "run.json"):
        assert parse_config(["finetune", "--config", str(source), "--output-dir", str(tmp_path / "again")])[0].lr \
            == rate, source
    assert parsed(tmp_path).lr == rate * 7
