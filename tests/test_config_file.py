"""``galore-plus finetune --config FILE``: a YAML/JSON file gives the same config as the same flags (and a
tiny run from each computes the same), flags override it, a run's ``config.yaml`` / ``run.json`` /
directory is read back to the run's config, and a bad file is one line naming the file and the key,
before anything loads."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from galore_plus.app import checkpoint, models
from galore_plus.app.cli import parse_config
from galore_plus.app.config import LEGACY_VALUES, FinetuneConfig
from galore_plus.app.validation import validated
from galore_plus.app.configfile import read_config_file
from galore_plus.app.errors import ConfigError
from galore_plus.app.outputs import OUTPUTS
from test_cli import TINY, argv, assert_same_weights, run_main

OPTIONS = dict(TINY, method="galore", rank=8, lr=3e-4, eval_before=False, seed=3)


@pytest.fixture
def no_model_load(monkeypatch):
    """A bad file is refused before any weight loads."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_yaml_file_is_the_same_config_as_the_same_flags(tmp_path):
    out = str(tmp_path / "run")
    from_flags, _ = parse_config(["finetune", *argv(**OPTIONS), "--output-dir", out])
    values = {**OPTIONS, "output_dir": out}
    yaml_file = write(tmp_path / "run.yaml", yaml.safe_dump(values))
    assert parse_config(["finetune", "--config", str(yaml_file)])[0] == from_flags
    json_file = write(tmp_path / "run.json", json.dumps(values))  # a JSON file named like a run's record, too
    assert parse_config(["finetune", "--config", str(json_file)])[0] == from_flags
    # the flags' spelling, YAML's text for 3e-4 (PyYAML reads "3e-4" as a string) and "8bit" for eightbit
    dashed = "\n".join(f"{k.replace('_', '-')}: {v}" for k, v in values.items() if k != "lr") + "\nlr: 3e-4\n8bit: true\n"
    assert yaml.safe_load(dashed)["lr"] == "3e-4"
    assert parse_config(["finetune", "--config", str(write(tmp_path / "d.yml", dashed))])[0] == dataclasses.replace(
        from_flags, eightbit=True)


def test_flags_override_the_file_and_replace_its_alternative(tmp_path):
    path = write(tmp_path / "c.yaml", yaml.safe_dump({**OPTIONS, "output_dir": str(tmp_path / "a"),
                                                        "warmup_steps": 3, "update_proj_gap": 7}))
    config, _ = parse_config(["finetune", "--config", str(path), "--rank", "4", "--output-dir", str(tmp_path / "b")])
    assert (config.rank, config.output_dir, config.method, config.lr) == (4, str(tmp_path / "b"), "galore", 3e-4)
    # a flag of a group of alternatives replaces the file's alternative
    config, _ = parse_config(["finetune", "--config", str(path), "--epochs", "2", "--refreshes", "2",
                              "--warmup-ratio", "0.5"])
    assert (config.epochs, config.max_steps) == (2.0, None)
    assert (config.refreshes, config.update_proj_gap) == (2, FinetuneConfig.update_proj_gap)
    assert (config.warmup_ratio, config.warmup_steps) == (0.5, FinetuneConfig.warmup_steps)
    # the file's own length by epochs
    path = write(tmp_path / "e.yaml", "model: tiny\nepochs: 1.5\n")
    assert parse_config(["finetune", "--config", str(path)])[0].max_steps is None
    assert parse_config(["finetune", "--config", str(path), "--max-steps", "3"])[0].epochs is None


def test_a_run_from_a_yaml_file_equals_the_run_from_flags(tmp_path, capsys):
    """The acceptance test: same metrics, same weights; the run's config.yaml is its resolved config,
    and it (or the run's directory, or its run.json) gives that config back."""
    options = dict(OPTIONS, max_steps=3, n_test=2, eval_before=True)
    a, b = tmp_path / "flags", tmp_path / "yaml"
    assert run_main(capsys, ["finetune", *argv(**options), "--output-dir", str(a)])[0] == 0
    path = write(tmp_path / "run.yaml", yaml.safe_dump({**options, "output_dir": str(b)}))
    assert run_main(capsys, ["finetune", "--config", str(path)])[0] == 0
    assert_same_weights(a, b)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (a, b)]
    for key in ("eval_before", "eval_after"):
        assert metrics[0][key] == metrics[1][key]
    assert [m["config"] for m in metrics] == [dataclasses.asdict(dataclasses.replace(
        validated(FinetuneConfig(**options, output_dir=str(d))))) for d in (a, b)]
    # config.yaml: the resolved options, read back to the same config
    run_config = checkpoint.saved_config(a)
    for source in (a / "config.yaml", a, a / "run.json"):
        assert parse_config(["finetune", "--config", str(source)])[0] == run_config, source
    # output_dir from it can be overridden, and a third run from a's config.yaml computes a's
    c = tmp_path / "again"
    assert run_main(capsys, ["finetune", "--config", str(a / "config.yaml"), "--output-dir", str(c)])[0] == 0
    assert_same_weights(a, c)


def test_the_written_config_yaml_round_trips_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    options = dict(OPTIONS, max_steps=2, n_test=2, eval_before=False, generate=False, rank="full",
                   target_modules="q_proj,.*mlp\\.(up|down)_proj", lr_scheduler="linear", warmup_ratio=0.25,
                   overwrite=True, warmup_steps=FinetuneConfig.warmup_steps)
    config = validated(FinetuneConfig(**options, output_dir=str(out)))
    assert run_main(capsys, ["finetune", "--config", str(write(tmp_path / "c.yaml", yaml.safe_dump(
        {**options, "output_dir": str(out)})))])[0] == 0
    text = (out / "config.yaml").read_text()
    assert text.startswith("# galore-plus finetune: the resolved options")
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(FinetuneConfig)]  # field order
    # the run's config, with overwrite off: repeating a run never deletes one unless asked
    assert read_config_file(out / "config.yaml") == {**dataclasses.asdict(config), "overwrite": False}
    for source in (out, out / "run.json"):
        values = read_config_file(source)
        assert "overwrite" not in values and {**values, "overwrite": True} == dataclasses.asdict(config)
    # a run's own directory given back without a new --output-dir is refused: it holds that run
    code, err = run_main(capsys, ["finetune", "--config", str(out)])
    assert code == 2 and re.fullmatch(r"galore-plus: --output-dir .*run already holds a run \(.*\).*\n", err), err


def test_config_yaml_is_a_file_of_the_run(tmp_path, capsys):
    """config.yaml is the run's: a directory holding one holds a run, ``--overwrite`` replaces it, and a
    resumed run rewrites it with its (extended) options."""
    assert "config.yaml" in OUTPUTS
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: tiny\n")
    base = ["finetune", *argv(**dict(OPTIONS, max_steps=2, n_test=2, generate=False)), "--output-dir", str(out)]
    code, err = run_main(capsys, base)
    assert code == 2 and "already holds a run (config.yaml)" in err
    assert run_main(capsys, [*base, "--overwrite"])[0] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2
    assert run_main(capsys, ["finetune", "--resume", str(out), "--max-steps", "3"])[0] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 3
    # beside --resume, a file is options given: the run's own agree with it, others are refused
    assert parse_config(["finetune", "--resume", str(out), "--config", str(out / "config.yaml")]) == (
        checkpoint.saved_config(out), str(out))
    other = write(tmp_path / "other.yaml", "model: tiny\nrank: 2\n")
    with pytest.raises(ConfigError, match=r"--resume .*: a resumed run keeps its options, and --rank 2 \(the run's is 8\)"):
        parse_config(["finetune", "--resume", str(out), "--config", str(other)])


def test_a_run_record_without_newer_options_takes_their_legacy_values(tmp_path):
    old = {k: v for k, v in dataclasses.asdict(FinetuneConfig(model="tiny")).items() if k not in LEGACY_VALUES}
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "config": old, "data_sha256": None}))
    values = read_config_file(tmp_path)
    assert all(values[k] == v for k, v in LEGACY_VALUES.items())
    # a user's file without them takes the defaults
    path = write(tmp_path / "mine.yaml", "model: tiny\n")
    assert parse_config(["finetune", "--config", str(path)])[0] == validated(FinetuneConfig(model="tiny"))


BAD_FILES = [
    # every option by name, in the dataclass's order (whichever field comes last)
    ("c.yaml", "model: tiny\nrnak: 3\n", r"--config {f}: unknown key 'rnak'; the keys are the options' names: "
                                         + ", ".join(re.escape(f.name) for f in dataclasses.fields(FinetuneConfig))),
    ("c.yaml", "rank: abc\n", r"--config {f}: rank: rank='abc' must be an int or a float or 'full'"),
    ("c.yaml", "max_steps: 2.5\n", r"--config {f}: max_steps: max_steps=2.5 must be an int or None"),
    ("c.yaml", "eval_before: maybe\n", r"--config {f}: eval_before: eval_before='maybe' must be a bool"),
    ("c.yaml", "model: [tiny]\n", r"--config {f}: model: model=\['tiny'\] must be a str"),
    ("c.yaml", "method: sgd\n", r"--config {f}: method: 'sgd' is not one of galore\+, galore, adamw, .*"),
    ("c.yaml", "max_steps: 2\nmax-steps: 3\n", r"--config {f}: 'max_steps' is given twice \(as 'max_steps' and "
                                               r"'max-steps'\); keep one"),
    ("c.yaml", "model: tiny\n  rank: 3\n", r"--config {f}:2: not YAML: mapping values are not allowed here"),
    ("c.yaml", "- model\n- tiny\n", r"--config {f}: holds a list, not a mapping of options .*"),
    ("c.yaml", "model: !!python/object/apply:os.system ['echo hi']\n", r"--config {f}:1: not YAML: .*"),
    ("c.json", '{"model": "tiny",}', r"--config {f}:1: not JSON: Expecting property name .*"),
    ("c.toml", "model = 'tiny'\n", r"--config {f}: give a .yaml, .yml or .json file, or a run's directory"),
    ("missing.yaml", None, r"--config {f}: no such file"),
    ("empty", "", r"--config {f}: a directory without run.json or config.yaml \(not a run's\)"),
    ("run.json", '{"format": 1, "config": 3}', r"--config {f}: its 'config' is not a mapping of options"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES, ids=[m[:40] for _, _, m in BAD_FILES])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, no_model_load, name, text, message):
    path = tmp_path / name
    if name == "empty":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    code, err = run_main(capsys, ["finetune", "--config", str(path), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert re.fullmatch(f"galore-plus: {message.format(f=re.escape(str(path)))}\n", err), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        read_config_file(path)


def test_the_readmes_yaml_example_is_a_valid_config(tmp_path):
    """README's complete example reads to the config its comments say (its model and data replaced by
    ones that exist here)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    path = write(tmp_path / "run.yaml", example)
    values = read_config_file(path)
    assert (values["lr"], values["eightbit"], values["eval_data"]) == (1e-5, True, "my-test.jsonl")
    assert values["target_modules"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    data = write(tmp_path / "mine.jsonl", "".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                                                  for i in range(10)))
    config, _ = parse_config(["finetune", "--config", str(path), "--model", "tiny", "--data", str(data),
                              "--eval-data", str(data), "--output-dir", str(tmp_path / "out")])
    assert (config.method, config.rank, config.epochs, config.max_steps, config.warmup_ratio) == (
        "galore+", 128, 1.0, None, 0.03)
