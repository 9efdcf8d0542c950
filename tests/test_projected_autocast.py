"""The projected backward under ``torch.autocast`` (bfloat16, CPU): the linear runs in bf16 as autocast
casts it, the projected gradient is formed in the compute dtype (float32) from the bf16 output
gradient, and training tracks the full path under the same autocast to bf16 accuracy (the full path
forms ``dyᵀx`` in bf16, the projected one ``(Pᵀdyᵀ)x`` in float32, so they differ at bf16's rounding)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from galore_plus import LowRankSpec, build_optimizer

CONFIG = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def run(projected):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    spec = LowRankSpec.recipe("galore+", 8, update_proj_gap=3, residual_warmup=2, scale=1.0)
    opt = build_optimizer(model, spec, lr=1e-3, projected_backward=projected)
    gen = torch.Generator().manual_seed(1)
    losses, dtypes = [], set()
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    for _ in range(6):  # refreshes at steps 1 and 4: both kinds of step
        ids = torch.randint(0, 64, (2, 11), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    hook.remove()
    return model, losses, dtypes


def test_projected_backward_under_bf16_autocast_tracks_the_full_path():
    full, full_losses, full_dtypes = run(False)
    projected, losses, dtypes = run(True)
    assert dtypes == full_dtypes == {torch.bfloat16}  # the target linear ran in bf16 on both paths
    assert all(p.dtype == torch.float32 for p in projected.parameters())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses), rtol=0, atol=2e-3)
    for (name, p), q in zip(full.named_parameters(), projected.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-3, msg=name)  # lr 1e-3 × 6 steps: bf16-level differences
    torch.manual_seed(0)
    untouched = LlamaForCausalLM(LlamaConfig(**CONFIG))
    moved = (projected.model.layers[0].self_attn.q_proj.weight - untouched.model.layers[0].self_attn.q_proj.weight)
    assert moved.abs().max() > 1e-3  # it trained
