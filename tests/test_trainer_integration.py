"""``galore_plus.trainer.make_optimizer`` with the plain ``transformers.Trainer`` and TRL's ``SFTTrainer``
(the README's example, run here), clipping under the projected backward (the Trainer's refused, the
optimizer's by the norm of what it applies), and DeepSpeed refused with a pointer to FSDP2."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer

from galore_plus import GaLoreAdamW, build_optimizer
from galore_plus.layerwise import engine_of
from galore_plus.projected import clip_grad_norm_, is_projected
from galore_plus.trainer import GaLoreTrainer, check_trainer_arguments, make_optimizer

from test_trainer import arguments, dataset, tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trainer_sft.py"
GALORE = {"update_proj_gap": 2, "residual_warmup": 1}


def no_projected_module(model):
    return not any(is_projected(m) for m in model.modules())


def test_the_readme_example_trains_with_sfttrainer_and_the_low_rank_optimizer(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    code = EXAMPLE.read_text()
    body = code[code.index("import torch"):]
    assert body in (ROOT / "README.md").read_text()  # the README shows exactly what runs here
    monkeypatch.chdir(tmp_path)
    ran = runpy.run_path(str(EXAMPLE), run_name="__example__")
    trainer, model = ran["trainer"], ran["model"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    engine = engine_of(trainer.optimizer.optimizer)  # accelerate wraps the optimizer
    assert engine is not None and engine.projected_backward is not None
    targets = [m.weight for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert targets and all(engine.state[w]["step"] == 4 for w in targets)
    assert all("proj_left" in engine.state[w] or "proj_right" in engine.state[w] for w in targets)


def test_sfttrainers_default_clipping_under_the_projected_backward_is_refused_and_changes_nothing(tmp_path):
    trl = pytest.importorskip("trl")
    model = tiny_model()
    args = trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True)  # max_grad_norm=1.0 by default
    refused = r"^max_grad_norm=1.0 with the projected backward: .* clip_grad_norm=1.0"
    with pytest.raises(ValueError, match=refused) as err:
        make_optimizer(model, args, "galore+", 4, projected_backward=True)
    assert "\n" not in str(err.value)
    assert no_projected_module(model)  # nothing installed: the fixed call goes through
    args.max_grad_norm = 0.0
    optimizer, scheduler = make_optimizer(model, args, "galore+", 4, projected_backward=True, clip_grad_norm=1.0)
    assert scheduler is None and optimizer.projected_backward is not None


@pytest.mark.parametrize("extra,options,clip", [
    ({}, {}, None),  # the Trainer's own clipping (max_grad_norm=1.0): right without the projected backward
    ({"max_grad_norm": 0.0}, {"projected_backward": True}, 0.05),  # the optimizer's, active at 0.05
])
def test_the_plain_trainer_with_make_optimizer_trains_like_galore_trainer(tmp_path, extra, options, clip):
    model = tiny_model()
    args = arguments(tmp_path / "plain", 4, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      optimizers=make_optimizer(model, args, "galore+", 4, clip_grad_norm=clip, **options, **GALORE))
    trainer.train()
    reference = tiny_model()
    GaLoreTrainer(model=reference, args=arguments(tmp_path / "galore", 4, **extra), train_dataset=dataset(),
                  galore={"method": "galore+", "rank": 4, **options, **GALORE}, clip_grad_norm=clip).train()
    assert engine_of(trainer.optimizer.optimizer) is not None
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _steps(model, optimizer, n=3, clip=None):
    gen = torch.Generator().manual_seed(2)
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        if clip is not None:
            clip_grad_norm_(optimizer, clip)
        optimizer.step()
        optimizer.zero_grad()


def test_clip_grad_norm_clips_every_gradient_the_optimizer_applies_before_each_step(tmp_path):
    args = arguments(tmp_path, 1, max_grad_norm=0.0)
    clipped = tiny_model()
    optimizer, _ = make_optimizer(clipped, args, "galore+", 4, projected_backward=True, clip_grad_norm=1e-2, **GALORE)
    _steps(clipped, optimizer)  # the Trainer calls step(); the optimizer clips inside it
    by_hand, unclipped = tiny_model(), tiny_model()
    options = dict(lr=args.learning_rate, weight_decay=args.weight_decay, seed=args.seed, projected_backward=True)
    _steps(by_hand, build_optimizer(by_hand, "galore+", 4, **options, **GALORE), clip=1e-2)
    _steps(unclipped, build_optimizer(unclipped, "galore+", 4, **options, **GALORE))
    for (name, a), b, c in zip(clipped.named_parameters(), by_hand.parameters(), unclipped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, c) for a, c in zip(clipped.parameters(), unclipped.parameters()))


@pytest.mark.parametrize("args,options,message", [
    ({"max_grad_norm": 1.0}, {"projected_backward": True, "clip_grad_norm": 1.0},
     "max_grad_norm=1.0 with the projected backward"),
    ({"max_grad_norm": 1.0}, {"clip_grad_norm": 1.0}, "clip_grad_norm=1.0 and max_grad_norm=1.0 would both clip"),
    ({"max_grad_norm": 0.0}, {"layerwise": True, "clip_grad_norm": 1.0}, "clip_grad_norm in layer-wise mode"),
    ({"max_grad_norm": 0.0}, {"clip_grad_norm": -1.0}, "must be a positive number"),
    ({"max_grad_norm": 0.0, "fp16": True}, {"projected_backward": True}, "fp16=True with the projected backward"),
    ({"max_grad_norm": 0.0}, {"lr": 1e-3}, "lr=0.001 is taken from the Trainer's arguments"),
])
def test_settings_that_cannot_work_are_refused_before_the_optimizer_is_built(args, options, message):
    model = tiny_model()
    namespace = SimpleNamespace(**{"learning_rate": 1e-3, "weight_decay": 0.0, "seed": 0, "fp16": False,
                                   "gradient_accumulation_steps": 1, "deepspeed": None, **args})
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer(model, namespace, "galore+", 4, **options)
    assert no_projected_module(model)


DEEPSPEED = (r"^DeepSpeed .*ZeRO flattens the parameters.*FSDP2 instead "
             r"\(galore_plus.distributed, or galore-plus finetune --distributed fsdp\)")


def test_deepspeed_in_the_arguments_is_refused_with_a_pointer_to_fsdp2():
    model = tiny_model()
    args = SimpleNamespace(deepspeed="ds_config.json", max_grad_norm=1.0)  # TrainingArguments would need deepspeed
    with pytest.raises(ValueError, match=DEEPSPEED) as err:
        make_optimizer(model, args, "galore+", 4, projected_backward=True)
    assert "\n" not in str(err.value) and no_projected_module(model)
    with pytest.raises(ValueError, match=DEEPSPEED):  # an optimizer built by hand, checked as the README says
        check_trainer_arguments(args, GaLoreAdamW(model.parameters()))
    check_trainer_arguments(args, torch.optim.AdamW(model.parameters()))  # not ours: DeepSpeed's business


def test_deepspeed_from_accelerate_launch_is_refused(tmp_path, monkeypatch):
    args = arguments(tmp_path, 1)  # made before the variable: with it, TrainingArguments needs deepspeed installed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=DEEPSPEED):
        make_optimizer(tiny_model(), args, "galore+", 4)


def test_galore_trainer_refuses_deepspeed_when_it_builds_the_optimizer(tmp_path):
    trainer = GaLoreTrainer(model=tiny_model(), args=arguments(tmp_path, 1), train_dataset=dataset(),
                            galore={"method": "galore+", "rank": 4})
    trainer.args.deepspeed = {"zero_optimization": {"stage": 2}}  # as the Trainer's DeepSpeed set-up would call it
    with pytest.raises(ValueError, match=DEEPSPEED):
        trainer.create_optimizer()
