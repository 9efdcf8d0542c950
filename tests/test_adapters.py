"""``galore-plus finetune --method lora|dora`` writes ``final/adapter/`` (PEFT's ``save_pretrained``) beside
the merged model: PEFT loads it on a fresh base, and it computes and generates as the merged ``final/``."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from galore_plus.app.config import FinetuneConfig
from galore_plus.app.finetune import finetune
from galore_plus.app.models import load_model

TINY = dict(model="tiny", data="arithmetic", rank=4, max_steps=4, batch_size=2, n_train=24, n_test=4, max_length=64,
            max_new_tokens=4, eval_batch_size=4, warmup_steps=1, lr=1e-2, seed=3)


def prompt_ids(tokenizer):
    return tokenizer("12 + 30 = ", return_tensors="pt").input_ids


def assert_same_model(adapted, merged, tokenizer):
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(adapted.generate(ids, **options), merged.generate(ids, **options))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_the_adapter_loads_with_peft_and_generates_like_the_merged_model(tmp_path, method):
    out = tmp_path / "run"
    finetune(FinetuneConfig(**TINY, method=method, output_dir=str(out)))
    adapter = out / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["use_dora"] == (method == "dora")
    assert (adapter / "adapter_model.safetensors").stat().st_size < (out / "final" / "model.safetensors").stat().st_size
    merged = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    base, tokenizer = load_model("tiny", seed=TINY["seed"])  # the README's recipe: the run's --seed
    ids = prompt_ids(tokenizer)
    with torch.no_grad():  # training changed the model: the base alone computes otherwise
        assert (base(ids).logits - merged(ids).logits).abs().max() > 1e-3
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    assert_same_model(adapted, merged, tokenizer)


def test_a_model_directory_is_named_by_its_absolute_path_and_loads_in_one_call(tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny", seed=5)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    finetune(FinetuneConfig(**{**TINY, "model": "base"}, method="lora", output_dir="run"))
    adapter = tmp_path / "run" / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    monkeypatch.chdir("/")
    adapted = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # base and adapter, offline
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    assert_same_model(adapted, merged, tokenizer)
