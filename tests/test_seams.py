"""The seams between the engine and what surrounds it: ``engine_of`` is the one unwrap, the layout
module (``sharding.py``) owns every distributed-tensor API, the projected backward reaches the engine
through its public accessor only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import galore_plus
from galore_plus import GaLoreAdamW, LayerwiseOptimizer, engine_of

SOURCE = Path(galore_plus.__file__).parent
#: attributes only a DTensor has (the layout module wraps them for everyone else)
DTENSOR_ONLY = {"DTensor", "to_local", "from_local", "redistribute", "placements", "device_mesh"}
#: known leftovers (none: lowrank.ParameterWrite's shard offset is sharding.local_offset)
ALLOWED: set[tuple[str, str]] = set()


def sources():
    return sorted(p for p in SOURCE.rglob("*.py") if p.name != "sharding.py")


def test_distributed_tensors_are_handled_in_the_layout_module_only():
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and re.match(r"torch\.distributed\._?tensor\b", node.module or ""):
                found.append((path.name, node.lineno, f"from {node.module} import ..."))
            elif isinstance(node, ast.Import):
                found += [(path.name, node.lineno, f"import {a.name}") for a in node.names
                          if re.match(r"torch\.distributed\._?tensor\b", a.name)]
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in DTENSOR_ONLY and (path.name, name) not in ALLOWED:
                found.append((path.name, node.lineno, name))
    assert not found, f"distributed-tensor code outside sharding.py: {found}"


def test_no_hand_written_unwrap_of_a_wrapped_optimizer():
    pattern = re.compile(r"getattr\([^)]*[\"']optimizer[\"']|\.optimizer if isinstance\(|^\s*\w+ = \w+\.optimizer\s*$")
    found = [(p.name, i + 1) for p in sources() if p.name not in ("lowrank.py", "layerwise.py")  # their own
             for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not found, f"use galore_plus.engine_of: {found}"


def test_engine_of():
    model = torch.nn.Linear(6, 5)
    engine = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}], lr=1e-2)
    assert engine_of(engine) is engine
    layerwise = LayerwiseOptimizer(engine, model.named_parameters())
    try:
        assert engine_of(layerwise) is engine
    finally:
        layerwise.remove()
    assert engine_of(torch.optim.AdamW(model.parameters())) is None
    assert engine_of(None) is None


def test_the_refresher_is_handed_over_by_one_public_call():
    """``use_refresher`` is how a refresher gets in (``distributed.distribute`` uses it); nothing outside
    the engine assigns the attribute, and the one handed over computes every due projector."""
    assigned = [(p.name, node.lineno) for p in SOURCE.rglob("*.py") if p.name != "lowrank.py"
                for node in ast.walk(ast.parse(p.read_text(), str(p)))
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "refresher"
                                                        for t in node.targets)]
    assert not assigned, f"assign through LowRankOptimizer.use_refresher: {assigned}"

    class Recording:
        def __init__(self):
            self.seen = []

        def refresh(self, optimizer, due):
            self.seen.append([tuple(p.shape) for p, _ in due])
            for p, grad in due:
                optimizer.refresh_projector(p, grad)

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    engine = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}], lr=1e-2)
    recording = Recording()
    engine.use_refresher(recording)
    model(torch.randn(3, 6)).sum().backward()
    engine.step()
    assert recording.seen == [[(5, 6)]]
    try:
        engine.use_refresher(object())
    except TypeError as e:
        assert "refresh(optimizer, due)" in str(e)
    else:
        raise AssertionError("use_refresher took an object without refresh()")
