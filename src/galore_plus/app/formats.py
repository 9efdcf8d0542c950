"""Users' data files: reading ``.jsonl``, ``.json`` (an array of records), ``.parquet`` and
``.csv`` (with ``datasets``) and directories saved by ``datasets``' ``save_to_disk``, recognising each record's form (:data:`FORMS`: ``question``/``answer``
(GSM8K), ``input``/``output``, Alpaca ``instruction``/``input``/``output``,
``prompt``/``completion``, chat ``messages``), checking it and turning it into an
:class:`~galore_plus.app.examples.Example`; every problem is reported as ``FILE:LINE: what is
wrong`` (:func:`read_examples`), the records with the same problem on one line with their count."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from .examples import MAX_DIGITS, DataError, Example, Problem, _final_number, record_errors

__all__ = ["FILE_TYPES", "FORMS", "ROLES", "read_examples"]

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


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_examples(path: str, split: str = "train") -> tuple[str, str, list[Example]]:
    """Read and check a whole data file, or a directory saved by ``datasets``' ``save_to_disk`` (a
    ``DatasetDict``'s ``split``); returns ``(kind, form, examples)`` in file order.

    The file is read with ``datasets`` (``load_dataset("json" | "parquet" | "csv")``; CSV cells as
    text). Each record must be in one of :data:`FORMS`, the same form throughout; other keys are
    ignored; blank JSONL lines are skipped. ``kind`` is ``"math"`` for question/answer data and for
    any form whose every answer ends in ``#### N`` (scored by the final number), else ``"text"``.

    Every problem is collected first and raised together as one :class:`DataError` whose lines read
    ``FILE:LINE: what is wrong`` (JSON Lines and CSV: the record's line; a JSON array, Parquet or a
    saved dataset: ``FILE:record N``), or ``FILE: 37 of 200 records: what is wrong (first at line 3)``
    for a problem several records share (:func:`~galore_plus.app.examples.record_errors`). For JSON,
    Python's own parser then names the problem where ``datasets`` (pyarrow) cannot read a file or
    fills a missing key with null.
    """
    if os.path.isdir(path):
        return _examples(*_saved_records(path, split))
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


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets``, offline and quiet: a file it cannot read is reported by read_examples as
    FILE:LINE lines, not by its logger or progress bars."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_rows(path: str, builder: str) -> list[dict[str, Any]]:
    """The file's records, read by ``datasets`` into a throw-away cache (nothing is kept or downloaded)."""
    import tempfile

    with _quiet_datasets() as datasets:
        options: dict[str, Any] = {}
        if builder == "csv":  # every cell as text: "042" stays "042", "NA" and "" stay strings
            header = _csv_header(path)
            options = {"features": datasets.Features({name: datasets.Value("string") for name in header}),
                       "keep_default_na": False}
        with tempfile.TemporaryDirectory(prefix="galore-plus-data-") as cache:
            dataset = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train",
                                            cache_dir=cache, keep_in_memory=True, **options)
            return dataset.to_list()


def _saved_records(path: str, split: str) -> tuple[str, list[tuple[str, dict]]]:
    """``(name, records)`` of a directory saved by ``save_to_disk`` (``datasets.load_from_disk``: Arrow
    files and JSON, nothing that runs code): a ``Dataset``'s records, or a ``DatasetDict``'s ``split``'s
    (named ``DIR/split``, the directory that holds it); each record at ``NAME:record N``."""
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_from_disk(path, keep_in_memory=True)
        except _read_errors() as err:
            raise DataError(f"{path}: cannot be read as a dataset saved by save_to_disk: {_reason(err)}") from None
        name = path
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{path}: a DatasetDict without a {split!r} split (its splits: "
                                f"{', '.join(dataset)})")
            dataset, name = dataset[split], os.path.join(path, split)
        rows = dataset.to_list()
    return name, [(f"{name}:record {i}", {k: v for k, v in row.items() if v is not None})
                  for i, row in enumerate(rows, 1)]


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
    """A record that is not JSON: what is wrong with it (:attr:`problem`)."""

    problem: Problem

    def __new__(cls, text: str, kind: str) -> "_Unparsed":
        record = super().__new__(cls, text)
        record.problem = Problem(text, kind)
        return record


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
            records.append((where, _Unparsed(f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                             "not valid UTF-8")))
            continue
        if not line.strip():
            continue
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((where, _Unparsed(f"not valid JSON ({exc.msg} at column {exc.colno})", "not valid JSON")))
    return records


def _examples(path: str, records: list[tuple[str, Any]]) -> tuple[str, str, list[Example]]:
    """Check ``(where, record)`` pairs: one form throughout, every record well formed."""
    errors: list[tuple[str, str]] = []
    examples: list[Example] = []
    form: str | None = None
    form_where = ""
    for where, record in records:
        if isinstance(record, _Unparsed):
            errors.append((where, record.problem))
            continue
        if not isinstance(record, dict):
            errors.append((where, f"expected a JSON object, got {_json_type(record)}"))
            continue
        record_form, problem = _record_form(record)
        if problem:
            errors.append((where, problem))
            continue
        if form is None:
            form, form_where = record_form, where
        elif record_form != form:
            errors.append((where, f"a record of the {FORMS[record_form][0]} form in a file whose first record "
                                  f"({form_where}) is of the {FORMS[form][0]} form; use one form per file"))
            continue
        problem = _record_problem(record, record_form)
        if problem:
            errors.append((where, problem))
            continue
        examples.append(_record_example(record, record_form, where))
    if errors:
        raise record_errors(errors, {path: len(records)})
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
        return Problem(f"{key} holds a lone surrogate {value[exc.start]!r} at character {exc.start + 1}, not text",
                       f"{key} holds a lone surrogate, not text")
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
            return Problem(f"'answer' must end with '#### N', N a number of at most {MAX_DIGITS} digits; it ends "
                           f"with {tail[:40]!r}", f"'answer' must end with '#### N', N a number of at most "
                           f"{MAX_DIGITS} digits")
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
