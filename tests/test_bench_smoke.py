"""CI smoke test of the benchmark scripts: each runs end to end in its fastest mode and writes
well-formed JSON and Markdown. No timing is asserted (the numbers are machine noise at these sizes).

The three scripts run concurrently, as subprocesses (their imports — torch, bitsandbytes,
transformers — dominate the wall time, and a script may patch or set process-wide state)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a loaded 2-core machine: imports alone can take a minute

PEERS = ["torch AdamW", "bnb AdamW8bit", "galore-torch", "APOLLO", "ours GaLore", "GaLore+", "GaLore+ 8-bit"]

SCRIPTS = {
    "step_time": ["bench/step_time.py", "--smoke"],
    "refresh_time": ["bench/refresh_time.py", "--smoke"],
    "peak_memory": ["bench/peak_memory.py", "--smoke", "--configs", "adamw,ours_galore_plus_8bit_layerwise"],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run every script once (concurrently) into its own tmp dir; return name -> out dir."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in SCRIPTS}
    procs = {name: subprocess.Popen([sys.executable, *args, "--out", str(dirs[name])], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in SCRIPTS.items()}
    failures = []
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failures.append(f"{name}: timed out after {TIMEOUT} s\n{out[-3000:]}")
            continue
        if proc.returncode != 0:
            failures.append(f"{name}: exit code {proc.returncode}\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)
    return dirs


def _load(out_dir: Path, stem: str) -> tuple[dict, str]:
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    assert json_path.is_file() and md_path.is_file(), sorted(p.name for p in out_dir.iterdir())
    return json.loads(json_path.read_text()), md_path.read_text()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _table_rows(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) >= 3, md
    assert set(rows[1].replace("|", "")) <= set("-"), rows[1]
    width = rows[0].count("|")
    assert all(row.count("|") == width for row in rows), md
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_step_time_smoke(outputs):
    result, md = _load(outputs["step_time"], "step_time")
    assert result["config"]["mode"] == "smoke"
    assert len(result["machine"]["load_avg_start"]) == 3 and "command" in result
    assert set(result["results"]) == set(PEERS)
    for name, r in result["results"].items():
        assert len(r["steady_seconds_all"]) == result["config"]["steady_steps"], name
        for key in ("steady_seconds", "amortized_seconds", "state_bytes", "state_bytes_per_element"):
            assert _positive(r[key]), (name, key, r[key])
        assert r["state_storage_bytes"] >= r["state_bytes"], name
        if name in ("torch AdamW", "bnb AdamW8bit"):
            assert r["refresh_step_seconds"] is None
        else:
            assert _positive(r["refresh_step_seconds"]) and _positive(r["projector_seconds"]), name
            assert r["projector_calls"] == 7, name  # one projector per matrix of the layer
    results = result["results"]
    # Exact byte counts: AdamW holds two float32 moments (+ a 4-byte step tensor per parameter); the
    # generic count agrees with galore_plus.state_bytes for our optimizers.
    numel = result["config"]["layer_elements"]
    assert results["torch AdamW"]["state_bytes"] == 8 * numel + 7 * 4
    for name in ("ours GaLore", "GaLore+", "GaLore+ 8-bit"):
        assert results[name]["state_bytes"] == results[name]["state_bytes_galore_plus_count"], name
    for name in ("APOLLO", "GaLore+", "GaLore+ 8-bit"):
        assert _positive(results[name]["later_refresh_step_seconds"]), name
    assert set(result["targets"]) == {"refresh_40x_faster_than_galore_torch", "steady_no_slower_than_galore_torch",
                                      "amortized_within_1.5x_apollo"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    rows = _table_rows(md)
    assert [row[0] for row in rows] == PEERS
    assert md.count("**met**") + md.count("**missed**") == 3


def test_refresh_time_smoke(outputs):
    result, md = _load(outputs["refresh_time"], "refresh_time")
    assert result["machine"]["mode"] == "smoke"
    methods = ["galore-torch", "ours exact", "ours randomized", "GaLore+", "cross-head exact"]
    assert set(result["seconds"]) == set(methods)
    assert len(result["seconds"]["galore-torch"]) == 7 and set(result["seconds"]["cross-head exact"]) == {"q", "k"}
    for method in methods:
        assert _positive(result["layer_total_seconds"][method]), method
        for name, energy in result["energy_vs_exact"][method].items():
            assert 0.5 < energy <= 1.0 + 1e-4, (method, name, energy)
    assert len(_table_rows(md)) == 8  # 7 matrices + the layer total
    assert "Target GaLore+ ≥ 40×" in md


def test_peak_memory_smoke(outputs):
    result, md = _load(outputs["peak_memory"], "peak_memory")
    assert result["meta"]["mode"] == "smoke"
    by = {r["config"]: r for r in result["results"]}
    assert set(by) == {"adamw", "ours_galore_plus_8bit_layerwise"}
    for config, r in by.items():
        assert "error" not in r, (config, r.get("error"))
        assert _positive(r["peak"]) and r["peak"] >= r["rss_before"] > 0, config
        assert math.isfinite(r["loss"]), config
    assert by["ours_galore_plus_8bit_layerwise"]["optimizer"] == "GaLoreAdamW8bit"
    assert [row[0] for row in _table_rows(md)] == ["adamw", "ours_galore_plus_8bit_layerwise"]
    assert "peak ≤ 0.35× adamw" in md
