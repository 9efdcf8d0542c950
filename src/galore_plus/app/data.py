"""Fine-tuning data: math word problems and text-to-text pairs, prompts, token encodings, batches.

Application layer: nothing here is imported by the optimizers. Three sources, all
offline:

- ``"gsm_symbolic"``: reasoning-gym's symbolic GSM8K (~85 templates re-instantiated with new
  numbers); the target is a GSM8K-style worked solution ending in ``#### N``.
- ``"arithmetic"``: reasoning-gym's ``basic_arithmetic`` with 2–3 terms of 1–2 digits, the MAWPS
  analog: the target is the number alone.
- a local ``.jsonl`` file, GSM8K form ``{"question", "answer"}`` or text-to-text form
  ``{"input", "output"}``.

Training encodes ``prompt → answer + EOS`` with the loss on the answer only; evaluation
(``galore_plus.app.evaluate``) tokenizes prompts with the same :func:`prompt_ids`, so generation sees
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
    "DATA_CHOICES",
    "TASKS",
    "check_source",
    "load_task",
    "read_jsonl",
    "build_prompt",
    "prompt_ids",
    "encode",
    "collate",
    "normalize_number",
    "NUMBER_RE",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (prompt tokens and padding)."""

TASKS = ("arithmetic", "gsm_symbolic")
"""The built-in sources (generated offline by reasoning-gym); anything else is a ``.jsonl`` path."""
DATA_CHOICES = (*TASKS, "a path to a .jsonl file")
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

    ``prompt``: the question text (before any chat template). ``answer``: the text the model must
    produce (GSM8K form: the worked solution ending in ``#### N``). ``final``: the final answer
    as a normalised number string (``"42"``) for math data, ``None`` for text-to-text.
    ``template``: the reasoning-gym template index (gsm_symbolic only).
    """

    prompt: str
    answer: str
    final: str | None = None
    template: int | None = None


@dataclass
class Task:
    """Train and test examples of one data source; ``kind`` is ``"math"`` or ``"text"``.
    ``info`` records how the split was made (e.g. the held-out templates)."""

    name: str
    kind: str
    train: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)


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

def load_task(data: str, *, n_train: int, n_test: int, seed: int = 0, split: str = "question") -> Task:
    """Load ``data`` and split it into ``n_train`` training and ``n_test`` test examples.

    ``data``: ``"gsm_symbolic"``, ``"arithmetic"`` or a path to a ``.jsonl`` file (see the module
    docstring). ``split="question"``: no question is in both sets. ``split="template"``
    (gsm_symbolic only): no template is in both; the held-out templates are drawn by ``seed``,
    about ``n_test / (n_train + n_test)`` of them, and items are generated until both sets are
    full. The test set does not depend on ``n_train`` under the question split.
    """
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
        raise ValueError(f"n_train must be an integer >= 0, got {n_train!r}")
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    check_source(data, split)
    data = os.fspath(data)
    if data == "gsm_symbolic":
        return _gsm_symbolic(n_train, n_test, seed, split)
    if data == "arithmetic":
        return _arithmetic(n_train, n_test, seed)
    return _jsonl_task(data, n_train, n_test, seed)


def check_source(data: str, split: str = "question") -> None:
    """Raise :class:`DataError` unless ``data`` names a task or an existing ``.jsonl`` file and
    ``split`` suits it; reads nothing (the command calls it before anything slow)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a string or path, got {type(data).__name__}")
    data = os.fspath(data)
    if split == "template" and data != "gsm_symbolic":
        raise DataError(f"split 'template' needs data 'gsm_symbolic' (the only source with templates), got {data!r}")
    if data in TASKS:
        return
    forms = f"use {' or '.join(TASKS)}, or a .jsonl file (one JSON object per line: {_FORM_LIST})"
    if os.path.isdir(data):
        raise DataError(f"{data!r} is a directory; {forms}")
    if data.lower().endswith(".jsonl"):
        if not os.path.isfile(data):
            raise DataError(f"{data!r}: no such file")
        return
    if data.lower().endswith(".json"):
        raise DataError(f"{data!r} is a .json file; the data must be JSON Lines: {forms}")
    if os.path.exists(data):
        raise DataError(f"{data!r} is not a .jsonl file; {forms}")
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


def _gsm_symbolic(n_train: int, n_test: int, seed: int, split: str) -> Task:
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
        total = max(n_train + n_test, 1)
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


# ---------------------------------------------------------------------- JSONL files

_FORMS = {"gsm8k": ("question", "answer"), "text": ("input", "output")}
_FORM_NAMES = {"gsm8k": "GSM8K-form ('question', 'answer')", "text": "text-to-text ('input', 'output')"}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
_FORM_LIST = "GSM8K form 'question'/'answer' with the answer ending in '#### N', or 'input'/'output'"
_MAX_LISTED_ERRORS = 20


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_jsonl(path: str) -> tuple[str, list[Example]]:
    """Parse and check a whole ``.jsonl`` file; returns ``(kind, examples)`` in file order.

    Blank lines are skipped. Every other line must be a JSON object with string, non-empty
    ``question`` and ``answer`` (GSM8K form; the answer ends in ``#### N``, N a number) or
    ``input`` and ``output`` (text-to-text form), the same form on every line; other keys are
    ignored. All problems are collected first and raised together as one :class:`DataError`
    whose lines read ``FILE:LINE: what is wrong``.
    """
    errors: list[str] = []
    examples: list[Example] = []
    form: str | None = None
    form_line = 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                errors.append(f"{where}: expected a JSON object, got {_json_type(record)}")
                continue
            line_form, problem = _record_form(record)
            if problem:
                errors.append(f"{where}: {problem}")
                continue
            if form is None:
                form, form_line = line_form, lineno
            elif line_form != form:
                errors.append(f"{where}: {_FORM_NAMES[line_form]} line in a file of {_FORM_NAMES[form]} "
                              f"lines (see line {form_line}); use one form per file")
                continue
            problem = _record_problem(record, line_form)
            if problem:
                errors.append(f"{where}: {problem}")
                continue
            examples.append(_record_example(record, line_form))
    if errors:
        listed = errors[:_MAX_LISTED_ERRORS]
        if len(errors) > len(listed):
            listed.append(f"... and {len(errors) - len(listed)} more")
        raise DataError("\n".join(listed), errors)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return ("math" if form == "gsm8k" else "text"), examples


def _record_form(record: dict) -> tuple[str | None, str | None]:
    present = {form for form, keys in _FORMS.items() if any(k in record for k in keys)}
    if len(present) == 2:
        return None, "has keys of both forms ('question'/'answer' and 'input'/'output'); use one"
    if not present:
        keys = ", ".join(repr(k) for k in record) or "none"
        return None, (f"expected keys 'question' and 'answer' (GSM8K form) or 'input' and 'output' "
                      f"(text-to-text form); got {keys}")
    (form,) = present
    missing = [k for k in _FORMS[form] if k not in record]
    if missing:
        return None, f"missing key {missing[0]!r}"
    return form, None


def _record_problem(record: dict, form: str) -> str | None:
    for key in _FORMS[form]:
        value = record[key]
        if not isinstance(value, str):
            return f"{key!r} must be a string, got {_json_type(value)}"
        if not value.strip():
            return f"{key!r} is empty"
        try:  # JSON can escape a lone surrogate (\ud800), which no tokenizer can encode
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{key!r} holds a lone surrogate {value[exc.start]!r} at character {exc.start + 1}, not text"
    if form == "gsm8k":
        answer = record["answer"]
        if "####" not in answer:
            return "'answer' has no final '#### N' line"
        match = _FINAL_LINE.search(answer.rstrip())
        if match is None or normalize_number(match["number"]) is None:
            tail = answer[answer.rindex("####"):].strip()
            return (f"'answer' must end with '#### N', N a number of at most {MAX_DIGITS} digits; "
                    f"it ends with {tail[:40]!r}")
    return None


def _record_example(record: dict, form: str) -> Example:
    if form == "gsm8k":
        answer = record["answer"].strip()
        return Example(prompt=record["question"].strip(), answer=answer,
                       final=normalize_number(_FINAL_LINE.search(answer)["number"]))
    return Example(prompt=record["input"].strip(), answer=record["output"].strip())


def _jsonl_task(path: str, n_train: int, n_test: int, seed: int) -> Task:
    """Split by ``seed``: test gets ``n_test`` examples, train the rest, capped at ``n_train``.

    Examples with the same prompt (a text-to-text file may hold several references per input)
    stay on one side: whole prompts are drawn for test until it is full; the surplus of the last
    drawn prompt is dropped rather than put into train.
    """
    kind, examples = read_jsonl(path)
    if n_test > len(examples):
        raise DataError(f"{path}: {len(examples)} examples, fewer than n_test={n_test}")
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.prompt, []).append(ex)
    prompts = list(groups)
    random.Random(seed).shuffle(prompts)
    test: list[Example] = []
    rest = 0
    while len(test) < n_test:
        test.extend(groups[prompts[rest]])
        rest += 1
    test = test[:n_test]
    train = [ex for prompt in prompts[rest:] for ex in groups[prompt]][:n_train]
    if n_train > 0 and not train:
        raise DataError(f"{path}: {len(examples)} examples leave none for training after n_test={n_test}")
    name = os.path.splitext(os.path.basename(path))[0]
    info = {"split": "question", "seed": seed, "source": path, "n_file": len(examples)}
    return Task(name=name, kind=kind, train=train, test=test, info=info)


# ---------------------------------------------------------------------- tokens

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


def encode(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """``input_ids = prompt + answer + [EOS]``; ``labels`` are −100 over the prompt, so the loss
    covers the answer tokens and the EOS only; ``attention_mask`` is all ones.

    Longer than ``max_length``: the prompt loses tokens from its left (the question's start; the
    end of the chat template stays), the answer is never cut — unless the answer and EOS alone
    do not fit in ``max_length - 1``: then one prompt token is kept (the last of the generation
    prompt), the answer is cut on the right to the remaining ``max_length - 1`` tokens and the
    EOS is dropped (the answer did not end there).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    prompt = prompt_ids(tokenizer, example.prompt)
    target = _answer_ids(tokenizer, example.answer) + [_eos_id(tokenizer)]
    if len(prompt) + len(target) > max_length:
        if len(target) <= max_length - 1:
            prompt = prompt[len(prompt) - (max_length - len(target)):]
        else:
            prompt = prompt[-1:]
            target = target[: max_length - len(prompt)]
    return {
        "input_ids": prompt + target,
        "labels": [IGNORE_INDEX] * len(prompt) + target,
        "attention_mask": [1] * (len(prompt) + len(target)),
    }


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
