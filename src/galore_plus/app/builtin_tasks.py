"""The built-in tasks, generated offline by reasoning-gym: ``"gsm_symbolic"`` and ``"arithmetic"``
(:data:`TASKS`), each drawn as a seeded stream of de-duplicated examples split into train and test.

- ``"gsm_symbolic"``: reasoning-gym's symbolic GSM8K (~85 templates re-instantiated with new
  numbers); the target is a GSM8K-style worked solution ending in ``#### N``.
- ``"arithmetic"``: reasoning-gym's ``basic_arithmetic`` with 2–3 terms of 1–2 digits, the MAWPS
  analog: the target is the number alone.

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
import math
import operator
import random
from fractions import Fraction
from typing import Any, Iterator

from .examples import _FINAL_LINE, DataError, Example, Task, normalize_number

__all__ = ["TASKS", "SEED_STRIDE", "ARITHMETIC_CONFIG"]

TASKS = ("arithmetic", "gsm_symbolic")
"""The built-in sources (generated offline by reasoning-gym); anything else is a data file's path."""
SEED_STRIDE = 10**7
"""reasoning-gym seed = ``seed * SEED_STRIDE``: its item ``i`` uses ``Random(seed + i)``, so
consecutive seeds would otherwise share all but one item."""

ARITHMETIC_CONFIG = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, allow_parentheses=True,
                         allow_negation=False, format_style="simple", whitespace="single")
"""The MAWPS analog: 2–3 terms of 1–2 digits, + − × ÷ (exact), some parentheses, no "-(...)"."""


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
