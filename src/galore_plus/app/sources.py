"""What ``--data`` names when it is not a built-in task: one or several data files, glob patterns and
directories saved by ``datasets``' ``save_to_disk``, expanded in order (:func:`expand`); which of a
saved ``DatasetDict``'s splits evaluates (:func:`eval_split`); and the one sha256 a run records for
all of them (:func:`sha256`), which a resumed run must find again (DESIGN.md, "Data sources")."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

from .examples import DataError

__all__ = ["EVAL_SPLITS", "entries", "expand", "is_saved_dataset", "dataset_splits", "eval_split", "sha256"]

EVAL_SPLITS = ("test", "validation")
"""A saved ``DatasetDict``'s splits that evaluate, in order of preference; training reads ``train``."""

_GLOB_CHARACTERS = "*?["
_DATASET_DICT = "dataset_dict.json"  # datasets.config.DATASETDICT_JSON_FILENAME
_DATASET = ("state.json", "dataset_info.json")  # DATASET_STATE_JSON_FILENAME, DATASET_INFO_FILENAME


def entries(data: Any) -> list[str]:
    """``data``'s entries as given: a list's, or the one string or path."""
    return [os.fspath(d) for d in data] if isinstance(data, (list, tuple)) else [os.fspath(data)]


def expand(data: Any) -> list[str]:
    """The paths ``data`` names, in the order given: an entry that exists is itself; one that does not
    and holds ``*``, ``?`` or ``[`` is a glob pattern (``**`` spans directories) and gives the paths
    it matches, sorted. A pattern that matches nothing, and a path named twice, are errors. Checks
    nothing else (``tasks.check_source`` does)."""
    paths: list[str] = []
    named: dict[str, str] = {}
    for entry in entries(data):
        if not os.path.exists(entry) and any(c in entry for c in _GLOB_CHARACTERS):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"{entry!r} matches no file")
        else:
            matches = [entry]
        for path in matches:
            key = os.path.realpath(path)
            if key in named:
                how = "" if named[key] == entry == path else f" (by {named[key]!r} and by {entry!r})"
                raise DataError(f"{path!r} is named twice{how}; name each data file once")
            named[key] = entry
            paths.append(path)
    return paths


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (what
    ``datasets.load_from_disk`` reads)."""
    return os.path.isfile(os.path.join(path, _DATASET_DICT)) or all(
        os.path.isfile(os.path.join(path, name)) for name in _DATASET)


def dataset_splits(path: str) -> list[str] | None:
    """A saved ``DatasetDict``'s split names (from its ``dataset_dict.json``, without loading it);
    None for anything else."""
    file = os.path.join(path, _DATASET_DICT)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            splits = json.load(f)["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{file}: not a DatasetDict's list of splits ({type(err).__name__}: {err})") from None
    return [str(split) for split in splits]


def eval_split(path: str) -> str | None:
    """The split of a saved ``DatasetDict`` that evaluates: the first of :data:`EVAL_SPLITS` it has;
    None for a ``Dataset`` or a file, or a ``DatasetDict`` with neither."""
    return next((split for split in EVAL_SPLITS if split in (dataset_splits(path) or ())), None)


def sha256(data: Any) -> str:
    """One digest of everything ``data`` names, in its order: a single file's own sha256 (what runs
    recorded before several sources were possible, so that they resume), else the sha256 of the
    sources' digests in order (a directory's: of its files' relative paths and digests, sorted)."""
    paths = expand(data)
    if len(paths) == 1 and os.path.isfile(paths[0]):
        return _file_sha256(paths[0])
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{_tree_sha256(path) if os.path.isdir(path) else _file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tree_sha256(directory: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, directory)}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()
