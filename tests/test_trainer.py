"""transformers.Trainer round trip: train a tiny LLaMA, save a checkpoint, resume, same result."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from galore_plus import GaLoreAdamW, LayerwiseOptimizer, LowRankSpec
from galore_plus.trainer import GaLoreTrainer, check_trainer_arguments


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def dataset(n=24, length=16):
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(length, dtype=torch.long)})
    return rows


def arguments(out, max_steps, accumulation=1, **extra):
    return TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=2, save_steps=3, save_strategy="steps", logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, gradient_accumulation_steps=accumulation,
        dataloader_num_workers=0, disable_tqdm=True, **extra)


def train(out, galore, max_steps=6, resume=None, accumulation=1, **extra):
    model = tiny_model()
    trainer = GaLoreTrainer(model=model, args=arguments(out, max_steps, accumulation, **extra),
                            train_dataset=dataset(), galore=galore)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("galore,extra", [
    ({"method": "galore+", "rank": 4, "update_proj_gap": 2, "residual_warmup": 1}, {}),
    ({"method": "galore", "rank": 4, "update_proj_gap": 2, "layerwise": True, "clip": "parameter",
      "max_grad_norm": 1.0}, {"max_grad_norm": 0.0}),
    ({"method": "galore+", "rank": 4, "update_proj_gap": 2, "residual_warmup": 1, "projected_backward": True},
     {"max_grad_norm": 0.0}),
    ({"spec": LowRankSpec.recipe("galore+", 4, update_proj_gap=2, residual_warmup=1)}, {}),
])
def test_trainer_checkpoint_resume_equals_uninterrupted(tmp_path, galore, extra):
    full, trainer = train(tmp_path / "full", galore, accumulation=2, **extra)
    assert trainer.state.global_step == 6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    ours = trainer.optimizer.optimizer  # accelerate wraps the optimizer; a LayerwiseOptimizer shares its state
    assert all(s["step"] == 6 for s in ours.state.values())  # one update per optimizer step, not per micro-batch
    train(tmp_path / "half", galore, accumulation=2, **extra)  # writes checkpoint-3
    resumed, _ = train(tmp_path / "half", galore, resume=str(tmp_path / "half" / "checkpoint-3"), accumulation=2,
                       **extra)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_layerwise_refuses_trainer_clipping(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm=1.0: in layer-wise mode"):
        train(tmp_path, {"method": "galore", "rank": 4, "layerwise": True}, max_steps=1)


def test_projected_backward_refuses_trainer_clipping(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm=1.0 with the projected backward"):
        train(tmp_path, {"method": "galore+", "rank": 4, "projected_backward": True}, max_steps=1)


def test_accumulation_mismatch_is_refused():
    model = tiny_model()
    opt = GaLoreAdamW(model.parameters())
    lw = LayerwiseOptimizer(opt, model.named_parameters(), accumulation_steps=2)
    args = arguments("/tmp/unused", 1, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="accumulation_steps=2"):
        check_trainer_arguments(args, lw)


def test_trainer_options_from_training_arguments_are_not_duplicated():
    with pytest.raises(ValueError, match="galore\\['lr'\\] is taken from the TrainingArguments"):
        GaLoreTrainer(model=tiny_model(), args=arguments("/tmp/unused", 1), galore={"method": "galore", "rank": 2,
                                                                                    "lr": 1e-3})
