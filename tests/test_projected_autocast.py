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


def test_projected_products_run_in_bf16_under_autocast_and_the_optimizer_in_float32(monkeypatch):
    """Under bf16 autocast the projected products between refreshes take bf16 ``x``, ``dy`` and
    projectors (torch's linear forms ``dyᵀx`` in bf16 there too), the gradient handed to the optimizer
    is float32, and a refresh's factors (held until ``step()``) are float32; without autocast every
    product is float32."""
    from galore_plus import projected

    seen = []
    original = projected.projected_weight_gradient

    def spy(x, dy, left, right, index, n):
        seen.append({t.dtype for t in (x, dy, left, right) if t is not None})
        return original(x, dy, left, right, index, n)

    monkeypatch.setattr(projected, "projected_weight_gradient", spy)
    for autocast, want in ((True, {torch.bfloat16}), (False, {torch.float32})):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
        opt = build_optimizer(model, LowRankSpec.recipe("galore+", 8, update_proj_gap=3, residual_warmup=1),
                              lr=1e-3, projected_backward=True)
        weights = list(opt.projected_backward.targets.values())
        ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
        for step in range(3):
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:  # a refresh: the factors are held in float32
                assert not seen and all(opt.factored_gradient(w).dtype == torch.float32 for w in weights)
            else:
                assert len(seen) == len(weights) and all(s == want for s in seen), (autocast, seen)
                assert all(opt.projected_gradient(w).low.dtype == torch.float32 for w in weights)
                assert any(opt.projected_gradient(w).residual is not None for w in weights)
            opt.step()
            opt.zero_grad()


def test_autocast_leaves_a_float64_model_alone_on_the_projected_path():
    """torch's autocast does not cast float64 tensors; neither does the projected path: under autocast
    a float64 model trains as without it, to float64 rounding."""
    runs = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.float64)
        opt = build_optimizer(model, LowRankSpec.recipe("galore+", 8, update_proj_gap=3, residual_warmup=1),
                              lr=1e-3, projected_backward=True)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            ids = torch.randint(0, 64, (2, 5), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
