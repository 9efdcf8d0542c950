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

    from galore_plus.app.config import FinetuneConfig, validated
    from galore_plus.app.errors import ConfigError

    with pytest.raises(ConfigError, match="--output-dir is empty"):
        validated(FinetuneConfig(model="tiny", output_dir=""))
