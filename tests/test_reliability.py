"""Issue 25's smaller fixes: a non-contiguous weight (``Parameter(w.t())``, whose gradient is
transposed too) trains with the sparse residual exactly as its contiguous copy does; an empty
``--output-dir`` is refused instead of writing into the current directory."""

from __future__ import annotations

import torch
from torch import nn

from galore_plus import GaLoreAdamW


def run(contiguous):
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=torch.float64)
    p = nn.Parameter(w.clone() if contiguous else w.t().contiguous().t())
    assert p.is_contiguous() == contiguous
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "svd": "randomized", "num_heads": 4, "residual_ratio": 0.1,
                        "residual_warmup": 1, "update_proj_gap": 2}], lr=1e-2, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # the residual's set is fixed at step 1 and used from step 2 on
        x = torch.randn(5, 16, dtype=torch.float64, generator=gen)
        (p @ x.T).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert "residual_index" in opt.state[p]
    return p.detach().clone()


def test_a_transposed_weight_with_the_residual_equals_its_contiguous_copy():
    torch.testing.assert_close(run(False), run(True), rtol=0, atol=1e-12)


def test_an_empty_output_dir_is_refused():
    import pytest

    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError

    with pytest.raises(ConfigError, match="--output-dir is empty"):
        validated(FinetuneConfig(model="tiny", output_dir=""))


def test_fp16_and_bf16_plain_parameters_keep_float32_moments():
    """fp16: ε = 1e-8 is 0 in fp16, so a zero second moment divided by it made step 2 NaN; bf16:
    0.999·v rounds back to v, so the second moment stopped decaying."""
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8, 6).to(dtype))
        b = nn.Parameter(torch.zeros(6, dtype=dtype))
        opt = GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [b]}], lr=1e-3)
        grads = [torch.tensor([1.0, 0, 0, 0, 0, 0]), torch.zeros(6), torch.zeros(6)]
        for g in grads:
            w.grad, b.grad = torch.randn(8, 6).to(dtype), g.to(dtype)
            opt.step()
        state = opt.state[b]
        assert state["exp_avg_sq"].dtype == torch.float32 and torch.isfinite(b).all(), dtype
        # v after a gradient of 1 then two zeros: (1 − β2)·β2², decayed in float32
        torch.testing.assert_close(state["exp_avg_sq"][0], torch.tensor(0.001 * 0.999**2), rtol=1e-6, atol=0)


def test_a_decay_that_would_zero_the_weights_is_refused():
    import pytest

    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.validation import validated
    from galore_plus.app.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--lr 1 × --weight-decay 1e\+30 = 1e\+30 ≥ 1"):
        validated(FinetuneConfig(model="tiny", lr=1.0, weight_decay=1e30))
    validated(FinetuneConfig(model="tiny", lr=1e-3, weight_decay=0.1))  # an ordinary decay passes


def test_a_second_run_into_a_directory_in_use_is_refused_and_changes_nothing(tmp_path):
    import pytest

    from galore_plus.app.errors import ConfigError
    from galore_plus.app.outputs import lock_output_dir

    held = lock_output_dir(tmp_path)  # what a running finetune holds
    try:
        with pytest.raises(ConfigError, match=rf"--output-dir {tmp_path} is in use by another run \(pid \d+\)"):
            lock_output_dir(tmp_path)
    finally:
        held.close()
    lock_output_dir(tmp_path).close()  # free again once the first is done
