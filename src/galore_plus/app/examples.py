"""The data's shared vocabulary: what every source yields and every consumer reads — one
:class:`Example`, a :class:`Task` (a source's train/validation/test examples), the
:class:`DataError` a bad source raises — and the final-number rule (``#### N``) that marks a math
answer and scores a generated one (:func:`normalize_number`, :data:`NUMBER_RE`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, Sequence

__all__ = ["DataError", "Problem", "record_errors", "Example", "Task", "NUMBER_RE", "MAX_DIGITS", "normalize_number"]

MAX_LISTED_ERRORS = 20
"""Lines of a :class:`DataError` shown; the rest are counted (``... and N more``)."""


class DataError(ValueError):
    """Bad input data. For files, each line of the message reads ``FILE:LINE: what is wrong``;
    ``errors`` holds them all."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors) or [message]


class Problem(str):
    """What is wrong with one record (its text), and ``kind``: what the records with the same problem
    share, the text without this record's own details (a column number, a character); by default the
    text itself."""

    kind: str

    def __new__(cls, text: str, kind: str | None = None) -> "Problem":
        problem = super().__new__(cls, text)
        problem.kind = kind or text
        return problem


def record_errors(errors: Sequence[tuple[str, str]], totals: Mapping[str, int]) -> DataError:
    """One :class:`DataError` for records' problems, each reported once: ``errors`` are ``(where,
    problem)`` pairs in file order (``where``: ``FILE:LINE`` or ``FILE:record N``), ``totals`` each
    file's number of records. A problem of one record is ``FILE:LINE: problem``; the records of one
    file with the same problem (:class:`Problem`'s ``kind``) are one line, ``FILE: 37 of 200 records:
    problem (first at line 3)`` (the first one's own text after it where theirs differ)."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for where, problem in errors:
        source, colon, position = where.rpartition(":")
        if not colon:  # an example of a built-in task: "example 7"
            source, position = "", where
        groups.setdefault((source, getattr(problem, "kind", problem)), []).append((position, str(problem)))
    lines = []
    for (source, kind), found in groups.items():
        position, text = found[0]
        if len(found) == 1:
            lines.append(f"{source}:{position}: {text}" if source else f"{position}: {text}")
            continue
        total = totals.get(source)
        count = (f"all {total}" if total == len(found) else f"{len(found)} of {total}") if total else str(len(found))
        at = f"line {position}" if position.isdigit() else position
        same = all(other == text for _, other in found)
        what = f"{count} {'records' if source else 'examples'}: {text if same else kind} (first at {at}" + (
            ")" if same else f": {text})")
        lines.append(f"{source}: {what}" if source else what)
    listed = lines[:MAX_LISTED_ERRORS]
    if len(lines) > len(listed):
        listed.append(f"... and {len(lines) - len(listed)} more")
    return DataError("\n".join(listed), lines)


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


def _final_number(answer: str) -> str | None:
    match = _FINAL_LINE.search(answer.rstrip())
    return normalize_number(match["number"]) if match else None
