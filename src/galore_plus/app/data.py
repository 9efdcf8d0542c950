"""Fine-tuning data: math word problems, users' own files in the common SFT forms, prompts, token
encodings, batches.

Application layer: nothing here is imported by the optimizers. Three kinds of source, all offline:

- ``"gsm_symbolic"``: reasoning-gym's symbolic GSM8K (~85 templates re-instantiated with new
  numbers); the target is a GSM8K-style worked solution ending in ``#### N``.
- ``"arithmetic"``: reasoning-gym's ``basic_arithmetic`` with 2–3 terms of 1–2 digits, the MAWPS
  analog: the target is the number alone.
- a local ``.jsonl``, ``.json`` (an array of records), ``.parquet`` or ``.csv`` file, read with
  ``datasets``, in one of the :data:`FORMS`: ``question``/``answer`` (GSM8K), ``input``/``output``,
  Alpaca ``instruction``/``input``/``output``, ``prompt``/``completion``, or chat ``messages``
  (role/content, multi-turn). A file's held-out share is :func:`eval_count`; ``eval_data`` gives a
  separate evaluation file instead.

Training encodes the context (the prompt in the tokenizer's chat template, when it has one) and the
response with the loss on the response tokens only (every assistant turn of a conversation);
evaluation (``galore_plus.app.evaluate``) generates from :func:`context_ids`, so generation sees
exactly the tokens training conditioned on.

Quirks of reasoning-gym 0.1.25 handled here (found by generating 15,000 items):

- ``metadata["answer_cot"]`` ends in ``#### 8.0`` for about 4% of gsm_symbolic items whose
  ``answer`` is ``"8"`` (templates that compute with floats). The final line is rewritten to
  ``#### <answer>`` so every target ends in the same string the answer check uses. A few answers
  are not integers (``"9281.25"``, template 27); they are kept.
- Every gsm_symbolic question ends with " Give the result as your final answer. Do not include
  units."; identical questions occur (~1%), so questions are de-duplicated.
- Item ``i`` of a dataset with seed ``s`` is drawn from ``Random(s + i)``: seeds 0 and 1 give the
  same stream shifted by one item. reasoning-gym is therefore given ``seed * 10**7``
  (:data:`SEED_STRIDE`), so different seeds never share items.
- ``basic_arithmetic`` with ``allow_parentheses=False`` is wrong for about 40% of items (it
  evaluates left to right, ignoring precedence, and prints the operand it replaced when it swaps a
  divisor: "4 / 1" with answer 2). The generator with parentheses evaluates the printed expression
  and is right; it is used (without negation), and every answer is re-checked exactly here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
import os
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Iterator, Sequence

import torch

__all__ = [
    "DataError",
    "Example",
    "Task",
    "TASKS",
    "FILE_TYPES",
    "FORMS",
    "check_source",
    "load_task",
    "read_examples",
    "eval_count",
    "eval_examples",
    "build_prompt",
    "prompt_ids",
    "context_ids",
    "encode",
    "collate",
    "normalize_number",
    "NUMBER_RE",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (prompt tokens and padding)."""

TASKS = ("arithmetic", "gsm_symbolic")
"""The built-in sources (generated offline by reasoning-gym); anything else is a data file's path."""
SPLITS = ("question", "template")
SEED_STRIDE = 10**7
"""reasoning-gym seed = ``seed * SEED_STRIDE``: its item ``i`` uses ``Random(seed + i)``, so
consecutive seeds would otherwise share all but one item."""

ARITHMETIC_CONFIG = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, allow_parentheses=True,
                         allow_negation=False, format_style="simple", whitespace="single")
"""The MAWPS analog: 2–3 terms of 1–2 digits, + − × ÷ (exact), some parentheses, no "-(...)"."""


class DataError(ValueError):
    """Bad input data. For files, each line of the message reads ``FILE:LINE: what is wrong``;
    ``errors`` holds them all."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors) or [message]


@dataclass(frozen=True)
class Example:
    """One problem.

    ``prompt``: the question text (before any chat template; a conversation's last user message).
    ``answer``: the text the model must produce (GSM8K form: the worked solution ending in ``#### N``;
    a conversation's last assistant message). ``final``: the number after the answer's final ``#### ``
    (normalised, ``"42"``) when it has one, else ``None``. ``template``: the reasoning-gym template
    index (gsm_symbolic only). ``context``: a conversation's messages before the answer, as
    ``(role, content)`` pairs (earlier assistant turns are trained on too); ``None`` for one turn.
    ``where``: the record's ``FILE:LINE`` (files only), for errors found later (a chat template's).
    """

    prompt: str
    answer: str
    final: str | None = None
    template: int | None = None
    context: tuple[tuple[str, str], ...] | None = None
    where: str | None = field(default=None, compare=False)


@dataclass
class Task:
    """Train and test examples of one data source; ``kind`` is ``"math"`` or ``"text"``.
    ``info`` records how the split was made (e.g. the held-out templates)."""

    name: str
    kind: str
    train: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)
    validation: list[Example] = field(default_factory=list)


# ---------------------------------------------------------------------- numbers

NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
"""A number in running text: optional minus (not after a letter or digit, so "5-3" gives 3),
thousands commas ("1,000"), optional decimals. "42." at the end of a sentence gives 42."""

_FINAL_LINE = re.compile(r"####\s*(?P<number>\S+)\s*$")


MAX_DIGITS = 100
"""Longest number :func:`normalize_number` accepts, in digits written out: ``#### 1e999999`` would
otherwise be expanded to a million digits (72 s of CPU; longer exponents never finish), and a
generated answer of thousands of digits would overflow ``str(int)``."""


def normalize_number(text: str) -> str | None:
    """``"1,000"`` → ``"1000"``, ``"3.0"`` → ``"3"``, ``"2.50"`` → ``"2.5"``, ``"-0"`` → ``"0"``;
    ``None`` if ``text`` is not a number of at most :data:`MAX_DIGITS` digits written out."""
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # digits of the plain form: before the point (at least one) and after it
    _, digits, exponent = value.as_tuple()
    if max(len(digits) + exponent, 1) + max(-exponent, 0) > MAX_DIGITS:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# ---------------------------------------------------------------------- loading

def load_task(data: str, *, n_train: int, n_test: int, seed: int = 0, split: str = "question",
              eval_data: str | None = None, eval_fraction: float = 0.1, n_validation: int = 0) -> Task:
    """Load ``data`` and split it into at most ``n_train`` training and ``n_test`` test examples.

    ``data``: ``"gsm_symbolic"``, ``"arithmetic"`` (``n_train`` and ``n_test`` generated) or a data
    file's path (see the module docstring; :func:`eval_count` of its examples are held out, at most
    ``n_test``). ``split="question"``: no question is in both sets. ``split="template"``
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
    data = os.fspath(data)
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
        task = _file_task(data, n_train + n_validation, n_test, seed, 0.0 if eval_data is not None else eval_fraction)
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


def check_source(data: str, split: str = "question") -> None:
    """Raise :class:`DataError` unless ``data`` names a task or an existing data file
    (:data:`FILE_TYPES`) and ``split`` suits it; reads nothing (the command calls it before anything
    slow)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a string or path, got {type(data).__name__}")
    data = os.fspath(data)
    if split == "template" and data != "gsm_symbolic":
        raise DataError(f"split 'template' needs data 'gsm_symbolic' (the only source with templates), got {data!r}")
    if data in TASKS:
        return
    forms = f"use {' or '.join(TASKS)}, or {_FORMATS} of records with {_FORM_LIST}"
    if os.path.isdir(data):
        raise DataError(f"{data!r} is a directory; {forms}")
    if os.path.splitext(data)[1].lower() in FILE_TYPES:
        if not os.path.isfile(data):
            raise DataError(f"{data!r}: no such file")
        return
    if os.path.exists(data):
        raise DataError(f"{data!r} is not {_FORMATS}; {forms}")
    raise DataError(f"{data!r} is neither a task nor a file; {forms}")


def _generation_budget(n_train: int, n_test: int) -> int:
    """How many items to generate at most before giving up (items are made lazily, ~0.1 ms each)."""
    return 20 * (n_train + n_test) + 2000


def _fill(stream: Iterator[Example], n_train: int, n_test: int, to_test, name: str, budget: int):
    """Take de-duplicated examples from ``stream``; ``to_test(example)`` says which set it may join.
    Test fills first from the head of the stream so it does not depend on ``n_train``."""
    train: list[Example] = []
    test: list[Example] = []
    seen: set[str] = set()
    for count, ex in enumerate(stream, 1):
        if len(train) >= n_train and len(test) >= n_test:
            return train, test
        if count > budget:
            break
        if ex.prompt in seen:
            continue
        target, size = (test, n_test) if to_test(ex) else (train, n_train)
        if len(target) < size:
            seen.add(ex.prompt)
            target.append(ex)
    if len(train) >= n_train and len(test) >= n_test:
        return train, test
    raise DataError(f"{name}: only {len(train)} train and {len(test)} test distinct examples after "
                    f"{budget} items (asked for {n_train} and {n_test})")


def _gsm_example(item: dict, template: int) -> Example | None:
    """The reasoning-gym item as an Example, its solution's last line rewritten to ``#### <answer>``
    (it is sometimes ``#### 8.0`` for answer ``8``); ``None`` if the solution's final number is not
    the answer (never seen, but then the item is unusable)."""
    final = normalize_number(str(item["answer"]))
    cot = item["metadata"]["answer_cot"].rstrip()
    match = _FINAL_LINE.search(cot)
    if final is None or match is None or normalize_number(match["number"]) != final:
        return None
    answer = cot[: match.start()] + f"#### {item['answer']}"
    return Example(prompt=item["question"].strip(), answer=answer, final=final, template=template)


def _gsm_symbolic(n_train: int, n_test: int, seed: int, split: str, n_templates_train: int) -> Task:
    """``n_templates_train``: the training size the template split's share of held-out templates is
    computed from (``n_train`` less the validation examples, so that holding them out leaves it alone)."""
    import reasoning_gym

    budget = _generation_budget(n_train, n_test)
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=budget, seed=seed * SEED_STRIDE)

    def stream():
        for i in range(budget):
            ex = _gsm_example(ds[i], ds.task_indices[i])
            if ex is not None:
                yield ex

    info: dict[str, Any] = {"split": split, "seed": seed, "source": "reasoning_gym gsm_symbolic"}
    if split == "question":
        train, test = _split_stream_head_test(stream(), n_train, n_test, budget, "gsm_symbolic")
    else:
        templates = _gsm_templates(ds)
        shuffled = random.Random(seed).sample(templates, len(templates))
        total = max(n_templates_train + n_test, 1)
        k = min(max(math.ceil(len(templates) * n_test / total), 1), len(templates) - 1)
        held_out = set(shuffled[:k])
        train, test = _fill(stream(), n_train, n_test, lambda ex: ex.template in held_out, "gsm_symbolic", budget)
        info["test_templates"] = sorted(held_out)
        info["train_templates"] = sorted(set(templates) - held_out)
    return Task(name="gsm_symbolic", kind="math", train=train, test=test, info=info)


def _split_stream_head_test(stream: Iterator[Example], n_train: int, n_test: int, budget: int, name: str):
    """The first ``n_test`` distinct questions are the test set, the next ``n_train`` the train set."""
    taken = 0

    def to_test(_):
        nonlocal taken
        taken += 1
        return taken <= n_test

    # _fill only consults to_test for questions not seen before, in stream order.
    return _fill(stream, n_train, n_test, to_test, name, budget)


def _gsm_templates(ds) -> list[int]:
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as module

        return sorted(module.tasks_ok)
    except (ImportError, AttributeError):  # another reasoning-gym layout: the templates it drew
        return sorted(set(ds.task_indices))


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _exact_value(expression: str) -> Fraction | None:
    """Exact value of an arithmetic expression (+ − × ÷, parentheses, unary minus); ``None`` if
    it is anything else or divides by zero."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"unsupported node {ast.dump(node)}")

    try:
        return value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _arithmetic(n_train: int, n_test: int, seed: int) -> Task:
    import reasoning_gym

    budget = _generation_budget(n_train, n_test)
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=budget, seed=seed * SEED_STRIDE, **ARITHMETIC_CONFIG)

    def stream():
        for i in range(budget):
            item = ds[i]
            exact = _exact_value(item["metadata"]["expression"])
            final = normalize_number(str(item["answer"]))
            if exact is None or exact.denominator != 1 or final != str(exact.numerator):
                continue  # reasoning-gym's answer is not the printed expression's value
            yield Example(prompt=item["question"].strip(), answer=final, final=final)

    train, test = _split_stream_head_test(stream(), n_train, n_test, budget, "arithmetic")
    info = {"split": "question", "seed": seed, "source": "reasoning_gym basic_arithmetic", "config": ARITHMETIC_CONFIG}
    return Task(name="arithmetic", kind="math", train=train, test=test, info=info)


# ---------------------------------------------------------------------- data files

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""The data files ``--data`` and ``--eval-data`` take, by extension, and the ``datasets`` builder that reads them."""

#: each form: its name as printed, the keys it needs, the keys it may have, the keys that mark it
FORMS = {
    "gsm8k": ("question/answer (GSM8K: the answer ends in '#### N')", ("question", "answer"), (),
              ("question", "answer")),
    "text": ("input/output", ("input", "output"), (), ("input", "output")),
    "alpaca": ("Alpaca instruction/input/output", ("instruction", "output"), ("input",), ("instruction",)),
    "completion": ("prompt/completion", ("prompt", "completion"), (), ("prompt", "completion")),
    "chat": ("chat messages (role/content)", ("messages",), (), ("messages",)),
}
ROLES = ("system", "user", "assistant")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
_FORM_LIST = ("'question'/'answer' (the answer ending in '#### N'), 'input'/'output', Alpaca 'instruction'/'input'/"
              "'output', 'prompt'/'completion', or chat 'messages' (a list of role/content objects ending with the "
              "assistant's)")
_FORMATS = "a .jsonl, .json, .parquet or .csv file"
_MAX_LISTED_ERRORS = 20


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_examples(path: str) -> tuple[str, str, list[Example]]:
    """Read and check a whole data file; returns ``(kind, form, examples)`` in file order.

    The file is read with ``datasets`` (``load_dataset("json" | "parquet" | "csv")``; CSV cells as
    text). Each record must be in one of :data:`FORMS`, the same form throughout; other keys are
    ignored; blank JSONL lines are skipped. ``kind`` is ``"math"`` for question/answer data and for
    any form whose every answer ends in ``#### N`` (scored by the final number), else ``"text"``.

    Every problem is collected first and raised together as one :class:`DataError` whose lines read
    ``FILE:LINE: what is wrong`` (JSON Lines and CSV: the record's line; a JSON array or Parquet:
    ``FILE:record N``). For JSON, Python's own parser then names the problem where ``datasets``
    (pyarrow) cannot read a file or fills a missing key with null.
    """
    builder = FILE_TYPES[os.path.splitext(path)[1].lower()]
    try:
        rows, failure = _load_rows(path, builder), None
    except _read_errors() as err:
        rows, failure = None, _reason(err)
    records = None
    if rows is not None:
        positions = _positions(path, builder, len(rows))
        if positions is not None:
            records = [(where, {k: v for k, v in row.items() if v is not None}) for where, row in zip(positions, rows)]
    if records is not None:
        try:
            return _examples(path, records)
        except DataError:
            if builder != "json":
                raise
    if builder != "json":
        raise DataError(f"{path}: cannot be read: {failure}")
    # JSON: Python's own parser says which line is wrong (and keeps null apart from a missing key)
    return _examples(path, _parse_json(path))


def _read_errors() -> tuple[type[BaseException], ...]:
    import pyarrow
    from datasets.exceptions import DatasetGenerationError

    return (DatasetGenerationError, pyarrow.ArrowException, ValueError, UnicodeDecodeError, StopIteration, OSError)


def _reason(err: BaseException) -> str:
    """What went wrong reading a file, on one line (the cause ``datasets`` wraps, when there is one)."""
    cause = err.__cause__ or err
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text[:300]


def _load_rows(path: str, builder: str) -> list[dict[str, Any]]:
    """The file's records, read by ``datasets`` into a throw-away cache (nothing is kept or downloaded)."""
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    options: dict[str, Any] = {}
    if builder == "csv":  # every cell as text: "042" stays "042", "NA" and "" stay strings
        header = _csv_header(path)
        options = {"features": datasets.Features({name: datasets.Value("string") for name in header}),
                   "keep_default_na": False}
    # quiet: a file it cannot read is reported by read_examples as FILE:LINE lines, not by its logger
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="galore-plus-data-") as cache:
            dataset = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train",
                                            cache_dir=cache, keep_in_memory=True, **options)
            return dataset.to_list()
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _csv_header(path: str) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError("no header line (a CSV file's first line names its columns)")
    return header


def _positions(path: str, builder: str, count: int) -> list[str] | None:
    """``FILE:LINE`` (JSON Lines, CSV) or ``FILE:record N`` (a JSON array, Parquet) of each of the
    ``count`` records, or None when the file's lines do not match the records one to one."""
    if builder == "parquet":
        return [f"{path}:record {i}" for i in range(1, count + 1)]
    if builder == "csv":
        return _csv_positions(path, count)
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith(b"["):
        return [f"{path}:record {i}" for i in range(1, count + 1)]
    with open(path, "rb") as f:
        lines = [f"{path}:{n}" for n, raw in enumerate(f, 1) if raw.strip()]
    return lines if len(lines) == count else None


def _csv_positions(path: str, count: int) -> list[str] | None:
    import csv

    positions = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        line = reader.line_num
        for row in reader:
            if row:  # datasets (pandas) skips blank lines
                positions.append(f"{path}:{line + 1}")
            line = reader.line_num
    return positions if len(positions) == count else None


class _Unparsed(str):
    """A record that is not JSON: what is wrong with it."""


def _parse_json(path: str) -> list[tuple[str, Any]]:
    """``(where, record)`` of a JSON array file, or of a JSON Lines file line by line (an unparsable
    line's record is :class:`_Unparsed`), read with Python's parser: the diagnosis when ``datasets``
    cannot read the file or a record is wrong. A file that is wrong as a whole raises."""
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip().startswith(b"["):
        try:
            value = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        return [(f"{path}:record {i}", record) for i, record in enumerate(value, 1)]
    if len([line for line in data.splitlines() if line.strip()]) > 1:
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            value = None
        if isinstance(value, dict):
            raise DataError(f"{path}: holds one JSON object; give an array of records, or JSON Lines (one record "
                            "per line)")
    records: list[tuple[str, Any]] = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            records.append((where, _Unparsed(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")))
            continue
        if not line.strip():
            continue
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((where, _Unparsed(f"not valid JSON ({exc.msg} at column {exc.colno})")))
    return records


def _raise(errors: list[str]) -> None:
    listed = errors[:_MAX_LISTED_ERRORS]
    if len(errors) > len(listed):
        listed.append(f"... and {len(errors) - len(listed)} more")
    raise DataError("\n".join(listed), errors)


def _examples(path: str, records: list[tuple[str, Any]]) -> tuple[str, str, list[Example]]:
    """Check ``(where, record)`` pairs: one form throughout, every record well formed."""
    errors: list[str] = []
    examples: list[Example] = []
    form: str | None = None
    form_where = ""
    for where, record in records:
        if isinstance(record, _Unparsed):
            errors.append(f"{where}: {record}")
            continue
        if not isinstance(record, dict):
            errors.append(f"{where}: expected a JSON object, got {_json_type(record)}")
            continue
        record_form, problem = _record_form(record)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        if form is None:
            form, form_where = record_form, where
        elif record_form != form:
            errors.append(f"{where}: a record of the {FORMS[record_form][0]} form in a file whose first record "
                          f"({form_where}) is of the {FORMS[form][0]} form; use one form per file")
            continue
        problem = _record_problem(record, record_form)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        examples.append(_record_example(record, record_form, where))
    if errors:
        _raise(errors)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    kind = "math" if all(ex.final is not None for ex in examples) else "text"
    return kind, form, examples


def _record_form(record: dict) -> tuple[str | None, str | None]:
    present = [name for name, (_, _, _, marks) in FORMS.items() if any(k in record for k in marks)]
    if "alpaca" in present and "text" in present:  # Alpaca's input/output are its own
        present.remove("text")
    if len(present) > 1:
        described = " and ".join(f"{FORMS[name][0]} ({', '.join(repr(k) for k in FORMS[name][3] if k in record)})"
                                 for name in present)
        return None, f"ambiguous: has keys of the {described} forms; use one"
    if not present:
        keys = ", ".join(repr(k) for k in record) or "none"
        return None, f"expected the keys of one form: {_FORM_LIST}; got {keys}"
    (form,) = present
    missing = [k for k in FORMS[form][1] if k not in record]
    if missing:
        return None, f"missing key {missing[0]!r} ({FORMS[form][0]} form)"
    return form, None


def _text_problem(key: str, value: Any, *, empty_ok: bool = False) -> str | None:
    if not isinstance(value, str):
        return f"{key} must be a string, got {_json_type(value)}"
    if not empty_ok and not value.strip():
        return f"{key} is empty"
    try:  # JSON can escape a lone surrogate (\ud800), which no tokenizer can encode
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{key} holds a lone surrogate {value[exc.start]!r} at character {exc.start + 1}, not text"
    return None


def _record_problem(record: dict, form: str) -> str | None:
    if form == "chat":
        return _messages_problem(record["messages"])
    _, needed, optional, _ = FORMS[form]
    for key in needed + tuple(k for k in optional if k in record):
        problem = _text_problem(repr(key), record[key], empty_ok=key in optional)
        if problem:
            return problem
    if form == "gsm8k":
        answer = record["answer"]
        if "####" not in answer:
            return "'answer' has no final '#### N' line"
        if _final_number(answer) is None:
            tail = answer[answer.rindex("####"):].strip()
            return (f"'answer' must end with '#### N', N a number of at most {MAX_DIGITS} digits; "
                    f"it ends with {tail[:40]!r}")
    return None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty array of {{'role', 'content'}} objects, got {_json_type(messages)}"
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return f"message {i} must be an object with 'role' and 'content', got {_json_type(message)}"
        for key in ("role", "content"):
            if key not in message:
                return f"message {i} has no {key!r}"
        if message["role"] not in ROLES:
            return f"message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}"
        if message["role"] == "system" and i > 1:
            return f"message {i}: a system message may only come first"
        problem = _text_problem(f"message {i}'s content", message["content"], empty_ok=message["role"] == "system")
        if problem:
            return problem
    if messages[-1]["role"] != "assistant":
        return f"the last message must be the assistant's (the answer to learn), not the {messages[-1]['role']}'s"
    first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:first_assistant]):
        return "no user message before the first assistant message"
    return None


def _final_number(answer: str) -> str | None:
    match = _FINAL_LINE.search(answer.rstrip())
    return normalize_number(match["number"]) if match else None


def _record_example(record: dict, form: str, where: str) -> Example:
    if form == "chat":
        messages = tuple((m["role"], m["content"].strip() if m["role"] != "system" else m["content"])
                         for m in record["messages"])
        last_user = next(content for role, content in reversed(messages) if role == "user")
        answer = messages[-1][1]
        return Example(prompt=last_user, answer=answer, final=_final_number(answer), context=messages[:-1],
                       where=where)
    if form == "alpaca":
        extra = record.get("input", "").strip()
        prompt = record["instruction"].strip() + (f"\n\n{extra}" if extra else "")
        answer = record["output"].strip()
    else:
        prompt_key, answer_key = FORMS[form][1]
        prompt, answer = record[prompt_key].strip(), record[answer_key].strip()
    return Example(prompt=prompt, answer=answer, final=_final_number(answer), where=where)


def eval_count(n_examples: int, n_groups: int, n_test: int, fraction: float) -> int:
    """How many of a file's ``n_examples`` are held out: ``fraction`` of them (rounded up), at most
    ``n_test``, and never all of them (one prompt group at least stays for training: a file of one
    prompt holds nothing out)."""
    if fraction <= 0 or n_groups < 2:
        return 0
    return min(n_test, math.ceil(fraction * n_examples), n_examples - 1)


def _file_task(path: str, n_train: int, n_test: int, seed: int, eval_fraction: float) -> Task:
    """Split by ``seed``: :func:`eval_count` examples are held out, the rest train (at most ``n_train``).

    Examples with the same prompt (a text-to-text file may hold several references per input, a chat
    file several conversations with the same last question) stay on one side: whole prompts are drawn
    for the held-out set until it is full; the surplus of the last drawn prompt is dropped rather than
    put into train.
    """
    kind, form, examples = read_examples(path)
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
    if n_train > 0 and not train:
        raise DataError(f"{path}: {len(examples)} examples leave none for training after holding out {n_held}")
    name = os.path.splitext(os.path.basename(path))[0]
    info = {"split": "question", "seed": seed, "source": path, "n_file": len(examples), "form": form,
            "form_name": FORMS[form][0]}
    return Task(name=name, kind=kind, train=train, test=test, info=info)


def eval_examples(path: str, n_test: int, seed: int) -> tuple[str, str, list[Example]]:
    """``(kind, form, examples)`` of an evaluation file: all its examples, or a sample of ``n_test``
    drawn by ``seed`` when it holds more (``finetune --eval-data`` and ``galore-plus evaluate`` draw
    the same)."""
    kind, form, examples = read_examples(path)
    if len(examples) > n_test:
        examples = random.Random(seed).sample(examples, n_test)
    return kind, form, examples


def _eval_file(task: Task, path: str, n_test: int, seed: int) -> Task:
    """``task`` with its held-out set replaced by :func:`eval_examples` of ``path``; its kind, and so
    the metrics, are the evaluation file's."""
    kind, form, examples = eval_examples(path, n_test, seed)
    info = dict(task.info, eval_source=path, eval_form=form, eval_form_name=FORMS[form][0])
    return dataclasses.replace(task, kind=kind, test=examples, info=info)


# ---------------------------------------------------------------------- tokens

PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                       "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer: "
                       "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")
"""A conversation for a tokenizer without a chat template, in the plain prompt's words
(:func:`build_prompt`): each user turn is ``Question: ...\\nAnswer: `` and each assistant turn its
text and EOS."""


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, question: str) -> str:
    """The text the model sees before its answer: the tokenizer's chat template with one user
    turn and the generation prompt when it has a template, else ``"Question: {q}\\nAnswer: "``."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer: "


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of :func:`build_prompt`, shared by training and generation.

    A chat template writes its own special tokens (a BOS, if the model wants one), so it is
    tokenized without adding any; the plain prompt gets the tokenizer's usual ones (a BOS for
    LLaMA-style tokenizers).
    """
    text = build_prompt(tokenizer, question)
    return list(tokenizer(text, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"])


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    return eos


def _render(tokenizer, messages: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    template = None if _has_chat_template(tokenizer) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], chat_template=template,
                                         tokenize=False, add_generation_prompt=generation_prompt)


def _segments(tokenizer, example: Example) -> list[tuple[list[int], bool]]:
    """``(token ids, is a response)`` pieces whose concatenation is the example's training sequence.

    One turn (every form but chat): the prompt (:func:`prompt_ids`), then the answer and EOS.
    A conversation: rendered by the chat template (:data:`PLAIN_CHAT_TEMPLATE` without one) at each
    assistant turn, before it with the generation prompt and after it; what the template writes for
    the turn is a response, everything else is context. A response's tokens after its last EOS (a
    template's newline after the end-of-turn token) are context; a response with no EOS gets one.
    """
    if example.context is None:
        return [(prompt_ids(tokenizer, example.prompt), False),
                (_answer_ids(tokenizer, example.answer) + [_eos_id(tokenizer)], True)]
    messages = (*example.context, ("assistant", example.answer))
    eos = _eos_id(tokenizer)
    pieces: list[tuple[list[int], bool]] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before, after = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError("the chat template does not write this conversation's turns one after another (a "
                             "conversation rendered up to a turn is not the start of it rendered further), so the "
                             "assistant's turns cannot be told apart")
        context = tokenizer(before[len(done):], add_special_tokens=not done and not _has_chat_template(tokenizer))
        response = _answer_ids(tokenizer, after[len(before):])
        tail: list[int] = []
        if eos in response:
            last = len(response) - 1 - response[::-1].index(eos)
            response, tail = response[:last + 1], response[last + 1:]
        else:
            response = response + [eos]
        pieces += [(list(context["input_ids"]), False), (response, True)]
        if tail:
            pieces.append((tail, False))
        done = after
    return pieces


def context_ids(tokenizer, example: Example) -> list[int]:
    """The tokens before the example's (last) answer, exactly as training sees them: what generation
    continues. One turn: :func:`prompt_ids`."""
    if example.context is None:
        return prompt_ids(tokenizer, example.prompt)
    pieces = _segments(tokenizer, example)
    last = max(i for i, (_, response) in enumerate(pieces) if response)
    return [t for ids, _ in pieces[:last] for t in ids]


def encode(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = the example's context and responses (:func:`_segments`; one turn: ``prompt +
    answer + [EOS]``); ``labels`` are −100 outside the responses, so the loss covers the responses
    (and their EOS) only; ``attention_mask`` is all ones.

    Longer than ``max_length``: tokens go from the left (the question's start, earlier turns; the end
    of the chat template stays), the last answer is never cut — unless it and its EOS alone do not
    fit in ``max_length - 1``: then one token before it is kept (the last of the generation prompt),
    the answer is cut on the right to the remaining ``max_length - 1`` tokens and the EOS is dropped
    (the answer did not end there).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    pieces = _segments(tokenizer, example)
    last = max(i for i, (_, response) in enumerate(pieces) if response)
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if response else IGNORE_INDEX for piece, response in pieces for t in piece]
    start = sum(len(piece) for piece, _ in pieces[:last])  # where the last answer begins
    final = len(ids) - start  # the last answer and anything after it
    if len(ids) > max_length:
        if final <= max_length - 1:
            ids, labels = ids[-max_length:], labels[-max_length:]
        else:
            keep = max(start - 1, 0)  # one context token, to predict the answer's first
            ids = ids[keep:keep + max_length]
            labels = [IGNORE_INDEX] * (start - keep) + labels[start:keep + max_length]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def collate(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: ``input_ids`` with ``pad_id``, ``labels`` with −100,
    ``attention_mask`` with 0. Features hold lists or 1-D tensors; returns int64 tensors."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_id is None:
        raise ValueError("pad_id is None; use the tokenizer's pad or EOS id")
    length = max(len(f["input_ids"]) for f in features)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        value = fill.get(key, 0)
        rows = []
        for f in features:
            row = torch.as_tensor(f[key], dtype=torch.long)
            rows.append(torch.cat([row, row.new_full((length - row.numel(),), value)]))
        batch[key] = torch.stack(rows)
    return batch
