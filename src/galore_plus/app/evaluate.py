"""Evaluation of a causal LM on a task's examples: answer loss, greedy generation, answer metrics.

Application layer, like the data modules, whose :func:`~galore_plus.app.encoding.encode` and
:func:`~galore_plus.app.templates.context_ids` it shares so that what is scored is exactly what was trained:

- :func:`answer_loss`: teacher-forced cross-entropy over the answer tokens (and EOS) only,
  ``Σ token losses / number of answer tokens`` over the whole set (not a mean of batch means, which
  would weight short batches up); its exponential is the answer perplexity.
- :func:`generate`: batched greedy decoding with left padding; returns the new text only.
- :func:`extract_final` and :func:`evaluate`: exact-match accuracy of the final number for math
  (``#### N`` data), corpus BLEU (sacrebleu, 0–100) and mean ROUGE-L F-measure (rouge-score, 0–1)
  for text.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch

from .encoding import IGNORE_INDEX, answer_loss_sum, collate, encode
from .examples import NUMBER_RE, Example, normalize_number
from .templates import context_ids

__all__ = ["answer_loss", "generate", "extract_final", "evaluate", "evaluate_model", "check_prerequisites", "KINDS"]

KINDS = ("math", "text")
PROGRESS_MIN_BATCHES = 5
"""``generate`` shows a progress bar from this many batches on (``progress=None``)."""


@contextmanager
def _eval_mode(model):
    """Eval mode (restored on exit) with PEFT's DoRA caching: an unmerged DoRA layer otherwise
    recomputes ``B @ A`` and the norm of ``W + B @ A`` at every forward — at every generated token.
    The cached values are the same computation done once (bitwise-equal results, tested); they are
    dropped on exit, so weights changed afterwards are never scored with a stale norm."""
    was_training = model.training
    model.eval()
    try:
        with _dora_caching():
            yield
    finally:
        for module in model.modules():
            if hasattr(module, "_dora_cache"):
                module._dora_cache.clear()
        model.train(was_training)


def _dora_caching():
    try:
        from peft.helpers import DoraCaching
    except ImportError:  # no peft, or one without DoRA caching: nothing to cache
        return nullcontext()
    return DoraCaching()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_loss(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 512) -> float:
    """Mean cross-entropy per answer token, teacher-forced, over all ``examples``.

    Each example is encoded as in training (:func:`galore_plus.app.encoding.encode`, prompt masked, EOS
    scored). Runs under ``torch.no_grad()`` in eval mode and restores the model's mode. Only the
    logits from the earliest answer position of a batch on are computed (``logits_to_keep``, where
    the model takes it): a 49k vocabulary × 512 positions × 8 rows is 800 MB of float32 logits.
    """
    if not examples:
        raise ValueError("answer_loss needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features = [encode(tokenizer, ex, max_length) for ex in examples]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # less padding
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    trim = _takes_logits_to_keep(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate([features[i] for i in order[start:start + batch_size]], pad_id)
            labels = batch["labels"]
            length = labels.shape[1]
            answer = labels != IGNORE_INDEX
            # logits at position t predict token t + 1: start one before the first answer token.
            first = max(int(answer.int().argmax(dim=1).min()) - 1, 0)
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            if trim:
                logits = model(**inputs, logits_to_keep=length - first).logits
            else:
                logits = model(**inputs).logits[:, first:]
            targets = labels[:, first:].to(device)  # position t of logits predicts t + 1 of targets
            total += answer_loss_sum(logits, targets).double().cpu()
            count += int((targets[:, 1:] != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no answer tokens to score")
    return float(total / count)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in ([value] if isinstance(value, int) else (value or [])):
            if i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    return ids


def generate(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int = 8,
             progress: bool | None = None) -> list[str]:
    """Greedy answers to ``examples`` (in their order): the new text only, up to the first EOS.

    Prompts are :func:`galore_plus.app.templates.context_ids` (the training tokens), left-padded by hand with
    the pad token (EOS when there is none) — the tokenizer is not modified — and grouped by length
    to waste little padding. Stops at the tokenizer's EOS or any of the model's generation-config
    EOS ids. ``progress``: show a tqdm bar; ``None`` shows it from
    :data:`PROGRESS_MIN_BATCHES` batches on.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        return []
    prompts = [context_ids(tokenizer, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=eos_ids)
    device = _device(model)
    n_batches = -(-len(order) // batch_size)
    show = progress if progress is not None else n_batches >= PROGRESS_MIN_BATCHES
    from tqdm.auto import tqdm

    outputs: list[str] = [""] * len(prompts)
    with _eval_mode(model), torch.no_grad(), tqdm(total=n_batches, desc="generate", disable=not show) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in rows])
            attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            for i, new in zip(rows, out[:, width:].tolist()):
                stop = next((j for j, t in enumerate(new) if t in eos_ids), len(new))
                outputs[i] = tokenizer.decode(new[:stop], skip_special_tokens=True)
            bar.update(1)
    return outputs


def extract_final(text: str) -> str | None:
    """The final answer in ``text``: the first number after the last ``####`` if there is one,
    else the last number in the text; normalised (``"1,000"`` → ``"1000"``, ``"3.0"`` → ``"3"``).
    ``None`` if there is no number."""
    if "####" in text:
        match = NUMBER_RE.search(text[text.rindex("####") + 4:])
        if match:
            return normalize_number(match.group())
    numbers = NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def evaluate(model, tokenizer, task_examples: Sequence[Example], kind: str, *, max_new_tokens: int, batch_size: int,
             generate_answers: bool = True, max_length: int = 512, return_generations: bool = False) -> dict:
    """``{"n", "answer_loss", "perplexity"}`` (``exp(answer_loss)``) plus, when ``generate_answers``,
    ``"accuracy"`` (math: exact match of
    :func:`extract_final` of the greedy answer with ``example.final``) or ``"bleu"`` (sacrebleu
    corpus BLEU, 0–100) and ``"rouge_l"`` (mean rouge-score ROUGE-L F-measure with stemming, 0–1)
    for text. ``return_generations`` adds the generated texts under ``"generations"``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not task_examples:
        raise ValueError("evaluate needs at least one example")
    if kind == "math" and any(ex.final is None for ex in task_examples):
        raise ValueError("math examples need a final answer (Example.final)")
    loss = answer_loss(model, tokenizer, task_examples, batch_size=batch_size, max_length=max_length)
    result: dict = {"n": len(task_examples), "answer_loss": loss,
                    "perplexity": math.exp(loss) if loss < 700 else math.inf}
    if not generate_answers:
        return result
    generations = generate(model, tokenizer, task_examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if kind == "math":
        hits = sum(extract_final(g) == ex.final for g, ex in zip(generations, task_examples))
        result["accuracy"] = hits / len(task_examples)
    else:
        result.update(text_metrics([g.strip() for g in generations], [ex.answer for ex in task_examples]))
    if return_generations:
        result["generations"] = generations
    return result


#: what scoring each kind of task imports (module, package to install)
PREREQUISITES = {"math": (), "text": (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score"))}


def check_prerequisites(kind: str) -> None:
    """Raise ``ImportError`` if scoring ``kind`` needs a package that is not installed, so that a
    run finds out before training, not after it."""
    missing = [package for module, package in PREREQUISITES[kind] if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"{kind} data is scored with BLEU and ROUGE-L, which need {' and '.join(missing)}: "
                          f"pip install {' '.join(missing)}")


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"bleu": corpus BLEU 0–100, "rouge_l": mean ROUGE-L F-measure 0–1}``, one reference each."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - both are dependencies of the package
        raise ImportError("text metrics need `pip install sacrebleu rouge-score`") from exc
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {"bleu": float(bleu), "rouge_l": float(sum(scores) / len(scores))}


def evaluate_model(config, *, print_json: bool = False) -> dict:
    """``galore-plus evaluate``: :func:`evaluate` of ``config.model`` on ``config.data``, as ``finetune``
    evaluates (``config``: a checked :class:`~galore_plus.app.evaluate_config.EvaluateConfig`).

    A data file gives :func:`~galore_plus.app.tasks.eval_examples` (all of it, or the seeded sample of
    ``n_test`` that ``finetune --eval-data`` draws); a task gives the held-out set ``finetune`` draws
    for the same ``seed``, ``n_test`` (and ``split``, ``n_train``). Returns ``{"model", "data", "form",
    **metrics}``; ``print_json`` prints it, and ``config.output`` is written too.

    A model directory with a ``manifest.json`` (a run's ``final/``) is verified against it first; a
    model that does not load (a truncated weights file), or holds non-finite weights, is refused
    with one line; metrics that are not finite are refused too (the JSON written is always strict).
    """
    import json
    import sys
    from pathlib import Path

    from .checkpoint import MANIFEST, verify, write_json
    from .config import default_max_new_tokens, torch_dtype
    from .diagnosis import non_finite
    from .tasks import TASKS, eval_examples, load_task
    from .errors import CheckpointError, ConfigError, RunError
    from .models import load_model

    if config.data in TASKS:
        task = load_task(config.data, n_train=config.n_train, n_test=config.n_test, seed=config.seed,
                         split=config.split)
        kind, form, examples = task.kind, None, task.test
    else:
        kind, form, examples = eval_examples(config.data, config.n_test, config.seed)
    try:
        check_prerequisites(kind)
    except ImportError as err:
        raise ConfigError(str(err)) from None
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    if (Path(config.model) / MANIFEST).is_file():  # a run's final/ (issue 25): a flipped byte is an error
        try:
            verify(Path(config.model))
        except CheckpointError as err:
            raise CheckpointError(f"evaluate: --model {config.model}: {err}") from None
    try:
        model, tokenizer = load_model(config.model, seed=config.seed, dtype=torch_dtype(config.dtype, device))
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError on a truncated file
        if not isinstance(err, (OSError, ValueError)) and type(err).__name__ != "SafetensorError":
            raise
        raise ConfigError(f"--model {config.model} cannot be loaded: {' '.join(str(err).split())[:300]}") from None
    bad, first = non_finite(model)
    if bad:
        raise ConfigError(f"evaluate: --model {config.model} has {bad} non-finite weight entries (the first in "
                          f"{first}); its metrics would mean nothing")
    model.to(device)
    print(f"evaluating {config.model} on {len(examples)} examples of {config.data}...", file=sys.stderr)
    metrics = evaluate(model, tokenizer, examples, kind, batch_size=config.eval_batch_size,
                       max_new_tokens=config.max_new_tokens or default_max_new_tokens(config.data),
                       max_length=config.max_length)
    result = {"model": config.model, "data": config.data, "form": form, **metrics}
    try:
        text = json.dumps(result, indent=1, allow_nan=False)
    except ValueError:  # NaN or infinity: not JSON, and not a result
        shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
        raise RunError(f"evaluate: {config.model} gave non-finite metrics ({shown}); nothing was written") from None
    if config.output is not None:
        write_json(Path(config.output), result)
    if print_json:
        print(text)
    return result
