"""``bench/subspace_noise.py`` end to end on the tiny model (seconds): every capture is a share in
[0, 1], and the signal's own top-r projector captures at least as much of it as any other rank-r
projector the script measures (Eckart–Young): a capture computed on the wrong side, or of the wrong
gradient, breaks that."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_captured_shares_are_bounded_by_the_signals_own_projector(tmp_path):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("subspace_noise", BENCH / "subspace_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--model", "tiny", "--data", "arithmetic", "--layers", "0", "--batches", "4", "--rank", "2",
                       "--results-dir", str(tmp_path), "--tag", "_tiny"])
    rows = json.loads((tmp_path / "subspace_noise_tiny.json").read_text())["rows"]
    assert rows == out["rows"] and len(rows) == 7  # q, k, v, o, gate, up, down of layer 0
    for r in rows:
        for key in ("one_batch", "one_batch_own", "half_mean", "signal_own", "random", "other_side_one_batch",
                    "other_side_signal_own"):
            assert 0.0 <= r[key] <= 1.0 + 1e-12, (r["matrix"], key)
        best = r["signal_own"] + 1e-9
        assert r["one_batch"] <= best and r["half_mean"] <= best and r["random"] <= best, r["matrix"]
        assert r["other_side_one_batch"] <= r["other_side_signal_own"] + 1e-9, r["matrix"]
    assert "| matrix | shape | side |" in (tmp_path / "subspace_noise_tiny.md").read_text()


def test_the_share_estimate_is_exact_where_the_gradient_lies_in_the_subspace_and_bounded_elsewhere(tmp_path):
    import torch

    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("subspace_noise", BENCH / "subspace_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0]
    inside = q[:, :3] @ torch.randn(3, 20, generator=gen, dtype=torch.float64)  # columns in span(q[:, :3])
    exact, ests = module.estimates(inside, (q[:, :3], None), 4, gen)
    assert abs(exact - 1) < 1e-12 and all(abs(e - 1) < 1e-12 for e in ests)
    outside = q[:, 3:6] @ torch.randn(3, 20, generator=gen, dtype=torch.float64)
    exact, ests = module.estimates(outside, (q[:, :3], None), 4, gen)
    assert exact < 1e-12 and all(e < 1e-12 for e in ests)
    # right bases: the transpose's left one gives the same shares
    exact_t, _ = module.estimates(inside.T.contiguous(), (None, q[:, :3].T), 1, gen)
    assert abs(exact_t - 1) < 1e-12

    out = module.main(["--model", "tiny", "--data", "arithmetic", "--layers", "0", "--batches", "4", "--rank", "2",
                       "--results-dir", str(tmp_path), "--tag", "_est", "--estimate", "3"])
    est = out["estimate"]
    assert len(est["pairs"]) == 3 * 7 and {r["kind"] for r in est["by_kind"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for _, exact, ests in est["pairs"]:
        assert 0 <= exact <= 1 + 1e-12 and len(ests) == 3 and all(0 <= e <= 1 + 1e-12 for e in ests)
    for r in est["by_kind"]:
        assert 0 <= r["agreement"] <= 1 and r["abs_error"] >= 0
    assert "| matrix | pairs | exact share (mean) |" in (tmp_path / "subspace_noise_est.md").read_text()
