"""What the model sees before its answer: a question in the tokenizer's chat template (or the plain
``Question: ...\\nAnswer: `` prompt without one, :func:`build_prompt`, :func:`prompt_ids`), and a
conversation split into context and response token pieces (:func:`_segments`), whose context
before the last answer (:func:`context_ids`) is exactly what training conditions on and
generation continues. ``--chat-template FILE`` replaces the tokenizer's own template
(:func:`use_chat_template`)."""

from __future__ import annotations

from typing import Sequence

from .errors import ConfigError
from .examples import Example

__all__ = ["PLAIN_CHAT_TEMPLATE", "build_prompt", "prompt_ids", "context_ids", "read_chat_template",
           "use_chat_template"]

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


_PROBE = ({"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"})
"""The conversation a ``--chat-template`` must render (its first message alone with the generation
prompt, then whole) before anything is trained with it."""


def read_chat_template(path: str) -> str:
    """The text of a ``--chat-template`` file (a Jinja template, as a tokenizer's ``chat_template``);
    a file that is missing, unreadable, not UTF-8 or empty is a one-line :class:`ConfigError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--chat-template {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as err:
        raise ConfigError(f"--chat-template {path}: cannot be read ({err.strerror})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty; give a Jinja chat template")
    return text


def use_chat_template(tokenizer, path: str) -> None:
    """Make the template in file ``path`` the tokenizer's own (``tokenizer.chat_template``: what
    ``apply_chat_template`` renders, so training and evaluation use it, and what ``save_pretrained``
    saves, so ``final/`` carries it). First a short conversation is rendered with it through
    transformers' own renderer (``apply_chat_template(..., chat_template=...)``, a sandboxed Jinja
    environment: nothing in the file runs outside it); a template that fails is a one-line
    :class:`ConfigError` naming the file (and the line of a syntax error)."""
    from jinja2 import TemplateSyntaxError

    text = read_chat_template(path)
    try:
        for messages, generation_prompt in ((_PROBE[:1], True), (_PROBE, False)):
            tokenizer.apply_chat_template([dict(m) for m in messages], chat_template=text, tokenize=False,
                                          add_generation_prompt=generation_prompt)
    except TemplateSyntaxError as err:
        raise ConfigError(f"--chat-template {path}:{err.lineno}: not a valid Jinja template: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - whatever the template raises rendering (raise_exception, 1/0, ...)
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise ConfigError(f"--chat-template {path}: cannot render a conversation ({type(err).__name__}): "
                          f"{message}") from None
    tokenizer.chat_template = text
