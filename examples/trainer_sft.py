"""Fine-tune with TRL's ``SFTTrainer`` (a ``transformers.Trainer``) and the GaLore+ optimizer of
``galore_plus.trainer.make_optimizer``: the README's "With transformers.Trainer / TRL SFTTrainer" example,
which ``tests/test_trainer_integration.py`` runs. Offline: the tiny random LLaMA and its tokenizer are built
in memory (``load_model`` also takes ``smollm2`` or a local model directory; any Hugging Face causal LM
from ``AutoModelForCausalLM.from_pretrained`` works the same).

    pip install -e ".[cli]" trl && python examples/trainer_sft.py
"""

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from galore_plus.app.models import load_model
from galore_plus.trainer import make_optimizer

model, tokenizer = load_model("tiny")  # or AutoModelForCausalLM / AutoTokenizer.from_pretrained(your model)
data = Dataset.from_dict({"text": [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]})
args = SFTConfig("sft-out", max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                 max_grad_norm=0.0,  # the Trainer's clipping would miss the projected gradients: see clip_grad_norm
                 report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
# (optimizer, None): lr, weight decay and seed from args; the Trainer makes the scheduler that args describe
optimizers = make_optimizer(model, args, "galore+", 8, update_proj_gap=2, projected_backward=True, clip_grad_norm=1.0)
# transformers.Trainer(model=model, args=TrainingArguments(...), ..., optimizers=optimizers) takes it the same way
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, optimizers=optimizers)
trainer.train()
print("losses:", [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h])
