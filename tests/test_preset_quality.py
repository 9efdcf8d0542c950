"""``--preset quality`` (``spec.PRESETS``, ``LowRankSpec.preset``, ``app/presets.py``; DESIGN.md, "Presets"):
GaLore with every matrix at full rank and α 1, at AdamW's default rate. The library's preset is the
recipe with those fields; the command sets them (an option given against them is one line, before the
model loads), its state is AdamW's plus one k×k projector per matrix, and a run of it trains and resumes
bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from galore_plus import LowRankSpec
from galore_plus.app import finetune as finetune_module
from galore_plus.app import models
from galore_plus.app.cli import main, parse_config
from galore_plus.app.config import DEFAULT_LR, FinetuneConfig, low_rank_spec
from galore_plus.app.validation import validated
from galore_plus.app.errors import ConfigError
from galore_plus.app.finetune import finetune
from galore_plus.app.methods import build_method
from galore_plus.spec import PRESETS
from test_cli import TINY, argv, assert_same_weights, crash_at, run_main

BASE = {k: v for k, v in TINY.items() if k not in ("lr", "method", "rank")}  # what the preset does not set


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))


def parsed(tmp_path, *extra):
    return parse_config(["finetune", *argv(**BASE), "--output-dir", str(tmp_path / "run"), *extra])[0]


def test_the_library_preset_is_galores_recipe_at_full_rank_and_alpha_1():
    assert LowRankSpec.preset("quality") == LowRankSpec.recipe("galore", "full", scale=1.0)
    spec = LowRankSpec.preset("quality", update_proj_gap=50, rank=0.5)  # options override, the preset's too
    assert (spec.rank, spec.scale, spec.update_proj_gap, spec.cross_head) == (0.5, 1.0, 50, False)
    with pytest.raises(ValueError, match=r"preset='fast' is not one of \('quality',\)"):
        LowRankSpec.preset("fast")


def test_the_command_sets_the_presets_options_and_adamws_rate(tmp_path):
    config = parsed(tmp_path, "--preset", "quality")
    assert (config.preset, config.method, config.rank, config.scale) == ("quality", "galore", "full", 1.0)
    assert config.lr == DEFAULT_LR["adamw"]
    assert parsed(tmp_path, "--preset", "quality", "--lr", "3e-5").lr == 3e-5  # an explicit --lr wins
    # the options it sets may be given at its values; the others are free
    assert parsed(tmp_path, "--preset", "quality", "--rank", "full", "--method", "galore") == config
    assert parsed(tmp_path, "--preset", "quality", "--update-proj-gap", "7").update_proj_gap == 7
    # from Python: the same config (options at their defaults take the preset's)
    assert validated(FinetuneConfig(**BASE, preset="quality", output_dir=str(tmp_path / "run"))) == config
    spec = low_rank_spec(config)
    assert spec == LowRankSpec.preset("quality", update_proj_gap=TINY["update_proj_gap"], residual_warmup=1)
    assert parsed(tmp_path).preset == "none" and parsed(tmp_path).method == "galore+"


@pytest.mark.parametrize("extra,option", [
    (["--rank", "32"], "--rank 32"),  # the default's value, given: refused on the command line
    (["--scale", "4"], "--scale 4.0"),
    (["--method", "galore+"], "--method galore\\+"),
    (["--method", "lora"], "--method lora"),
])
def test_an_option_given_against_the_preset_is_one_line_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                                 extra, option):
    code, err = run_main(capsys, ["finetune", *argv(**BASE), "--output-dir", str(tmp_path / "run"),
                                  "--preset", "quality", *extra])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"galore-plus: --preset quality sets --method galore, --rank full, --scale 1, and {option}"
                          .replace("\\", "")), err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"--preset quality sets .*, and --rank 0.5 contradicts it"):
        validated(FinetuneConfig(**BASE, preset="quality", rank=0.5, output_dir=str(tmp_path / "run")))


def test_its_state_is_adamws_plus_a_projector_per_matrix(tmp_path):
    """Every projected matrix keeps moments of its own m×n shape (AdamW's) and one k×k projector, k =
    min(m, n); the plain parameters keep AdamW's; nothing else (no residual)."""
    config = validated(FinetuneConfig(**BASE, preset="quality", output_dir=str(tmp_path / "run")))
    model, optimizer = build_method(config, models.load_model("tiny", seed=0)[0], 4)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    projectors = 0
    for name, p in model.named_parameters():
        state = {k: v for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.numel() > 1}
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape, name
        rest = {k: v for k, v in state.items() if k not in ("exp_avg", "exp_avg_sq")}
        if optimizer.is_low_rank(p):
            k = min(p.shape)
            assert [tuple(v.shape) for v in rest.values()] == [(k, k)], (name, rest.keys())
            projectors += 1
        else:
            assert not rest, (name, rest.keys())
    assert projectors == 14  # 7 linear layers × 2 decoder layers


def test_a_quality_run_trains_and_resumes_bitwise_across_a_refresh(tmp_path, monkeypatch, capsys):
    """6 steps, T 2 (refreshes at steps 1, 3, 5): a crash at step 5 after the step-3 checkpoint, then
    ``--resume``, gives the uninterrupted run's weights; the run records the preset's resolved options."""
    options = dict(BASE, preset="quality", max_steps=6, eval_before=False, generate=False)
    full, run = tmp_path / "full", tmp_path / "interrupted"
    metrics = finetune(FinetuneConfig(**options, output_dir=str(full)))
    assert metrics["method"] == "galore" and torch.isfinite(torch.tensor(metrics["eval_after"]["answer_loss"]))
    recorded = json.loads((full / "run.json").read_text())["config"]
    assert {k: recorded[k] for k in ("preset", "method", "rank", "scale", "lr")} == {
        "preset": "quality", **PRESETS["quality"], "lr": DEFAULT_LR["adamw"]}
    real = crash_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(**options, save_every=3, output_dir=str(run)))
    monkeypatch.setattr(finetune_module, "_forward_backward", real)
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_same_weights(full, run)
    losses = [[json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()] for d in (full, run)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
