"""Issue 25: ``LayerwiseOptimizer`` refuses names that would make it lose a hook or mix two parameters'
state: two parameters under one name, one parameter under two names, one parameter twice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from galore_plus import GaLoreAdamW, LayerwiseOptimizer


def make():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    return a, b, GaLoreAdamW([{"params": [a, b], "rank": 2}], lr=1e-2)


def test_two_parameters_under_one_name_are_refused():
    a, b, opt = make()
    with pytest.raises(ValueError, match="two parameters the name 'w'"):
        LayerwiseOptimizer(opt, [("w", a), ("w", b)])


def test_one_parameter_under_two_names_is_refused():
    a, b, opt = make()
    with pytest.raises(ValueError, match="names one parameter twice \\('a' and 'again'\\)"):
        LayerwiseOptimizer(opt, [("a", a), ("b", b), ("again", a)])


def test_one_parameter_twice_in_the_optimizer_is_refused():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(6, 4))
    with pytest.warns(UserWarning):  # torch's own warning about a duplicate in one group
        opt = GaLoreAdamW([{"params": [a, a], "rank": 2}], lr=1e-2)
    with pytest.raises(ValueError, match="appears twice"):
        LayerwiseOptimizer(opt, [("a", a)])


def test_unique_names_work_and_hooks_are_kept():
    a, b, opt = make()
    layerwise = LayerwiseOptimizer(opt, [("a", a), ("b", b)])
    try:
        (a.sum() + 2 * b.sum()).backward()
        assert opt.state[a]["step"] == 1 and opt.state[b]["step"] == 1
        assert set(layerwise.state_dict()["state"]) == {"a", "b"}
    finally:
        layerwise.remove()
