"""What ``--data`` names, made a :class:`~galore_plus.app.examples.Task`: :func:`check_source`
says whether a source is usable without reading it; :func:`load_task` loads a built-in task
(:mod:`galore_plus.app.builtin_tasks`) or data files (:mod:`galore_plus.app.formats`; several,
glob patterns and saved ``datasets`` directories: :mod:`galore_plus.app.sources`) and splits them
into training, validation and held-out examples (the files' held-out share is :func:`eval_count`;
``eval_data`` gives a separate evaluation file instead, :func:`eval_examples`, and a saved
``DatasetDict``'s test split does so too)."""

from __future__ import annotations

import dataclasses
import math
import os
import random
from typing import Any

from . import sources
from .builtin_tasks import TASKS, _arithmetic, _gsm_symbolic
from .examples import MAX_LISTED_ERRORS, DataError, Example, Task
from .formats import _FORM_LIST, _FORMATS, FILE_TYPES, FORMS, read_examples

__all__ = ["TASKS", "SPLITS", "check_source", "load_task", "eval_count", "eval_examples", "is_real_fraction"]

SPLITS = ("question", "template")


def load_task(data: str | list[str], *, n_train: int, n_test: int, seed: int = 0, split: str = "question",
              eval_data: str | None = None, eval_fraction: float = 0.1, n_validation: int = 0) -> Task:
    """Load ``data`` and split it into at most ``n_train`` training and ``n_test`` test examples.

    ``data``: ``"gsm_symbolic"``, ``"arithmetic"`` (``n_train`` and ``n_test`` generated), or a data
    file's path (:mod:`galore_plus.app.formats`), a directory saved by ``save_to_disk``, a glob
    pattern, or a list of them (:func:`~galore_plus.app.sources.expand`): their examples in order, of
    one form, of which :func:`eval_count` are held out, at most ``n_test`` — or, when a saved
    ``DatasetDict`` has a ``test`` (else ``validation``) split and ``eval_data`` is not given, those
    splits' examples are the test set (a seeded sample of ``n_test``) and its ``train`` split trains. ``split="question"``: no question is in both sets. ``split="template"``
    (gsm_symbolic only): no template is in both; the held-out templates are drawn by ``seed``,
    about ``n_test / (n_train + n_test)`` of them, and items are generated until both sets are
    full. The test set does not depend on ``n_train`` under the question split.

    ``eval_data``: a data file to evaluate on instead (a seeded sample of ``n_test`` when it holds
    more); the training data then holds nothing out.

    ``n_validation``: that many examples of the training side are held out as ``task.validation``
    (for choosing hyperparameters without touching the test set): the first ones the training set
    would have had, whole prompt groups of a file. The test set does not depend on it; the training
    set is the next ``n_train`` (0: exactly the training set without it).
    """
    for name, count in (("n_train", n_train), ("n_test", n_test), ("n_validation", n_validation)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {count!r}")
    if not is_real_fraction(eval_fraction):
        raise ValueError(f"eval_fraction must be a number in [0, 1], got {eval_fraction!r}")
    check_source(data, split)
    data = _one(data)
    if eval_data is not None:
        check_source(eval_data)
        if os.fspath(eval_data) in TASKS:
            raise DataError(f"eval_data must be a data file, not the task {eval_data!r}")
    held = 0 if eval_data is not None else n_test
    if data == "gsm_symbolic":
        task = _gsm_symbolic(n_train + n_validation, held, seed, split, n_train)
    elif data == "arithmetic":
        task = _arithmetic(n_train + n_validation, held, seed)
    else:
        task = _file_task(data, n_train + n_validation, n_test, seed, 0.0 if eval_data is not None else eval_fraction,
                          eval_splits=eval_data is None)
    if n_validation:
        task = _hold_validation(task, n_train, n_validation, data)
    return task if eval_data is None else _eval_file(task, os.fspath(eval_data), n_test, seed)


def _hold_validation(task: Task, n_train: int, n_validation: int, data: str) -> Task:
    """``task`` with the head of its training set (whole prompt groups, at least ``n_validation``
    examples' worth, cut to that many) as its validation set and the next ``n_train`` as its training set."""
    keys = [(ex.context, ex.prompt) for ex in task.train]
    cut = min(n_validation, len(keys))
    while 0 < cut < len(keys) and keys[cut] == keys[cut - 1]:  # a prompt group stays on one side
        cut += 1
    validation, train = task.train[:cut][:n_validation], task.train[cut:][:n_train]
    if n_train > 0 and not train:
        raise DataError(f"{data}: {len(task.train)} training examples leave none for training after holding out "
                        f"{n_validation} for validation")
    return dataclasses.replace(task, train=train, validation=validation,
                               info=dict(task.info, n_validation=len(validation)))


def is_real_fraction(value: Any) -> bool:
    """A number in ``[0, 1]``: a held-out fraction (1: as many as ``n_test`` allows)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _one(data: str | list[str]) -> str | list[str]:
    """``data`` with a list of one entry made that entry (``--data FILE`` is a list of one)."""
    if isinstance(data, (list, tuple)):
        return os.fspath(data[0]) if len(data) == 1 else [os.fspath(d) for d in data]
    return os.fspath(data)


def check_source(data: str | list[str], split: str = "question") -> None:
    """Raise :class:`DataError` unless ``data`` names a task, or data files (:data:`FILE_TYPES`) and
    directories saved by ``save_to_disk`` that exist (several: a list; glob patterns expanded,
    :func:`~galore_plus.app.sources.expand`), and ``split`` suits it; reads nothing (the command calls
    it before anything slow)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(data, (list, tuple)):
        if not data:
            raise DataError("names no data file (an empty list)")
        wrong = [d for d in data if not isinstance(d, (str, os.PathLike))]
        if wrong:
            raise DataError(f"a list of data files holds {wrong[0]!r}, not a path")
    elif not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a string or path, got {type(data).__name__}")
    data = _one(data)
    if split == "template" and data != "gsm_symbolic":
        raise DataError(f"split 'template' needs data 'gsm_symbolic' (the only source with templates), got {data!r}")
    if isinstance(data, str) and data in TASKS:
        return
    for entry in sources.entries(data):
        if entry in TASKS:
            raise DataError(f"the task {entry!r} cannot be combined with data files; give it alone")
    for path in sources.expand(data):
        _check_path(path)


def _check_path(data: str) -> None:
    forms = f"use {' or '.join(TASKS)}, or {_FORMATS} of records with {_FORM_LIST}"
    if os.path.isdir(data):
        if sources.is_saved_dataset(data):
            return
        raise DataError(f"{data!r} is a directory; {forms}; a directory must be one saved by datasets' save_to_disk")
    if os.path.splitext(data)[1].lower() in FILE_TYPES:
        if not os.path.isfile(data):
            raise DataError(f"{data!r}: no such file")
        return
    if os.path.exists(data):
        raise DataError(f"{data!r} is not {_FORMATS}; {forms}")
    raise DataError(f"{data!r} is neither a task nor a file; {forms}")


def eval_count(n_examples: int, n_groups: int, n_test: int, fraction: float) -> int:
    """How many of a file's ``n_examples`` are held out: ``fraction`` of them (rounded up), at most
    ``n_test``, and never all of them (one prompt group at least stays for training: a file of one
    prompt holds nothing out)."""
    if fraction <= 0 or n_groups < 2:
        return 0
    return min(n_test, math.ceil(fraction * n_examples), n_examples - 1)


def _file_task(data: str | list[str], n_train: int, n_test: int, seed: int, eval_fraction: float,
               eval_splits: bool = True) -> Task:
    """Split by ``seed``: :func:`eval_count` examples are held out, the rest train (at most ``n_train``).

    Examples with the same prompt (a text-to-text file may hold several references per input, a chat
    file several conversations with the same last question) stay on one side: whole prompts are drawn
    for the held-out set until it is full; the surplus of the last drawn prompt is dropped rather than
    put into train. ``eval_splits``: saved ``DatasetDict`` test splits, when there are any, are the
    held-out set instead (:func:`_read_sources`).
    """
    paths = sources.expand(data)
    kind, form, examples, held = _read_sources(paths, eval_splits)
    if held:
        eval_fraction = 0.0
    groups: dict[Any, list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.context, ex.prompt), []).append(ex)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_held = eval_count(len(examples), len(keys), n_test, eval_fraction)
    test: list[Example] = []
    drawn = 0
    while len(test) < n_held:
        test.extend(groups[keys[drawn]])
        drawn += 1
    test = test[:n_held]
    train = [ex for key in keys[drawn:] for ex in groups[key]][:n_train]
    shown = paths[0] if len(paths) == 1 else f"{len(paths)} sources ({', '.join(paths[:3])}{', ...' * (len(paths) > 3)})"
    if n_train > 0 and not train:
        raise DataError(f"{shown}: {len(examples)} examples leave none for training after holding out {n_held}")
    stems = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for p in paths]
    name = "+".join(stems) if len(stems) <= 3 else f"{stems[0]}+{len(stems) - 1} more"
    info = {"split": "question", "seed": seed, "source": shown, "n_file": len(examples), "form": form,
            "form_name": FORMS[form][0]}
    if len(paths) > 1:
        info["sources"] = paths
    task = Task(name=name, kind=kind, train=train, test=test, info=info)
    if held:
        eval_kind, eval_form, names, test = held
        if len(test) > n_test:
            test = random.Random(seed).sample(test, n_test)
        info.update(eval_source=", ".join(names), eval_form=eval_form, eval_form_name=FORMS[eval_form][0])
        task = dataclasses.replace(task, kind=eval_kind, test=test)
    return task


def _read_sources(paths: list[str], eval_splits: bool) -> tuple[str, str, list[Example], tuple | None]:
    """``(kind, form, examples, held)`` of data files and saved datasets, read whole and in order
    (a ``DatasetDict``'s ``train`` split): every file's problems are reported together; their records
    must all be of one form (an error names the file that differs). ``held``: with ``eval_splits``,
    ``(kind, form, split directories, examples)`` of the saved ``DatasetDict``'s test (else
    validation) splits, when any has one (:data:`~galore_plus.app.sources.EVAL_SPLITS`), else None."""
    read, held_read, lines = [], [], []
    for path in paths:
        try:
            read.append((path, *read_examples(path)))
            split = sources.eval_split(path) if eval_splits and os.path.isdir(path) else None
            if split is not None:
                held_read.append((os.path.join(path, split), *read_examples(path, split)))
        except DataError as err:
            lines += err.errors
    if not lines:
        lines = _mixed_forms(read) or _mixed_forms(held_read)
    if lines:
        listed = lines[:MAX_LISTED_ERRORS] + ([f"... and {len(lines) - MAX_LISTED_ERRORS} more"]
                                              if len(lines) > MAX_LISTED_ERRORS else [])
        raise DataError("\n".join(listed), lines)
    examples = [ex for _, _, _, found in read for ex in found]
    kind = "math" if all(ex.final is not None for ex in examples) else "text"
    held = None
    if held_read:
        test = [ex for _, _, _, found in held_read for ex in found]
        held = ("math" if all(ex.final is not None for ex in test) else "text", held_read[0][2],
                [path for path, *_ in held_read], test)
    return kind, read[0][2], examples, held


def _mixed_forms(read: list[tuple[str, str, str, list[Example]]]) -> list[str]:
    """A line for each ``(path, kind, form, examples)`` whose form is not the first one's."""
    return [f"{path}: records of the {FORMS[form][0]} form, where {read[0][0]}'s are of the {FORMS[read[0][2]][0]} "
            "form; give data files of one form" for path, _, form, _ in read[1:] if form != read[0][2]]


def eval_examples(path: str, n_test: int, seed: int) -> tuple[str, str, list[Example]]:
    """``(kind, form, examples)`` of an evaluation file: all its examples, or a sample of ``n_test``
    drawn by ``seed`` when it holds more (``finetune --eval-data`` and ``galore-plus evaluate`` draw
    the same). A saved ``DatasetDict``: its test (else validation) split. A glob pattern must match
    one file."""
    paths = sources.expand(path)
    if len(paths) != 1:
        raise DataError(f"{path!r}: an evaluation set is one file or saved dataset, and it matches {len(paths)}")
    path = paths[0]
    split = "train"
    if os.path.isdir(path) and sources.dataset_splits(path) is not None:
        split = sources.eval_split(path)
        if split is None:
            raise DataError(f"{path}: a DatasetDict with neither a 'test' nor a 'validation' split to evaluate on")
    kind, form, examples = read_examples(path, split)
    if len(examples) > n_test:
        examples = random.Random(seed).sample(examples, n_test)
    return kind, form, examples


def _eval_file(task: Task, path: str, n_test: int, seed: int) -> Task:
    """``task`` with its held-out set replaced by :func:`eval_examples` of ``path``; its kind, and so
    the metrics, are the evaluation file's."""
    kind, form, examples = eval_examples(path, n_test, seed)
    info = dict(task.info, eval_source=path, eval_form=form, eval_form_name=FORMS[form][0])
    return dataclasses.replace(task, kind=kind, test=examples, info=info)
