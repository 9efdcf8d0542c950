"""``galore-plus finetune --config FILE``: options from a YAML or JSON file, and the ``config.yaml`` each
run writes (DESIGN.md, "Config files").

A file holds a mapping of ``FinetuneConfig``'s fields (``max_steps`` or the flag's spelling
``max-steps``; ``8bit`` for ``eightbit``) to values as YAML/JSON types (``lr: 1e-4`` — PyYAML reads
that as text, which is read as the command line reads it); options given on the command line
override the file's. A run's ``config.yaml`` (its resolved options), ``run.json``, or the run's
directory (its ``run.json``; else its ``config.yaml``) are accepted too: a run record's options that
predate the run take their ``LEGACY_VALUES``, as at ``--resume``, and its ``overwrite`` is left out
(repeating a run never deletes one unless ``--overwrite`` is given). Files are read with
``yaml.safe_load`` / ``json``, which build plain data only. Every problem is one line naming the
file (and the key).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from .checks import check_types
from .config import LEGACY_VALUES, FinetuneConfig, flag
from .errors import ConfigError

__all__ = ["CONFIG_FILE", "read_config_file", "with_file", "write_config_file"]

#: the resolved options a run writes in its output directory (beside ``run.json``)
CONFIG_FILE = "config.yaml"
RUN_RECORD = "run.json"  # checkpoint.RUN, named here so that reading a file imports no torch
SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options in ``path`` (a ``.yaml``/``.yml``/``.json`` file, a run's ``run.json`` or a run
    directory) as ``{field: value}``, each of its field's type; :class:`ConfigError` (one line naming
    the file) for a file that cannot be read, is not a mapping, or has an unknown key or a value of a
    wrong type."""
    path = Path(path)
    record = False
    if path.is_dir():
        found = [path / name for name in (RUN_RECORD, CONFIG_FILE) if (path / name).is_file()]
        if not found:
            raise ConfigError(f"--config {path}: a directory without {RUN_RECORD} or {CONFIG_FILE} (not a run's)")
        path = found[0]
    elif not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    elif path.suffix not in SUFFIXES:
        raise ConfigError(f"--config {path}: give a .yaml, .yml or .json file, or a run's directory")
    values = _parse(path)
    if path.name == RUN_RECORD and isinstance(values, dict) and "format" in values:  # a run's record
        if not isinstance(values.get("config"), dict):
            raise ConfigError(f"--config {path}: its 'config' is not a mapping of options")
        values, record = values["config"], True
    if values is None:  # an empty file: no options
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: holds a {type(values).__name__}, not a mapping of options "
                          "(option: value, one a line)")
    values = _named(values, path)
    if record:
        values = {**{k: v for k, v in LEGACY_VALUES.items() if k not in values}, **values}
        values.pop("overwrite", None)
    return {name: _typed(name, value, path) for name, value in values.items()}


def with_file(path: str | os.PathLike, given: dict[str, Any]) -> dict[str, Any]:
    """The options of file ``path`` with those ``given`` on the command line over them. A flag of a
    group of alternatives (``--epochs`` / ``--max-steps``, ``--refreshes`` / ``--update-proj-gap``,
    ``--warmup-ratio`` / ``--warmup-steps``) replaces the file's alternative too."""
    values = read_config_file(path)
    for name in given:
        group = FinetuneConfig.__dataclass_fields__[name].metadata["group"]
        if group:
            for f in fields(FinetuneConfig):
                if f.metadata["group"] == group and f.name != name:
                    values.pop(f.name, None)
    if "epochs" in given and "max_steps" not in given:
        values["max_steps"] = None  # the length given replaces the file's and the default
    return {**values, **given}


def write_config_file(out: Path, config: FinetuneConfig) -> Path:
    """``out/config.yaml``: ``config`` (the run's resolved options, ``overwrite`` off) as YAML in field
    order, written atomically; ``--config`` reads it back to the same config."""
    import yaml

    values = {**dataclasses.asdict(config), "overwrite": False}
    text = ("# galore-plus finetune: the resolved options of this run; repeat it with\n"
            "#   galore-plus finetune --config THIS_FILE --output-dir NEW_DIR\n"
            + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False))
    path = out / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- reading


def _parse(path: Path) -> Any:
    """The file's data: JSON for ``.json`` (and ``run.json``), else YAML with ``yaml.safe_load`` (plain
    data only: no Python objects); a syntax error is ``FILE:LINE: problem``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot be read ({err})") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {path}:{err.lineno}: not JSON: {err.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {path}{where}: not YAML: {problem}") from None


def _named(values: dict[Any, Any], path: Path) -> dict[str, Any]:
    """``values`` keyed by field names: a key is a field's name or its flag without the dashes; an
    unknown key, or one option given twice (``max_steps`` and ``max-steps``), is refused."""
    names = {}
    for f in fields(FinetuneConfig):
        names[f.name] = names[flag(f.name).removeprefix("--")] = f.name
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = names.get(key) if isinstance(key, str) else None
        if name is None:
            raise ConfigError(f"--config {path}: unknown key {key!r}; the keys are the options' names: "
                              f"{', '.join(f.name for f in fields(FinetuneConfig))}")
        if name in out:
            raise ConfigError(f"--config {path}: {name!r} is given twice (as {name!r} and "
                              f"{flag(name).removeprefix('--')!r}); keep one")
        out[name] = value
    return out


def _typed(name: str, value: Any, path: Path) -> Any:
    """``value`` as field ``name`` takes it: text for a number is read as the command line reads it
    (``1e-4``, ``0.5``, ``full``), a list for ``target_modules`` is its items joined by commas; a value
    of another type, or not among the field's choices, raises :class:`ConfigError` naming file and key."""
    from .arguments import _reader

    hints = typing.get_type_hints(FinetuneConfig)
    kinds = [k for k in typing.get_args(hints[name]) if k is not type(None)] or [hints[name]]
    if name == "target_modules" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(value, str) and str not in kinds and bool not in kinds:
        try:
            value = _reader(name, FinetuneConfig)(value)
        except (TypeError, ValueError):
            pass  # check_types names it below
    try:
        check_types(dataclasses.replace(FinetuneConfig(), **{name: value}))
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {name}: {err}") from None
    except TypeError:  # an unhashable value in a comparison
        raise ConfigError(f"--config {path}: {name}: {value!r} is not a {kinds[0].__name__}") from None
    choices = FinetuneConfig.__dataclass_fields__[name].metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"--config {path}: {name}: {value!r} is not one of {', '.join(choices)}")
    return value
