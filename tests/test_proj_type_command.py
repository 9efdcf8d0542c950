"""``galore-plus finetune --proj-type``: the library's projection side as a command option (issue 29;
BENCHMARKS.md §9, "which side holds across batches"). The side rules themselves are tested with the
library (``projection_side``, every path); here: the option reaches the spec, old runs keep ``std``,
it is refused where it means nothing, and it changes which side a real refresh projects."""

from __future__ import annotations

import pytest
import torch

from galore_plus import build_optimizer, projection
from galore_plus.app.config import LEGACY_VALUES, FinetuneConfig, low_rank_spec
from galore_plus.app.errors import ConfigError
from galore_plus.app.models import tiny_model
from galore_plus.app.validation import validated


def test_the_option_reaches_the_spec_and_old_runs_keep_std():
    assert LEGACY_VALUES["proj_type"] == "std" == FinetuneConfig().proj_type
    assert low_rank_spec(FinetuneConfig(proj_type="right")).proj_type == "right"
    assert low_rank_spec(FinetuneConfig(method="galore", proj_type="reverse_std")).proj_type == "reverse_std"
    with pytest.raises(ConfigError, match="--proj-type right needs --method galore or galore"):
        validated(FinetuneConfig(method="lora", proj_type="right"))
    with pytest.raises(ConfigError, match="proj"):
        validated(FinetuneConfig(proj_type="sideways"))


@pytest.mark.parametrize("method", ["galore", "galore+"])
def test_right_projects_every_matrix_on_its_input_side(method):
    """After one step, every projected matrix's projector: ``std`` puts k/v (out 16 < in 64) and
    down (out 64 < in 128) on the left, ``right`` puts all of them on the input side."""
    sides = {}
    for proj_type in ("std", "right"):
        model = tiny_model(320, seed=0, dtype=torch.float64)
        spec = low_rank_spec(FinetuneConfig(method=method, rank=2, proj_type=proj_type))
        opt = build_optimizer(model, spec, lr=1e-3)
        ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        sides[proj_type] = {names[id(p)]: opt.state[p]["proj_side"] for g in opt.param_groups if g.get("rank")
                            for p in g["params"] if "proj_side" in opt.state[p]}
    assert sides["std"].keys() == sides["right"].keys() and sides["std"]
    assert set(sides["right"].values()) == {projection.RIGHT}
    assert projection.LEFT in sides["std"].values()  # so the option changed something
